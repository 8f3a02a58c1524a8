"""Mask branch: LabelMapSegmentor and SwinUNETRSegmentor (random weights, real MONAI network)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from textscf.errors import CheckpointError, InputError, PromptError
from textscf.segmentation import (
    LabelMapSegmentor,
    Segmentation,
    Segmentor,
    SwinUNETRSegmentor,
)
from textscf.spatial import grid_mismatch
from textscf.files import sha256_of, verify_sha256

REGIONS = ["liver", "spleen", "kidney"]


def _rotation_z(degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])


def _image_from_ijk(array: np.ndarray, spacing, origin, direction) -> sitk.Image:
    """sitk image from an (I, J, K) array."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    image.SetDirection(tuple(np.asarray(direction, float).ravel()))
    return image


def _arr(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize(), a.GetSpacing(), a.GetOrigin(), a.GetDirection()) == (
        b.GetSize(), b.GetSpacing(), b.GetOrigin(), b.GetDirection()
    )


# ----------------------------------------------------------------------------------------------------------------
# LabelMapSegmentor


@pytest.fixture
def planted():
    """A 20x16x12 label map with values 0, 7, 3, 12 planted in known boxes, oblique grid."""
    values = np.zeros((20, 16, 12), np.int16)
    values[2:8, 2:6, 1:4] = 7  # liver
    values[10:15, 3:9, 5:9] = 3  # spleen
    values[16:19, 10:14, 8:11] = 12  # kidney
    label_map = _image_from_ijk(values, (1.2, 0.9, 2.0), (-30.0, 12.5, 4.0), _rotation_z(25))
    image = _image_from_ijk(np.random.default_rng(0).normal(size=values.shape).astype(np.float32),
                            (1.2, 0.9, 2.0), (-30.0, 12.5, 4.0), _rotation_z(25))
    return values, label_map, image


def test_label_map_mapping_and_confidence(planted):
    values, label_map, image = planted
    seg = LabelMapSegmentor(label_map, [7, 3, 12], REGIONS).predict(image)
    assert isinstance(seg, Segmentation)
    assert seg.region_names == ["background", *REGIONS]
    assert seg.regions.GetPixelID() == sitk.sitkUInt16 and seg.confidence.GetPixelID() == sitk.sitkFloat32
    assert _same_grid(seg.regions, image) and _same_grid(seg.confidence, image)
    expected = np.select([values == 7, values == 3, values == 12], [1, 2, 3], 0)
    np.testing.assert_array_equal(_arr(seg.regions), expected)
    np.testing.assert_array_equal(seg.regions_array(), expected)
    assert seg.regions_array().dtype == np.int64
    assert np.all(seg.confidence_array() == 1.0)
    assert seg.probabilities is None


def test_label_map_float_integer_valued_accepted_and_tolerant_grid(planted):
    values, label_map, image = planted
    as_float = sitk.Cast(label_map, sitk.sitkFloat64)
    # float32-rounded NIfTI affines differ by ~1e-6 mm: must still count as the same grid.
    as_float.SetOrigin(tuple(np.array(label_map.GetOrigin()) + 2e-6))
    seg = LabelMapSegmentor(as_float, [7, 3, 12], REGIONS).predict(image)
    assert int((seg.regions_array() == 1).sum()) == int((values == 7).sum())
    assert seg.regions.GetOrigin() == image.GetOrigin()


def test_label_map_non_integer_rejected(planted):
    values, label_map, _ = planted
    bad = _image_from_ijk(values.astype(np.float32) + 0.25 * (values > 0), label_map.GetSpacing(),
                          label_map.GetOrigin(), np.array(label_map.GetDirection()).reshape(3, 3))
    with pytest.raises(InputError, match="not integer-valued.*nearest-neighbour"):
        LabelMapSegmentor(bad, [7, 3, 12], REGIONS)
    with pytest.raises(InputError, match="not an integer type"):
        LabelMapSegmentor(sitk.Image([4, 4, 4], sitk.sitkComplexFloat32), [1], ["liver"])


def test_label_map_unmapped_values(planted):
    values, label_map, image = planted
    with pytest.raises(InputError, match=r"2 label value\(s\) with no region/prompt: 3, 12.*--unmapped-labels background"):
        LabelMapSegmentor(label_map, [7], ["liver"])
    seg = LabelMapSegmentor(label_map, [7], ["liver"], unmapped="background").predict(image)
    np.testing.assert_array_equal(seg.regions_array(), (values == 7).astype(np.int64))


def test_label_map_absent_value_warns(planted):
    _, label_map, image = planted
    with pytest.warns(UserWarning, match=r"'bladder' \(label 99\)"):
        seg = LabelMapSegmentor(label_map, [7, 3, 12, 99], [*REGIONS, "bladder"]).predict(image)
    assert seg.num_regions == 5 and seg.regions_array().max() == 3


def test_label_map_sparse_large_values(planted):
    """Label values spanning millions take the np.unique path instead of a dense lookup table."""
    values, _, image = planted
    sparse = np.where(values == 7, 50_000_000, values.astype(np.int32))
    sparse[0, 0, 0] = -4
    label_map = _image_from_ijk(sparse, image.GetSpacing(), image.GetOrigin(),
                                np.array(image.GetDirection()).reshape(3, 3))
    seg = LabelMapSegmentor(label_map, [50_000_000, 12], ["liver", "kidney"], unmapped="background").predict(image)
    expected = np.select([sparse == 50_000_000, sparse == 12], [1, 2], 0)
    np.testing.assert_array_equal(seg.regions_array(), expected)
    with pytest.raises(InputError, match=r"no region/prompt: -4, 3\."):
        LabelMapSegmentor(label_map, [50_000_000, 12], ["liver", "kidney"])


def test_label_map_bad_arguments(planted):
    _, label_map, _ = planted
    with pytest.raises(InputError, match="3 entries but region_names has 2"):
        LabelMapSegmentor(label_map, [7, 3, 12], ["liver", "spleen"])
    with pytest.raises(PromptError, match="background"):
        LabelMapSegmentor(label_map, [1, 7, 3, 12], ["background", *REGIONS])
    with pytest.raises(PromptError, match="duplicates"):
        LabelMapSegmentor(label_map, [7, 3], ["liver", "liver"])
    with pytest.raises(InputError, match="label value 0"):
        LabelMapSegmentor(label_map, [0, 7, 3, 12], ["air", *REGIONS])
    with pytest.raises(InputError, match="unmapped"):
        LabelMapSegmentor(label_map, [7, 3, 12], REGIONS, unmapped="ignore")


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda im: sitk.Resample(im, [21, 16, 12], sitk.Transform(), sitk.sitkNearestNeighbor, im.GetOrigin(),
                                  im.GetSpacing(), im.GetDirection()), r"size \(21, 16, 12\) vs \(20, 16, 12\)"),
        (lambda im: _with(im, spacing=(1.2, 0.95, 2.0)), r"spacing .*differs by up to 0.05 mm"),
        (lambda im: _with(im, origin=tuple(np.array(im.GetOrigin()) + [0, 0, 3.0])), r"origin .*differs by up to 3 mm"),
        (lambda im: _with(im, direction=_rotation_z(35)), r"direction .*about 10 degrees"),
    ],
    ids=["size", "spacing", "origin", "direction"],
)
def test_label_map_grid_mismatch(planted, change, expected):
    _, label_map, image = planted
    segmentor = LabelMapSegmentor(change(label_map), [7, 3, 12], REGIONS, unmapped="background")
    with pytest.raises(InputError, match=expected) as info:
        segmentor.predict(image)
    message = str(info.value)
    assert "not on the image grid" in message and "resample the label map onto the image grid" in message


def _with(image: sitk.Image, spacing=None, origin=None, direction=None) -> sitk.Image:
    out = sitk.Image(image)
    if spacing is not None:
        out.SetSpacing(spacing)
    if origin is not None:
        out.SetOrigin(origin)
    if direction is not None:
        out.SetDirection(tuple(np.asarray(direction).ravel()))
    return out


def test_grid_mismatch_reports_every_property(planted):
    _, label_map, image = planted
    assert grid_mismatch(image, label_map) == []
    moved = _with(label_map, spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0))
    problems = grid_mismatch(image, moved)
    assert len(problems) == 2 and problems[0].startswith("spacing") and problems[1].startswith("origin")


@pytest.mark.data
def test_label_map_real_ct_example(shared_data):
    folder = shared_data / "abdomen"
    names = json.loads((folder / "ct_example_labels.json").read_text())
    label_map = sitk.ReadImage(str(folder / "ct_example_labels.nii.gz"))
    image = sitk.ReadImage(str(folder / "ct_example.nii.gz"))
    values = [int(v) for v in names]
    seg = LabelMapSegmentor(label_map, values, list(names.values())).predict(image)
    raw = _arr(label_map).astype(np.int64)
    counts = np.bincount(raw.ravel())
    region_counts = np.bincount(seg.regions_array().ravel(), minlength=len(values) + 1)
    assert seg.num_regions == len(values) + 1 == 62
    for index, value in enumerate(values, start=1):
        assert region_counts[index] == counts[value], names[str(value)]
    assert region_counts[0] == counts[0]
    assert region_counts.sum() == raw.size and region_counts[1:].sum() > 0
    assert _same_grid(seg.regions, image)


# ----------------------------------------------------------------------------------------------------------------
# SwinUNETRSegmentor


N_CLASSES = len(REGIONS) + 1
ROI = (64, 64, 64)
SPACING = (3.0, 3.0, 3.0)


def _swin_state(feature_size: int = 12, out_channels: int = N_CLASSES, seed: int = 0) -> dict:
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(seed)
    net = SwinUNETR(in_channels=1, out_channels=out_channels, feature_size=feature_size)
    # Random weights give nearly uniform softmax; scale the head so the argmax is not a coin toss.
    with torch.no_grad():
        net.out.conv.conv.weight.mul_(20.0)
    return net.state_dict()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("swin") / "swin_tiny.pt"
    torch.save(_swin_state(), path)
    return path


@pytest.fixture(scope="module")
def segmentor(weights_file):
    return SwinUNETRSegmentor(weights_file, REGIONS, feature_size=12, roi_size=ROI, target_spacing=SPACING,
                              keep_probabilities=True)


def _ct_like(size=(48, 40, 36), seed=1) -> np.ndarray:
    """(I, J, K) HU-like volume: air outside, soft tissue body, two bright blobs."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in size], indexing="ij"))
    body = (grid[0] ** 2 + grid[1] ** 2) < 0.8
    volume = np.where(body, 40.0, -1000.0) + rng.normal(0, 20, size)
    volume[((grid - np.array([0.3, 0.2, 0.0])[:, None, None, None]) ** 2).sum(0) < 0.05] = 200.0
    volume[((grid + np.array([0.3, 0.1, 0.2])[:, None, None, None]) ** 2).sum(0) < 0.04] = 120.0
    return volume.astype(np.float32)


@pytest.fixture(scope="module")
def oblique_prediction(segmentor):
    direction = _rotation_z(20) @ np.diag([1.0, -1.0, -1.0])  # a proper rotation, far from RAS and LPS
    image = _image_from_ijk(_ct_like(), (2.5, 2.5, 2.5), (-60.0, 45.0, 130.0), direction)
    return image, segmentor.predict(image)


def test_swin_predict_grid_and_probabilities(segmentor, oblique_prediction):
    image, seg = oblique_prediction
    assert isinstance(segmentor, Segmentor)
    assert seg.region_names == ["background", *REGIONS]
    assert _same_grid(seg.regions, image) and _same_grid(seg.confidence, image)
    assert seg.regions.GetPixelID() == sitk.sitkUInt16 and seg.confidence.GetPixelID() == sitk.sitkFloat32
    probs = seg.probabilities
    assert probs.shape == (N_CLASSES, 48, 40, 36) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    assert probs.min() >= 0.0
    confidence, labels = seg.confidence_array(), seg.regions_array()
    assert confidence.min() >= 1.0 / N_CLASSES - 1e-5 and confidence.max() <= 1.0
    np.testing.assert_allclose(confidence, probs.max(axis=0), atol=1e-6)
    assert labels.max() < N_CLASSES
    np.testing.assert_array_equal(labels, probs.argmax(axis=0))
    assert len(np.unique(labels)) >= 2  # not a constant map


def test_swin_matches_direct_monai_inference_on_network_grid(segmentor):
    """On a RAS grid at target spacing the resampling is the identity: compare with MONAI called directly."""
    from monai.inferers import sliding_window_inference

    volume = _ct_like((40, 36, 30), seed=2)  # 30 < 64: the sliding window pads
    image = _image_from_ijk(volume, SPACING, (12.0, -7.0, 3.0), np.diag([-1.0, -1.0, 1.0]))
    seg = segmentor.predict(image)
    scaled = np.clip((volume + 175.0) / 425.0, 0.0, 1.0)
    with torch.no_grad():
        logits = sliding_window_inference(torch.from_numpy(scaled)[None, None], ROI, 1, segmentor.network, overlap=0.5)
    expected = torch.softmax(logits, 1)[0].numpy()
    np.testing.assert_allclose(seg.probabilities, expected, atol=2e-4)


def test_swin_is_consistent_in_physical_space(segmentor, oblique_prediction):
    """The same voxels stored with flipped axes (same physical points) give the same per-voxel result."""
    image, seg = oblique_prediction
    array = _arr(image)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = np.array(image.GetSpacing())
    size = np.array(image.GetSize())
    # Flip i and k: new voxel (0, j, 0) is old (I-1, j, K-1).
    flipped_origin = np.array(image.GetOrigin()) + direction @ (spacing * [size[0] - 1, 0, size[2] - 1])
    flipped = _image_from_ijk(array[::-1, :, ::-1], spacing, flipped_origin, direction @ np.diag([-1.0, 1.0, -1.0]))
    seg_flipped = segmentor.predict(flipped)
    np.testing.assert_allclose(seg_flipped.probabilities[:, ::-1, :, ::-1], seg.probabilities, atol=1e-4)


def test_swin_without_kept_probabilities_gives_same_result(segmentor, weights_file, oblique_prediction):
    """The streaming path (no (N, I, J, K) array kept) gives the same labels and confidence."""
    image, _ = oblique_prediction
    lean = SwinUNETRSegmentor(weights_file, REGIONS, feature_size=12, roi_size=ROI, target_spacing=SPACING)
    grid = segmentor._network_grid(image)
    logits = torch.randn(N_CLASSES, *grid.GetSize(), generator=torch.Generator().manual_seed(5)) * 3
    probs = torch.softmax(logits, 0).numpy()
    full = segmentor._back_to_image_grid(probs, grid, image)
    fast = lean._back_to_image_grid(probs, grid, image)
    assert fast.probabilities is None
    np.testing.assert_array_equal(fast.regions_array(), full.regions_array())
    np.testing.assert_allclose(fast.confidence_array(), full.probabilities.max(axis=0), atol=1e-6)
    np.testing.assert_allclose(full.probabilities.sum(axis=0), 1.0, atol=1e-5)


def test_swin_wrapped_prefixed_bundle_layout(tmp_path):
    state = {"module." + k: v for k, v in _swin_state(seed=3).items()}
    (tmp_path / "bundle" / "models").mkdir(parents=True)
    torch.save({"state_dict": state, "epoch": 7}, tmp_path / "bundle" / "models" / "model.pt")
    loaded = SwinUNETRSegmentor(tmp_path / "bundle", REGIONS, feature_size=12, roi_size=ROI)
    reference = _swin_state(seed=3)
    for key, value in loaded.network.state_dict().items():
        assert torch.equal(value, reference[key]), key
    with pytest.raises(CheckpointError, match="no models/model.pt"):
        SwinUNETRSegmentor(tmp_path, REGIONS, feature_size=12, roi_size=ROI)


def test_swin_wrong_feature_size_or_classes(tmp_path, weights_file):
    with pytest.raises(CheckpointError, match="feature_size=12, not 24") as info:
        SwinUNETRSegmentor(weights_file, REGIONS, feature_size=24, roi_size=ROI)
    assert "mis-shaped" in str(info.value)
    with pytest.raises(CheckpointError, match=r"has 4 output classes but 3 were requested") as info:
        SwinUNETRSegmentor(weights_file, REGIONS[:2], feature_size=12, roi_size=ROI)
    assert "out.conv.conv.weight" in str(info.value)
    partial = {k: v for k, v in torch.load(weights_file, weights_only=True).items() if not k.startswith("decoder1.")}
    partial["extra.weight"] = torch.zeros(1)
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"missing \(decoder1\..*unexpected \(extra.weight\)"):
        SwinUNETRSegmentor(tmp_path / "partial.pt", REGIONS, feature_size=12, roi_size=ROI)


def test_swin_unreadable_and_bad_arguments(tmp_path, weights_file):
    with pytest.raises(CheckpointError, match="not found"):
        SwinUNETRSegmentor(tmp_path / "absent.pt", REGIONS, feature_size=12, roi_size=ROI)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(weights_file.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cannot read"):
        SwinUNETRSegmentor(truncated, REGIONS, feature_size=12, roi_size=ROI)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        SwinUNETRSegmentor(tmp_path / "list.pt", REGIONS, feature_size=12, roi_size=ROI)
    with pytest.raises(InputError, match="roi_size"):
        SwinUNETRSegmentor(weights_file, REGIONS, feature_size=12, roi_size=(32, 32, 32))
    with pytest.raises(InputError, match="intensity_window"):
        SwinUNETRSegmentor(weights_file, REGIONS, feature_size=12, roi_size=ROI, intensity_window=(250, -175))


def test_sha256_verification(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"textscf")
    good = sha256_of(path)
    assert good == hashlib.sha256(b"textscf").hexdigest()
    verify_sha256(path, good.upper())  # case-insensitive, no exception
    assert path.exists()
    with pytest.raises(CheckpointError, match="SHA-256 mismatch.*removed"):
        verify_sha256(path, "0" * 64)
    assert not path.exists()

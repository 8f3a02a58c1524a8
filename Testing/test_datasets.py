"""Loaders of the shared real data and of a user's data, label -> region lookup, and the training pair dataset."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from textscf.datasets import (
    BTCV_ANATOMICAL_DIRECTION,
    BTCV_SPLIT,
    Augmentation,
    PairDataset,
    Subject,
    brain_eval_labels,
    brain_subjects,
    label_values_to_regions,
    load_brain_npz,
    load_btcv_labels,
    load_folder_pairs,
    load_learn2reg_dataset,
    oasis_pair,
    ordered_pairs,
)
from textscf.errors import InputError
from textscf.phantom import make_abdomen_phantom
from textscf.spatial import IntensityNormaliser

SMALL = dict(shape=(48, 40, 64), spacing=(8.0, 8.0, 8.0))


# ---------------------------------------------------------------------------------------------- shared real data


def test_brain_subjects(shared_data):
    subjects = brain_subjects(shared_data)
    assert [s.name for s in subjects] == ["vxm", "l2r"]
    eval_labels = brain_eval_labels(shared_data)
    assert len(eval_labels) == 30 and eval_labels[:3] == [2, 3, 4] and eval_labels[-1] == 63
    for s in subjects:
        assert s.shape == (160, 192, 224)
        assert s.image.dtype == np.float32 and s.labels.dtype == np.int16
        assert 0.0 <= s.image.min() and s.image.max() <= 1.0
        assert s.spacing == (1.0, 1.0, 1.0) and s.origin == (0.0, 0.0, 0.0)
        present = set(np.unique(s.labels).tolist())
        assert set(eval_labels) <= present and 0 in present
    # two different subjects on one grid, overlapping but not identical
    a, b = (label_values_to_regions(s.labels, eval_labels) for s in subjects)
    overlap = np.mean([2 * ((a == r) & (b == r)).sum() / ((a == r).sum() + (b == r).sum()) for r in range(1, 31)])
    assert 0.4 < overlap < 0.7


def test_load_brain_npz_keys(shared_data, tmp_path):
    path = shared_data / "brain" / "subject_vxm.npz"
    assert load_brain_npz(path).shape == (160, 192, 224)  # 'vol' by default
    assert set(np.unique(load_brain_npz(path, "seg"))) >= {0, 2, 41}
    with pytest.raises(InputError, match="no array 'label'"):
        load_brain_npz(path, "label")
    with pytest.raises(InputError, match="not found"):
        load_brain_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "one.npz", whatever=np.zeros((2, 3, 4)))
    assert load_brain_npz(tmp_path / "one.npz").shape == (2, 3, 4)


def test_oasis_pair(shared_data):
    a, b = oasis_pair(shared_data)
    for s in (a, b):
        assert s.shape == (160, 192, 144)
        assert set(np.unique(s.labels).tolist()) == {0, 1, 2}
        assert s.spacing == (1.0, 1.0, 1.0)
        image, labels = s.image_sitk(), s.labels_sitk()
        assert image.GetSize() == (160, 192, 144) and labels.GetSpacing() == image.GetSpacing()
    assert not np.array_equal(a.labels, b.labels)


def test_btcv_split_and_pairs(shared_data):
    assert [len(BTCV_SPLIT[k]) for k in ("train", "val", "test")] == [20, 3, 7]
    assert BTCV_SPLIT["train"][:2] == ["0001", "0002"] and BTCV_SPLIT["train"][10] == "0021"
    assert BTCV_SPLIT["val"] == ["0031", "0032", "0033"] and BTCV_SPLIT["test"][-1] == "0040"
    everything = sum(BTCV_SPLIT.values(), [])
    assert len(set(everything)) == 30
    assert all((shared_data / "abdomen" / "btcv_labels" / f"{i}.nii.gz").is_file() for i in everything)
    pairs = ordered_pairs(BTCV_SPLIT["test"])
    assert len(pairs) == 42 and len(set(pairs)) == 42
    assert all(m != f for m, f in pairs) and ("0034", "0035") in pairs and ("0035", "0034") in pairs


def test_load_btcv_labels(shared_data):
    subjects = load_btcv_labels(shared_data, ["0034", 35])
    assert [s.name for s in subjects] == ["0034", "0035"]
    for s in subjects:
        assert s.image is None
        assert s.shape == (192, 160, 256) and s.spacing == (2.0, 2.0, 2.0)
    assert set(np.unique(subjects[0].labels).tolist()) == set(range(14))
    assert set(np.unique(subjects[1].labels).tolist()) == set(range(14)) - {4}  # 0035 has no gall bladder
    # the header as on disk (RAS identity) unless the anatomical direction is asked for
    assert subjects[0].direction == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    (fixed,) = load_btcv_labels(shared_data, ["0034"], anatomical_orientation=True)
    assert fixed.direction == tuple(BTCV_ANATOMICAL_DIRECTION)
    liver = np.array(ndimage.center_of_mass(fixed.labels == 6))
    spleen = np.array(ndimage.center_of_mass(fixed.labels == 1))
    liver_lps, spleen_lps = (fixed.affine @ np.r_[c, 1.0] for c in (liver, spleen))
    assert liver_lps[0] < spleen_lps[0]  # LPS x grows to the left: the liver is on the right
    with pytest.raises(InputError, match="not found"):
        load_btcv_labels(shared_data, ["0011"])
    with pytest.raises(InputError, match="not a number"):
        load_btcv_labels(shared_data, ["abc"])


# ---------------------------------------------------------------------------------------------- a user's data


def write(array: np.ndarray, path, spacing=(2.0, 3.0, 4.0), origin=(5.0, -6.0, 7.0)):
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
    sitk.WriteImage(image, str(path))


def make_cases(folder, names, shape=(10, 12, 14), image_suffix="_0000"):
    rng = np.random.default_rng(0)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    arrays = {}
    for n, name in enumerate(names):
        image = rng.normal(size=shape).astype(np.float32)
        labels = np.zeros(shape, np.uint8)
        labels[2:5, 3:6, 4 + n : 8 + n] = 3
        write(image, folder / "imagesTr" / f"{name}{image_suffix}.nii.gz")
        write(labels, folder / "labelsTr" / f"{name}.nii.gz")
        arrays[name] = (image, labels)
    return arrays


def test_learn2reg_dataset(tmp_path):
    arrays = make_cases(tmp_path, ["Abd_0001", "Abd_0002", "Abd_0003"])
    (tmp_path / "imagesTs").mkdir()
    write(np.ones((10, 12, 14), np.float32), tmp_path / "imagesTs" / "Abd_0009_0000.nii.gz")
    meta = {
        "name": "Abd",
        "training": [
            {"image": f"./imagesTr/Abd_000{i}_0000.nii.gz", "label": f"./labelsTr/Abd_000{i}.nii.gz"} for i in (1, 2, 3)
        ],
        "registration_val": [
            {"fixed": "./imagesTr/Abd_0002_0000.nii.gz", "moving": "./imagesTr/Abd_0003_0000.nii.gz"},
            {"fixed": "./imagesTr/Abd_0001_0000.nii.gz", "moving": "./imagesTs/Abd_0009_0000.nii.gz"},
        ],
    }
    (tmp_path / "Abd_dataset.json").write_text(json.dumps(meta))
    subjects, pairs = load_learn2reg_dataset(tmp_path / "Abd_dataset.json")
    assert [s.name for s in subjects] == ["Abd_0001_0000", "Abd_0002_0000", "Abd_0003_0000", "Abd_0009_0000"]
    assert pairs == [(2, 1), (3, 0)]  # (moving, fixed)
    first = subjects[0]
    np.testing.assert_array_equal(first.image, arrays["Abd_0001"][0])
    np.testing.assert_array_equal(first.labels, arrays["Abd_0001"][1])
    assert first.labels.dtype == np.int16 and first.image.dtype == np.float32
    assert first.spacing == (2.0, 3.0, 4.0) and first.origin == (5.0, -6.0, 7.0)
    assert first.direction == (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    assert subjects[3].labels is None
    # round trip back to SimpleITK keeps the geometry
    image = first.image_sitk()
    assert image.GetSize() == (10, 12, 14) and image.GetDirection() == first.direction


def test_learn2reg_dataset_errors(tmp_path):
    make_cases(tmp_path, ["A_0001"])
    path = tmp_path / "d.json"
    with pytest.raises(InputError, match="not found"):
        load_learn2reg_dataset(path)
    path.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_learn2reg_dataset(path)
    path.write_text(json.dumps({"training": [{"image": "./imagesTr/missing.nii.gz"}]}))
    with pytest.raises(InputError, match="missing.nii.gz"):
        load_learn2reg_dataset(path)
    write(np.zeros((4, 4, 4), np.uint8), tmp_path / "labelsTr" / "small.nii.gz")
    path.write_text(
        json.dumps({"training": [{"image": "./imagesTr/A_0001_0000.nii.gz", "label": "./labelsTr/small.nii.gz"}]})
    )
    with pytest.raises(InputError, match="resample the label map"):
        load_learn2reg_dataset(path)


def test_load_folder_pairs(tmp_path):
    arrays = make_cases(tmp_path, ["case1", "case2"])
    write(np.zeros((10, 12, 14), np.float32), tmp_path / "imagesTr" / "case3.nii.gz")  # no _0000 suffix
    write(np.zeros((10, 12, 14), np.uint8), tmp_path / "labelsTr" / "case3.nii.gz")
    (tmp_path / "imagesTr" / "notes.txt").write_text("ignored")
    subjects = load_folder_pairs(tmp_path / "imagesTr", tmp_path / "labelsTr")
    assert [s.name for s in subjects] == ["case1", "case2", "case3"]
    np.testing.assert_array_equal(subjects[1].labels, arrays["case2"][1])
    (tmp_path / "labelsTr" / "case2.nii.gz").unlink()
    with pytest.raises(InputError, match="case2_0000.nii.gz"):
        load_folder_pairs(tmp_path / "imagesTr", tmp_path / "labelsTr")
    write(np.zeros((10, 12, 13), np.uint8), tmp_path / "labelsTr" / "case2.nii.gz")
    with pytest.raises(InputError, match="size"):
        load_folder_pairs(tmp_path / "imagesTr", tmp_path / "labelsTr")
    with pytest.raises(InputError, match="label folder not found"):
        load_folder_pairs(tmp_path / "imagesTr", tmp_path / "nowhere")


def test_subject_validation():
    with pytest.raises(InputError, match="neither"):
        Subject("x", None, None)
    with pytest.raises(InputError, match="differs"):
        Subject("x", np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 5), np.int16))
    s = Subject("x", None, np.zeros((2, 3, 4), np.int16), spacing=(2, 2, 3), origin=(1, 2, 3))
    np.testing.assert_allclose(s.affine @ [1, 1, 1, 1], [3, 4, 6, 1])


# ---------------------------------------------------------------------------------------------- regions


def test_label_values_to_regions():
    labels = np.array([[[0, 2, 41, 7], [17, 53, 99, 2]]], np.int16)
    regions = label_values_to_regions(labels, [2, 41, [17, 53]])
    assert regions.dtype == np.int64
    np.testing.assert_array_equal(regions, [[[0, 1, 2, 0], [3, 3, 0, 1]]])
    with pytest.raises(InputError, match=r"\[7, 99\]"):
        label_values_to_regions(labels, [2, 41, [17, 53]], unknown="error")
    np.testing.assert_array_equal(label_values_to_regions(labels, [2, 41, 17, 53, 7, 99], unknown="error")[0, 1],
                                  [3, 4, 6, 1])
    with pytest.raises(InputError, match="regions 1 and 3"):
        label_values_to_regions(labels, [2, 41, 2])
    with pytest.raises(InputError, match="background"):
        label_values_to_regions(labels, [0, 41])
    with pytest.raises(InputError, match="unknown"):
        label_values_to_regions(labels, [2], unknown="drop")
    huge = np.array([0, 10**8, -(10**8), 5], np.int64)  # sparse values take the sort-based path
    np.testing.assert_array_equal(label_values_to_regions(huge, [5, 10**8]), [0, 2, 0, 1])
    negative = np.array([-3, 0, 4], np.int8)
    np.testing.assert_array_equal(label_values_to_regions(negative, [4, -3]), [2, 0, 1])


# ---------------------------------------------------------------------------------------------- training pairs


@pytest.fixture(scope="module")
def phantom_subjects():
    out = []
    for seed in range(3):
        ct, labels = make_abdomen_phantom(seed=seed, variation=0.5, **SMALL)
        out.append(Subject.from_sitk(f"p{seed}", ct, labels))
    return out


def test_pair_dataset_shapes_and_types(phantom_subjects):
    ds = PairDataset(phantom_subjects, list(range(1, 14)), normalise=IntensityNormaliser("ct_window", (-500, 800)))
    assert len(ds) == 6 and ds.num_regions == 14
    item = ds[1]
    assert (item["moving_name"], item["fixed_name"]) == ("p0", "p2")
    for key in ("moving", "fixed"):
        assert item[key].shape == (1, 48, 40, 64) and item[key].dtype == torch.float32
        assert 0.0 <= item[key].min() and item[key].max() <= 1.0
        assert item[f"{key}_regions"].shape == (1, 48, 40, 64) and item[f"{key}_regions"].dtype == torch.int64
    np.testing.assert_array_equal(item["fixed_regions"][0].numpy(), phantom_subjects[2].labels)
    expected = np.clip((phantom_subjects[0].image + 500) / 1300, 0, 1)
    np.testing.assert_allclose(item["moving"][0].numpy(), expected, atol=1e-6)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["moving"].shape == (2, 1, 48, 40, 64) and batch["fixed_regions"].shape == (2, 1, 48, 40, 64)
    # the given pairs only, regions from a subset of labels, min-max normalisation by default
    ds = PairDataset(phantom_subjects, [6, [2, 3]], pairs=[(2, 0)])
    item = ds[0]
    assert len(ds) == 1 and item["moving_name"] == "p2"
    assert set(np.unique(item["moving_regions"]).tolist()) == {0, 1, 2}
    assert item["moving"].min() == 0.0 and item["moving"].max() == 1.0
    with pytest.raises(IndexError):
        ds[1]


def test_pair_dataset_rejects_bad_input(phantom_subjects):
    no_image = Subject("labels only", None, phantom_subjects[0].labels)
    with pytest.raises(InputError, match="lacks an image"):
        PairDataset([phantom_subjects[0], no_image], [6])
    other = Subject("other", np.zeros((8, 8, 8), np.float32), np.zeros((8, 8, 8), np.int16))
    with pytest.raises(InputError, match="different shapes"):
        PairDataset([phantom_subjects[0], other], [6])
    with pytest.raises(InputError, match="out of range"):
        PairDataset(phantom_subjects, [6], pairs=[(0, 3)])
    with pytest.raises(InputError, match="at least two"):
        PairDataset(phantom_subjects[:1], [6])


def test_augmentation_keeps_image_and_labels_aligned(phantom_subjects):
    # the image is the liver mask: its 0.5 iso-surface after trilinear warping must match the warped liver label
    subjects = [
        Subject(s.name, (s.labels == 6).astype(np.float32), s.labels, spacing=s.spacing) for s in phantom_subjects
    ]
    spatial_only = Augmentation(
        rotation_deg=10.0, scale=0.1, translation_mm=10.0, elastic_mm=8.0, gamma=0.0, intensity_scale=0.0, noise_std=0.0
    )
    ds = PairDataset(subjects, list(range(1, 14)), augment=spatial_only, normalise=lambda x: x, seed=3)
    for n in range(3):
        item = ds[n]
        for role, subject in (("moving", ds.pairs[n][0]), ("fixed", ds.pairs[n][1])):
            from_image = item[role][0].numpy() > 0.5
            from_labels = item[f"{role}_regions"][0].numpy() == 6
            assert 2 * (from_image & from_labels).sum() / (from_image.sum() + from_labels.sum()) > 0.95
            offset = np.array(ndimage.center_of_mass(from_image)) - np.array(ndimage.center_of_mass(from_labels))
            assert np.abs(offset).max() < 0.2  # voxels
            # and the augmentation did move the liver
            original = subjects[subject].labels == 6
            assert 2 * (original & from_labels).sum() / (original.sum() + from_labels.sum()) < 0.93


def test_augmentation_is_deterministic(phantom_subjects):
    ds = PairDataset(phantom_subjects, list(range(1, 14)), augment=True, seed=7)
    first, again = ds[0], ds[0]
    for key in ("moving", "fixed", "moving_regions", "fixed_regions"):
        assert torch.equal(first[key], again[key])
    same_seed = PairDataset(phantom_subjects, list(range(1, 14)), augment=True, seed=7)[0]
    assert torch.equal(first["moving"], same_seed["moving"])
    other_seed = PairDataset(phantom_subjects, list(range(1, 14)), augment=True, seed=8)[0]
    assert not torch.equal(first["moving"], other_seed["moving"])
    ds.set_epoch(1)
    assert not torch.equal(first["moving_regions"], ds[0]["moving_regions"])
    ds.set_epoch(0)
    assert torch.equal(first["moving_regions"], ds[0]["moving_regions"])
    # intensity jitter stays in [0, 1] and changes the image
    plain = PairDataset(phantom_subjects, list(range(1, 14)))[0]
    assert 0.0 <= first["moving"].min() and first["moving"].max() <= 1.0
    assert not torch.equal(first["moving"], plain["moving"])


def test_normalisers():
    minmax = IntensityNormaliser("minmax")
    np.testing.assert_allclose(minmax(np.array([2.0, 4.0, 6.0])), [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(minmax(np.full(3, 5.0)), [0.0, 0.0, 0.0])
    window = IntensityNormaliser("ct_window", (-100, 100))
    np.testing.assert_allclose(window(np.array([-500.0, 0.0, 50.0, 900.0])), [0, 0.5, 0.75, 1])
    with pytest.raises(InputError, match="high > low"):
        IntensityNormaliser("ct_window", (10, 10))(np.zeros(2))
    with pytest.raises(InputError, match="unknown intensity normalisation"):
        IntensityNormaliser("zscore")

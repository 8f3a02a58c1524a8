"""The memory savings of ``register`` and its outputs change no result: in-place SDlogJ, Dice/HD95 on views of the
label images, the field released before its image is built, float32 fields written without a float64 copy, and the
CLI's peak memory per stage."""
import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

from textscf import deformation, metrics
from textscf import io as tio
from textscf.cli import _StagePeaks, peak_rss_mib
from textscf.phantom import random_smooth_displacement
from textscf.pipeline import Prompts, region_metrics
from textscf.spatial import ModelGrid, image_to_array

SPACING = (1.2, 0.9, 2.0)


def _labels(shape=(36, 30, 32), seed=1):
    """Two label maps ``(I, J, K)`` int32 with noisy blobs, one touching the volume edge."""
    rng = np.random.default_rng(seed)
    x = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))

    def blob(centre, radii):
        return sum(((x[a] - centre[a]) / radii[a]) ** 2 for a in range(3)) + rng.normal(0, 0.15, shape) < 1.0

    pred, target = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    pred[blob((12, 10, 11), (6, 5, 7))], target[blob((14, 11, 12), (7, 5, 6))] = 1, 1
    pred[blob((0, 25, 28), (8, 6, 5))], target[blob((2, 27, 29), (7, 5, 5))] = 2, 2
    target[blob((25, 8, 20), (4, 3, 3))] = 3  # only in one map
    return pred, target


def _image(arr: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    img.SetSpacing(SPACING)
    return img


# ----------------------------------------------------------------------------------------------------- evaluate


def _plain_sdlogj(jac, mask=None, border=metrics.L2R_BORDER):
    crop = (slice(border, -border),) * 3
    values = jac[crop] if mask is None else jac[crop][mask[crop]]
    return float(np.std(np.log(np.clip(values.astype(np.float64) + 3.0, 1e-9, 1e9))))


def test_sdlogj_in_place_equals_the_plain_formula_for_any_layout():
    rng = np.random.default_rng(0)
    jac = rng.normal(1.0, 0.6, (23, 19, 27)).astype(np.float32)  # some J + 3 below the clip, most above
    jac[3, 4, 5] = -5.0
    image = sitk.GetImageFromArray(jac.transpose(2, 1, 0).copy())  # the view below is valid while it lives
    itk_view = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)
    mask = rng.random(jac.shape) < 0.4
    for layout in (jac, itk_view, np.asfortranarray(jac)):
        assert metrics.sdlogj(layout) == _plain_sdlogj(jac)  # bit for bit
        assert metrics.sdlogj(layout, mask) == _plain_sdlogj(jac, mask)
    for n in (1, 2, 7, 1000, 100_003):  # the pairwise sums' block sizes
        x = rng.lognormal(0.0, 2.0, n)
        assert metrics._std_in_place(x.copy()) == float(np.std(x))


def test_dice_and_hd95_cropped_equal_the_whole_volume():
    pred, target = _labels()
    dice = metrics.dice_per_label(pred, target, [1, 2, 3])
    hd = metrics.hd95_per_label(pred, target, [1, 2], SPACING)
    for label in (1, 2, 3):
        a, b = (torch.from_numpy(v == label)[None, None] for v in (pred, target))
        assert dice[label] == float(compute_dice(a, b, include_background=True, ignore_empty=False).item())
        if label in hd:
            whole = compute_hausdorff_distance(a, b, include_background=True, percentile=95, spacing=list(SPACING))
            assert hd[label] == float(whole.item())


def test_region_metrics_on_image_views_equal_the_array_copies():
    pred, target = _labels()
    prompts = Prompts(["liver", "spleen", "kidney", "absent"], [1, 2, 3, 4], "{}")
    dice, hd = region_metrics(_image(target), _image(pred), prompts)
    copies = image_to_array(_image(pred)), image_to_array(_image(target))
    expected_dice = metrics.dice_per_label(*copies, prompts.label_values)
    expected_hd = metrics.hd95_per_label(*copies, prompts.label_values, SPACING)
    assert dice == pytest.approx({n: expected_dice[v] for n, v in zip(prompts.region_names, prompts.label_values)},
                                 rel=0, abs=0, nan_ok=True)
    assert hd == pytest.approx({n: expected_hd[v] for n, v in zip(prompts.region_names, prompts.label_values)},
                               rel=0, abs=0, nan_ok=True)


# ----------------------------------------------------------------------------------------------- resample field


def test_total_image_builds_its_image_from_the_field_itself_on_the_last_use(monkeypatch):
    """With ``release=True`` the initial alignment is folded into the field in place, the image is built from that
    buffer (no second full-size array), and the field is dropped."""
    monkeypatch.setattr(deformation, "SLAB_VOXELS", 300)  # several slabs
    fixed = sitk.Image([14, 12, 10], sitk.sitkFloat32)
    fixed.SetSpacing((2.0, 2.5, 3.0))
    grid = ModelGrid((8, 7, 6), (4.0, 4.5, 5.0), (1.0, 2.0, 0.5), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    u = random_smooth_displacement(grid.shape, (3, 3, 3), 1.5, 10.0, seed=2).astype(np.float32)
    rigid = sitk.Euler3DTransform((10.0, 12.0, 14.0), 0.05, -0.03, 0.1, (-2.0, 1.5, 3.0))
    for initial in (None, rigid):
        kept = deformation.Deformation(u, grid, fixed, initial).total_image()
        d = deformation.Deformation(u, grid, fixed, initial)
        field_buffer = d.d_mm.data_ptr()
        build = sitk.GetImageFromArray
        sources = []

        def checked_build(arr, *args, **kwargs):
            sources.append(arr.__array_interface__["data"][0])
            return build(arr, *args, **kwargs)

        monkeypatch.setattr(sitk, "GetImageFromArray", checked_build)
        released = d.total_image(release=True)
        monkeypatch.setattr(sitk, "GetImageFromArray", build)
        assert sources == [field_buffer], "the image was built from a copy of the field"
        assert d.d_mm is None
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(released), sitk.GetArrayViewFromImage(kept))


# ---------------------------------------------------------------------------------------------------- outputs


def _field(pixel_type):
    rng = np.random.default_rng(3)
    f = sitk.GetImageFromArray(rng.normal(0, 5, (5, 6, 7, 3)), isVector=True)
    f.SetSpacing((1.5, 2.0, 2.5))
    f.SetOrigin((-10.0, 20.0, 5.0))
    return sitk.Cast(f, pixel_type)


@pytest.mark.parametrize("name", ["d.nii.gz", "d.mha", "d.nrrd", "d.h5"])
def test_a_float32_field_is_written_as_its_float64_cast_was(tmp_path, name):
    field = _field(sitk.sitkVectorFloat32)
    (tmp_path / "f32").mkdir()
    (tmp_path / "f64").mkdir()
    tio.write_displacement_transform(field, tmp_path / "f32" / name)
    tio.write_displacement_transform(sitk.Cast(field, sitk.sitkVectorFloat64), tmp_path / "f64" / name)
    if name.endswith(".h5"):
        a, b = (sitk.DisplacementFieldTransform(sitk.ReadTransform(str(tmp_path / d / name))).GetDisplacementField()
                for d in ("f32", "f64"))
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))
    elif name.endswith(".nii.gz"):
        a, b = (nib.load(str(tmp_path / d / name)) for d in ("f32", "f64"))
        assert a.header.binaryblock == b.header.binaryblock
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    else:
        assert (tmp_path / "f32" / name).read_bytes() == (tmp_path / "f64" / name).read_bytes()
    assert field.GetPixelID() == sitk.sitkVectorFloat32 and field.GetSize() == (7, 6, 5)  # the caller's, untouched
    assert not field.GetMetaDataKeys()


def _plain_nifti_dispvect(field: sitk.Image, path) -> None:
    """The displacement NIfTI as nibabel writes it from the whole RAS field in memory (the reference)."""
    vec = np.empty((*field.GetSize(), 1, 3), dtype=np.float32, order="F")
    vec[:, :, :, 0, :] = sitk.GetArrayViewFromImage(field).transpose(2, 1, 0, 3)
    vec[..., :2] *= -1.0
    affine = tio.ijk_to_ras_matrix(field)
    nii = nib.Nifti1Image(vec, affine)
    nii.header.set_intent(1006)
    nii.header.set_qform(affine, code=1)
    nii.header.set_sform(affine, code=1)
    nii.header.set_xyzt_units("mm")
    nib.save(nii, str(path))


@pytest.mark.parametrize("pixel_type", [sitk.sitkVectorFloat32, sitk.sitkVectorFloat64])
@pytest.mark.parametrize("name", ["d.nii", "d.nii.gz"])
def test_the_streamed_displacement_nifti_is_the_one_nibabel_writes_whole(tmp_path, monkeypatch, pixel_type, name):
    monkeypatch.setattr(tio, "NIFTI_SLAB_VOXELS", 7 * 6 * 2)  # 2 k-slices at a time, the last slab short
    field = _field(pixel_type)
    field.SetDirection(sitk.Euler3DTransform((0, 0, 0), 0.1, -0.2, 0.3).GetMatrix())
    tio.write_displacement_transform(field, tmp_path / name)
    _plain_nifti_dispvect(field, tmp_path / ("plain_" + name))
    streamed, plain = ((tmp_path / n).read_bytes() for n in (name, "plain_" + name))
    if name.endswith(".gz"):
        streamed, plain = gzip.decompress(streamed), gzip.decompress(plain)
    assert streamed == plain


# -------------------------------------------------------------------------------------------------------- CLI


def test_stage_peaks_note_the_peak_so_far_at_each_stage_end():
    calls = []
    stages = _StagePeaks(lambda *a: calls.append(a))
    stages("load model", 0.0, None)
    stages("register", 0.3, 5.0)
    stages("register", 0.5, 3.0)
    big = np.ones(64 * 2 ** 20 // 8)  # 64 MiB touched
    stages("evaluate", 0.9, None)
    del big
    stages("write outputs", 1.0, None)
    assert calls[1] == ("register", 0.3, 5.0) and len(calls) == 5  # every call passed on
    assert list(stages.peaks) == ["load model", "register", "evaluate"]
    peaks = list(stages.peaks.values())
    if peak_rss_mib() is None:  # no count on this platform
        assert peaks == [None] * 3
        return
    assert peaks == sorted(peaks) and peaks[0] > 0
    assert peak_rss_mib() >= peaks[-1] >= 64


def test_the_benchmark_reports_each_stage_and_the_writing_as_the_overall_peak():
    from benchmarks.clinical_ct_memory import stage_peaks_gib

    peaks = stage_peaks_gib({"load model": 1024.0, "evaluate": 3072.0, "done": 3072.0, "register": None}, 4 * 2 ** 30)
    assert peaks == {"load model": 1.0, "evaluate": 3.0, "write outputs": 4.0}

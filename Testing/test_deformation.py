"""The torch deformation path (textscf.deformation) against the ITK reference path (textscf.spatial, metrics)."""
import numpy as np
import pytest
import SimpleITK as sitk

from textscf import metrics
from textscf.deformation import Deformation, matrix_offset, supports
from textscf.errors import InputError
from textscf.phantom import random_smooth_displacement
from textscf.spatial import (
    ModelGrid,
    compose_with_initial,
    image_to_array,
    physical_displacement_to_voxel,
    resample_displacement,
    voxel_displacement_to_physical,
    warp_image,
)


def _image(arr, spacing, origin, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def _oblique(angles=(0.1, -0.05, 0.2)):
    rot = sitk.Euler3DTransform()
    rot.SetRotation(*angles)
    return tuple(rot.GetMatrix())


def _initials():
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.02, 0.03, 0.0, -0.02, 0.98, 0.01, 0.0, 0.02, 1.01))
    affine.SetTranslation((3.0, 2.0, 1.0))
    affine.SetCenter((50.0, 40.0, 100.0))
    rigid = sitk.Euler3DTransform((40.0, 20.0, 60.0), 0.05, -0.03, 0.1, (-4.0, 2.5, 6.0))
    return {"none": None, "affine": affine, "rigid": rigid, "translation": sitk.TranslationTransform(3, (5, -3, 2))}


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    shape_f = (40, 34, 46)
    fixed = _image(rng.normal(size=shape_f).astype(np.float32), (2.0, 1.8, 2.2), (410.0, -320.0, 530.0), _oblique())
    shape_m = (48, 40, 52)
    ct = np.cumsum(rng.normal(size=shape_m) * 40, 0).astype(np.int16)
    moving = _image(ct, (2.1, 1.9, 2.0), (400.0, -330.0, 520.0))
    labels = _image(rng.integers(0, 14, size=shape_m).astype(np.int16), (2.1, 1.9, 2.0), (400.0, -330.0, 520.0))
    grid = ModelGrid((20, 17, 23), (4.1, 3.5, 4.6), (412.0, -318.0, 528.0), _oblique((0.08, 0.0, 0.15)))
    u = random_smooth_displacement(grid.shape, (4, 4, 4), 3.0, 30.0, seed=1).astype(np.float32)
    return fixed, moving, labels, grid, u


@pytest.fixture(scope="module")
def aligned_case(case):
    """``case`` with a model grid whose axes are the fixed grid's (its direction, another spacing and origin): the
    field is resampled axis by axis."""
    fixed, moving, labels, grid, u = case
    aligned = ModelGrid(grid.shape, grid.spacing, grid.origin, fixed.GetDirection())
    return fixed, moving, labels, aligned, u


@pytest.mark.parametrize("initial", list(_initials()))
@pytest.mark.parametrize("axes", ["oblique", "aligned"])
def test_deformation_matches_the_itk_path(case, aligned_case, initial, axes, monkeypatch):
    from textscf import deformation as module

    fixed, moving, labels, grid, u = case if axes == "oblique" else aligned_case
    init = _initials()[initial]
    by_axis = []
    real = module._interpolate_axis
    monkeypatch.setattr(module, "_interpolate_axis", lambda *a: by_axis.append(1) or real(*a))
    field = resample_displacement(voxel_displacement_to_physical(u, grid), fixed)
    total = compose_with_initial(field, init)
    deformation = Deformation(u, grid, fixed, init)
    assert bool(by_axis) == (axes == "aligned")

    assert np.abs(image_to_array(field) - deformation.field_mm().numpy()).max() < 1e-4  # mm, fields of up to ~3 mm
    assert deformation.max_length_mm() == pytest.approx(np.sqrt((image_to_array(field) ** 2).sum(0)).max(), rel=1e-5)
    jac = metrics.jacobian_determinant(physical_displacement_to_voxel(field, fixed))
    assert np.abs(jac - deformation.jacobian()).max() < 1e-5
    ours = deformation.total_image()
    assert ours.GetPixelID() == sitk.sitkVectorFloat32 and ModelGrid.from_image(ours) == ModelGrid.from_image(fixed)
    assert np.abs(image_to_array(total) - image_to_array(ours)).max() < 1e-3  # float32 on coordinates of ~500 mm

    warped_itk = sitk.GetArrayFromImage(warp_image(moving, total, fixed, "linear", -1024.0))
    warped = deformation.warp(moving, "linear", -1024.0)
    assert warped.GetPixelID() == moving.GetPixelID()
    # int16 truncation may land one unit apart where the float32 and float64 interpolations straddle an integer
    assert np.abs(warped_itk.astype(int) - sitk.GetArrayFromImage(warped).astype(int)).max() <= 1
    assert (warped_itk == -1024).sum() == (sitk.GetArrayFromImage(warped) == -1024).sum() > 0  # outside: default
    labels_itk = sitk.GetArrayFromImage(warp_image(labels, total, fixed, "nearest", 0))
    assert (labels_itk != sitk.GetArrayFromImage(deformation.warp(labels, "nearest", 0))).mean() < 1e-3


def test_only_matrix_offset_initial_transforms_are_composed(case):
    fixed, _, _, grid, u = case
    bspline = sitk.BSplineTransform(3)
    assert supports(None) and supports(_initials()["affine"]) and not supports(bspline)
    m, t = matrix_offset(_initials()["affine"])
    y = np.array([1.0, 2.0, 3.0])
    assert np.allclose(m @ y + t, _initials()["affine"].TransformPoint(tuple(y)))
    with pytest.raises(InputError, match="matrix-offset"):
        Deformation(u, grid, fixed, bspline)
    with pytest.raises(InputError, match="voxel displacement must be"):
        Deformation(u[:, 1:], grid, fixed, None)


def test_field_outputs_take_the_itk_path_for_other_initial_transforms_and_agree(case):
    from textscf.pipeline import field_outputs

    fixed, moving, labels, grid, u = case
    identity_bspline = sitk.BSplineTransformInitializer(fixed, [3, 3, 3])  # zero coefficients: the identity
    fast = field_outputs(u, grid, fixed, None, moving, labels)
    itk = field_outputs(u, grid, fixed, identity_bspline, moving, labels)
    assert np.abs(image_to_array(fast.total) - image_to_array(itk.total)).max() < 1e-4
    assert np.abs(fast.jacobian - itk.jacobian).max() < 1e-5
    assert fast.max_displacement_mm == pytest.approx(itk.max_displacement_mm, rel=1e-5)
    assert np.abs(sitk.GetArrayFromImage(fast.warped).astype(int) - sitk.GetArrayFromImage(itk.warped)).max() <= 1
    assert (sitk.GetArrayFromImage(fast.warped_labels) != sitk.GetArrayFromImage(itk.warped_labels)).mean() < 1e-3


def test_the_last_use_can_release_the_field(case):
    fixed, _, _, grid, u = case
    deformation = Deformation(u, grid, fixed, _initials()["rigid"])
    kept = image_to_array(deformation.total_image())
    released = image_to_array(deformation.total_image(release=True))
    assert np.array_equal(kept, released) and deformation.d_mm is None


def test_a_voxel_field_carried_between_grids():
    """Onto the subdivided box: exactly resize_field; onto a shifted, finer box: a field linear in space stays exact
    inside the source's voxel centres and continues with the border value beyond them (no drop to zero)."""
    import torch

    from textscf.deformation import resample_voxel_field
    from textscf.spatial import ModelGrid
    from textscf.warp import resize_field

    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    source = ModelGrid((10, 8, 12), (8.0, 6.0, 4.0), (5.0, -3.0, 20.0), rotation)
    rng = np.random.default_rng(0)
    u = rng.normal(size=(3, 10, 8, 12)).astype(np.float32)
    fine = source.subdivided(2)
    expected = resize_field(torch.from_numpy(u)[None], fine.shape, rescale=True)[0].numpy()
    np.testing.assert_allclose(resample_voxel_field(u, source, fine), expected, atol=1e-5)

    shifted = ModelGrid((20, 16, 24), (4.0, 3.0, 2.0), source.index_to_physical([-2.0, 1.5, 3.0]), rotation)
    slope = np.array([0.3, -0.2, 0.1])  # mm of displacement per voxel along each axis of the source
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in source.shape], indexing="ij"))
    mm = slope[:, None, None, None] * idx  # component a: slope[a] * index a, in mm
    linear = (mm / np.array(source.spacing)[:, None, None, None]).astype(np.float32)
    out = resample_voxel_field(linear, source, shifted) * np.array(shifted.spacing)[:, None, None, None]
    at = source.physical_to_index(shifted.physical_points())  # target voxel centres in source indices
    inside = np.all((at >= 0) & (at <= np.array(source.shape) - 1), axis=-1)
    clamped = np.clip(at, 0, np.array(source.shape) - 1)
    truth = np.moveaxis(slope * clamped, -1, 0)
    assert inside.any() and (~inside).any()
    np.testing.assert_allclose(out[:, inside], truth[:, inside], atol=1e-4)
    np.testing.assert_allclose(out[:, ~inside], truth[:, ~inside], atol=1e-4)  # the border value beyond
    with pytest.raises(InputError, match="same direction"):
        resample_voxel_field(u, source, ModelGrid(source.shape, source.spacing, source.origin))


def test_a_field_on_the_fixed_grid_is_only_converted_to_mm(case):
    fixed, _, _, _, _ = case
    grid = ModelGrid.from_image(fixed)
    u = random_smooth_displacement(grid.shape, (4, 4, 4), 3.0, 30.0, seed=2).astype(np.float32)
    expected = np.einsum("ab,bijk->aijk", grid.index_to_physical_matrix, u)
    np.testing.assert_allclose(Deformation(u, grid, fixed, None).field_mm().numpy(), expected, atol=1e-5)


def test_a_field_shifted_by_whole_voxels_matches_the_itk_path(case):
    fixed, _, _, _, _ = case
    own = ModelGrid.from_image(fixed)
    shifted = ModelGrid((30, 30, 40), own.spacing, own.index_to_physical([3.0, -2.0, 5.0]), own.direction)
    u = random_smooth_displacement(shifted.shape, (4, 4, 4), 3.0, 30.0, seed=3).astype(np.float32)
    reference = image_to_array(resample_displacement(voxel_displacement_to_physical(u, shifted), fixed))
    np.testing.assert_allclose(Deformation(u, shifted, fixed, None).field_mm().numpy(), reference, atol=1e-4)


def test_nearest_sampling_keeps_the_label_type_and_rounds_half_up_like_itk():
    import torch

    from textscf.deformation import sample

    labels = torch.arange(4 * 5 * 6, dtype=torch.int16).reshape(1, 4, 5, 6)  # (C, D, H, W)
    # continuous indices (x, y, z) along (W, H, D): a tie (2.5 -> 3, half up), the edges' half voxels, beyond them
    index = torch.tensor([[2.5, 1.0, 0.0], [-0.49, 0.0, 0.0], [5.49, 4.0, 3.0], [5.5, 0.0, 0.0], [0.0, -0.51, 1.0]])
    coords = (2.0 * index / torch.tensor([5.0, 4.0, 3.0]) - 1.0).view(1, 1, 5, 3)
    out = sample(labels, coords, "nearest", default=-7)
    assert out.dtype == torch.int16 and out.shape == (1, 1, 1, 5)
    expected = [labels[0, 0, 1, 3], labels[0, 0, 0, 0], labels[0, 3, 4, 5], -7, -7]
    assert out.flatten().tolist() == [int(v) for v in expected]

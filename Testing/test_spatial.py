"""Physical-space correctness of textscf.spatial, proven against ITK (SimpleITK) and analytic ground truth.

The geometry of every test grid is rebuilt here with plain numpy (origin + D @ diag(spacing) @ idx), so the
engine's conversions are checked against an independent implementation, and every displacement field goes
through a file and back through ITK before it is used to resample.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import map_coordinates

from textscf import spatial as sp
from textscf.errors import InputError
from textscf.io import read_image, write_displacement_transform


# ------------------------------------------------------------------------------------------- test geometry
def rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


SHAPE = (36, 32, 28)
SPACING = np.array([1.3, 0.9, 1.7])
ORIGIN = np.array([-21.5, 14.0, 33.0])
# a genuine oblique rotation (25 deg about (1, 2, 3)) times a 180 deg turn about x: not a permutation or flip
DIRECTION = rotation((1, 2, 3), 25.0) @ np.diag([1.0, -1.0, -1.0])


def make_image(arr_ijk: np.ndarray, origin=ORIGIN, spacing=SPACING, direction=DIRECTION) -> sitk.Image:
    """(I, J, K) numpy -> SimpleITK image with the given geometry (built with SimpleITK calls only)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(arr_ijk).transpose(2, 1, 0)))
    img.SetOrigin(tuple(map(float, origin)))
    img.SetSpacing(tuple(map(float, spacing)))
    img.SetDirection(tuple(map(float, np.asarray(direction).ravel())))
    return img


def voxel_points(shape, origin, spacing, direction) -> np.ndarray:
    """(I, J, K, 3) LPS points of the voxel centres, by the definition point = origin + D diag(s) idx."""
    idx = np.stack(np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij"), axis=-1)
    return origin + (idx * spacing) @ np.asarray(direction).T


def pattern(p: np.ndarray) -> np.ndarray:
    """Smooth analytic moving image M(p), p in LPS mm (wavelengths 25-50 mm)."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    return np.sin(0.21 * x + 0.5) * np.cos(0.17 * y - 0.3) + 0.5 * np.sin(0.13 * z + 0.11 * x)


def displacement(p: np.ndarray) -> np.ndarray:
    """Smooth analytic physical displacement u(p) in LPS mm, up to ~2.5 mm."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    return np.stack([2.5 * np.sin(y / 9.0), 2.0 * np.cos(z / 11.0), 1.5 * np.sin(x / 13.0 + 0.4)], axis=-1)


def interior_mask(targets_idx: np.ndarray, shape, margin=2.0) -> np.ndarray:
    ok = np.ones(targets_idx.shape[:-1], bool)
    for a, n in enumerate(shape):
        ok &= (targets_idx[..., a] >= margin) & (targets_idx[..., a] <= n - 1 - margin)
    return ok


def read_back_transform(path) -> sitk.Transform:
    """Read a written field with plain SimpleITK, the way ITK users would."""
    if str(path).endswith((".h5", ".hdf5")):
        return sitk.ReadTransform(str(path))
    return sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64))


def round_trip_check(tmp_path, origin, spacing, direction, shape, suffixes=(".h5", ".nii.gz", ".nrrd", ".mha")):
    """The whole physical <-> voxel chain on one grid, checked against analytic truth and ITK resampling."""
    pts = voxel_points(shape, origin, spacing, direction)
    u_phys = displacement(pts)  # (I, J, K, 3)
    truth = pattern(pts + u_phys)  # warped(x) = M(x + u(x))
    moving_arr = pattern(pts).astype(np.float32)
    moving = make_image(moving_arr, origin, spacing, direction)
    grid = sp.ModelGrid.from_image(moving)

    # independent voxel coordinates of x + u(x)
    target_idx = np.linalg.solve(np.asarray(direction) @ np.diag(spacing),
                                 (pts + u_phys - origin).reshape(-1, 3).T).T.reshape(pts.shape)
    inside = interior_mask(target_idx, shape)
    assert inside.mean() > 0.4

    # engine: physical field -> voxel displacement; test: voxel-space warp with scipy
    field = sp.array_to_image(np.moveaxis(u_phys, -1, 0), grid)
    u_vox = sp.physical_displacement_to_voxel(field, grid)
    assert u_vox.shape == (3, *shape)
    np.testing.assert_allclose(np.moveaxis(u_vox, 0, -1), target_idx - np.moveaxis(
        np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]], 0, -1), atol=1e-9)
    idx = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]].astype(float)
    warped_vox = map_coordinates(moving_arr.astype(np.float64), idx + u_vox, order=1, mode="nearest")
    assert np.abs(warped_vox - truth)[inside].max() < 0.03

    # engine: voxel displacement -> physical field; written, read back and applied by ITK
    field2 = sp.voxel_displacement_to_physical(u_vox, grid)
    assert field2.GetPixelID() == sitk.sitkVectorFloat64
    assert np.allclose(field2.GetDirection(), np.asarray(direction).ravel())
    np.testing.assert_allclose(sp.image_to_array(field2), np.moveaxis(u_phys, -1, 0), atol=1e-10)
    for suffix in suffixes:
        path = tmp_path / f"field{suffix}"
        write_displacement_transform(field2, path)
        transform = read_back_transform(path)
        warped_itk = sp.image_to_array(sitk.Resample(moving, moving, transform, sitk.sitkLinear, 0.0,
                                                     sitk.sitkFloat64))
        err_truth = np.abs(warped_itk - truth)[inside].max()
        err_voxel = np.abs(warped_itk - warped_vox)[inside].max()
        assert err_truth < 0.03, (suffix, err_truth)
        assert err_voxel < 1e-4, (suffix, err_voxel)
        # the engine's own warp agrees with ITK's resampling through the file
        warped_engine = sp.image_to_array(sp.warp_image(moving, field2))
        assert np.abs(warped_engine - warped_itk)[inside].max() < 1e-4


# ------------------------------------------------------------------------------------------- tests
def test_model_grid_geometry_matches_itk():
    img = make_image(np.zeros(SHAPE, np.float32))
    grid = sp.ModelGrid.from_image(img)
    assert grid.shape == SHAPE
    np.testing.assert_allclose(grid.direction_matrix, DIRECTION, atol=1e-12)
    idx = np.array([[0, 0, 0], [3, 7, 11], [35, 31, 27], [1.5, 2.25, 0.5]])
    expected = np.array([img.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in idx])
    np.testing.assert_allclose(grid.index_to_physical(idx), expected, atol=1e-10)
    np.testing.assert_allclose(grid.physical_to_index(expected), idx, atol=1e-10)
    np.testing.assert_allclose(grid.physical_points(), voxel_points(SHAPE, ORIGIN, SPACING, DIRECTION), atol=1e-10)
    ref = grid.reference_image()
    assert ref.GetSize() == SHAPE and np.allclose(ref.GetDirection(), img.GetDirection())
    assert np.allclose(ref.GetOrigin(), ORIGIN) and np.allclose(ref.GetSpacing(), SPACING)
    # nested 3x3 direction is accepted and frozen as 9 floats
    g2 = sp.ModelGrid(SHAPE, SPACING, ORIGIN, DIRECTION)
    assert g2 == grid and len(g2.direction) == 9
    with pytest.raises(InputError, match="orthonormal"):
        sp.ModelGrid(SHAPE, SPACING, ORIGIN, np.eye(3) * 2)
    with pytest.raises(InputError, match="spacing"):
        sp.ModelGrid(SHAPE, (1, 0, 1), ORIGIN)


def test_array_image_index_order():
    arr = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    img = sp.array_to_image(arr, make_image(np.zeros(SHAPE, np.float32)))
    assert img.GetSize() == SHAPE
    assert img.GetPixel(3, 7, 11) == pytest.approx(float(arr[3, 7, 11]))
    np.testing.assert_array_equal(sp.image_to_array(img), arr)
    vec = np.random.default_rng(1).normal(size=(3, *SHAPE))
    vimg = sp.array_to_image(vec, sp.ModelGrid.from_image(img))
    assert vimg.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_allclose(vimg.GetPixel(5, 2, 9), vec[:, 5, 2, 9])
    np.testing.assert_array_equal(sp.image_to_array(vimg), vec)
    assert sp.array_to_image(arr > 0, img).GetPixelID() == sitk.sitkUInt8
    with pytest.raises(InputError, match="does not match"):
        sp.array_to_image(arr[:-1], img)


def test_round_trip_oblique_grid_all_formats(tmp_path):
    round_trip_check(tmp_path, ORIGIN, SPACING, DIRECTION, SHAPE)


def test_ras_nifti_written_by_nibabel(tmp_path):
    """A RAS NIfTI with a rotated, offset affine: ITK's LPS geometry is the RAS affine flipped."""
    shape = (30, 34, 26)
    spacing = np.array([1.1, 1.4, 1.9])
    rot_ras = rotation((-2, 1, 4), 35.0)
    affine = np.eye(4)
    affine[:3, :3] = rot_ras @ np.diag(spacing)
    affine[:3, 3] = [12.5, -40.0, 7.25]
    data = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    nii = nib.Nifti1Image(data, affine)
    nii.header.set_qform(affine, code=1)
    nii.header.set_sform(affine, code=1)
    path = tmp_path / "ras.nii.gz"
    nib.save(nii, str(path))

    img = read_image(path, role="moving image")
    grid = sp.ModelGrid.from_image(img)
    np.testing.assert_array_equal(sp.image_to_array(img), data)  # nibabel's [i,j,k] == engine's [i,j,k]
    idx = np.array([[0, 0, 0], [29, 33, 25], [4, 17, 9], [10.5, 3.25, 20.75]])
    ras = (affine @ np.c_[idx, np.ones(len(idx))].T).T[:, :3]
    expected_lps = ras * [-1, -1, 1]
    itk_points = np.array([img.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in idx])
    np.testing.assert_allclose(itk_points, expected_lps, atol=1e-4)
    np.testing.assert_allclose(grid.index_to_physical(idx), expected_lps, atol=1e-4)
    np.testing.assert_allclose(sp.ras_to_lps(ras), expected_lps, atol=1e-12)
    np.testing.assert_allclose(sp.ijk_to_ras_matrix(img), affine, atol=1e-4)

    direction = np.array(img.GetDirection()).reshape(3, 3)
    round_trip_check(tmp_path, np.array(img.GetOrigin()), np.array(img.GetSpacing()), direction, shape,
                     suffixes=(".nii.gz", ".h5"))


def test_compose_with_initial_matches_itk_composite():
    img = make_image(np.zeros(SHAPE, np.float32))
    grid = sp.ModelGrid.from_image(img)
    pts = voxel_points(SHAPE, ORIGIN, SPACING, DIRECTION)
    d = displacement(pts)
    field = sp.array_to_image(np.moveaxis(d, -1, 0), grid)

    matrix = rotation((0.3, -1, 0.5), 12.0) @ np.diag([1.05, 0.97, 1.02])
    centre = np.array([-5.0, 30.0, 40.0])
    translation = np.array([4.0, -3.0, 2.5])
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(matrix.ravel().tolist())
    affine.SetCenter(centre.tolist())
    affine.SetTranslation(translation.tolist())

    total = sp.compose_with_initial(field, affine)
    assert total.GetPixelID() == sitk.sitkVectorFloat64 and total.GetSize() == SHAPE
    assert np.allclose(total.GetDirection(), field.GetDirection())
    # analytic: x -> A(x + d(x)) with A(p) = M (p - c) + c + t
    expected = (pts + d - centre) @ matrix.T + centre + translation - pts
    np.testing.assert_allclose(np.moveaxis(sp.image_to_array(total), 0, -1), expected, atol=1e-9)

    # ITK's composite (deformable first, then the affine) at off-grid interior points
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(affine)
    composite.AddTransform(sitk.DisplacementFieldTransform(sitk.Image(field)))
    composed = sitk.DisplacementFieldTransform(sitk.Image(total))
    rng = np.random.default_rng(3)
    idx = rng.uniform(2, np.array(SHAPE) - 3, size=(50, 3))
    for p in idx @ (DIRECTION @ np.diag(SPACING)).T + ORIGIN:
        np.testing.assert_allclose(composed.TransformPoint(p.tolist()), composite.TransformPoint(p.tolist()),
                                   atol=1e-6)
    assert sp.compose_with_initial(field, None) is field


def test_resample_displacement_zero_outside_and_exact_for_linear_fields():
    grid = sp.ModelGrid((20, 18, 16), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), DIRECTION)
    pts = grid.physical_points()
    lin = np.stack([0.1 * pts[..., 0] + 1, -0.05 * pts[..., 1], 0.02 * pts[..., 2] + 0.3 * pts[..., 0]], axis=-1)
    field = sp.array_to_image(np.moveaxis(lin, -1, 0), grid)
    # a larger, finer, shifted grid around it
    big = sp.ModelGrid((40, 40, 36), (1.5, 1.5, 1.5), grid.index_to_physical([-6.0, -8.0, -7.0]), DIRECTION)
    out = sp.resample_displacement(field, big)
    assert out.GetSize() == big.shape and out.GetPixelID() == sitk.sitkVectorFloat64
    arr = np.moveaxis(sp.image_to_array(out), 0, -1)
    bpts = big.physical_points()
    bidx = grid.physical_to_index(bpts)
    inside = interior_mask(bidx, grid.shape, margin=0.0)
    outside = ~interior_mask(bidx, grid.shape, margin=-1.0)
    expected = np.stack([0.1 * bpts[..., 0] + 1, -0.05 * bpts[..., 1], 0.02 * bpts[..., 2] + 0.3 * bpts[..., 0]], -1)
    np.testing.assert_allclose(arr[inside], expected[inside], atol=1e-9)
    assert outside.any() and np.all(arr[outside] == 0.0)


def test_model_grid_for_centres_on_the_body():
    shape, spacing = (60, 50, 40), np.array([2.0, 2.5, 3.0])
    origin = np.array([-50.0, 20.0, -10.0])
    body_centre_idx = np.array([20.0, 30.0, 15.0])
    body_centre = origin + DIRECTION @ (spacing * body_centre_idx)
    # CT-like: air at -1000, a box-shaped "body" (in index space) at +40 HU
    arr = np.full(shape, -1000.0, np.float32)
    arr[10:31, 22:39, 9:22] = 40.0  # centre index (20, 30, 15)
    arr[55, 2, 37] = 500.0  # an isolated speck: not the largest component
    fixed = make_image(arr, origin, spacing, DIRECTION)
    grid = sp.model_grid_for(fixed, spacing=(1.5, 1.5, 1.5), shape=(64, 48, 32))
    assert grid.shape == (64, 48, 32) and grid.spacing == (1.5, 1.5, 1.5)
    np.testing.assert_allclose(grid.direction_matrix, DIRECTION, atol=1e-12)
    np.testing.assert_allclose(grid.centre(), body_centre, atol=1e-6)
    assert sp.body_threshold_for(fixed) == -500.0

    # an explicit mask wins over the threshold, and all its parts count (organs need not touch)
    mask_arr = np.zeros(shape, np.uint8)
    mask_arr[40:46, 5:11, 25:31] = 1
    mask_arr[48:51, 13:16, 33:36] = 4  # a separate organ: union bounding box (40..50, 5..15, 25..35)
    mask = make_image(mask_arr, origin, spacing, DIRECTION)
    g_mask = sp.model_grid_for(fixed, (2.0, 2.0, 2.0), (32, 32, 32), body_mask=mask)
    np.testing.assert_allclose(g_mask.centre(), origin + DIRECTION @ (spacing * [45.0, 10.0, 30.0]), atol=1e-6)

    # no body above the threshold: the image centre
    g_none = sp.model_grid_for(fixed, (2.0, 2.0, 2.0), (32, 32, 32), body_threshold=1e6)
    np.testing.assert_allclose(g_none.centre(), origin + DIRECTION @ (spacing * (np.array(shape) - 1) / 2),
                               atol=1e-6)


def test_fit_box_centre_covers_the_image_where_the_box_is_long_enough():
    """A grid centred on a body near one end of the image would leave the other end outside (zero field there, folds
    at the grid's edge): it moves just enough to cover the image on axes where it can, and stays inside elsewhere."""
    shape, spacing = (40, 30, 50), np.array([2.0, 2.0, 4.0])
    fixed = make_image(np.zeros(shape, np.float32), ORIGIN, spacing, DIRECTION)
    grid = sp.ModelGrid.from_image(fixed)
    # in image voxels: 25 (longer than the image's 39 along i), 10 (shorter than 29 along j), 24.5 (exactly 49 along k)
    half = np.array([50.0, 20.0, 98.0])
    body = grid.index_to_physical(np.array([5.0, 3.0, 45.0]))  # near the first i and j voxels and the last k voxel
    centre = sp.fit_box_centre(fixed, body, DIRECTION, half)
    along = grid.physical_to_index(centre)
    box_low, box_high = along - half / spacing, along + half / spacing
    np.testing.assert_allclose(box_high[0], shape[0] - 1, atol=1e-9)  # moved just enough to cover i
    assert box_low[0] < 0
    np.testing.assert_allclose(box_low[1], 0.0, atol=1e-9)  # within j, as close to the body as it can stay
    np.testing.assert_allclose([box_low[2], box_high[2]], [0.0, shape[2] - 1], atol=1e-9)  # exactly covers k
    # a box already in place does not move
    middle = grid.centre()
    np.testing.assert_allclose(sp.fit_box_centre(fixed, middle, DIRECTION, half), middle, atol=1e-9)


def test_model_grid_for_large_image_uses_subsampling_but_stays_close():
    shape = (300, 260, 140)
    arr = np.full(shape, -1000.0, np.float32)
    arr[40:201, 60:181, 20:101] = 30.0  # centre index (120, 120, 60)
    fixed = make_image(arr, ORIGIN, (0.8, 0.8, 2.0), np.eye(3))
    grid = sp.model_grid_for(fixed, (2.0, 2.0, 2.0), (96, 96, 64))
    expected = ORIGIN + np.array([0.8, 0.8, 2.0]) * [120.0, 120.0, 60.0]
    assert np.abs(grid.centre() - expected).max() <= 2.0  # within a subsampled voxel
    # a thin mask survives the subsampling (max-pooled)
    mask_arr = np.zeros(shape, np.uint8)
    mask_arr[21, 30:91, 10:51] = 1
    mask_arr[279, 30:91, 10:51] = 1
    mask = make_image(mask_arr, ORIGIN, (0.8, 0.8, 2.0), np.eye(3))
    g_mask = sp.model_grid_for(fixed, (2.0, 2.0, 2.0), (96, 96, 64), body_mask=mask)
    expected = ORIGIN + np.array([0.8, 0.8, 2.0]) * [150.0, 60.0, 30.0]
    assert np.abs(g_mask.centre() - expected).max() <= 2.0


def test_resample_to_grid_interpolators():
    labels = np.zeros(SHAPE, np.int32)
    labels[5:20, 4:18, 6:15] = 3
    labels[20:30, 10:25, 10:20] = 7
    img = make_image(labels)
    grid = sp.model_grid_for(sitk.Cast(img, sitk.sitkFloat32), SPACING / 2, (60, 60, 50), body_threshold=0.5)
    near = sp.resample_to_grid(img, grid, interpolator="nearest")
    assert near.GetPixelID() == sitk.sitkInt32
    assert set(np.unique(sp.image_to_array(near))) <= {0, 3, 7}
    # identity resampling onto its own grid is exact for every interpolator
    f = sitk.Cast(img, sitk.sitkFloat32)
    for name in ("linear", "nearest", "bspline"):
        same = sp.resample_to_grid(f, sp.ModelGrid.from_image(f), interpolator=name)
        np.testing.assert_allclose(sp.image_to_array(same), labels, atol=1e-4)
    # a transform shifts the sampling: out(x) = image(T(x))
    shift = sitk.TranslationTransform(3, (DIRECTION @ (SPACING * [2, 0, 0])).tolist())
    moved = sp.image_to_array(sp.resample_to_grid(f, img, shift, interpolator="nearest", default_value=-1))
    np.testing.assert_array_equal(moved[:-2], labels[2:])
    assert np.all(moved[-2:] == -1)
    with pytest.raises(InputError, match="nearest"):
        sp.resample_to_grid(f, grid, interpolator="cubic")


def test_intensity_normaliser_ct_window_and_percentiles():
    ct = np.array([-2000.0, -1000.0, -500.0, 150.0, 800.0, 3000.0])
    out = sp.IntensityNormaliser("ct_window")(ct)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0, 0, 0, 0.5, 1, 1], atol=1e-6)
    np.testing.assert_allclose(sp.IntensityNormaliser("ct_window", (-1000, 1000))(ct),
                               [0, 0, 0.25, 0.575, 0.9, 1], atol=1e-6)
    rng = np.random.default_rng(4)
    mri = np.zeros((40, 40, 40), np.float32)
    mri[10:30, 10:30, 10:30] = rng.uniform(100, 300, size=(20, 20, 20))
    out = sp.IntensityNormaliser("percentile")(mri)
    assert out.min() == 0.0 and out.max() == 1.0
    fg = mri[mri != 0]
    lo, hi = np.percentile(fg, [0.5, 99.5])
    np.testing.assert_allclose(out[15, 15, 15], np.clip((mri[15, 15, 15] - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert np.all(out[mri == 0] == 0)
    with pytest.raises(InputError, match="unknown intensity normalisation"):
        sp.IntensityNormaliser("pet")


def test_ras_lps_and_ijk_to_ras():
    v = np.array([[1.0, 2.0, 3.0], [-4.0, 5.0, -6.0]])
    np.testing.assert_array_equal(sp.ras_to_lps(v), [[-1, -2, 3], [4, -5, -6]])
    np.testing.assert_array_equal(sp.lps_to_ras(sp.ras_to_lps(v)), v)
    assert sp.ras_to_lps(v) is not v and v[0, 0] == 1.0  # input untouched
    img = make_image(np.zeros(SHAPE, np.float32))
    m = sp.ijk_to_ras_matrix(img)
    idx = np.array([7.0, 3.0, 12.0])
    lps = np.array(img.TransformContinuousIndexToPhysicalPoint(idx.tolist()))
    np.testing.assert_allclose((m @ np.r_[idx, 1])[:3], lps * [-1, -1, 1], atol=1e-10)
    np.testing.assert_array_equal(m[3], [0, 0, 0, 1])


@pytest.mark.parametrize("left_handed", [False, True])
def test_ijk_to_ras_matches_slicer(tmp_path, left_handed):
    """Slicer's volume reader (slicer-core MRML) gives the volume the IJKToRAS we compute; for a left-handed
    index frame it flips K, so the same voxel sits at the same RAS point under the other index."""
    mrml = pytest.importorskip("slicer").MRMLCore
    import vtk

    direction = DIRECTION @ np.diag([1.0, 1.0, -1.0]) if left_handed else DIRECTION
    img = make_image(np.random.default_rng(5).random(SHAPE).astype(np.float32), direction=direction)
    path = tmp_path / "vol.nrrd"
    sitk.WriteImage(img, str(path))
    scene = mrml.vtkMRMLScene()
    node = mrml.vtkMRMLScalarVolumeNode()
    scene.AddNode(node)
    storage = mrml.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    slicer_ijk_to_ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    ours = sp.ijk_to_ras_matrix(img)
    if not left_handed:
        np.testing.assert_allclose(slicer_ijk_to_ras, ours, atol=1e-9)
    else:
        for i, j, k in [(0, 0, 0), (5, 9, 3), (35, 31, 27)]:
            np.testing.assert_allclose(slicer_ijk_to_ras @ [i, j, SHAPE[2] - 1 - k, 1], ours @ [i, j, k, 1],
                                       atol=1e-9)


def test_same_grid_one_tolerance_set_for_images_and_model_grids():
    grid = sp.ModelGrid((8, 9, 10), (1.0, 1.5, 2.0), (10.0, -5.0, 3.0))
    image = grid.reference_image()
    assert sp.same_grid(grid, image) and sp.same_grid(image, grid) and sp.grid_mismatch(grid, image) == []
    float32_noise = sp.ModelGrid(grid.shape, np.float32(grid.spacing), np.array(grid.origin) + 4e-4, grid.direction)
    assert sp.same_grid(grid, float32_noise)  # a NIfTI's float32 affine is the same grid
    for other, word in [(sp.ModelGrid((8, 9, 11), grid.spacing, grid.origin), "size"),
                        (sp.ModelGrid(grid.shape, (1.0, 1.5, 2.01), grid.origin), "spacing"),
                        (sp.ModelGrid(grid.shape, grid.spacing, (10.0, -5.0, 3.01)), "origin"),
                        (sp.ModelGrid(grid.shape, grid.spacing, grid.origin, (-1, 0, 0, 0, -1, 0, 0, 0, 1)),
                         "direction")]:
        assert not sp.same_grid(grid, other)
        assert [p.split()[0] for p in sp.grid_mismatch(grid, other)] == [word]


def test_subdivided_grid_is_the_same_box_and_carries_fields_exactly():
    import torch

    from textscf.warp import resize_field

    coarse = sp.ModelGrid((12, 10, 8), (8.0, 8.0, 6.0), ORIGIN, DIRECTION)
    fine = coarse.subdivided(2)
    assert fine.shape == (24, 20, 16) and fine.spacing == (4.0, 4.0, 3.0) and fine.direction == coarse.direction
    np.testing.assert_allclose(fine.centre(), coarse.centre(), atol=1e-9)
    # the outer voxel edges coincide: first edge at index -0.5 of either grid, last at shape - 0.5
    np.testing.assert_allclose(coarse.index_to_physical(-0.5 * np.ones(3)), fine.index_to_physical(-0.5 * np.ones(3)),
                               atol=1e-9)
    np.testing.assert_allclose(coarse.index_to_physical(np.array(coarse.shape) - 0.5),
                               fine.index_to_physical(np.array(fine.shape) - 0.5), atol=1e-9)
    assert coarse.subdivided(1) == coarse
    with pytest.raises(InputError, match="integer factor"):
        coarse.subdivided(0)
    # A displacement linear in physical space (mm along the index axes), given in coarse voxels, resized to the
    # fine grid (voxel units rescaled) is the same displacement at the fine voxel centres inside the coarse ones.
    a = np.array([[0.02, -0.01, 0.03], [0.0, 0.04, -0.02], [0.01, 0.0, 0.05]])

    def mm(points):
        return points @ a.T + np.array([1.0, -2.0, 0.5])

    u_coarse = np.moveaxis(mm(coarse.physical_points()) / np.array(coarse.spacing), -1, 0)
    u_fine = resize_field(torch.from_numpy(u_coarse)[None], fine.shape, rescale=True)[0].numpy()
    got = np.moveaxis(u_fine, 0, -1) * np.array(fine.spacing)
    inside = interior_mask(coarse.physical_to_index(fine.physical_points()), coarse.shape, margin=0.0)
    assert inside.mean() > 0.7
    np.testing.assert_allclose(got[inside], mm(fine.physical_points())[inside], atol=1e-9)


def test_field_of_view_weight_keeps_the_grid_points_a_margin_inside_the_image():
    """``field_of_view_weight``: 1 where the mapped grid point lies ``margin_mm`` inside the image's outer voxel faces
    along each of its axes (anisotropic spacing, a translation), and a transform that is not matrix-offset takes the
    resampling path with the same answer where no margin applies."""
    image = sitk.Image([20, 10, 8], sitk.sitkFloat32)
    image.SetSpacing((2.0, 1.0, 3.0))
    image.SetOrigin((5.0, -3.0, 7.0))
    assert sp.field_of_view_weight(image, image).all()
    # margin 2 mm: 1 voxel of 2 mm, 2 of 1 mm, 1 of 3 mm (the first voxel centre is only 1.5 mm inside) on each side
    weight = sp.field_of_view_weight(image, image, margin_mm=2.0)
    assert weight.dtype == np.float32 and weight.shape == (20, 10, 8)
    assert weight.sum() == 18 * 6 * 6 and weight[1:19, 2:8, 1:7].all()
    shifted = sp.field_of_view_weight(image, image, sitk.TranslationTransform(3, (4.0, 0.0, 0.0)))
    assert shifted[:18].all() and not shifted[18:].any()  # grid points 4 mm = 2 voxels further along i
    # a larger grid around the image: zero beyond it, by both paths
    grid = sitk.Image([26, 14, 10], sitk.sitkFloat32)
    grid.SetSpacing(image.GetSpacing())
    grid.SetOrigin((5.0 - 6.0, -3.0 - 2.0, 7.0 - 3.0))
    analytic = sp.field_of_view_weight(grid, image)
    assert analytic.sum() == 20 * 10 * 8 and analytic[3:23, 2:12, 1:9].all()
    zero_field = sitk.Image([26, 14, 10], sitk.sitkVectorFloat64)
    zero_field.CopyInformation(grid)
    resampled = sp.field_of_view_weight(grid, image, sitk.DisplacementFieldTransform(zero_field))
    np.testing.assert_array_equal(resampled, analytic)

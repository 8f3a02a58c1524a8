"""QC figure: orientation handling, rendering, folds, no pyplot state."""
from __future__ import annotations

import io

import matplotlib
import matplotlib.image as mpimg
import numpy as np
import pytest
import SimpleITK as sitk

from textscf.errors import InputError
from textscf.qc import (FOLD_COLOUR, anatomical_axes, focus_point, orthogonal_slices, render_qc_figure,
                        view_planes)
from textscf.results import RegistrationResult
from textscf.spatial import array_to_image, image_to_array, warp_image

CANON_SPACING = (1.5, 1.25, 3.0)  # anisotropic, LPS order
CANON_SHAPE = (48, 40, 24)        # (x: R->L, y: A->P, z: I->S)
ORIGIN = (-30.0, -20.0, 10.0)


# ------------------------------------------------------------------------------------------------ synthetic data
def phantom(points: np.ndarray, shift=(0.0, 0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """CT-like intensities (HU) and labels at LPS ``points`` (..., 3), asymmetric in every axis.

    A body ellipsoid, a bright "liver" on the patient's right, anterior and superior, a "kidney" on the left,
    posterior and inferior, and a "spine" posterior on the midline.
    """
    c = np.array([ORIGIN[a] + CANON_SPACING[a] * (CANON_SHAPE[a] - 1) / 2 for a in range(3)])
    p = points - c - np.array(shift)
    half = np.array([CANON_SPACING[a] * CANON_SHAPE[a] / 2 for a in range(3)])
    body = ((p / (half * np.array([0.85, 0.8, 1.2]))) ** 2).sum(-1) < 1
    liver = (((p - np.array([-12.0, -6.0, 12.0])) / np.array([10.0, 8.0, 14.0])) ** 2).sum(-1) < 1
    kidney = (((p - np.array([12.0, 8.0, -12.0])) / np.array([5.0, 4.0, 10.0])) ** 2).sum(-1) < 1
    spine = (((p[..., :2] - np.array([0.0, 14.0])) / np.array([4.0, 4.0])) ** 2).sum(-1) < 1
    hu = np.full(points.shape[:-1], -1000.0)
    hu[body] = 0.0
    hu[liver] = 120.0
    hu[kidney] = 200.0
    hu[spine & body] = 700.0
    labels = np.zeros(points.shape[:-1], np.uint8)
    labels[liver] = 1
    labels[kidney] = 2
    labels[spine & body] = 3
    # a gentle texture so that misalignment is visible everywhere inside the body
    hu += body * 25.0 * np.sin(p[..., 0] / 3.0) * np.cos(p[..., 1] / 4.0)
    return hu.astype(np.float32), labels


def grid_points(img: sitk.Image) -> np.ndarray:
    """``(I, J, K, 3)`` LPS points of every voxel of ``img``."""
    size = img.GetSize()
    idx = np.stack(np.meshgrid(*(np.arange(s, dtype=float) for s in size), indexing="ij"), axis=-1)
    m = np.array(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
    return idx @ m.T + np.array(img.GetOrigin())


def canonical_reference() -> sitk.Image:
    ref = sitk.Image(list(CANON_SHAPE), sitk.sitkFloat32)
    ref.SetSpacing(CANON_SPACING)
    ref.SetOrigin(ORIGIN)
    return ref


def stored_reference() -> sitk.Image:
    """The canonical grid stored as (i -> superior-to-inferior, j -> right-to-left, k -> anterior-to-posterior).

    The same physical voxels in another storage order: a permuted and partly flipped index frame.
    """
    canon = canonical_reference()
    out = sitk.Flip(sitk.PermuteAxes(canon, [2, 0, 1]), [True, False, False])
    return out


def make_image(ref: sitk.Image, values_ijk: np.ndarray) -> sitk.Image:
    return array_to_image(values_ijk, ref)


def planted_displacement(points: np.ndarray) -> np.ndarray:
    """LPS mm displacement ``(..., 3)``: a smooth shift plus a sharp bump along x that folds the field."""
    c = np.array([ORIGIN[a] + CANON_SPACING[a] * (CANON_SHAPE[a] - 1) / 2 for a in range(3)])
    p = points - c
    v = np.zeros_like(points)
    v[..., 0] = 2.5 * np.sin(p[..., 2] / 15.0)
    v[..., 1] = 2.0 * np.cos(p[..., 0] / 12.0)
    # planted fold: d v_x / d x reaches about -2.4 on the patient's right side of the bump
    bump = np.exp(-(((p - np.array([8.0, -4.0, 0.0])) / np.array([4.0, 6.0, 8.0])) ** 2).sum(-1) / 2)
    v[..., 0] += 16.0 * bump
    return v


def jacobian_of(field_lps: np.ndarray, ref: sitk.Image) -> np.ndarray:
    """det(I + dv/dx) of an ``(I, J, K, 3)`` LPS field on ``ref`` (index-space Jacobian of the voxel field)."""
    m = np.array(ref.GetDirection()).reshape(3, 3) @ np.diag(ref.GetSpacing())
    u = np.moveaxis(field_lps @ np.linalg.inv(m).T, -1, 0)  # (3, I, J, K) in voxels
    g = np.empty((3, 3) + u.shape[1:])
    for a in range(3):
        g[a] = np.stack(np.gradient(u[a]), 0)
    g[0, 0] += 1
    g[1, 1] += 1
    g[2, 2] += 1
    return np.linalg.det(np.moveaxis(g, (0, 1), (-2, -1))).astype(np.float32)


def make_case(fixed_ref: sitk.Image):
    """fixed (on ``fixed_ref``), moving (another grid), labels, and a hand-built RegistrationResult."""
    pts = grid_points(fixed_ref)
    hu, labels = phantom(pts)
    fixed = make_image(fixed_ref, hu)
    fixed_labels = make_image(fixed_ref, labels)
    # moving: shifted anatomy on an identity-direction grid of another spacing
    moving_ref = sitk.Image([40, 44, 30], sitk.sitkFloat32)
    moving_ref.SetSpacing((1.8, 1.2, 2.5))
    moving_ref.SetOrigin((-29.0, -22.0, 8.0))
    mhu, _ = phantom(grid_points(moving_ref), shift=(4.0, -3.0, 5.0))
    moving = make_image(moving_ref, mhu)
    field = planted_displacement(pts)
    displacement = make_image(fixed_ref, np.moveaxis(field, -1, 0).astype(np.float64))
    jac = jacobian_of(field, fixed_ref)
    assert (jac <= 0).any(), "the planted fold must fold"
    result = RegistrationResult(
        displacement=displacement,
        warped=warp_image(moving, displacement, fixed_ref),
        jacobian=make_image(fixed_ref, jac),
        stats={"sdlogj": 0.1234, "folding_percent": 100.0 * float((jac <= 0).mean()), "mean_dice_before": 0.41,
               "mean_dice": 0.83, "seconds_total": 3.21, "device": "cpu"},
        region_names=["background", "liver", "kidney", "spine"],
    )
    return fixed, moving, fixed_labels, result


# ------------------------------------------------------------------------------------------------ orientation
def test_anatomical_axes_identity_and_permuted():
    assert anatomical_axes((1, 0, 0, 0, 1, 0, 0, 0, 1)) == ((0, 1, 2), (1, 1, 1))
    stored = stored_reference()
    axis, sign = anatomical_axes(stored.GetDirection())
    # i runs along z (flipped: superior -> inferior), j along x, k along y
    assert axis == (1, 2, 0)
    assert sign == (1, 1, -1)


def test_stored_reference_holds_the_same_voxels():
    canon, stored = canonical_reference(), stored_reference()
    assert stored.GetSize() == (CANON_SHAPE[2], CANON_SHAPE[0], CANON_SHAPE[1])
    np.testing.assert_allclose(sorted(stored.GetSpacing()), sorted(CANON_SPACING))
    assert not np.allclose(stored.GetDirection(), canon.GetDirection())
    np.testing.assert_allclose(np.sort(grid_points(stored).reshape(-1, 3), axis=0),
                               np.sort(grid_points(canon).reshape(-1, 3), axis=0), atol=1e-6)


@pytest.mark.parametrize("vector", [False, True])
def test_storage_order_does_not_change_the_display(vector):
    canon_ref, stored_ref = canonical_reference(), stored_reference()
    point = (-5.0, 3.0, 40.0)

    def values(ref):  # a smooth but asymmetric function of the LPS position, optionally 3 components
        p = grid_points(ref)
        s = np.sin(p[..., 0] / 7.0) + 0.01 * p[..., 1] ** 2 + 0.1 * p[..., 2]
        return np.moveaxis(np.stack([s, 2 * s, -s], -1), -1, 0) if vector else s

    canon = make_image(canon_ref, values(canon_ref))
    stored = make_image(stored_ref, values(stored_ref))
    a, b = orthogonal_slices(canon, point), orthogonal_slices(stored, point)
    for name in a:
        assert a[name].shape == b[name].shape
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=1e-6)
    # ...and equals plain slicing of the DICOMOrient(LPS) volume, oriented by hand
    oriented = sitk.DICOMOrient(stored, "LPS")
    vol = np.asarray(sitk.GetArrayFromImage(oriented))  # [z, y, x(, c)]
    vol = np.moveaxis(vol, (0, 1, 2), (2, 1, 0))        # [x, y, z(, c)]
    x, y, z = np.rint(np.array(oriented.TransformPhysicalPointToContinuousIndex(point))).astype(int)
    np.testing.assert_allclose(b["axial"], np.swapaxes(vol[:, :, z], 0, 1))           # rows A->P, cols R->L
    np.testing.assert_allclose(b["coronal"], np.swapaxes(vol[:, y, ::-1], 0, 1))      # rows S->I, cols R->L
    np.testing.assert_allclose(b["sagittal"], np.swapaxes(vol[x, :, ::-1], 0, 1))     # rows S->I, cols A->P


def test_radiological_convention():
    """A marker at the patient's left, anterior, superior shows right/top in axial, right/top in coronal,
    left/top in sagittal."""
    ref = stored_reference()
    p = grid_points(ref)
    c = p.reshape(-1, 3).mean(0)
    marker = ((p - (c + np.array([15.0, -12.0, 18.0]))) ** 2).sum(-1) < 6.0 ** 2  # +x = left, -y = ant, +z = sup
    img = make_image(ref, marker.astype(np.float32))
    views = orthogonal_slices(img, c + np.array([15.0, -12.0, 18.0]))

    def centre(a):
        r, cc = np.nonzero(a > 0.5)
        return r.mean() / a.shape[0], cc.mean() / a.shape[1]

    r, cc = centre(views["axial"])
    assert r < 0.5 and cc > 0.5      # anterior at the top, patient left on the viewer's right
    r, cc = centre(views["coronal"])
    assert r < 0.5 and cc > 0.5      # superior at the top, patient left on the viewer's right
    r, cc = centre(views["sagittal"])
    assert r < 0.5 and cc < 0.5      # superior at the top, anterior on the left


def test_view_planes_shapes_and_aspect():
    planes = view_planes(stored_reference())
    nx, ny, nz = CANON_SHAPE
    sx, sy, sz = CANON_SPACING
    assert planes["axial"].shape == (ny, nx) and (planes["axial"].row_spacing, planes["axial"].col_spacing) == (sy, sx)
    assert planes["coronal"].shape == (nz, nx) and planes["coronal"].row_spacing == sz
    assert planes["sagittal"].shape == (nz, ny) and planes["sagittal"].col_spacing == sy


def test_in_plane_displacement_follows_the_display():
    from textscf.qc import _in_plane_displacement

    v = np.array([3.0, -2.5, 6.0])  # LPS mm: towards the patient's left, anterior, superior
    out = {}
    for key, ref in (("canon", canonical_reference()), ("stored", stored_reference())):
        planes = view_planes(ref)
        out[key] = {name: _in_plane_displacement(np.broadcast_to(v, plane.shape + (3,)), ref, plane)[0, 0]
                    for name, plane in planes.items()}
    sx, sy, sz = CANON_SPACING
    for key in out:
        # display (row down, column right) in pixels
        np.testing.assert_allclose(out[key]["axial"], [-2.5 / sy, 3.0 / sx])     # anterior = up, left = right
        np.testing.assert_allclose(out[key]["coronal"], [-6.0 / sz, 3.0 / sx])   # superior = up
        np.testing.assert_allclose(out[key]["sagittal"], [-6.0 / sz, -2.5 / sy])  # anterior = left


def test_focus_point_follows_labels():
    ref = stored_reference()
    fixed, _, labels, _ = make_case(ref)
    lab = image_to_array(labels)
    pts = grid_points(ref)
    np.testing.assert_allclose(focus_point(fixed, labels), pts[lab > 0].mean(0), atol=1e-6)
    body = focus_point(fixed)  # body box centre: near the volume centre for this phantom
    assert np.linalg.norm(body - pts.reshape(-1, 3).mean(0)) < 5.0


# ------------------------------------------------------------------------------------------------ rendering
def _fold_pixels(png: np.ndarray, skip_bottom: int = 0) -> int:
    """Pixels of the fold colour, optionally ignoring the bottom rows (the legend with the colour bar)."""
    rgb = png[: png.shape[0] - skip_bottom, :, :3]
    target = np.array(matplotlib.colors.to_rgb(FOLD_COLOUR))
    return int(np.count_nonzero(np.abs(rgb - target).max(-1) < 0.08))


def _open_pyplot_figures() -> list[int]:
    import matplotlib.pyplot as plt  # only to check that nothing was left open
    return plt.get_fignums()


def test_render_qc_figure_png(tmp_path):
    fixed, moving, labels, result = make_case(stored_reference())
    before = _open_pyplot_figures()
    out = tmp_path / "qc.png"
    render_qc_figure(fixed, moving, result, out, fixed_labels=labels, title="synthetic case", modality="ct")
    assert _open_pyplot_figures() == before
    assert out.is_file() and out.stat().st_size > 20_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png = mpimg.imread(out)
    assert png.ndim == 3 and png.shape[2] in (3, 4)
    assert png.shape[1] > 1200 and png.shape[0] > 600
    assert float(png[..., :3].std()) > 0.1
    assert _fold_pixels(png, skip_bottom=110) > 200  # the planted fold, in the Jacobian panels


def test_render_without_folds_has_no_fold_colour():
    fixed, moving, _, result = make_case(stored_reference())
    result.jacobian = make_image(fixed, np.ones(fixed.GetSize(), np.float32))
    buf = io.BytesIO()
    render_qc_figure(fixed, moving, result, buf, modality="ct")
    png = mpimg.imread(io.BytesIO(buf.getvalue()))
    # only the colour bar's "fold" triangle (in the legend row at the bottom) is lime
    assert _fold_pixels(png, skip_bottom=110) == 0
    assert 0 < _fold_pixels(png) < 300


def test_render_to_file_object_mri_and_no_stats():
    fixed, moving, labels, result = make_case(canonical_reference())
    result.stats = {}
    buf = io.BytesIO()
    render_qc_figure(sitk.RescaleIntensity(fixed, 0, 800), sitk.RescaleIntensity(moving, 0, 800), result, buf,
                     fixed_labels=labels, modality="mri")
    data = buf.getvalue()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    png = mpimg.imread(io.BytesIO(data))
    assert float(png[..., :3].std()) > 0.1


def test_bad_modality():
    fixed, moving, _, result = make_case(canonical_reference())
    with pytest.raises(InputError):
        render_qc_figure(fixed, moving, result, io.BytesIO(), modality="pet")

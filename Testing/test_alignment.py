"""textscf.alignment: known rigid motions are recovered, in the resampling convention, deterministically."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from textscf import alignment as al
from textscf import spatial as sp
from textscf.errors import InputError


def _soft_inside(p, centre, radii, width=2.0):
    """~1 inside the ellipsoid, ~0 outside, smooth edge of ``width`` mm."""
    d = (np.linalg.norm((p - np.asarray(centre)) / np.asarray(radii), axis=-1) - 1.0) * min(radii)
    return 1.0 / (1.0 + np.exp(d / width))


def phantom(p: np.ndarray) -> np.ndarray:
    """A CT-like abdomen in HU, defined in LPS mm: air, an ellipsoidal body, asymmetric organs, a spine, texture."""
    body = _soft_inside(p, (0, 0, 0), (75, 55, 85))
    v = -1000.0 + 1040.0 * body
    for centre, radii, value in [((30, -10, 20), (25, 18, 30), 60), ((-35, 5, -25), (15, 12, 20), 120),
                                 ((10, 30, -30), (8, 8, 40), 300), ((-20, -25, 30), (12, 20, 10), -80),
                                 ((40, 20, -40), (10, 10, 10), 200), ((0, 35, 0), (10, 10, 70), 700)]:
        v = v + value * _soft_inside(p, centre, radii)
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    return v + 30.0 * np.sin(x / 7.0) * np.sin(y / 9.0 + 1.0) * np.sin(z / 11.0 + 2.0) * body


def sample(grid: sp.ModelGrid, transform: sitk.Transform | None = None) -> sitk.Image:
    """The phantom seen through ``transform``: image(y) = phantom(transform^-1(y)) (so transform maps the
    phantom's points to this image's points, i.e. fixed -> moving in the resampling convention)."""
    pts = grid.physical_points()
    if transform is not None:
        a, b = al.linear_part(transform.GetInverse())
        pts = pts @ a.T + b
    return sp.array_to_image(phantom(pts).astype(np.float32), grid)


FIXED_GRID = sp.ModelGrid((64, 52, 64), (3.0, 3.0, 3.2), (-95.0, -78.0, -100.0))
MOVING_GRID = sp.ModelGrid((60, 60, 68), (3.2, 3.0, 3.0), (-90.0, -88.0, -100.0))
PROBES = np.array([[0.0, 0.0, 0.0], [30.0, 20.0, -30.0], [-40.0, 10.0, 40.0], [20.0, -30.0, 10.0],
                   [-30.0, -20.0, -45.0]])


def truth_rigid() -> sitk.Euler3DTransform:
    t = sitk.Euler3DTransform()
    t.SetCenter((0.0, 0.0, 0.0))
    t.SetRotation(np.radians(6.0), np.radians(-4.0), np.radians(8.0))  # 10.6 deg in all
    t.SetTranslation((7.0, -5.0, 6.0))
    return t


def point_errors(estimate: sitk.Transform, truth: sitk.Transform, points=PROBES) -> np.ndarray:
    return np.array([np.linalg.norm(np.subtract(estimate.TransformPoint(p.tolist()), truth.TransformPoint(p.tolist())))
                     for p in points])


@pytest.fixture(scope="module")
def rigid_pair():
    truth = truth_rigid()
    return sample(FIXED_GRID), sample(MOVING_GRID, truth), truth


def test_affine_recovers_rigid_motion_and_is_deterministic(rigid_pair):
    fixed, moving, truth = rigid_pair
    before = point_errors(sitk.Transform(), truth)
    assert before.max() > 10.0
    est = al.initial_alignment(fixed, moving, "affine", seed=0)
    assert isinstance(est, sitk.AffineTransform)
    errors = point_errors(est, truth)
    assert errors.max() < 1.5, errors
    # resampling convention: the moving image pulled through the estimate matches the fixed image
    warped = sitk.Resample(moving, fixed, est, sitk.sitkLinear, -1000.0)
    inner = (slice(12, -12), slice(10, -10), slice(12, -12))
    diff = np.abs(sp.image_to_array(warped) - sp.image_to_array(fixed))[inner]
    diff_before = np.abs(sp.image_to_array(sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear,
                                                         -1000.0)) - sp.image_to_array(fixed))[inner]
    assert diff.mean() < 0.25 * diff_before.mean()
    again = al.initial_alignment(fixed, moving, "affine", seed=0)
    assert again.GetParameters() == est.GetParameters()
    assert again.GetFixedParameters() == est.GetFixedParameters()
    text = al.describe_transform(est, at=(0.0, 0.0, 0.0))
    assert text.startswith("affine: translation (7.") and "rotation 10." in text, text


def test_affine_with_masks(rigid_pair):
    fixed, moving, truth = rigid_pair
    fixed_mask = sitk.Cast(fixed > -500, sitk.sitkUInt8)
    moving_mask = sitk.Cast(moving > -500, sitk.sitkUInt8)
    est = al.initial_alignment(fixed, moving, "affine", fixed_mask=fixed_mask, moving_mask=moving_mask, seed=3)
    assert point_errors(est, truth).max() < 1.5


def test_affine_on_anisotropic_finer_grids():
    """Images finer than the 3 mm working grid (and thick-sliced on one axis) are smoothed and downsampled."""
    truth = truth_rigid()
    fixed = sample(sp.ModelGrid((96, 76, 66), (2.0, 2.0, 3.0), (-95.0, -76.0, -100.0)))
    moving = sample(sp.ModelGrid((100, 120, 40), (1.9, 1.5, 5.0), (-95.0, -90.0, -98.0)), truth)
    est = al.initial_alignment(fixed, moving, "affine", seed=1)
    assert point_errors(est, truth).max() < 1.5


def test_center_aligns_centres_of_mass():
    shift = sitk.TranslationTransform(3, (9.0, -6.0, 4.0))
    fixed = sample(FIXED_GRID)
    moving = sample(MOVING_GRID, shift)
    est = al.initial_alignment(fixed, moving, "center")
    assert isinstance(est, sitk.TranslationTransform)

    def centre_of_mass(img):
        arr = sp.image_to_array(img).astype(np.float64)
        w = np.maximum(arr - np.percentile(arr, 1.0), 0.0)
        pts = sp.ModelGrid.from_image(img).physical_points()
        return (pts * w[..., None]).sum(axis=(0, 1, 2)) / w.sum()

    expected = centre_of_mass(moving) - centre_of_mass(fixed)
    np.testing.assert_allclose(est.GetOffset(), expected, atol=0.05)
    assert np.linalg.norm(np.subtract(est.GetOffset(), (9.0, -6.0, 4.0))) < 1.0
    assert al.describe_transform(est).startswith("translation: translation (")


def test_center_falls_back_to_geometry_and_none_and_bad_method():
    fixed = FIXED_GRID.reference_image()  # all zero: no mass
    moving = MOVING_GRID.reference_image()
    est = al.initial_alignment(fixed, moving, "center")
    np.testing.assert_allclose(est.GetOffset(), MOVING_GRID.centre() - FIXED_GRID.centre(), atol=1e-6)
    assert al.initial_alignment(fixed, moving, "none") is None
    assert al.describe_transform(None) == "none (identity)"
    with pytest.raises(InputError, match=r"unknown alignment method 'rigid'; choose one of none, center, affine"):
        al.initial_alignment(fixed, moving, "rigid")


def test_describe_transform_values():
    t = sitk.Euler3DTransform()
    t.SetCenter((10.0, 20.0, 30.0))
    t.SetRotation(0.0, 0.0, np.radians(30.0))
    t.SetTranslation((1.0, 2.0, 3.0))
    text = al.describe_transform(t)
    assert "translation (1.00, 2.00, 3.00) mm LPS" in text and "at (10.0, 20.0, 30.0)" in text
    assert "rotation 30.00 deg about (0.00, 0.00, 1.00)" in text and "scales (1.000, 1.000, 1.000)" in text
    s = sitk.ScaleTransform(3, (2.0, 1.0, 0.5))
    assert "scales (2.000, 1.000, 0.500)" in al.describe_transform(s)
    field = sitk.Image([4, 4, 4], sitk.sitkVectorFloat64, 3)
    field.SetPixel((1, 2, 1), (0.5, -1.0, 2.0))
    assert al.describe_transform(sitk.DisplacementFieldTransform(sitk.Image(field))) == \
        "DisplacementFieldTransform (non-linear)"
    composite = sitk.CompositeTransform([t, sitk.DisplacementFieldTransform(sitk.Image(field))])
    assert al.describe_transform(composite).startswith("composite of 2 transforms")
    a, b = al.linear_part(t)
    np.testing.assert_allclose(a @ [1.0, 2.0, 3.0] + b, t.TransformPoint((1.0, 2.0, 3.0)))


def test_affine_on_real_ct(shared_data):
    """A known rigid motion of a real abdominal CT (3 mm) is recovered to < 1.5 mm."""
    from textscf.io import read_image

    fixed = read_image(shared_data / "abdomen" / "ct_example.nii.gz")
    centre = sp.ModelGrid.from_image(fixed).centre()
    truth = sitk.Euler3DTransform()
    truth.SetCenter(centre.tolist())
    truth.SetRotation(np.radians(-5.0), np.radians(3.0), np.radians(7.0))
    truth.SetTranslation((-6.0, 8.0, 5.0))
    moving = sitk.Resample(fixed, fixed, truth.GetInverse(), sitk.sitkLinear, -1024.0)
    est = al.initial_alignment(fixed, moving, "affine")
    probes = centre + np.array([[0, 0, 0], [40, 30, -30], [-50, 10, 40], [20, -40, 10]], float)
    assert point_errors(est, truth, probes).max() < 1.5

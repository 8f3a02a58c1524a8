"""Metrics against analytic values: Jacobian of linear fields, SDlogJ (Learn2Reg definition), folding, Dice, HD95."""
import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

from textscf.errors import InputError
from textscf.metrics import (
    dice_per_label,
    displacement_stats,
    folding_percent,
    hd95_per_label,
    jacobian_determinant,
    endpoint_errors_mm,
    mean_endpoint_error_mm,
    mean_ignoring_nan,
    sdlogj,
)

SHAPE = (12, 10, 14)
SPACING = (0.7, 1.3, 2.5)


def _index_grid(shape=SHAPE):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))


def _rotation(angles):
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


# ----------------------------------------------------------------------------------------------------- Jacobian


def test_identity_field():
    u = np.zeros((3, *SHAPE), np.float32)
    jac = jacobian_determinant(u)
    assert jac.shape == SHAPE and jac.dtype == np.float32
    np.testing.assert_array_equal(jac, 1.0)
    assert sdlogj(jac) == 0.0
    assert folding_percent(jac) == 0.0
    assert displacement_stats(u, spacing=SPACING) == {
        "sdlogj": 0.0, "folding_percent": 0.0, "jacobian_min": 1.0, "jacobian_max": 1.0, "jacobian_mean": 1.0}


@pytest.mark.parametrize("scale", [0.8, 1.25])
def test_scaling_in_voxels(scale):
    # x + u(x) = c + s (x - c) scales volumes by s^3; central differences are exact on a linear field
    x = _index_grid()
    c = np.array([5.0, 4.0, 6.5])[:, None, None, None]
    jac = jacobian_determinant((scale - 1) * (x - c))
    np.testing.assert_allclose(jac[1:-1, 1:-1, 1:-1], scale**3, rtol=1e-12)
    np.testing.assert_allclose(jac, scale**3, rtol=1e-12)  # one-sided differences at the edge: exact too


def test_scaling_in_mm_with_anisotropic_spacing():
    s = np.asarray(SPACING)[:, None, None, None]
    pos = _index_grid() * s  # mm along each array axis
    c = np.array([3.0, 7.0, 11.0])[:, None, None, None]
    u_mm = (1.1 - 1) * (pos - c)
    np.testing.assert_allclose(jacobian_determinant(u_mm, spacing=SPACING), 1.1**3, rtol=1e-12)


def test_rotation_in_voxels_and_mm():
    r = _rotation((0.3, -0.2, 0.5))
    x = _index_grid()
    c = np.array([6.0, 5.0, 7.0])
    u_vox = np.einsum("ab,bijk->aijk", r - np.eye(3), x - c[:, None, None, None])
    np.testing.assert_allclose(jacobian_determinant(u_vox), 1.0, atol=1e-12)

    # physical rotation about a centre, field in mm along the array axes of an anisotropic grid
    s = np.asarray(SPACING)
    pos = x * s[:, None, None, None]
    u_mm = np.einsum("ab,bijk->aijk", r - np.eye(3), pos - (c * s)[:, None, None, None])
    np.testing.assert_allclose(jacobian_determinant(u_mm, spacing=SPACING), 1.0, atol=1e-12)
    # the same numbers read as voxels are not a rotation: the spacing matters
    assert abs(float(jacobian_determinant(u_mm).mean()) - 1.0) > 0.05


def test_mm_field_that_is_linear_in_the_index():
    # u_a = alpha_a * idx_a mm  ->  d(u_a / s_a)/d idx_a = alpha_a / s_a
    alpha = np.array([0.35, -0.4, 1.0])
    u_mm = alpha[:, None, None, None] * _index_grid()
    expected = np.prod(1 + alpha / np.asarray(SPACING))
    np.testing.assert_allclose(jacobian_determinant(torch.from_numpy(u_mm), spacing=SPACING), expected, rtol=1e-12)


def test_planted_fold():
    # u_i = h(i) inside a (j, k) block: J = 1 + dh/di exactly (only row i of the gradient is non-zero).
    # h is 0 up to i=a, falls with slope -1.5 to i=b, then stays constant: J = -0.5 strictly between a and b,
    # 1 elsewhere. At the kinks the central difference averages slopes 0 and -1.5, so J = 1 - 0.75 = 0.25 > 0:
    # the folded set is exactly {a < i < b} x block, with no boundary tolerance needed.
    shape, a, b, j_sl, k_sl = (20, 16, 18), 6, 12, slice(3, 11), slice(5, 14)
    h = -1.5 * np.clip(np.arange(shape[0], dtype=np.float64) - a, 0, b - a)
    u = np.zeros((3, *shape))
    u[0][:, j_sl, k_sl] = h[:, None, None]
    jac = jacobian_determinant(u)

    block = np.zeros(shape, bool)
    block[a + 1:b, j_sl, k_sl] = True
    np.testing.assert_allclose(jac[block], -0.5)
    np.testing.assert_allclose(jac[a, j_sl, k_sl], 0.25)
    np.testing.assert_allclose(jac[b, j_sl, k_sl], 0.25)
    assert np.array_equal(jac <= 0, block)
    planted = 100.0 * block.sum() / block.size  # 5*8*9 of 5760 voxels = 6.25 %
    assert folding_percent(jac) == pytest.approx(planted, abs=1e-12)
    assert folding_percent(jac, mask=block) == 100.0
    stats = displacement_stats(u)
    assert stats["folding_percent"] == pytest.approx(planted)
    assert stats["jacobian_min"] == pytest.approx(-0.5) and stats["jacobian_max"] == pytest.approx(1.0)
    n_fold, n_kink = block.sum(), 2 * 8 * 9
    assert stats["jacobian_mean"] == pytest.approx((-0.5 * n_fold + 0.25 * n_kink + (jac.size - n_fold - n_kink)) /
                                                   jac.size)


# ------------------------------------------------------------------------------------------------------- SDlogJ


def test_sdlogj_learn2reg_definition_on_known_values():
    # log(J + 3) = +-1 on alternating halves of the cropped volume -> std exactly 1; the 2-voxel border is ignored
    jac = np.full((10, 9, 8), 1e6)
    inner = jac[2:-2, 2:-2, 2:-2]
    inner[:3] = math.e - 3
    inner[3:] = math.exp(-1) - 3
    assert sdlogj(jac) == pytest.approx(1.0, abs=1e-12)
    # J + 3 is clipped to [1e-9, 1e9] before the log
    inner[:3], inner[3:] = -50.0, 5e12
    assert sdlogj(jac) == pytest.approx(math.log(1e9), rel=1e-12)  # (log 1e9 - log 1e-9) / 2
    # a mask keeps only its voxels (inside the border)
    mask = np.zeros(jac.shape, bool)
    mask[2:5, 2:7, 2:6] = True
    assert sdlogj(jac, mask=mask) == pytest.approx(0.0, abs=1e-12)
    assert sdlogj(np.ones((4, 4, 4)), border=0) == 0.0


def test_sdlogj_matches_learn2reg_pipeline_on_a_smooth_random_field():
    # Learn2Reg: central differences of the voxel field, Jacobian cropped by 2 voxels, std(log(clip(J+3)))
    rng = np.random.default_rng(0)
    shape = (14, 12, 16)
    x = _index_grid(shape)
    u = sum(rng.normal(0, 1.5, (3, 1, 1, 1)) * np.sin(x[d] * f + p)
            for d, f, p in ((0, 0.5, 0.1), (1, 0.7, 1.0), (2, 0.4, 2.0)))
    c = (slice(2, -2),) * 3
    grad = np.empty((3, 3) + tuple(n - 4 for n in shape))
    for a in range(3):
        for b in range(3):
            hi = list(c)
            lo = list(c)
            hi[b] = slice(3, shape[b] - 1)
            lo[b] = slice(1, shape[b] - 3)
            grad[a, b] = (u[a][tuple(hi)] - u[a][tuple(lo)]) / 2
    det = np.linalg.det(np.moveaxis(grad, (0, 1), (-2, -1)) + np.eye(3))
    expected = np.log(np.clip(det + 3, 1e-9, 1e9)).std()
    jac = jacobian_determinant(u)
    np.testing.assert_allclose(jac[c], det, atol=1e-12)
    assert sdlogj(jac) == pytest.approx(expected, rel=1e-12)
    assert expected > 0.1  # a non-trivial field


def test_jacobian_input_errors():
    with pytest.raises(InputError, match="3 channels"):
        jacobian_determinant(np.zeros((2, 8, 8, 8)))
    with pytest.raises(InputError, match=r"\(3, I, J, K\)"):
        jacobian_determinant(np.zeros((3, 8, 8)))
    with pytest.raises(InputError, match="at least 3 voxels"):
        jacobian_determinant(np.zeros((3, 8, 2, 8)))
    with pytest.raises(InputError, match="spacing"):
        jacobian_determinant(np.zeros((3, 8, 8, 8)), spacing=(1.0, 0.0, 1.0))
    with pytest.raises(InputError, match="NaN"):
        jacobian_determinant(np.full((3, 8, 8, 8), np.nan))
    assert jacobian_determinant(np.zeros((1, 3, 8, 8, 8))).shape == (8, 8, 8)  # batch of one accepted
    with pytest.raises(InputError, match="3-D"):
        sdlogj(np.ones((8, 8)))
    with pytest.raises(InputError, match="mask has shape"):
        folding_percent(np.ones((8, 8, 8)), mask=np.ones((8, 8, 7), bool))
    with pytest.raises(InputError, match="border"):
        sdlogj(np.ones((4, 8, 8)))
    with pytest.raises(InputError, match="no voxel"):
        sdlogj(np.ones((8, 8, 8)), mask=np.zeros((8, 8, 8), bool))


# ------------------------------------------------------------------------------------------------- Dice and HD95


def _boxes():
    pred = np.zeros((30, 28, 26), np.int16)
    target = np.zeros_like(pred)
    pred[2:8, 2:8, 2:8] = 1
    target[4:10, 2:8, 2:8] = 1  # overlap 4*6*6 = 144 of 216 + 216 voxels
    pred[20:24, 20:24, 20:24] = 2  # label 2 only in pred
    return pred, target


def test_dice_on_two_boxes():
    pred, target = _boxes()
    dice = dice_per_label(pred, target, [1, 2, 3])
    assert dice[1] == pytest.approx(2 * 144 / 432)
    assert dice[2] == 0.0
    assert math.isnan(dice[3])
    assert dice_per_label(pred, pred, [1, 2]) == {1: 1.0, 2: 1.0}
    assert mean_ignoring_nan(dice) == pytest.approx((2 / 3 + 0) / 2)
    assert math.isnan(mean_ignoring_nan({1: math.nan}))
    # torch input and float label maps behave the same
    assert dice_per_label(torch.from_numpy(pred), target.astype(np.float64), [1])[1] == pytest.approx(2 / 3)


def test_hd95_offset_boxes_anisotropic():
    # a box shifted by d voxels along one axis: every point of the leading face is d * s_axis from the other
    # surface and that face holds far more than 5 % of the surface voxels, so HD95 = d * s_axis exactly
    spacing = (2.0, 0.8, 1.5)
    pred = np.zeros((40, 40, 40), np.int16)
    target = np.zeros_like(pred)
    pred[10:20, 5:25, 5:25] = 1
    target[13:23, 5:25, 5:25] = 1  # 3 voxels along i
    pred[5:25, 28:38, 8:28] = 2
    target[5:25, 28:38, 10:30] = 2  # 2 voxels along k
    pred[30:35, 30:35, 30:35] = 3  # label 3 missing from target
    hd = hd95_per_label(pred, target, [1, 2, 3, 4], spacing)
    assert hd[1] == pytest.approx(3 * 2.0)
    assert hd[2] == pytest.approx(2 * 1.5)
    assert math.isnan(hd[3]) and math.isnan(hd[4])
    assert hd95_per_label(pred, pred, [1], spacing)[1] == 0.0


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy")  # MONAI-internal deprecation in the reference call
def test_hd95_crop_does_not_change_the_value():
    rng = np.random.default_rng(1)
    shape, spacing = (36, 30, 32), (1.2, 0.9, 2.0)
    x = _index_grid(shape)

    def blob(centre, radii):
        r2 = sum(((x[a] - centre[a]) / radii[a]) ** 2 for a in range(3))
        return r2 + rng.normal(0, 0.15, shape) < 1.0

    pred = np.zeros(shape, np.int16)
    target = np.zeros_like(pred)
    pred[blob((12, 10, 11), (6, 5, 7))] = 1
    target[blob((14, 11, 12), (7, 5, 6))] = 1
    pred[blob((0, 25, 28), (8, 6, 5))] = 2  # touches the volume edge
    target[blob((2, 27, 29), (7, 5, 5))] = 2
    hd = hd95_per_label(pred, target, [1, 2], spacing)
    for label in (1, 2):
        full = compute_hausdorff_distance(torch.from_numpy(pred == label)[None, None],
                                          torch.from_numpy(target == label)[None, None],
                                          include_background=True, percentile=95, spacing=list(spacing))
        assert hd[label] == pytest.approx(float(full.item()), rel=1e-6)
        assert hd[label] > 0
    # the boxes come from one pass over each map, for any integer or float label map and any label value: the
    # cropped Dice and HD95 equal MONAI's on the whole volume (labels in one map only, absent, 0 and negative too)
    pred[blob((20, 20, 20), (4, 4, 4))] = -3
    target[blob((30, 5, 5), (3, 3, 3))] = 7  # only in the target
    labels = [1, 2, 7, 9, 0, -3]
    for p, t in ((pred, target), (pred.astype(np.float32), target.astype(np.int64)), (pred.T, target.T)):
        dice, hd = dice_per_label(p, t, labels), hd95_per_label(p, t, labels, spacing[::-1] if p is pred.T else spacing)
        for label in labels:
            a, b = torch.from_numpy(np.ascontiguousarray(p == label)), torch.from_numpy(np.ascontiguousarray(t == label))
            if not (a.any() or b.any()):
                assert math.isnan(dice[label]) and math.isnan(hd[label])
                continue
            full_dice = compute_dice(a[None, None], b[None, None], include_background=True, ignore_empty=False)
            assert dice[label] == pytest.approx(float(full_dice.item()), abs=1e-7), label
            if not (a.any() and b.any()):
                assert math.isnan(hd[label])
                continue
            full = compute_hausdorff_distance(a[None, None], b[None, None], include_background=True, percentile=95,
                                              spacing=list(spacing[::-1] if p is pred.T else spacing))
            assert hd[label] == pytest.approx(float(full.item()), rel=1e-6), label


def test_label_metric_input_errors():
    a = np.zeros((8, 8, 8), np.int16)
    with pytest.raises(InputError, match="same shape"):
        dice_per_label(a, np.zeros((8, 8, 9), np.int16), [1])
    with pytest.raises(InputError, match="3-D"):
        dice_per_label(a[0], a[0], [1])
    with pytest.raises(InputError, match="spacing"):
        hd95_per_label(a, a, [1], spacing=(1.0, 1.0))
    with pytest.raises(InputError, match="labels"):
        dice_per_label(a, a, [])


def test_mean_endpoint_error():
    u = np.zeros((3, 4, 5, 6), np.float32)
    v = u.copy()
    v[0] = 1.5  # 1.5 voxels of 2 mm along i
    assert mean_endpoint_error_mm(u, u, (2, 2, 2)) == 0.0
    assert mean_endpoint_error_mm(v, u, (2.0, 1.0, 1.0)) == pytest.approx(3.0)
    mask = np.zeros((4, 5, 6), bool)
    mask[0, 0, 0] = True
    v[0, 0, 0, 0] = 0.0
    assert mean_endpoint_error_mm(v, u, (2.0, 1.0, 1.0), mask) == 0.0
    v[1, 1, 1, 1] = 4.0  # one voxel 5 mm off: the worst error is sqrt(3^2 + 4^2)
    errors = endpoint_errors_mm(v, u, (2.0, 1.0, 1.0))
    assert errors.shape == (4 * 5 * 6,) and errors.max() == pytest.approx(5.0) and errors.min() == 0.0
    with pytest.raises(InputError):
        mean_endpoint_error_mm(v, u[:, :2], (1, 1, 1))

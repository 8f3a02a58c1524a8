"""Losses against analytic values, plus gradient flow through RegistrationLoss."""
import pytest
import torch

from textscf.errors import InputError
from textscf.losses import (
    RegistrationLoss,
    endpoint_error_loss,
    multiscale_dice_loss,
    gradient_loss,
    local_ncc_loss,
    mind_loss,
    mse_loss,
    one_hot_regions,
    soft_dice_loss,
)

SHAPE = (2, 1, 12, 10, 14)


def _regions():
    r = torch.zeros(SHAPE, dtype=torch.long)
    r[:, :, 2:6, 2:6, 2:6] = 1
    r[:, :, 7:11, 5:9, 8:13] = 2
    return r


def test_one_hot_regions():
    r = _regions()
    oh = one_hot_regions(r, 4)
    assert oh.shape == (2, 4, 12, 10, 14) and oh.dtype == torch.float32
    assert torch.equal(oh.sum(1), torch.ones(2, 12, 10, 14))
    assert torch.equal(oh.argmax(1, keepdim=True), r)
    assert oh[:, 3].sum() == 0  # region 3 absent
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        one_hot_regions(r, 2)
    with pytest.raises(InputError, match="torch.long"):
        one_hot_regions(r.float(), 3)
    with pytest.raises(InputError, match="one channel"):
        one_hot_regions(r.expand(2, 2, 12, 10, 14), 3)


def test_mse():
    a = torch.rand(SHAPE)
    assert mse_loss(a, a).item() == 0.0
    assert mse_loss(torch.zeros(SHAPE), torch.full(SHAPE, 2.0)).item() == pytest.approx(4.0)
    with pytest.raises(InputError, match="same shape"):
        mse_loss(a, a[:, :, :-1])


def test_soft_dice_identical_disjoint_soft_and_absent():
    oh = one_hot_regions(_regions(), 3)
    assert soft_dice_loss(oh, oh).item() == pytest.approx(0.0, abs=1e-6)
    # regions 1 and 2 swapped: no overlap in either channel
    swapped = oh[:, [0, 2, 1]]
    assert soft_dice_loss(swapped, oh).item() == pytest.approx(1.0, abs=1e-6)
    # prediction 0.5 where the target is 1: 2 * 0.5n / (0.25n + n) = 0.8 (squared denominator)
    half = oh.clone()
    half[:, 1:] *= 0.5
    assert soft_dice_loss(half, oh).item() == pytest.approx(0.2, abs=1e-6)
    # an extra region absent from both changes nothing (no NaN, no dilution)
    oh4 = one_hot_regions(_regions(), 4)
    half4 = oh4.clone()
    half4[:, 1:] *= 0.5
    assert soft_dice_loss(half4, oh4).item() == pytest.approx(0.2, abs=1e-6)
    # background included: channel 0 is 0.5 * background against 1 -> 0.2 too
    half4[:, 0] *= 0.5
    assert soft_dice_loss(half4, oh4, include_background=True).item() == pytest.approx(0.2, abs=1e-6)
    # nothing present at all -> 0, still differentiable
    empty = torch.zeros(1, 3, 4, 4, 4, requires_grad=True)
    loss = soft_dice_loss(empty, torch.zeros(1, 3, 4, 4, 4))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(empty.grad).all()
    with pytest.raises(InputError, match="at least 2"):
        soft_dice_loss(oh[:, :1], oh[:, :1])


def test_gradient_loss_of_linear_field():
    # u_c = sum_b A_cb idx_b: every forward difference along axis b in channel c equals A_cb,
    # so the loss is (1/3) sum_b mean_c A_cb^2 = ||A||_F^2 / 9
    a = torch.tensor([[0.5, -1.0, 0.2], [0.0, 2.0, 0.3], [-0.7, 0.1, 1.5]], dtype=torch.float64)
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in (9, 8, 7)], indexing="ij"))
    field = torch.einsum("cb,bijk->cijk", a, idx)[None].repeat(2, 1, 1, 1, 1)
    assert gradient_loss(field).item() == pytest.approx(float((a**2).sum()) / 9, rel=1e-12)
    assert gradient_loss(torch.full((1, 3, 5, 5, 5), 3.0)).item() == 0.0  # constant translation


def test_local_ncc():
    g = torch.Generator().manual_seed(0)
    a = torch.rand((1, 1, 16, 16, 16), generator=g)
    b = torch.rand((1, 1, 16, 16, 16), generator=g)
    assert local_ncc_loss(a, a).item() == pytest.approx(-1.0, abs=1e-4)
    # invariant to intensity scale; the correlation is squared, so an inverted image also scores -1.
    # (An offset is not tested: MONAI zero-pads, so border windows see it.)
    assert local_ncc_loss(a, 3 * a).item() == pytest.approx(-1.0, abs=1e-4)
    assert local_ncc_loss(a, -a).item() == pytest.approx(-1.0, abs=1e-4)
    # independent zero-mean noise: squared correlation ~ 1/window^3 (zero-mean so the zero padding adds no
    # shared structure)
    assert -0.01 < local_ncc_loss(a - 0.5, b - 0.5).item() < 0.0
    with pytest.raises(InputError, match="odd"):
        local_ncc_loss(a, a, window=4)


@pytest.mark.parametrize("shape,window", [((1, 1, 12, 17, 20), 9), ((2, 1, 9, 6, 11), 5), ((1, 2, 7, 8, 9), 3)])
def test_local_ncc_is_monai_local_ncc_with_the_fixed_statistics_kept(shape, window):
    """The running-sum windows give MONAI's rectangular-kernel local NCC (value and gradient), windows larger than the
    volume included; one LocalNCC serves many warped images."""
    from monai.losses import LocalNormalizedCrossCorrelationLoss

    from textscf.losses import LocalNCC, window_sums

    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(shape, generator=g)
    monai_ncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=window, kernel_type="rectangular")
    ours = LocalNCC(fixed, window)
    for _ in range(2):
        warped = (fixed + 0.3 * torch.rand(shape, generator=g)).requires_grad_()
        expected = monai_ncc(warped, fixed)
        (expected_grad,) = torch.autograd.grad(expected, warped)
        value = ours(warped)
        (grad,) = torch.autograd.grad(value, warped)
        assert value.item() == pytest.approx(expected.item(), rel=1e-5)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4 * float(expected_grad.abs().max()))
    box = torch.ones(1, 1, window, window, window)
    torch.testing.assert_close(window_sums(fixed[:, :1], window),
                               torch.nn.functional.conv3d(fixed[:, :1], box, padding=window // 2), rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="same shape"):
        ours(torch.rand(1, 1, 4, 4, 4))


@pytest.mark.parametrize("similarity", ["mse", "ncc", "mind"])
def test_registration_loss_components_and_backward(similarity):
    g = torch.Generator().manual_seed(1)
    fixed = torch.rand((1, 1, 16, 16, 16), generator=g)
    warped = torch.rand((1, 1, 16, 16, 16), generator=g).requires_grad_(True)
    field = torch.randn((1, 3, 8, 8, 8), generator=g).requires_grad_(True)
    regions = torch.zeros((1, 1, 16, 16, 16), dtype=torch.long)
    regions[:, :, 4:12, 4:12, 4:12] = 1
    fixed_oh = one_hot_regions(regions, 2)
    warped_oh = (0.7 * fixed_oh + 0.15).requires_grad_(True)

    crit = RegistrationLoss(similarity=similarity, dice_weight=0.5, smooth_weight=0.2)
    total, parts = crit(warped, fixed, field, warped_oh, fixed_oh)
    assert set(parts) == {"similarity", "smooth", "dice"}
    assert sum(parts.values()) == pytest.approx(total.item(), rel=1e-6)
    sim = {"mse": mse_loss, "ncc": local_ncc_loss, "mind": mind_loss}[similarity](warped, fixed)
    assert parts["similarity"] == pytest.approx(sim.item(), rel=1e-6)
    assert parts["smooth"] == pytest.approx(0.2 * gradient_loss(field).item(), rel=1e-6)
    assert parts["dice"] == pytest.approx(0.5 * soft_dice_loss(warped_oh, fixed_oh).item(), rel=1e-6)
    total.backward()
    for t in (warped, field, warped_oh):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0

    total2, parts2 = crit(warped, fixed, field)  # no labels: no Dice term
    assert set(parts2) == {"similarity", "smooth"}
    assert total2.item() == pytest.approx(parts["similarity"] + parts["smooth"], rel=1e-6)


def test_registration_loss_errors():
    with pytest.raises(InputError, match="'mse', 'ncc', 'mind'"):
        RegistrationLoss(similarity="mi")
    with pytest.raises(InputError, match="smooth_weight"):
        RegistrationLoss(smooth_weight=-1.0)
    x = torch.zeros(1, 1, 4, 4, 4)
    with pytest.raises(InputError, match="both"):
        RegistrationLoss()(x, x, torch.zeros(1, 3, 4, 4, 4), warped_labels_onehot=torch.zeros(1, 2, 4, 4, 4))


def test_blurred_dice_reaches_misalignments_the_sharp_dice_cannot_see():
    from textscf.warp import SpatialTransformer

    fixed = torch.zeros(1, 1, 24, 24, 24, dtype=torch.long)
    fixed[:, :, 8:14, 8:14, 8:14] = 1
    moving = torch.roll(fixed, 8, dims=2)  # 8 voxels off: no overlap, no moving boundary within reach
    warp = SpatialTransformer()
    field = torch.zeros(1, 3, 24, 24, 24, requires_grad=True)
    m, f = one_hot_regions(moving, 2), one_hot_regions(fixed, 2)
    sharp = multiscale_dice_loss(m, f, field, warp, (0.0,))
    sharp.backward()
    # inside the fixed organ the sharp loss gives no direction at all
    assert float(sharp) == pytest.approx(1.0) and float(field.grad[0, :, 8:14, 8:14, 8:14].abs().sum()) == 0.0
    field.grad = None
    blurred = multiscale_dice_loss(m, f, field, warp, (0.0, 3.0))
    blurred.backward()
    assert float(blurred) < 1.0
    # the gradient points the right way: sampling further along +i (towards the moving organ) lowers the loss
    assert float(field.grad[0, 0, 8:14, 8:14, 8:14].sum()) < 0
    with pytest.raises(InputError, match="sigmas"):
        multiscale_dice_loss(m, f, field, warp, (-1.0,))


def test_endpoint_error():
    true = torch.zeros(1, 3, 4, 4, 4)
    pred = torch.zeros(1, 3, 4, 4, 4)
    pred[:, 0] = 3.0
    pred[:, 1] = 4.0
    assert float(endpoint_error_loss(pred, true)) == pytest.approx(5.0, rel=1e-6)
    assert float(endpoint_error_loss(true, true)) == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(InputError):
        endpoint_error_loss(pred, true[:, :2])


def test_mind_descriptors_ignore_contrast_and_see_misalignment():
    from textscf.mind import CHANNELS, mind_ssc

    g = torch.Generator().manual_seed(3)
    image = torch.nn.functional.avg_pool3d(torch.rand((1, 1, 24, 24, 24), generator=g), 3, 1, 1)
    d = mind_ssc(image)
    assert d.shape == (1, CHANNELS, 24, 24, 24) == (1, 12, 24, 24, 24)
    assert float(d.min()) > 0 and float(d.max()) == pytest.approx(1.0)
    # an affine or inverted remapping of the intensities leaves the descriptors as they were
    assert float(mind_loss(image, 1.0 - 3.0 * image)) < 1e-8
    assert float(mind_loss(image, image)) == 0.0
    # a shifted copy differs clearly
    assert float(mind_loss(torch.roll(image, 2, 2), image)) > 1e-3
    warped = image.clone().requires_grad_(True)
    mind_loss(warped, torch.roll(image, 1, 2)).backward()
    assert torch.isfinite(warped.grad).all() and warped.grad.abs().sum() > 0
    with pytest.raises(InputError, match="MIND-SSC"):
        mind_ssc(torch.zeros(1, 2, 8, 8, 8))
    with pytest.raises(InputError, match="dilation"):
        mind_ssc(image, dilation=0)


def test_registration_loss_keeps_the_fixed_window_statistics_while_the_fixed_image_is_the_same():
    from textscf.losses import RegistrationLoss, local_ncc_loss

    g = torch.Generator().manual_seed(0)
    fixed, other = torch.rand((1, 1, 12, 10, 14), generator=g), torch.rand((1, 1, 12, 10, 14), generator=g)
    warped = torch.rand((1, 1, 12, 10, 14), generator=g)
    field = torch.zeros(1, 3, 12, 10, 14)
    loss = RegistrationLoss("ncc", dice_weight=0.0, smooth_weight=0.0, ncc_window=5)
    first, _ = loss(warped, fixed, field)
    kept = loss._ncc
    again, _ = loss(warped, fixed, field)
    assert loss._ncc is kept and torch.equal(first, again)
    torch.testing.assert_close(first, local_ncc_loss(warped, fixed, 5))
    changed, _ = loss(warped, other, field)  # another fixed image: its own statistics
    assert loss._ncc is not kept
    torch.testing.assert_close(changed, local_ncc_loss(warped, other, 5))

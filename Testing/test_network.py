"""TextSCFNet: the SCF head against eq. 4 evaluated voxel by voxel, warping, integration, shapes."""
import numpy as np
import pytest
import torch

from textscf.networks import LKUNet, TextSCFConfig, TextSCFHead, TextSCFNet
from textscf.networks.heads import ReferenceSCFHead
from textscf.warp import ScalingAndSquaring, SpatialTransformer, compose, invert, resize_field, warp


def _randomise(module: torch.nn.Module, seed: int = 0, scale: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_scf_head_matches_per_voxel_equation():
    torch.manual_seed(0)
    n, c1, c2, hidden = 5, 7, 6, 8
    head = TextSCFHead(c1, c2, hidden)
    _randomise(head)
    text = torch.randn(n, c1)
    feats = torch.randn(2, c2, 3, 4, 5)
    regions = torch.randint(0, n, (2, 1, 3, 4, 5))
    p = torch.rand(2, 1, 3, 4, 5)
    out = head(feats, text, regions, p)
    assert out.shape == (2, 3, 3, 4, 5)

    w_r = head.shared_filter.detach()
    expected = torch.zeros_like(out)
    for b in range(2):
        for i in range(3):
            for j in range(4):
                for k in range(5):
                    w = head.filter_mlp(text[regions[b, 0, i, j, k]]).view(3, c2)  # Φθ(B[J_f(x)])
                    f = feats[b, :, i, j, k]
                    px = p[b, 0, i, j, k]
                    expected[b, :, i, j, k] = (px * w + (1 - px) * w_r) @ f
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_filter_bank_is_mlp_of_text_matrix_and_confidence_one_ignores_shared_filter():
    head = TextSCFHead(4, 3, 5)
    _randomise(head, seed=1)
    text = torch.randn(6, 4)
    bank = head.filter_bank(text)
    assert bank.shape == (6, 3, 3)
    torch.testing.assert_close(bank, head.filter_mlp.mlp(text).view(6, 3, 3))
    feats, regions = torch.randn(1, 3, 2, 2, 2), torch.randint(0, 6, (1, 1, 2, 2, 2))
    torch.testing.assert_close(head(feats, text, regions, torch.ones(1, 1, 2, 2, 2)), head(feats, text, regions))
    # p = 0 everywhere: the shared filter alone.
    shared = torch.einsum("ac,bcijk->baijk", head.shared_filter, feats)
    torch.testing.assert_close(head(feats, text, regions, torch.zeros(1, 1, 2, 2, 2)), shared)


def test_no_scf_head_uses_only_shared_filter():
    head = TextSCFHead(4, 3, 5, covariant=False)
    assert not any("filter_mlp" in name for name, _ in head.named_parameters())
    feats = torch.randn(1, 3, 2, 2, 2)
    a = head(feats, torch.randn(6, 4), torch.randint(0, 6, (1, 1, 2, 2, 2)))
    b = head(feats, torch.randn(6, 4), torch.randint(0, 6, (1, 1, 2, 2, 2)))
    torch.testing.assert_close(a, b)


def test_lkunet_output_is_half_resolution_with_2ns_channels():
    net = LKUNet(2, start_channels=4)
    out = net(torch.rand(1, 2, 32, 16, 48))
    assert out.shape == (1, 8, 16, 8, 24)
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.rand(1, 2, 30, 16, 16))


def test_filter_bank_and_regions_route_the_flow():
    """Two regions with different filters give different flows where F is the same."""
    cfg = TextSCFConfig(num_regions=3, text_dim=3, start_channels=2, hidden_channels=4)
    net = TextSCFNet(cfg, torch.eye(3)).eval()
    _randomise(net.head, seed=3)
    bank = net.filter_bank()
    assert bank.shape == (3, 3, 4)
    torch.testing.assert_close(bank, net.head.filter_mlp(torch.eye(3)).view(3, 3, 4))


@pytest.mark.parametrize("head", ["textscf", "no_scf", "reference"])
@pytest.mark.parametrize("integrate", [False, True])
def test_textscf_net_shapes_and_near_zero_initial_field(head, integrate):
    cfg = TextSCFConfig(num_regions=4, text_dim=4, start_channels=2, hidden_channels=8, head=head, integrate=integrate)
    net = TextSCFNet(cfg, torch.eye(4))
    m, f = torch.rand(1, 1, 32, 32, 16), torch.rand(1, 1, 32, 32, 16)
    r = torch.randint(0, 4, (1, 1, 32, 32, 16))
    out = net(m, f, r, torch.rand(1, 1, 32, 32, 16))
    assert out.displacement.shape == (1, 3, 32, 32, 16)
    assert out.warped.shape == m.shape
    if head != "reference":  # our heads start from a near-zero field; the authors' head does not
        assert out.displacement.abs().max() < 1e-2
    assert torch.isfinite(out.displacement).all()
    expected_reg = (1, 3, 16, 16, 8) if integrate else (1, 3, 32, 32, 16)
    assert out.regularised_field.shape == expected_reg
    out.displacement.sum().backward()


def test_net_rejects_out_of_range_regions_and_bad_text_matrix():
    cfg = TextSCFConfig(num_regions=3, text_dim=3, start_channels=2, hidden_channels=4)
    with pytest.raises(ValueError, match="text matrix"):
        TextSCFNet(cfg, torch.eye(4))
    net = TextSCFNet(cfg, torch.eye(3))
    x = torch.rand(1, 1, 16, 16, 16)
    with pytest.raises(ValueError, match="region indices"):
        net(x, x, torch.full((1, 1, 16, 16, 16), 5))


def test_warp_by_constant_integer_displacement_shifts_exactly():
    img = torch.zeros(1, 1, 10, 12, 14)
    img[0, 0, 4, 5, 6] = 1.0
    u = torch.zeros(1, 3, 10, 12, 14)
    u[:, 0], u[:, 1], u[:, 2] = 2.0, -1.0, 3.0
    out = warp(img, u)
    # warped(x) = img(x + u): the spike appears at x = (4-2, 5+1, 6-3)
    assert out[0, 0, 2, 6, 3] == pytest.approx(1.0)
    assert out.sum() == pytest.approx(1.0)


def test_warp_by_affine_displacement_matches_analytic_pattern():
    shape = (20, 18, 16)
    idx = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))

    def pattern(p):  # a linear function: trilinear interpolation reproduces it exactly
        return 0.3 * p[0] - 0.2 * p[1] + 0.5 * p[2] + 1.0

    a = torch.tensor([[0.05, 0.02, 0.0], [-0.03, 0.04, 0.01], [0.0, 0.02, -0.05]], dtype=torch.float64)
    t = torch.tensor([0.7, -0.4, 0.3], dtype=torch.float64)
    u = torch.einsum("ab,bijk->aijk", a, idx) + t.view(3, 1, 1, 1)
    out = warp(pattern(idx)[None, None], u[None])
    expected = pattern(idx + u)
    inside = ((idx + u >= 0) & (idx + u <= torch.tensor(shape).view(3, 1, 1, 1) - 1)).all(0)
    np.testing.assert_allclose(out[0, 0][inside].numpy(), expected[inside].numpy(), atol=1e-9)


def test_scaling_and_squaring_inverse_and_small_field_limit():
    torch.manual_seed(0)
    coarse = torch.randn(1, 3, 4, 4, 4) * 0.75  # up to ~2.6 voxels
    v = resize_field(coarse, (24, 24, 24))  # smooth stationary velocity, voxels
    integrate = ScalingAndSquaring(7)
    phi = integrate(v)
    phi_inv = integrate(-v)
    residual = compose(phi, phi_inv)[..., 4:-4, 4:-4, 4:-4].abs()
    assert residual.mean() < 0.01 and residual.max() < 0.1  # voxels; trilinear resampling limits the exactness
    assert phi.abs().max() > 2.0  # the field is not trivially small
    # For a tiny velocity, exp(v) ~ v.
    tiny = v * 1e-3
    torch.testing.assert_close(integrate(tiny), tiny, atol=1e-6, rtol=1e-2)


def test_invert_gives_the_inverse_map_both_ways():
    n, w = 32, 2 * np.pi / 32
    i, j, k = torch.meshgrid(*[torch.arange(n, dtype=torch.float32)] * 3, indexing="ij")
    # smooth, up to 2.5 voxels, voxel gradient up to 0.5 (no folding)
    u = torch.stack([2.5 * torch.sin(w * j + 0.3), 2.0 * torch.cos(w * k), 1.5 * torch.sin(w * (i + k))])[None]
    v = invert(u)
    then_u = compose(v, u)[..., 4:-4, 4:-4, 4:-4].norm(dim=1)  # the fixed point it solves: y + v(y) + u(.) = y
    assert then_u.max() < 1e-4, then_u.max()
    then_v = compose(u, v)[..., 4:-4, 4:-4, 4:-4].norm(dim=1)  # the other order: trilinear sampling of v limits it
    assert then_v.max() < 0.1, then_v.max()
    assert torch.equal(invert(torch.zeros(1, 3, 8, 8, 8)), torch.zeros(1, 3, 8, 8, 8))


def test_compose_slab_by_slab_equals_the_whole_field(monkeypatch):
    from textscf import warp as module

    torch.manual_seed(0)
    first = resize_field(torch.randn(1, 3, 4, 4, 4) * 2, (40, 36, 30))
    second = resize_field(torch.randn(1, 3, 4, 4, 4) * 2, (40, 36, 30))
    whole = compose(first, second)
    monkeypatch.setattr(module, "COMPOSE_SLAB_VOXELS", 36 * 30 * 3)  # 14 slabs, the last one shorter
    torch.testing.assert_close(compose(first, second), whole, atol=1e-5, rtol=0)


def test_resize_field_rescale_converts_units():
    f = torch.ones(1, 3, 4, 4, 4)
    out = resize_field(f, (8, 8, 4), rescale=True)
    assert out.shape == (1, 3, 8, 8, 4)
    assert torch.allclose(out[0, 0], torch.full((8, 8, 4), 2.0))
    assert torch.allclose(out[0, 2], torch.ones(8, 8, 4))
    assert torch.allclose(resize_field(f, (8, 8, 4)), torch.ones(1, 3, 8, 8, 4))


def test_spatial_transformer_nearest_keeps_labels():
    labels = torch.randint(0, 5, (1, 1, 8, 8, 8)).float()
    u = torch.full((1, 3, 8, 8, 8), 0.3)
    out = SpatialTransformer(mode="nearest")(labels, u)
    assert set(out.unique().tolist()) <= set(range(5))


def test_reference_head_combines_covariant_and_conv_flow():
    head = ReferenceSCFHead(4, 3, 5)
    _randomise(head, seed=2)
    text = torch.randn(6, 4)
    feats, regions = torch.randn(1, 3, 4, 4, 4), torch.randint(0, 6, (1, 1, 4, 4, 4))
    out = head(feats, text, regions)
    bx = head.generate_flow_x(text)[regions[0, 0]]  # (4,4,4,C2)
    flow_x = (bx.permute(3, 0, 1, 2) * feats[0]).sum(0) + head.flow(feats)[0, 0]
    torch.testing.assert_close(out[0, 0], flow_x, rtol=1e-5, atol=1e-6)


def _deep_gradient(scheme: str) -> tuple[float, float]:
    """Gradient norm reaching the deepest large-kernel block after one backward pass, and the initial field."""
    from textscf.train import build_model

    net = build_model(["a", "b"], [1, 2], start_channels=4, hidden_channels=16, spacing=(4, 4, 4),
                      input_shape=(32, 32, 32), seed=0, init=scheme)
    g = torch.Generator().manual_seed(1)
    moving, fixed = torch.rand(1, 1, 32, 32, 32, generator=g), torch.rand(1, 1, 32, 32, 32, generator=g)
    regions = torch.randint(0, 3, (1, 1, 32, 32, 32), generator=g)
    out = net(moving, fixed, regions)
    ((out.warped - fixed) ** 2).mean().backward()
    return float(net.backbone.ec9.large.weight.grad.norm()), float(out.displacement.abs().max())


def test_kaiming_initialisation_lets_the_gradient_reach_the_deepest_block():
    # the authors' scheme leaves the deep backbone silent (far below Adam's epsilon of 1e-8)
    reference_grad, reference_field = _deep_gradient("reference")
    kaiming_grad, kaiming_field = _deep_gradient("kaiming")
    assert reference_grad < 1e-9 and reference_field < 1e-3
    assert kaiming_grad > 1e4 * reference_grad and kaiming_grad > 1e-7
    assert kaiming_field < 0.5  # still well below a voxel: training starts near the identity


def test_initialise_is_reproducible_and_rejects_unknown_schemes():
    from textscf.train import build_model

    a = build_model(["a"], [1], start_channels=4, hidden_channels=8, input_shape=(16, 16, 16), seed=3, init="kaiming")
    b = build_model(["a"], [1], start_channels=4, hidden_channels=8, input_shape=(16, 16, 16), seed=3, init="kaiming")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="unknown initialisation"):
        a.initialise("xavier")

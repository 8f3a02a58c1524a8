"""Checkpoints: round trip, clear errors, and the authors' reference state dicts."""
import torch
import torch.nn.functional as F
import pytest

from textscf.checkpoint import load_checkpoint, save_checkpoint
from textscf.errors import CheckpointError
from textscf.networks import TextSCFConfig, TextSCFNet
from textscf.reference import (
    REFERENCE_BRAIN_STRUCTURES,
    load_reference_model,
    reference_region_names,
    reference_text_matrix,
)


def _small_net(**kw):
    cfg = TextSCFConfig(num_regions=4, text_dim=5, start_channels=2, hidden_channels=8,
                        region_names=["liver", "spleen", "aorta"], label_values=[6, 1, 8], **kw)
    torch.manual_seed(0)
    net = TextSCFNet(cfg, torch.randn(4, 5))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval()


def _inputs(shape=(16, 32, 16), regions=4):
    g = torch.Generator().manual_seed(1)
    m, f = torch.rand(1, 1, *shape, generator=g), torch.rand(1, 1, *shape, generator=g)
    r = torch.randint(0, regions, (1, 1, *shape), generator=g)
    return m, f, r


@pytest.mark.parametrize("integrate", [False, True])
def test_checkpoint_round_trip_reproduces_outputs_and_config(tmp_path, integrate):
    net = _small_net(integrate=integrate)
    path = save_checkpoint(net, tmp_path / "model.pt", metadata={"epochs": 3})
    loaded, meta = load_checkpoint(path)
    assert meta == {"epochs": 3}
    assert loaded.config == net.config
    torch.testing.assert_close(loaded.text_matrix, net.text_matrix)
    m, f, r = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(m, f, r).displacement, net(m, f, r).displacement)
    # Plain types and tensors only: loads with weights_only=True (load_checkpoint already did).
    raw = torch.load(path, weights_only=True)
    assert raw["config"]["region_names"] == ["liver", "spleen", "aorta"]


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "empty.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupted, truncated"):
        load_checkpoint(tmp_path / "text.pt")
    good = save_checkpoint(_small_net(), tmp_path / "good.pt")
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted, truncated"):
        load_checkpoint(tmp_path / "truncated.pt")
    torch.save({"ec1.weight": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a textscf checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    # Weights of another architecture under a valid header.
    payload = torch.load(good, weights_only=True)
    payload["config"]["start_channels"] = 4
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="do not fit the model.*mis-shaped"):
        load_checkpoint(tmp_path / "mismatch.pt")
    payload = torch.load(good, weights_only=True)
    payload["config"]["head"] = "fancy"
    torch.save(payload, tmp_path / "badhead.pt")
    with pytest.raises(CheckpointError, match="invalid configuration.*head"):
        load_checkpoint(tmp_path / "badhead.pt")


# --- the authors' released format -------------------------------------------------------------------------

def reference_state_dict(ns=8, c_phi=2048, c1=768, k=5, seed=0, prefix=""):
    """A state dict with exactly the key list and shapes of the authors' brainTextSCFComplex."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(name, cin, cout, ks):
        sd[f"{name}.weight"] = torch.randn(cout, cin, ks, ks, ks, generator=g) * (1.0 / (cin * ks**3)) ** 0.5
        sd[f"{name}.bias"] = torch.randn(cout, generator=g) * 0.01

    def conv_prelu(name, cin, cout, ks=3):
        conv(f"{name}.layer.0", cin, cout, ks)
        sd[f"{name}.layer.1.weight"] = torch.full((1,), 0.25)

    def up(name, c):
        sd[f"{name}.layer.0.weight"] = torch.randn(c, c, 2, 2, 2, generator=g) * (1.0 / (c * 8)) ** 0.5
        sd[f"{name}.layer.0.bias"] = torch.zeros(c)
        sd[f"{name}.layer.1.weight"] = torch.full((1,), 0.25)

    def lk(name, c):
        conv(f"{name}.regular", c, c, 3)
        conv(f"{name}.large", c, c, k)
        conv(f"{name}.one", c, c, 1)
        sd[f"{name}.prelu.weight"] = torch.full((1,), 0.25)

    conv_prelu("eninput", 2, ns)
    conv_prelu("ec1", ns, ns)
    conv_prelu("ec2", ns, 2 * ns); lk("ec3", 2 * ns)
    conv_prelu("ec4", 2 * ns, 4 * ns); lk("ec5", 4 * ns)
    conv_prelu("ec6", 4 * ns, 8 * ns); lk("ec7", 8 * ns)
    conv_prelu("ec8", 8 * ns, 8 * ns); lk("ec9", 8 * ns)
    conv_prelu("dc1", 16 * ns, 8 * ns); conv_prelu("dc2", 8 * ns, 4 * ns)
    conv_prelu("dc3", 8 * ns, 4 * ns); conv_prelu("dc4", 4 * ns, 2 * ns)
    conv_prelu("dc5", 4 * ns, 4 * ns); conv_prelu("dc6", 4 * ns, 2 * ns)
    up("up1", 8 * ns); up("up2", 4 * ns); up("up3", 2 * ns); up("up4", 2 * ns)
    for axis in "xyz":
        for i, (cin, cout) in enumerate([(c1, c_phi), (c_phi, 2 * c_phi), (2 * c_phi, 2 * ns)]):
            sd[f"flow.generate_flow_{axis}.mlp.{2 * i}.weight"] = torch.randn(cout, cin, generator=g) * (2.0 / cin) ** 0.5
            sd[f"flow.generate_flow_{axis}.mlp.{2 * i}.bias"] = torch.zeros(cout)
    sd["flow.flow.weight"] = torch.randn(3, 2 * ns, 3, 3, 3, generator=g) * 1e-5
    sd["flow.flow.bias"] = torch.zeros(3)
    sd["transformer.grid"] = torch.zeros(1, 3, 4, 4, 4)
    sd["integrate.transformer.grid"] = torch.zeros(1, 3, 2, 2, 2)
    return {prefix + key: v for key, v in sd.items()}


def reference_forward(sd, moving, fixed, fixed_seg, text, integrate=False):
    """The authors' forward pass written out with torch.nn.functional, straight from the state dict."""
    def cp(name, x, stride=1):
        w = sd[f"{name}.layer.0.weight"]
        return F.prelu(F.conv3d(x, w, sd[f"{name}.layer.0.bias"], stride, w.shape[-1] // 2), sd[f"{name}.layer.1.weight"])

    def lk(name, x):
        w = sd[f"{name}.large.weight"]
        y = (F.conv3d(x, sd[f"{name}.regular.weight"], sd[f"{name}.regular.bias"], 1, 1)
             + F.conv3d(x, w, sd[f"{name}.large.bias"], 1, w.shape[-1] // 2)
             + F.conv3d(x, sd[f"{name}.one.weight"], sd[f"{name}.one.bias"]) + x)
        return F.prelu(y, sd[f"{name}.prelu.weight"])

    def up(name, x):
        return F.prelu(F.conv_transpose3d(x, sd[f"{name}.layer.0.weight"], sd[f"{name}.layer.0.bias"], 2),
                       sd[f"{name}.layer.1.weight"])

    def mlp(axis, t):
        p = f"flow.generate_flow_{axis}.mlp"
        t = F.relu(F.linear(t, sd[f"{p}.0.weight"], sd[f"{p}.0.bias"]))
        t = F.relu(F.linear(t, sd[f"{p}.2.weight"], sd[f"{p}.2.bias"]))
        return F.linear(t, sd[f"{p}.4.weight"], sd[f"{p}.4.bias"])

    def st(src, flow):  # voxelmorph-style transformer, align_corners=True
        shape = flow.shape[2:]
        grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=flow.dtype) for s in shape], indexing="ij"))[None]
        loc = grid + flow
        loc = torch.stack([2 * (loc[:, i] / (shape[i] - 1) - 0.5) for i in range(3)], 1)
        loc = loc.permute(0, 2, 3, 4, 1)[..., [2, 1, 0]]
        return F.grid_sample(src, loc, align_corners=True, mode="bilinear")

    x = torch.cat((moving, fixed), 1)
    e0 = cp("ec1", cp("eninput", x))
    e1 = lk("ec3", cp("ec2", e0, 2))
    e2 = lk("ec5", cp("ec4", e1, 2))
    e3 = lk("ec7", cp("ec6", e2, 2))
    e4 = lk("ec9", cp("ec8", e3, 2))
    d0 = cp("dc2", cp("dc1", torch.cat((up("up1", e4), e3), 1)))
    d1 = cp("dc4", cp("dc3", torch.cat((up("up2", d0), e2), 1)))
    d2 = cp("dc6", cp("dc5", torch.cat((up("up3", d1), e1), 1)))
    seg = F.interpolate(fixed_seg.float(), scale_factor=0.5, mode="nearest").long()[:, 0]
    flows = []
    for axis in "xyz":
        filt = F.embedding(seg, mlp(axis, text)).permute(0, 4, 1, 2, 3)
        flows.append((filt * d2).sum(1, keepdim=True))
    flow = torch.cat(flows, 1) + F.conv3d(d2, sd["flow.flow.weight"], sd["flow.flow.bias"], 1, 1)
    if integrate:
        vec = flow / 2.0 / 2**7
        for _ in range(7):
            vec = vec + st(vec, vec)
        flow = vec * 2.0
    flow = F.interpolate(flow, size=list(moving.shape[2:]), mode="trilinear", align_corners=False)
    return st(moving, flow), flow


def test_reference_key_shapes_match_the_published_ones():
    sd = reference_state_dict()
    assert sd["eninput.layer.0.weight"].shape == (8, 2, 3, 3, 3)
    assert sd["ec3.large.weight"].shape == (16, 16, 5, 5, 5)
    assert sd["dc1.layer.0.weight"].shape == (64, 128, 3, 3, 3)
    assert sd["up4.layer.0.weight"].shape == (16, 16, 2, 2, 2)
    assert sd["flow.generate_flow_x.mlp.4.weight"].shape == (16, 4096)
    assert sd["flow.flow.weight"].shape == (3, 16, 3, 3, 3)


@pytest.mark.parametrize("integrate", [False, True])
def test_reference_state_dict_loads_and_computes_what_the_reference_computes(integrate):
    sd = reference_state_dict(prefix="module.")  # saved from DataParallel
    g = torch.Generator().manual_seed(5)
    text = reference_text_matrix(torch.randn(35, 768, generator=g))
    net = load_reference_model(sd, text, integrate=integrate)
    assert net.config.start_channels == 8 and net.config.hidden_channels == 2048 and net.config.text_dim == 768
    assert net.config.region_names == reference_region_names()
    shape = (32, 32, 16)
    moving, fixed = torch.rand(1, 1, *shape, generator=g), torch.rand(1, 1, *shape, generator=g)
    seg = torch.randint(0, 36, (1, 1, *shape), generator=g)
    with torch.no_grad():
        ours = net(moving, fixed, seg)
        plain = {k[len("module."):]: v for k, v in sd.items()}
        warped, flow = reference_forward(plain, moving, fixed, seg, text, integrate)
    assert flow.abs().max() > 1e-3  # a non-trivial field, so the comparison means something
    torch.testing.assert_close(ours.displacement, flow, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.warped, warped, rtol=1e-4, atol=1e-5)


def test_reference_text_matrix_and_names():
    assert len(REFERENCE_BRAIN_STRUCTURES) == 35
    assert reference_region_names()[3] == "left inf lat ventricle"
    e = torch.randn(35, 64)
    t = reference_text_matrix(e)
    assert t.shape == (36, 64)
    torch.testing.assert_close(t[1:], e)


def test_reference_loading_errors():
    with pytest.raises(CheckpointError, match="not a textSCF reference state dict"):
        load_reference_model({"conv.weight": torch.zeros(1)}, torch.zeros(36, 768))
    sd = reference_state_dict(ns=2, c_phi=8, c1=16)
    with pytest.raises(CheckpointError, match="width 16"):
        load_reference_model(sd, torch.zeros(36, 768))
    with pytest.raises(CheckpointError, match="region names"):
        load_reference_model(sd, torch.zeros(5, 16))

"""The inference path (textscf.networks.inference): folded blocks, fused conv + PReLU, channels-last, no autograd.

Its outputs must equal the training-time forward's to 1e-4 on random weights, it must leave the trained network
alone, and it must be what register() runs for the network-only forward pass.
"""
import pytest
import torch

from textscf.networks import TextSCFConfig, TextSCFNet
from textscf.networks.blocks import InferenceConvPReLU, LargeKernelBlock
from textscf.networks.inference import InferenceNet, fold_network, for_inference

SHAPE = (32, 32, 48)
TOLERANCE = 1e-4


def _randomise(module: torch.nn.Module, seed: int, scale: float) -> None:
    """Every parameter N(0, scale²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _net(head: str, integrate: bool, kernel: int, regions: int = 5, text_dim: int = 7) -> TextSCFNet:
    """Random weights with O(1) activations and a field of several voxels (a near-zero field would make the 1e-4
    comparison trivial): He-normal convolutions, random biases and PReLU slopes, a large output layer."""
    config = TextSCFConfig(num_regions=regions, text_dim=text_dim, start_channels=4, large_kernel=kernel,
                           hidden_channels=16, head=head, integrate=integrate, input_shape=SHAPE)
    net = TextSCFNet(config, torch.randn(regions, text_dim, generator=torch.Generator().manual_seed(1)))
    net.initialise("kaiming", seed=0)
    g = torch.Generator().manual_seed(kernel)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif isinstance(net.get_submodule(name.rsplit(".", 1)[0]), torch.nn.PReLU):
                p.uniform_(0.05, 0.5, generator=g)
        net.head.init_output(0.5)
    return net.eval()


def _inputs(regions: int = 5, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    moving = torch.rand((1, 1, *SHAPE), generator=g)
    fixed = torch.rand((1, 1, *SHAPE), generator=g)
    fixed_regions = torch.randint(0, regions, (1, 1, *SHAPE), generator=g)
    confidence = torch.rand((1, 1, *SHAPE), generator=g)
    return moving, fixed, fixed_regions, confidence


@pytest.mark.parametrize("kernel", [3, 5, 7])
@pytest.mark.parametrize("integrate", [False, True], ids=["no-integration", "integration"])
@pytest.mark.parametrize("head", ["textscf", "no_scf", "reference"])
def test_inference_path_equals_training_forward(head, integrate, kernel):
    net = _net(head, integrate, kernel)
    inputs = _inputs()
    with torch.no_grad():
        expected = net(*inputs)
    out = for_inference(net)(*inputs)
    # The field is not trivially small: the tolerance is far below the displacements compared.
    assert expected.displacement.abs().max() > 0.5
    for name in ("displacement", "warped", "regularised_field"):
        torch.testing.assert_close(getattr(out, name), getattr(expected, name), rtol=0, atol=TOLERANCE, msg=name)
    displacement, regularised = for_inference(net).displacement(*inputs)
    assert displacement.is_contiguous()
    torch.testing.assert_close(displacement, expected.displacement, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(regularised, expected.regularised_field, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
def test_folded_block_is_one_convolution_with_the_blocks_output(kernel):
    block = LargeKernelBlock(6, kernel)
    _randomise(block, seed=kernel, scale=0.05)
    folded = block.fold()
    size = max(kernel, 3)
    convolutions = [m for m in folded.modules() if isinstance(m, torch.nn.Conv3d)]
    assert len(convolutions) == 1 and convolutions[0].kernel_size == (size,) * 3
    x = torch.randn(2, 6, 9, 10, 11)
    with torch.no_grad():
        expected = block(x)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
def test_fused_convolution_and_prelu_equal_the_plain_modules(transposed):
    """The oneDNN call with the leaky-ReLU post-op and the fallback (oneDNN off, or autograd on) agree."""
    conv = torch.nn.ConvTranspose3d(3, 5, 2, 2) if transposed else torch.nn.Conv3d(3, 5, 3, 2, 1)
    prelu = torch.nn.PReLU()
    _randomise(conv, seed=3, scale=0.5)
    with torch.no_grad():
        prelu.weight.fill_(0.3)
    fused = InferenceConvPReLU(conv, prelu)
    x = torch.randn(1, 3, 12, 14, 16)
    with torch.no_grad():
        expected = prelu(conv(x))
    assert (expected < 0).any()  # the slope is exercised
    with torch.inference_mode():
        with torch.profiler.profile() as prof:
            torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
        if torch.backends.mkldnn.is_available():  # the fused oneDNN kernel ran, not conv then prelu
            names = {event.name for event in prof.events()}
            assert any("pointwise" in name for name in names) and "aten::prelu" not in names
        with torch.backends.mkldnn.flags(enabled=False):
            torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
    x_grad = x.clone().requires_grad_(True)
    fused(x_grad).sum().backward()
    assert x_grad.grad is not None


def test_folded_copy_leaves_the_original_network_unchanged():
    net = _net("textscf", False, 5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    inference = for_inference(net)
    inference(*_inputs())
    after = net.state_dict()
    assert list(after) == list(before)  # the checkpoint keys are those of the training modules
    for key, value in before.items():
        assert torch.equal(after[key], value), key
        assert after[key].is_contiguous(), key
    assert sum(isinstance(m, LargeKernelBlock) for m in net.modules()) == 4
    assert all(p.requires_grad for p in net.parameters())
    # The copy has no unfolded block and owns its tensors: changing it does not reach the original.
    assert not any(isinstance(m, LargeKernelBlock) for m in inference.modules())
    original = {p.data_ptr() for p in net.parameters()}
    assert not original & {p.data_ptr() for p in inference.parameters()}
    with torch.no_grad():
        for p in inference.parameters():
            p.zero_()
    for key, value in before.items():
        assert torch.equal(net.state_dict()[key], value), key


def test_fold_network_keeps_the_config_and_text_matrix():
    net = _net("reference", True, 3)
    folded = fold_network(net)
    assert folded.config == net.config
    assert torch.equal(folded.text_matrix, net.text_matrix)
    assert not any(p.requires_grad for p in folded.parameters())


@pytest.mark.parametrize("debias", [True, False])
def test_register_runs_the_network_through_the_inference_path(tiny_abdomen_checkpoint, monkeypatch, debias):
    from textscf import pipeline
    from textscf.checkpoint import load_checkpoint
    from textscf.phantom import make_example_pair

    built: list[InferenceNet] = []
    calls: list[tuple] = []
    real_for_inference = pipeline.for_inference

    def spy_for_inference(net, *args, **kwargs):
        inference = real_for_inference(net, *args, **kwargs)
        built.append(inference)
        real_displacement = inference.displacement

        def recorded(*inputs):
            out = real_displacement(*inputs)
            calls.append((inputs, out))
            return out

        inference.displacement = recorded
        return inference

    trained_forwards = []
    real_forward = TextSCFNet.forward
    monkeypatch.setattr(pipeline, "for_inference", spy_for_inference)
    monkeypatch.setattr(TextSCFNet, "forward", lambda self, *a, **k: trained_forwards.append(1) or real_forward(
        self, *a, **k))

    pair = make_example_pair(seed=0, shape=(48, 40, 64), spacing=(8.0, 8.0, 8.0))
    options = pipeline.RegistrationOptions(checkpoint=str(tiny_abdomen_checkpoint), init="none",
                                           refine_iterations=0, debias=debias)
    result = pipeline.register(pair["fixed"], pair["moving"], options, fixed_labels=pair["fixed_labels"])

    # One folded copy serves the pair and, with debias, the null pair (the fixed image as moving too).
    assert len(built) == 1 and len(calls) == (2 if debias else 1)
    assert not any(isinstance(m, LargeKernelBlock) for m in built[0].modules())
    assert trained_forwards == []  # the unfolded training forward never ran
    if debias:
        (null_moving, null_fixed, null_regions, _), _ = calls[1]
        assert torch.equal(null_moving, null_fixed) and torch.equal(null_fixed, calls[0][0][1])
        assert torch.equal(null_regions, calls[0][0][2])
        assert result.stats["null_pair_correction"]["applied"]
    else:
        assert "null_pair_correction" not in result.stats
    # What register ran equals the checkpoint's training-time forward on the same inputs.
    (moving, fixed, regions, confidence), (displacement, _) = calls[0]
    net, _ = load_checkpoint(tiny_abdomen_checkpoint)
    net.set_text_matrix(built[0].net.text_matrix)
    with torch.no_grad():
        expected = real_forward(net, moving, fixed, regions, confidence).displacement
    torch.testing.assert_close(displacement, expected, rtol=0, atol=TOLERANCE)
    assert result.displacement.GetSize() == pair["fixed"].GetSize()


def test_benchmark_compares_the_inference_path_with_the_eager_forward(tmp_path, capsys):
    """``benchmarks/model_efficiency.py --inference`` at a small grid: both models, every run timed, outputs equal."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import model_efficiency

    out_json = tmp_path / "inference.json"
    threads = torch.get_num_threads()
    try:
        result = model_efficiency.main(["--inference", "--shape", "32,32,48", "--inference-threads", "1",
                                        "--repeats", "1", "--json", str(out_json)])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "| reference | 32x32x48 | cpu | 1 |" in printed and "| bundled | 32x32x48 | cpu | 1 |" in printed
    assert json.loads(out_json.read_text())["markdown"] == result["markdown"]
    for row in result["rows"]:
        assert set(row["median_seconds"]) == {"eager", "inference", "field", "contiguous"}
        assert all(t > 0 for t in row["median_seconds"].values())
        assert row["max_abs_displacement"] > 0.1  # a real field, so the differences below mean something
        assert row["max_diff_displacement"] <= TOLERANCE and row["max_diff_warped"] <= TOLERANCE


@pytest.mark.parametrize("spacing", [8.0, 4.0])
def test_the_same_image_as_fixed_and_moving_gets_a_zero_field(spacing):
    """The bundled network answers an image paired with itself with a field of about a millimetre and a half; the
    null-pair correction (the default) takes it to zero."""
    import numpy as np
    import SimpleITK as sitk

    from textscf import pipeline
    from textscf.phantom import make_example_pair

    shape = tuple(int(s * 8 / spacing) for s in (48, 40, 64))
    pair = make_example_pair(seed=0, shape=shape, spacing=(spacing,) * 3)

    def largest_mm(**debias):
        options = pipeline.RegistrationOptions(init="none", refine_iterations=0, refine_field_iterations=0, **debias)
        with pytest.warns(UserWarning, match="identical"):
            result = pipeline.register(pair["fixed"], pair["fixed"], options, fixed_labels=pair["fixed_labels"])
        field = sitk.GetArrayFromImage(result.displacement)
        return float(np.sqrt((field ** 2).sum(-1)).max()), result.stats

    one_pass, _ = largest_mm(debias=False)
    debiased, stats = largest_mm()  # the default
    assert one_pass > 1.0  # mm: the network's bias is real
    assert stats["null_pair_correction"]["response_max_voxels"] > 0.1
    assert stats["null_pair_correction"]["applied"] and stats["null_pair_correction"]["inverse_residual_voxels"] < 0.05
    assert debiased < 0.01, (one_pass, debiased)


def test_removing_a_zero_null_response_keeps_the_field():
    import numpy as np

    from textscf.pipeline import remove_null_response

    forward = np.random.default_rng(0).normal(size=(3, 8, 8, 8)).astype(np.float32)
    field, residual = remove_null_response(forward, np.zeros_like(forward))
    np.testing.assert_allclose(field, forward, atol=1e-5)
    assert residual == 0.0


def test_a_folding_null_response_is_not_applied(tiny_abdomen_checkpoint, monkeypatch):
    """A network whose response to the null pair folds (no inverse) keeps its single pass, with a warning."""
    import numpy as np

    from textscf import pipeline
    from textscf.phantom import make_example_pair

    real_run = pipeline.run_network

    def folding_null(net, pairs, device):
        fields, note = real_run(net, pairs, device)
        if len(pairs) == 2:  # the null pair's response: a fold-over of several voxels, alternating along i
            shape = fields[1].shape
            fields[1] = np.zeros(shape, np.float32)
            fields[1][0] = np.where(np.arange(shape[1]) % 2 == 0, 3.0, -3.0)[:, None, None]
        return fields, note

    monkeypatch.setattr(pipeline, "run_network", folding_null)
    pair = make_example_pair(seed=0, shape=(48, 40, 64), spacing=(8.0, 8.0, 8.0))
    base = dict(checkpoint=str(tiny_abdomen_checkpoint), init="none", refine_iterations=0)
    with pytest.warns(UserWarning, match="folds"):
        result = pipeline.register(pair["fixed"], pair["moving"], pipeline.RegistrationOptions(**base),
                                   fixed_labels=pair["fixed_labels"])
    one_pass = pipeline.register(pair["fixed"], pair["moving"], pipeline.RegistrationOptions(**base, debias=False),
                                 fixed_labels=pair["fixed_labels"])
    correction = result.stats["null_pair_correction"]
    assert not correction["applied"] and correction["inverse_residual_voxels"] > pipeline.NULL_INVERSE_TOLERANCE
    import SimpleITK as sitk
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.displacement),
                                  sitk.GetArrayFromImage(one_pass.displacement))


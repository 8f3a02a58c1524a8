"""The benchmark scripts run end to end in tiny configurations and report what they claim.

- ``benchmarks/model_efficiency.py``: prints the Markdown table; its parameter count for N_s = 8 is ``sum(p.numel())``
  of an independently built network; FLOPs double when the voxels double (exactly for the no-SCF network; for the
  textSCF head up to the filter MLP, which runs once per forward and is counted exactly once).
- ``benchmarks/pipeline_resources.py``: the register() runs (forward, one pass, refinement) report every pipeline stage, a
  positive time and a positive peak memory.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import model_efficiency, pipeline_resources  # noqa: E402
from textscf.networks import TextSCFConfig, TextSCFNet  # noqa: E402
from textscf.pipeline import STAGES  # noqa: E402


def test_model_efficiency_small_run(tmp_path, capsys):
    out_json = tmp_path / "efficiency.json"
    result = model_efficiency.main([
        "--geometries", "abdomen", "--ns", "8", "--shape", "16,16,16", "--repeats", "1",
        "--no-paper-context", "--json", str(out_json),
    ])
    printed = capsys.readouterr().out
    assert "| geometry | head | N_s | params |" in printed
    assert printed.count("| abdomen 16x16x16 |") == len(model_efficiency.VARIANTS)
    assert "FlopCounterMode" in printed and "intra-op threads" in printed
    assert out_json.is_file()

    rows = {(r["variant"], r["start_channels"]): r for r in result["rows"]}
    # N_s = 8 textSCF (one-hot, CΦ = 64) on 14 regions, built here independently of the script
    config = TextSCFConfig(num_regions=14, text_dim=14, start_channels=8, hidden_channels=64, head="textscf")
    reference_net = TextSCFNet(config, torch.eye(14))
    assert rows[("textscf-onehot", 8)]["params"] == sum(p.numel() for p in reference_net.parameters())
    for row in result["rows"]:
        assert row["flops"] > 0 and row["macs"] == row["flops"] / 2
        assert row["median_seconds"] is not None and row["median_seconds"] > 0
        assert row["direct_count_checked"]  # full-size count == extrapolation from the small grids
    assert all(check["affine_exact"] for check in result["linearity_checks"])


def test_flops_double_when_voxels_double():
    small, double = (16, 16, 16), (32, 16, 16)
    baseline = model_efficiency.build_net("no_scf", 8, 14)
    f1 = sum(model_efficiency.count_flops(baseline, small).values())
    f2 = sum(model_efficiency.count_flops(baseline, double).values())
    assert f1 > 0 and f2 == 2 * f1

    net = model_efficiency.build_net("textscf-onehot", 8, 14)
    f1 = sum(model_efficiency.count_flops(net, small).values())
    f2 = sum(model_efficiency.count_flops(net, double).values())
    mlp = model_efficiency.filter_mlp_flops(14, 14, 64, 16, "textscf")
    assert mlp > 0
    assert f2 - mlp == 2 * (f1 - mlp)  # voxel part doubles; the filter MLP runs once, not per voxel


def test_pipeline_resources_small_run(tmp_path, capsys):
    out_json = tmp_path / "resources.json"
    result = pipeline_resources.main([
        "--shape", "32,32,32", "--spacing", "12,12,12", "--refine-iterations", "1", "--json", str(out_json),
    ])
    printed = capsys.readouterr().out
    assert "| stage | forward: s | forward: peak RSS GiB |" in printed
    assert out_json.is_file()
    assert set(result["runs"]) == {"forward", "one pass (--no-debias)", "refine 1"}
    stage_names = [name for name, _ in STAGES]
    for run in result["runs"].values():
        assert list(run["seconds_per_stage"]) == stage_names
        assert all(s >= 0 for s in run["seconds_per_stage"].values())
        assert run["peak_whole_process_bytes"] > 0
        assert set(run["peak_per_stage_bytes"]) == set(stage_names)
        assert all(p > 0 for p in run["peak_per_stage_bytes"].values())
        assert run["mean_dice"] is not None
    for stage in stage_names:
        assert f"| {stage} |" in printed
    assert result["runs"]["refine 1"]["refine"]["iterations"] == 1
    assert 0 < result["peak_fraction_of_budget"]["forward"] < 1


def test_registration_benchmark_dice_conventions_and_table():
    """``mean_dice`` counts an organ missing from one map as 0; ``mean_dice_both`` (Learn2Reg) drops it."""
    import numpy as np

    from benchmarks import registration_benchmark as rb

    fixed = np.zeros((8, 8, 8), np.int64)
    fixed[1:4, 1:4, 1:4] = 1
    fixed[5:7, 5:7, 5:7] = 2  # organ 2 is only in the fixed map
    moving = np.zeros_like(fixed)
    moving[1:4, 1:4, 1:4] = 1
    zero = np.zeros((3, 8, 8, 8))
    m = rb.pair_metrics(moving, fixed, [1, 2, 3], (1.0, 1.0, 1.0), zero, moving_labels=moving)
    assert m["dice"][1] == pytest.approx(1.0) and m["dice"][2] == 0.0 and np.isnan(m["dice"][3])
    assert m["mean_dice"] == pytest.approx(0.5)
    assert m["mean_dice_both"] == pytest.approx(1.0)
    assert m["folding_percent"] == 0.0

    rows = [{"method": "unregistered", "seconds": 0.0, **m},
            {"method": "textSCF", "seconds": 2.0, **{**m, "mean_dice": 0.7}},
            {"method": "ANTs SyN", "seconds": 8.0, **{**m, "mean_dice": 0.6}}]
    summaries = [rb.summarise(rows, name) for name in ("unregistered", "textSCF", "ANTs SyN")]
    table = rb.markdown(summaries, ["textSCF", "absent method"], "T", "note").splitlines()
    assert "Dice % (organs in both)" in table[4] and "absent method" not in table[4]
    ants = [line for line in table if line.startswith("| ANTs SyN")][0].split(" | ")
    assert ants[-2] == "0.25" and ants[-1].rstrip(" |") == "+10.00"
    assert all(line.replace("\\|", "").count("|") == table[4].replace("\\|", "").count("|") for line in table[4:])


def test_paired_difference_counts_only_pairs_both_methods_ran():
    from benchmarks import registration_benchmark as rb

    rows = [{"pair": "a", "method": "textSCF", "mean_dice": 0.50}, {"pair": "a", "method": "base", "mean_dice": 0.40},
            {"pair": "b", "method": "textSCF", "mean_dice": 0.30}, {"pair": "b", "method": "base", "mean_dice": 0.35},
            {"pair": "c", "method": "textSCF", "mean_dice": 0.90}]
    text = rb.paired_difference(rows, "textSCF", "base")
    assert text.startswith("Paired over 2 pairs") and "+2.50 ± 7.50" in text and "higher on 1 of 2" in text
    assert rb.paired_difference(rows, "textSCF", "absent") == ""


def test_benchmark_variants_change_one_option_each_even_the_checkpoint():
    from types import SimpleNamespace

    from benchmarks import registration_benchmark as rb

    rows = rb.default_rows(SimpleNamespace(variants=["network4", "previous-model"]), checkpoint="new.pt",
                           preset="abdomen-ct", init="none", device="cpu")
    defaults, network4, previous = rows.values()
    assert defaults.checkpoint == network4.checkpoint == "new.pt" and network4.refine_iterations == 4
    assert previous.checkpoint.endswith("abdomen-ct-onehot-ns8.pt") and previous.refine_iterations is None
    assert (rb.MODELS / "abdomen-ct-onehot-ns8.pt").is_file()
    # "fresh": the defaults without a trained network, i.e. the steps the default schedule gives a fresh network
    from textscf.schedule import default_schedule

    fresh = list(rb.default_rows(SimpleNamespace(variants=["fresh"]), checkpoint=None, preset="abdomen-ct",
                                 init="none", device="cpu").values())[1]
    schedule = default_schedule("fresh", (64, 64, 64))
    assert fresh.checkpoint == "fresh" and fresh.refine_similarity == "auto"
    assert (fresh.refine_iterations, fresh.refine_field_iterations) == (schedule.network_steps, schedule.field_steps)


def _run_gpu_script(name: str, out: Path, **env) -> None:
    """scripts/gpu/NAME run here on the CPU on tiny grids (TEXTSCF_DEVICE=cpu, TEXTSCF_QUICK=1), results in ``out``."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OUT=str(out), TEXTSCF_DEVICE="cpu", TEXTSCF_QUICK="1", PYTHON=sys.executable, **env)
    proc = subprocess.run(["bash", str(root / "scripts" / "gpu" / name)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_gpu_check_script_runs_its_checks_on_the_cpu(tmp_path):
    """scripts/gpu/check.sh, the prepared GPU check, runs end to end here with TEXTSCF_DEVICE=cpu on tiny grids:
    the versions, the inference comparison and both end-to-end pipeline runs (SwinUNETR segmentation included)."""
    import json

    _run_gpu_script("check.sh", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "inference.json", "inference.md", "pipeline.json", "pipeline.md", "pipeline_bundled_grid.md", "versions.txt"]
    versions = (tmp_path / "versions.txt").read_text()
    assert "SimpleITK" in versions and "monai" in versions and "no GPU" in versions
    inference = json.loads((tmp_path / "inference.json").read_text())
    assert {row["model"] for row in inference["rows"]} == {"reference", "bundled"}
    assert all(row["device"] == "cpu" and row["max_diff_displacement"] < 1e-4 for row in inference["rows"])
    pipeline = json.loads((tmp_path / "pipeline.json").read_text())
    for run in pipeline["runs"].values():
        assert run["segmentor"] == "SwinUNETR feature size 12, random weights"
        assert run["seconds_per_stage"]["segment fixed image"] > 0
        assert run["mean_dice"] is None  # no fixed label map: the segmentor gave the regions
        assert run["gpu_peak_per_stage_bytes"] == {} and run["gpu_peak_bytes"] is None
    assert "fixed regions from a random-init SwinUNETR" in (tmp_path / "pipeline_bundled_grid.md").read_text()
    assert "model grid 16x16x16" in (tmp_path / "pipeline_bundled_grid.md").read_text()


def test_pipeline_resources_table_adds_gpu_memory_columns_when_a_gpu_ran():
    run = {"peak_before_register_bytes": 2 ** 30, "seconds_per_stage": {"load model": 0.5, "register": 1.25},
           "peak_per_stage_bytes": {"load model": 2 ** 30, "register": 3 * 2 ** 30}, "seconds_total": 1.75,
           "peak_whole_process_bytes": 3 * 2 ** 30}
    cpu_table = pipeline_resources.markdown_table([("forward", run)])
    assert "GPU" not in cpu_table
    assert "| register | 1.25 | 3.00 |" in cpu_table
    gpu_run = dict(run, gpu_peak_per_stage_bytes={"load model": 2 ** 29, "register": 5 * 2 ** 30},
                   gpu_peak_bytes=5 * 2 ** 30)
    gpu_table = pipeline_resources.markdown_table([("forward", gpu_run)])
    assert "| stage | forward: s | forward: peak RSS GiB | forward: peak GPU GiB |" in gpu_table
    assert "| load model | 0.50 | 1.00 | 0.50 |" in gpu_table
    assert "| register | 1.25 | 3.00 | 5.00 |" in gpu_table
    assert "| **whole register() / whole process** | **1.75** | **3.00** | **5.00** |" in gpu_table
    assert "| before register (interpreter, torch, inputs) | — | 1.00 | — |" in gpu_table


def test_conv_precision_split_bf16_keeps_float32_accuracy(capsys):
    """benchmarks/conv_precision.py: the three-product bfloat16 convolution is within the inference path's 1e-4 of
    float64 (what would make it usable), like float32; every layer gets a table row."""
    from benchmarks import conv_precision

    rows = conv_precision.main(["--scale", "0.2", "--repeats", "1", "--threads", "1"])
    assert [r["layer"] for r in rows] == [name for name, *_ in conv_precision.LAYERS]
    for r in rows:
        assert r["float32"]["max_error"] < 1e-4
        assert r["bf16 x3"]["max_error"] < 1e-4
        assert all(r[v]["seconds"] > 0 for v in ("float32", "bf16 math", "bf16 x3"))
    assert capsys.readouterr().out.count("| decoder 3^3, 32 -> 32") == 1


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "shared" / "data" / "abdomen").is_dir(),
                    reason="needs ../shared/data (the BTCV label maps)")
def test_gpu_train_script_trains_a_stage_and_compares_it_with_the_bundled_network(tmp_path):
    """scripts/gpu/train.sh, the prepared GPU training stage, runs here on the CPU in its tiny configuration: one
    epoch of two synthesised pairs from the bundled 8 mm weights, then both networks on two abdomen test pairs."""
    from textscf.checkpoint import load_checkpoint

    _run_gpu_script("train.sh", tmp_path, EPOCHS="1", STEPS="2", WORKERS="1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pt", "last.pt", "log.csv", "results_bundled.md", "results_new.md", "train.log", "versions.txt"]
    net, meta = load_checkpoint(tmp_path / "last.pt")
    assert net.config.input_shape == (32, 32, 32) and meta["init_weights"].endswith("abdomen-ct-onehot-ns8-8mm.pt")
    assert (tmp_path / "log.csv").read_text().splitlines()[0].startswith("epoch,lr,")
    for which in ("new", "bundled"):
        table = (tmp_path / f"results_{which}.md").read_text()
        assert "| unregistered | 2 |" in table and "| textSCF | 2 |" in table
    assert "last.pt" in (tmp_path / "results_new.md").read_text()

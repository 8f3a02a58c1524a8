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

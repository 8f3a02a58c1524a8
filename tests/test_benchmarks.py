"""The benchmark scripts run end to end in tiny configurations and report what they claim.

- ``benchmarks/model_efficiency.py``: prints the Markdown table; its parameter count for N_s = 8 is ``sum(p.numel())``
  of an independently built network; FLOPs double when the voxels double (exactly for the no-SCF network; for the
  textSCF head up to the filter MLP, which runs once per forward and is counted exactly once).
- ``benchmarks/pipeline_resources.py``: both register() runs (forward, refinement) report every pipeline stage, a
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
    assert set(result["runs"]) == {"forward", "refine 1"}
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

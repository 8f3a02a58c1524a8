"""textscf evaluate: planted metrics, reports, the Learn2Reg layout, overwrite refusal and the CLI."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import zoom

from textscf import evaluate
from textscf.errors import InputError, OutputError
from textscf.evaluate import evaluate_pairs
from textscf.evaluation import pairs as pair_lists, report
from textscf.evaluation.learn2reg import learn2reg_displacement
from textscf.evaluation.pairs import PairCase
from textscf.evaluation.statistics import PER_REGION_COLUMNS, summarise
from textscf.io import MANIFEST_NAME
from textscf.pipeline import RegistrationOptions

SIZE = (24, 20, 16)  # (I, J, K), all even (the Learn2Reg layout halves them)
SPACING = (2.0, 1.5, 3.0)
ORIGIN = (10.0, -5.0, 3.0)
NAMES = ["liver", "spleen"]

# Two boxes per label map. Box 1: 8 x 8 x 6 voxels, moved by 2 voxels along i (2 mm voxels): Dice 6/8, HD95 4 mm.
# Box 2: 6 x 6 x 6 voxels, moved by 1 voxel along k (3 mm voxels): Dice 5/6, HD95 3 mm. In both directions the
# whole front (back) face lies exactly d voxels from the other box's surface and is more than 5 % of the surface,
# so the 95th percentile is exactly d * spacing.
FIXED_BOXES = {1: (slice(3, 11), slice(3, 11), slice(3, 9)), 2: (slice(14, 20), slice(12, 18), slice(4, 10))}
MOVING_BOXES = {1: (slice(5, 13), slice(3, 11), slice(3, 9)), 2: (slice(14, 20), slice(12, 18), slice(5, 11))}
EXPECTED = {"liver": (6 / 8, 4.0), "spleen": (5 / 6, 3.0)}


def _image(array_ijk: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=None) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(array_ijk.transpose(2, 1, 0)))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


def _labels(boxes) -> np.ndarray:
    lab = np.zeros(SIZE, np.int16)
    for value, box in boxes.items():
        lab[box] = value
    return lab


def _ct(labels: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (np.where(labels > 0, 40.0 + 30.0 * labels, -900.0) + rng.normal(0, 5, labels.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def boxes():
    fixed_lab, moving_lab = _labels(FIXED_BOXES), _labels(MOVING_BOXES)
    return {
        "fixed": _image(_ct(fixed_lab, 0)), "moving": _image(_ct(moving_lab, 1)),
        "fixed_labels": _image(fixed_lab), "moving_labels": _image(moving_lab),
    }


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random-init one-hot model: its last layer starts at ~1e-5, so its field is ~0 (identity)."""
    import torch

    from textscf.checkpoint import save_checkpoint
    from textscf.networks import TextSCFConfig, TextSCFNet

    n = len(NAMES) + 1
    cfg = TextSCFConfig(num_regions=n, text_dim=n, start_channels=2, hidden_channels=8, region_names=NAMES,
                        label_values=[1, 2], input_shape=(16, 16, 16), spacing=(4.0, 4.0, 4.0))
    torch.manual_seed(0)
    net = TextSCFNet(cfg, torch.eye(n)).eval()
    return str(save_checkpoint(net, tmp_path_factory.mktemp("model") / "tiny.pt"))


def _options(checkpoint) -> RegistrationOptions:
    return RegistrationOptions(checkpoint=checkpoint, init="none", device="cpu")


def _box_cases(boxes):
    return [
        PairCase("box", boxes["fixed"], boxes["moving"], boxes["fixed_labels"], boxes["moving_labels"],
                 fixed_id="1", moving_id="2"),
        PairCase("self", boxes["fixed"], boxes["fixed"], boxes["fixed_labels"], boxes["fixed_labels"],
                 fixed_id="1", moving_id="1"),
    ]


@pytest.fixture(scope="module")
def evaluated(boxes, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "out"
    result = evaluate_pairs(_box_cases(boxes), _options(tiny_checkpoint), out, learn2reg=True, progress=False)
    return out, result


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_planted_boxes_give_the_hand_computed_metrics(evaluated):
    _, result = evaluated
    rows = {(r["pair"], r["region"]): r for r in result.per_region}
    assert set(rows) == {(p, n) for p in ("box", "self") for n in NAMES}
    for name, (dice, hd95) in EXPECTED.items():
        r = rows[("box", name)]
        # the near-zero network field leaves the labels where they were: after == before == the planted numbers
        assert r["dice_before"] == pytest.approx(dice, rel=1e-6)
        assert r["dice"] == pytest.approx(dice, rel=1e-6)
        assert r["hd95_mm_before"] == pytest.approx(hd95, abs=1e-6)
        assert r["hd95_mm"] == pytest.approx(hd95, abs=1e-6)
        assert rows[("self", name)]["dice"] == pytest.approx(1.0)
        assert rows[("self", name)]["hd95_mm"] == pytest.approx(0.0)
    pairs = {r["pair"]: r for r in result.per_pair}
    assert pairs["box"]["mean_dice"] == pytest.approx((6 / 8 + 5 / 6) / 2)
    assert pairs["box"]["mean_hd95_mm"] == pytest.approx(3.5)
    for row in pairs.values():
        # identity field: J = 1 everywhere, so log(J + 3) is constant (SDlogJ 0) and nothing folds
        assert row["sdlogj"] == pytest.approx(0.0, abs=1e-4)
        assert row["folding_percent"] == 0.0
        assert row["jacobian_min"] == pytest.approx(1.0, abs=1e-3)
        assert row["seconds"] > 0 and row["device"] == "cpu"
    # mean and sample std over the two pairs, by hand
    s = result.summary["regions"]["liver"]["dice"]
    assert s["n"] == 2 and s["mean"] == pytest.approx((0.75 + 1.0) / 2)
    assert s["std"] == pytest.approx(abs(1.0 - 0.75) / math.sqrt(2))
    assert result.summary["pairs"]["mean_hd95_mm"]["mean"] == pytest.approx((3.5 + 0.0) / 2)


def test_a_region_missing_from_one_scan_counts_as_0_or_is_dropped(boxes, tiny_checkpoint, tmp_path):
    """Our Dice scores a region present in only one label map as 0; the Learn2Reg mean drops it."""
    no_spleen = _labels({1: MOVING_BOXES[1]})
    case = PairCase("no-spleen", boxes["fixed"], _image(_ct(no_spleen, 1)), boxes["fixed_labels"], _image(no_spleen))
    result = evaluate_pairs([case], _options(tiny_checkpoint), tmp_path / "out", progress=False)
    row = result.per_pair[0]
    assert row["mean_dice"] == pytest.approx((6 / 8 + 0.0) / 2)
    assert row["mean_dice_in_both"] == pytest.approx(6 / 8)
    assert row["mean_dice_before_in_both"] == pytest.approx(6 / 8)
    assert "| textscf | 1 | 37.50 | 75.00 |" in result.markdown


def test_reports_are_written_and_parseable(evaluated):
    out, result = evaluated
    assert sorted(p.name for p in out.iterdir()) == sorted([*evaluate.OUTPUT_NAMES, "learn2reg", MANIFEST_NAME])
    assert sorted(json.loads((out / MANIFEST_NAME).read_text())["files"]) == sorted([*evaluate.OUTPUT_NAMES,
                                                                                    MANIFEST_NAME])
    region_rows = _read_csv(out / "per_region.csv")
    assert list(region_rows[0]) == list(PER_REGION_COLUMNS)
    assert len(region_rows) == 4
    box_liver = [r for r in region_rows if r["pair"] == "box" and r["region"] == "liver"][0]
    assert float(box_liver["dice"]) == pytest.approx(0.75) and float(box_liver["hd95_mm"]) == pytest.approx(4.0)
    pair_rows = report.read_rows(out / "per_pair.csv")
    assert [r["pair"] for r in pair_rows] == ["box", "self"]
    assert pair_rows[0]["mean_dice"] == pytest.approx(result.per_pair[0]["mean_dice"], rel=1e-12)
    assert pair_rows[0]["device"] == "cpu" and pair_rows[0]["fixed"] == "1"

    md = (out / "summary.md").read_text(encoding="utf-8")
    assert md == result.markdown
    assert "| before registration | 2 | 89.58 ± 14.73 |" in md  # (79.17 + 100) / 2, std 20.83 / sqrt(2)
    assert "| textscf | 2 | 89.58 ± 14.73 | 89.58 ± 14.73 | 1.75 ± 2.47 | 0.000 ± 0.000 | 0.000 ± 0.000 |" in md
    assert "| liver | 2 | 87.50 ± 17.68 | 87.50 ± 17.68 | 2.00 ± 2.83 | 2.00 ± 2.83 |" in md
    assert "SYNTHETIC" not in md
    png = (out / "dice_boxplot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_learn2reg_files_have_the_documented_layout(evaluated):
    out, _ = evaluated
    files = sorted(p.name for p in (out / "learn2reg").iterdir())
    assert files == ["disp_0001_0001.npz", "disp_0001_0002.npz", MANIFEST_NAME]  # fixed id first, zero-padded
    with np.load(out / "learn2reg" / "disp_0001_0002.npz") as data:
        assert list(data.keys()) == ["arr_0"]
        disp = data["arr_0"]
    assert disp.dtype == np.float16
    assert disp.shape == (3, SIZE[0] // 2, SIZE[1] // 2, SIZE[2] // 2)
    assert np.abs(disp.astype(np.float32)).max() < 1e-3  # the near-identity registration


def _planted_field(shape, amplitude=1.5):
    """A smooth voxel displacement (3, I, J, K) whose Jacobian is 1.05 everywhere.

    u_i depends on j only, u_j on k only and u_k = 0.05 k + c: the Jacobian matrix I + du/dx is upper triangular
    with diagonal (1, 1, 1.05), whatever the finite differences.
    """
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    u = np.stack([
        amplitude * np.sin(2 * np.pi * j / shape[1]),
        amplitude * np.cos(2 * np.pi * k / shape[2]),
        0.05 * (k - shape[2] / 2) + 0.5,
    ])
    return u


def test_learn2reg_field_reproduces_the_displacement_after_upsampling():
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # a rotated grid: voxel axes are not LPS axes
    shape = (32, 24, 40)
    fixed = _image(np.zeros(shape, np.float32), spacing=(1.5, 2.0, 2.5), direction=direction)
    u = _planted_field(shape)
    a = np.array(direction).reshape(3, 3) @ np.diag(fixed.GetSpacing())
    physical = np.einsum("ab,bijk->aijk", a, u)  # the engine's LPS mm field
    field = sitk.GetImageFromArray(np.ascontiguousarray(physical.transpose(3, 2, 1, 0)), isVector=True)
    field.CopyInformation(fixed)

    half = learn2reg_displacement(field, fixed)
    assert half.dtype == np.float16 and half.shape == (3, 16, 12, 20)
    # what the Learn2Reg evaluation does: zoom each component by 2 (order 2), then add the identity grid
    full = np.stack([zoom(half[c].astype(np.float32), 2, order=2) for c in range(3)])
    assert full.shape == (3, *shape)
    inner = (slice(None), slice(2, -2), slice(2, -2), slice(2, -2))
    assert np.abs(full - u)[inner].max() < 0.05  # float16 + half-resolution sampling
    assert np.abs(full - u).mean() < 0.01
    # the half-resolution samples are the field at the corner-aligned positions m (N - 1) / (N/2 - 1)
    assert float(half[2, 0, 0, 5]) == pytest.approx(0.05 * (5 * 39 / 19 - 20) + 0.5, abs=1e-3)
    # the known Jacobian (1.05 everywhere) and SDlogJ (0) survive the round trip, computed as Learn2Reg does
    from textscf.metrics import jacobian_determinant, sdlogj

    jac = jacobian_determinant(full)
    assert np.allclose(jac[2:-2, 2:-2, 2:-2], 1.05, atol=0.02)
    assert sdlogj(jac) < 2e-3

    # the moving image on another grid: indices are the moving image's
    moving = _image(np.zeros(shape, np.float32), spacing=(1.5, 2.0, 2.5), direction=direction,
                    origin=tuple(np.array(ORIGIN) - a @ np.array([2.0, -1.0, 0.5])))
    shifted = learn2reg_displacement(field, fixed, moving).astype(np.float32)
    assert np.allclose(shifted - half.astype(np.float32), np.array([2.0, -1.0, 0.5])[:, None, None, None],
                       atol=0.02)


def test_learn2reg_needs_even_sizes():
    fixed = _image(np.zeros((9, 8, 8), np.float32))
    field = sitk.Image([9, 8, 8], sitk.sitkVectorFloat64, 3)
    field.CopyInformation(fixed)
    with pytest.raises(InputError, match="even"):
        learn2reg_displacement(field, fixed)


def test_existing_outputs_are_refused_before_any_work(evaluated, boxes):
    out, _ = evaluated
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    cases = _box_cases(boxes)
    with pytest.raises(OutputError, match="overwrite"):
        # a checkpoint that does not exist: the refusal comes first, before any registration
        evaluate_pairs(cases, _options("/nonexistent.pt"), out, progress=False)
    with pytest.raises(OutputError, match="overwrite"):
        evaluate_pairs(cases, _options("/nonexistent.pt"), out, learn2reg=True, progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def _bad_case(name="bad"):
    return PairCase(name, _image(_ct(_labels(FIXED_BOXES), 0)), _image(_ct(_labels(MOVING_BOXES), 1)),
                    _image(_labels(FIXED_BOXES)), _image(np.full(SIZE, 7, np.int16)),  # label 7 has no prompt
                    fixed_id="1", moving_id="3")


def _counting_register(monkeypatch):
    """Record the pairs that reach register() (by their moving image's identity)."""
    import textscf.pipeline

    calls = []
    real = textscf.pipeline.register

    def counting(fixed, moving, *args, **kwargs):
        calls.append(moving)
        return real(fixed, moving, *args, **kwargs)

    monkeypatch.setattr(textscf.pipeline, "register", counting)
    return calls


def test_a_failing_pair_is_named_the_others_are_kept_and_resume_runs_only_the_rest(boxes, tiny_checkpoint, tmp_path,
                                                                                    monkeypatch):
    box, self_pair = _box_cases(boxes)
    out = tmp_path / "out"
    with pytest.raises(InputError) as e:
        evaluate_pairs([box, _bad_case(), self_pair], _options(tiny_checkpoint), out, learn2reg=True, progress=False)
    msg = str(e.value)
    assert "1 of 3 pair(s) failed" in msg and "pair 'bad'" in msg and "7" in msg
    assert "2 finished pair(s) are kept" in msg and "--resume" in msg
    # no report yet, but both finished pairs (and their Learn2Reg fields) are on disk
    assert [p for p in out.rglob("*") if p.is_file() and "partial" not in p.parts] == []
    lines = [json.loads(x) for x in (out / "partial" / "pairs.jsonl").read_text().splitlines()]
    assert [x.get("pair") for x in lines[1:]] == ["box", "self"] and "settings" in lines[0]
    assert (out / "partial" / "disp_0001_0002.npz").is_file()

    # without --resume or --overwrite the unfinished evaluation is refused
    with pytest.raises(OutputError, match="unfinished evaluation .*--resume.*--overwrite"):
        evaluate_pairs([box, self_pair], _options(tiny_checkpoint), out, learn2reg=True, progress=False)
    # other settings cannot be mixed in
    other = RegistrationOptions(checkpoint=tiny_checkpoint, init="center", device="cpu")
    with pytest.raises(InputError, match="other settings .*init"):
        evaluate_pairs([box, self_pair], other, out, learn2reg=True, progress=False, resume=True)

    # the failed pair, repaired, is the only one registered on resume
    fixed_pair = PairCase("bad", boxes["fixed"], boxes["moving"], boxes["fixed_labels"], boxes["moving_labels"],
                          fixed_id="1", moving_id="3")
    calls = _counting_register(monkeypatch)
    result = evaluate_pairs([box, fixed_pair, self_pair], _options(tiny_checkpoint), out, learn2reg=True,
                            progress=False, resume=True)
    assert calls == [boxes["moving"]]
    assert [r["pair"] for r in result.per_pair] == ["box", "bad", "self"]
    assert [r["pair"] for r in report.read_rows(out / "per_pair.csv")] == ["box", "bad", "self"]
    assert not (out / "partial").exists()
    assert sorted(p.name for p in (out / "learn2reg").iterdir()) == [
        "disp_0001_0001.npz", "disp_0001_0002.npz", "disp_0001_0003.npz", MANIFEST_NAME]


def test_overwrite_replaces_the_previous_evaluation_as_a_whole(boxes, tiny_checkpoint, tmp_path):
    box, self_pair = _box_cases(boxes)
    out = tmp_path / "out"
    evaluate_pairs([box, self_pair], _options(tiny_checkpoint), out, learn2reg=True, progress=False)
    before = (out / "per_pair.csv").read_text()
    # a failing new run changes nothing
    with pytest.raises(InputError, match="pair 'bad'"):
        evaluate_pairs([_bad_case()], _options(tiny_checkpoint), out, learn2reg=True, overwrite=True, progress=False)
    assert (out / "per_pair.csv").read_text() == before
    assert (out / "learn2reg" / "disp_0001_0001.npz").is_file()
    # --overwrite discards that unfinished run and replaces the old one; the old pair's field does not stay
    evaluate_pairs([box], _options(tiny_checkpoint), out, learn2reg=True, overwrite=True, progress=False)
    assert [r["pair"] for r in report.read_rows(out / "per_pair.csv")] == ["box"]
    assert sorted(p.name for p in (out / "learn2reg").iterdir()) == ["disp_0001_0002.npz", MANIFEST_NAME]
    assert not (out / "partial").exists()
    # a new evaluation without --learn2reg replaces the old one's fields too
    evaluate_pairs([box], _options(tiny_checkpoint), out, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([*evaluate.OUTPUT_NAMES, MANIFEST_NAME])


def test_synthetic_images_are_said_plainly(boxes, tiny_checkpoint, tmp_path):
    [case, _] = _box_cases(boxes)
    case.synthetic = True
    result = evaluate_pairs([case], _options(tiny_checkpoint), tmp_path / "out", progress=False,
                            method_name="tiny")
    assert result.notes == [pair_lists.SYNTHETIC_NOTE]
    md = (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")
    assert "SYNTHETIC" in md and "# Evaluation: tiny" in md and "| tiny | 1 |" in md
    assert not (tmp_path / "out" / "learn2reg").exists()


def test_bad_pair_lists_are_refused(tmp_path, boxes):
    with pytest.raises(InputError, match="no pairs"):
        evaluate_pairs([], progress=False)
    case = _box_cases(boxes)[0]
    with pytest.raises(InputError, match="unique"):
        evaluate_pairs([case, case], output_dir=tmp_path / "o", progress=False)
    with pytest.raises(InputError, match="not found"):
        evaluate_pairs([PairCase("x", tmp_path / "missing.nii.gz", tmp_path / "m.nii.gz")], output_dir=tmp_path,
                       progress=False)
    no_ids = PairCase("x", boxes["fixed"], boxes["moving"], boxes["fixed_labels"], boxes["moving_labels"])
    with pytest.raises(InputError, match="case id"):
        evaluate_pairs([no_ids], output_dir=tmp_path / "o", learn2reg=True, progress=False)
    with pytest.raises(InputError, match="fixed_labels, moving_labels|lacks the column"):
        (tmp_path / "bad.csv").write_text("a,b\nx,y\n")
        pair_lists.pairs_from_csv(tmp_path / "bad.csv")
    assert not (tmp_path / "o").exists()


def test_pairs_from_csv_and_learn2reg_json(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for i in (1, 2):
        (tmp_path / "imagesTr" / f"AbdomenCTCT_{i:04d}_0000.nii.gz").write_bytes(b"")
    (tmp_path / "labelsTr" / "AbdomenCTCT_0001_0000.nii.gz").write_bytes(b"")
    (tmp_path / "pairs.csv").write_text(
        "fixed,moving,fixed_labels,moving_labels\n"
        "imagesTr/AbdomenCTCT_0001_0000.nii.gz,imagesTr/AbdomenCTCT_0002_0000.nii.gz,"
        "labelsTr/AbdomenCTCT_0001_0000.nii.gz,\n"
    )
    [case] = pair_lists.pairs_from_csv(tmp_path / "pairs.csv")
    assert case.fixed == tmp_path / "imagesTr" / "AbdomenCTCT_0001_0000.nii.gz"
    assert case.fixed_labels == tmp_path / "labelsTr" / "AbdomenCTCT_0001_0000.nii.gz"
    assert case.moving_labels is None
    assert case.learn2reg_ids() == ("0001", "0002")

    (tmp_path / "AbdomenCTCT_dataset.json").write_text(
        '{"registration_val": [{"fixed": "./imagesTr/AbdomenCTCT_0001_0000.nii.gz",'
        ' "moving": "./imagesTr/AbdomenCTCT_0002_0000.nii.gz"}], "registration_test": []}'
    )
    [case] = pair_lists.pairs_from_learn2reg(tmp_path / "AbdomenCTCT_dataset.json")
    assert case.name == "0001<-0002"
    assert case.fixed_labels == (tmp_path / "labelsTr" / "AbdomenCTCT_0001_0000.nii.gz").resolve()
    assert case.moving_labels is None
    with pytest.raises(InputError, match="registration_test"):
        pair_lists.pairs_from_learn2reg(tmp_path / "AbdomenCTCT_dataset.json", split="test")


def test_btcv_synthetic_test_pairs(shared_data):
    cases = pair_lists.btcv_synthetic_test_pairs(shared_data)
    assert len(cases) == 42 and len({c.name for c in cases}) == 42
    assert all(c.synthetic for c in cases)
    ids = {c.fixed_id for c in cases} | {c.moving_id for c in cases}
    assert ids == {f"{i:04d}" for i in range(34, 41)}
    assert cases[0].learn2reg_ids() == (cases[0].fixed_id, cases[0].moving_id)
    assert all(c.fixed_id != c.moving_id for c in cases)


def test_summarise_and_markdown_table():
    rows = [{"pair": "a", "region": "x", "dice": 0.5}, {"pair": "b", "region": "x", "dice": float("nan")},
            {"pair": "b", "region": "y", "dice": 1.0}]
    assert summarise(rows)["dice"]["mean"] == pytest.approx(0.75)
    by_region = summarise(rows, by="region")
    assert list(by_region) == ["x", "y"]
    assert by_region["x"]["dice"]["n"] == 1 and math.isnan(by_region["x"]["dice"]["std"])
    table = report.markdown_table(["a", "b"], [["x|y", float("nan")], ["z", 1.23456]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | – |", "| z | 1.23 |"]


def test_dice_boxplot_draws_methods_side_by_side(tmp_path):
    rng = np.random.default_rng(0)
    rows = {m: [{"region": r, "dice": float(v)} for r in ("liver", "spleen", "aorta") for v in rng.uniform(0, 1, 5)]
            for m in ("initial", "textscf", "lku-net")}
    path = report.dice_boxplot(rows, tmp_path / "box.png", title="three methods")
    assert Path(path).read_bytes()[:4] == b"\x89PNG"


def test_cli_end_to_end(boxes, tiny_checkpoint, tmp_path, capsys):
    from textscf.cli import main

    for key in ("fixed", "moving", "fixed_labels", "moving_labels"):
        sitk.WriteImage(boxes[key], str(tmp_path / f"{key}_000{1 if key.startswith('fixed') else 2}.nii.gz"))
    (tmp_path / "pairs.csv").write_text("fixed,moving,fixed_labels,moving_labels\n"
                                        "fixed_0001.nii.gz,moving_0002.nii.gz,"
                                        "fixed_labels_0001.nii.gz,moving_labels_0002.nii.gz\n")
    out = tmp_path / "out"
    code = main(["evaluate", "--pairs", str(tmp_path / "pairs.csv"), "--checkpoint", tiny_checkpoint,
                 "--init", "none", "--device", "cpu", "-o", str(out), "--learn2reg", "--quiet"])
    assert code == 0
    assert "evaluated 1 pair(s)" in capsys.readouterr().out
    [row] = _read_csv(out / "per_pair.csv")
    assert float(row["mean_dice"]) == pytest.approx((6 / 8 + 5 / 6) / 2)
    assert (out / "learn2reg" / "disp_0001_0002.npz").is_file()

    # bad input: exit code 2 and a message, no traceback
    assert main(["evaluate", "--pairs", str(tmp_path / "missing.csv"), "-o", str(tmp_path / "o2")]) == 2
    assert "pairs CSV not found" in capsys.readouterr().err
    # existing outputs without --overwrite: 2 as well
    assert main(["evaluate", "--pairs", str(tmp_path / "pairs.csv"), "--checkpoint", tiny_checkpoint,
                 "-o", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_reports_the_failed_pair_and_resumes(boxes, tiny_checkpoint, tmp_path, capsys):
    from textscf.cli import main

    for key in ("fixed", "moving", "fixed_labels", "moving_labels"):
        sitk.WriteImage(boxes[key], str(tmp_path / f"{key}_000{1 if key.startswith('fixed') else 2}.nii.gz"))
    sitk.WriteImage(_image(np.full(SIZE, 7, np.int16)), str(tmp_path / "bad_labels_0003.nii.gz"))
    header = "fixed,moving,fixed_labels,moving_labels,name\n"
    good = "fixed_0001.nii.gz,moving_0002.nii.gz,fixed_labels_0001.nii.gz,moving_labels_0002.nii.gz,good\n"
    bad = "fixed_0001.nii.gz,moving_0002.nii.gz,fixed_labels_0001.nii.gz,bad_labels_0003.nii.gz,bad\n"
    (tmp_path / "pairs.csv").write_text(header + good + bad)
    out = tmp_path / "out"
    argv = ["evaluate", "--pairs", str(tmp_path / "pairs.csv"), "--checkpoint", tiny_checkpoint, "--init", "none",
            "--device", "cpu", "-o", str(out), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pair 'bad'" in err and "1 finished pair(s) are kept" in err and "--resume" in err
    assert not (out / "summary.md").exists()
    # the bad pair repaired: --resume registers it alone and writes the reports over both pairs
    (tmp_path / "pairs.csv").write_text(header + good + bad.replace("bad_labels_0003", "moving_labels_0002"))
    assert main(argv + ["--resume"]) == 0
    assert [r["pair"] for r in report.read_rows(out / "per_pair.csv")] == ["good", "bad"]
    assert "evaluated 2 pair(s)" in capsys.readouterr().out
    assert not (out / "partial").exists()

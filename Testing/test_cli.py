"""`textscf register` end to end: outputs, ITK agreement, and the bad-input matrix (clear message, no file written)."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from textscf.cli import EXIT_INPUT, EXIT_OK, build_parser, main

DIRECTION = (0.0, -1.0, 0.0, 0.8, 0.0, -0.6, 0.6, 0.0, 0.8)  # a rotation, not only axis flips


def _image(arr_ijk, spacing=(3.0, 2.5, 3.5), origin=(-40.0, 25.0, -60.0), direction=DIRECTION, pixel=None):
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(arr_ijk).transpose(2, 1, 0)))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return sitk.Cast(img, pixel) if pixel is not None else img


def _scene(shift=0):
    """A CT-like body with two organs (liver 6, spleen 1), all shifted by ``shift`` voxels along i."""
    shape = (40, 36, 30)
    ct = np.full(shape, -1000.0, np.float32)
    labels = np.zeros(shape, np.uint8)
    ct[4:36, 4:32, 3:27] = 40.0
    labels[10:20, 10:24, 8:20] = 6
    labels[23:30, 12:22, 10:18] = 1
    ct[labels == 6] = 100.0
    ct[labels == 1] = 150.0
    return np.roll(ct, shift, axis=0), np.roll(labels, shift, axis=0)


@pytest.fixture()
def pair_files(tmp_path):
    ct_f, lab_f = _scene()
    ct_m, lab_m = _scene(shift=2)
    paths = {}
    for name, arr, pixel in (("fixed", ct_f, sitk.sitkFloat32), ("fixed_labels", lab_f, sitk.sitkUInt8),
                             ("moving", ct_m, sitk.sitkFloat32), ("moving_labels", lab_m, sitk.sitkUInt8)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(_image(arr, pixel=pixel), str(paths[name]))
    return paths


def _args(files, out, ckpt, *extra):
    return ["register", str(files["fixed"]), str(files["moving"]), "-o", str(out), "--checkpoint", str(ckpt),
            "--fixed-labels", str(files["fixed_labels"]), "--moving-labels", str(files["moving_labels"]),
            "--preset", "abdomen-ct", "--unmapped-labels", "background", "--quiet", *extra]


def test_register_writes_outputs_that_itk_reads_as_intended(pair_files, tmp_path, tiny_abdomen_checkpoint, capsys):
    out = tmp_path / "out"
    assert main(_args(pair_files, out, tiny_abdomen_checkpoint)) == EXIT_OK
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["displacement.nii.gz", "warped.nii.gz", "jacobian.nii.gz", "report.json",
                            "warped_labels.nii.gz", "initial_transform.tfm", "qc.png", "textscf-manifest.json"])
    manifest = json.loads((out / "textscf-manifest.json").read_text())
    assert sorted(manifest["files"]) == names
    fixed = sitk.ReadImage(str(pair_files["fixed"]))
    moving = sitk.ReadImage(str(pair_files["moving"]))
    warped = sitk.ReadImage(str(out / "warped.nii.gz"))
    # SimpleITK reads our displacement file as a transform and reproduces our warped image.
    transform = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(out / "displacement.nii.gz")),
                                                          sitk.sitkVectorFloat64))
    resampled = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, -1000.0)
    diff = np.abs(sitk.GetArrayFromImage(resampled) - sitk.GetArrayFromImage(warped))
    assert np.percentile(diff, 99) < 1.0 and diff.mean() < 0.1
    for name in ("warped.nii.gz", "jacobian.nii.gz"):
        img = sitk.ReadImage(str(out / name))
        assert img.GetSize() == fixed.GetSize()
        np.testing.assert_allclose(img.GetDirection(), fixed.GetDirection(), atol=1e-6)
        np.testing.assert_allclose(img.GetOrigin(), fixed.GetOrigin(), atol=1e-4)
    report = json.loads((out / "report.json").read_text())
    assert report["prompts"][5] == "liver"
    # The centre-of-mass alignment recovers the 2-voxel organ shift: Dice rises from the unregistered start.
    assert report["mean_dice"] > report["mean_dice_before"] + 0.1
    assert set(report["seconds_per_stage"]) >= {"load model", "register", "resample field"}
    assert "Dice" in capsys.readouterr().out


def _assert_nothing_written(out):
    assert not out.exists() or not any(out.iterdir())


def _run_bad(args, capsys, *keywords):
    code = main(args)
    err = capsys.readouterr().err
    assert code == EXIT_INPUT, err
    for word in keywords:
        assert word.lower() in err.lower(), err
    return err


def test_missing_file(pair_files, tmp_path, tiny_abdomen_checkpoint, capsys):
    pair_files["moving"] = tmp_path / "nope.nii.gz"
    out = tmp_path / "out"
    _run_bad(_args(pair_files, out, tiny_abdomen_checkpoint), capsys, "moving image", "not found")
    _assert_nothing_written(out)


def test_not_an_image(pair_files, tmp_path, tiny_abdomen_checkpoint, capsys):
    bad = tmp_path / "notes.nii.gz"
    bad.write_text("hello")
    pair_files["fixed"] = bad
    out = tmp_path / "out"
    _run_bad(_args(pair_files, out, tiny_abdomen_checkpoint), capsys, "fixed image")
    _assert_nothing_written(out)


@pytest.mark.parametrize("shape", [(20, 20), (10, 10, 10, 3)])
def test_wrong_dimension(pair_files, tmp_path, tiny_abdomen_checkpoint, capsys, shape):
    img = sitk.GetImageFromArray(np.random.rand(*shape[::-1]).astype(np.float32), isVector=False)
    path = tmp_path / f"dim{len(shape)}.nii.gz"
    sitk.WriteImage(img, str(path))
    pair_files["moving"] = path
    out = tmp_path / "out"
    _run_bad(_args(pair_files, out, tiny_abdomen_checkpoint), capsys, "3-D")
    _assert_nothing_written(out)


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_non_finite_voxels(pair_files, tmp_path, tiny_abdomen_checkpoint, capsys, value, suffix):
    ct, _ = _scene()
    ct[3, 4, 5] = value
    path = tmp_path / f"bad{suffix}"
    if suffix == ".nii.gz":  # written by nibabel: SimpleITK's NIfTI writer would store 0 instead
        import nibabel

        nibabel.save(nibabel.Nifti1Image(ct, np.diag([3.0, 2.5, 3.5, 1.0])), str(path))
    else:
        sitk.WriteImage(_image(ct, pixel=sitk.sitkFloat32), str(path))
    pair_files["fixed"] = path
    out = tmp_path / "out"
    _run_bad(_args(pair_files, out, tiny_abdomen_checkpoint), capsys, "NaN" if np.isnan(value) else "Inf")
    _assert_nothing_written(out)


def test_empty_image(pair_files, tmp_path, tiny_abdomen_checkpoint, capsys):
    path = tmp_path / "empty.nii.gz"
    sitk.WriteImage(_image(np.zeros((10, 10, 10), np.float32)), str(path))
    pair_files["moving"] = path
    out = tmp_path / "out"
    _run_bad(_args(pair_files, out, tiny_abdomen_checkpoint), capsys, "constant")
    _assert_nothing_written(out)


def test_label_map_on_another_grid(pair_files, tmp_path, tiny_abdomen_checkpoint, capsys):
    _, labels = _scene()
    path = tmp_path / "labels_other.nii.gz"
    sitk.WriteImage(_image(labels, spacing=(1.0, 1.0, 1.0), pixel=sitk.sitkUInt8), str(path))
    pair_files["fixed_labels"] = path
    out = tmp_path / "out"
    _run_bad(_args(pair_files, out, tiny_abdomen_checkpoint), capsys, "spacing", "resample")
    _assert_nothing_written(out)


def test_label_values_without_prompt(pair_files, tmp_path, tiny_abdomen_checkpoint, capsys):
    out = tmp_path / "out"
    args = _args(pair_files, out, tiny_abdomen_checkpoint, "--prompts", "liver", "--label-values", "6")
    args.remove("--unmapped-labels")
    args.remove("background")
    _run_bad(args, capsys, "no region/prompt", "1")
    _assert_nothing_written(out)


@pytest.mark.parametrize("prompts,values,words", [
    (" , ", "1,2", ["empty"]),
    ("liver,Liver", "6,1", ["duplicate"]),
    ("liver,spleen", "6", ["label values"]),
])
def test_empty_or_duplicate_prompts(pair_files, tmp_path, tiny_abdomen_checkpoint, capsys, prompts, values, words):
    out = tmp_path / "out"
    _run_bad(_args(pair_files, out, tiny_abdomen_checkpoint, "--prompts", prompts, "--label-values", values),
             capsys, *words)
    _assert_nothing_written(out)


def test_checkpoint_does_not_know_the_prompts(pair_files, tmp_path, tiny_abdomen_checkpoint, capsys):
    out = tmp_path / "out"
    _run_bad(_args(pair_files, out, tiny_abdomen_checkpoint, "--prompts", "liver,spleen,lung",
                   "--label-values", "6,1,20"), capsys, "knows only 13 regions", "lung")
    _assert_nothing_written(out)


def test_checkpoint_trained_with_another_encoder(pair_files, tmp_path, tiny_abdomen_checkpoint, capsys):
    out = tmp_path / "out"
    _run_bad(_args(pair_files, out, tiny_abdomen_checkpoint, "--encoder", "open_clip:ViT-B-32:none"),
             capsys, "trained with the text encoder", "onehot")
    _assert_nothing_written(out)


def test_corrupt_checkpoint(pair_files, tmp_path, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x00" * 100)
    out = tmp_path / "out"
    _run_bad(_args(pair_files, out, bad), capsys, "checkpoint", "corrupted")
    _assert_nothing_written(out)


def test_output_folder_not_writable(pair_files, tmp_path, tiny_abdomen_checkpoint, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    _run_bad(_args(pair_files, blocker / "out", tiny_abdomen_checkpoint), capsys, "output folder")


def test_existing_outputs_need_overwrite(pair_files, tmp_path, tiny_abdomen_checkpoint, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "warped.nii.gz").write_text("precious")
    _run_bad(_args(pair_files, out, tiny_abdomen_checkpoint), capsys, "already holds", "--overwrite")
    assert (out / "warped.nii.gz").read_text() == "precious"
    assert sorted(p.name for p in out.iterdir()) == ["warped.nii.gz"]
    assert main(_args(pair_files, out, tiny_abdomen_checkpoint, "--overwrite")) == EXIT_OK
    assert sitk.ReadImage(str(out / "warped.nii.gz")).GetSize() == (40, 36, 30)


def test_help_explains_every_option(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["register", "--help"])
    text = capsys.readouterr().out
    for option in ("--fixed-labels", "--moving-labels", "--prompts", "--preset", "--template", "--checkpoint",
                   "--init", "--device", "--refine", "--overwrite", "--field-format"):
        assert option in text
    assert "Exit codes" in build_parser().format_help()


def test_sigterm_unwinds_like_ctrl_c_and_the_handler_is_restored(monkeypatch, capsys):
    import os
    import signal
    import time

    import textscf.cli as cli

    original = signal.getsignal(signal.SIGTERM)
    reached = []

    def killed_mid_run(args):
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would
        time.sleep(5)
        reached.append("after the signal")  # never: the signal raised where the program was
        return EXIT_OK

    monkeypatch.setattr(cli, "cmd_register", killed_mid_run)
    assert main(["register", "f.nii.gz", "m.nii.gz", "-o", "out"]) == cli.EXIT_CANCELLED
    assert "terminated (SIGTERM); no output was written" in capsys.readouterr().err
    assert reached == [] and signal.getsignal(signal.SIGTERM) is original


def test_cli_startup_benchmark_row(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import cli_startup

    row = cli_startup.main(["--runs", "1", "--json", str(tmp_path / "row.json")])
    assert row["imports_torch"] is False and row["median_seconds"] > 0 and row["runs"] == 1
    assert "| `textscf --help` | 1 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "row.json").read_text())["median_seconds"] == row["median_seconds"]


def test_progress_bar_shows_the_stage_the_fraction_and_the_time_left():
    from textscf.cli import _ProgressBar

    bar = _ProgressBar(True)
    try:
        bar("register", 0.5, 35.2)
        assert (bar.bar.n, bar.bar.desc.rstrip(": ")) == (50, "register")
        assert bar.bar.postfix.endswith("about 35 s left")
        bar("evaluate", 0.97, None)
        assert (bar.bar.n, bar.bar.desc.rstrip(": "), bar.bar.postfix) == (97, "evaluate", "")
    finally:
        bar.close()


@pytest.mark.parametrize("command", ["register", "evaluate"])
def test_moving_labels_enter_the_loss_only_with_guide_with_labels(command):
    from textscf.cli import label_guidance
    from textscf.errors import InputError

    base = (["register", "f.nii.gz", "m.nii.gz", "-o", "out", "--moving-labels", "ml.nii.gz"] if command == "register"
            else ["evaluate", "--pairs", "pairs.csv", "-o", "out"])
    parser = build_parser()
    assert label_guidance(parser.parse_args(base)) == {"refine_use_moving_labels": False, "refine_label_weight": 1.0}
    assert label_guidance(parser.parse_args(base + ["--guide-with-labels", "--label-loss-weight", "0.3"])) == {
        "refine_use_moving_labels": True, "refine_label_weight": 0.3}
    with pytest.raises(InputError, match="--guide-with-labels"):
        label_guidance(parser.parse_args(base + ["--label-loss-weight", "0.3"]))
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--guide-with-labels", "--label-loss-weight", "0"])


def test_no_debias_runs_the_network_once():
    from textscf.cli import _options_from_args

    base = ["register", "f.nii.gz", "m.nii.gz", "-o", "out"]
    parser = build_parser()
    assert _options_from_args(parser.parse_args(base)).debias is True
    assert _options_from_args(parser.parse_args(base + ["--no-debias"])).debias is False
    evaluate = ["evaluate", "--pairs", "pairs.csv", "-o", "out"]
    assert parser.parse_args(evaluate).debias is True and parser.parse_args(evaluate + ["--no-debias"]).debias is False

"""The bad-input and fault matrix of issue 12, one parameterised case per row.

Every case runs a ``textscf`` command (in-process through ``textscf.cli.main``; in a subprocess only for signals and
``--help``) on small inputs (an abdominal phantom pair at 8 mm, 48 x 40 x 64 voxels, and the tiny random-init
checkpoint of conftest) and asserts:

- the exit code (0 ok, 2 bad input or options, 3 cancelled) and that no traceback was printed;
- the message: words naming the problem and words naming the fix;
- no partial output: the output folder holds what it held before (a failed run) or exactly the new run's files,
  and no hidden temporary file is left anywhere;
- inputs unchanged: the SHA-256 of every file in the input folder (and of any input placed in the output folder)
  is the same before and after.

The module counts the cases by group and prints the counts (``pytest -s`` shows them; they are also printed at the
end of the session by the last case).
"""
from __future__ import annotations

import collections
import gzip
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk

from textscf.cli import EXIT_CANCELLED, EXIT_INPUT, EXIT_OK, main

SHAPE, SPACING = (48, 40, 64), (8.0, 8.0, 8.0)
BASE_NAMES = ("fixed.nii.gz", "moving.nii.gz", "fixed_labels.nii.gz", "moving_labels.nii.gz")
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ inputs
@pytest.fixture(scope="module")
def base_inputs(tmp_path_factory) -> Path:
    """The good pair: phantom subjects 0 and 1 (the moving one deformed), with their BTCV label maps."""
    from textscf.phantom import make_example_pair

    pair = make_example_pair(seed=0, shape=SHAPE, spacing=SPACING)
    folder = tmp_path_factory.mktemp("base")
    for name in BASE_NAMES:
        sitk.WriteImage(pair[name.split(".")[0]], str(folder / name), useCompression=True)
    return folder


@dataclass
class Ctx:
    """One case's world: its own copy of the inputs, an output folder, the checkpoint."""

    inputs: Path
    out: Path
    ckpt: Path
    tmp: Path
    protect: list[Path] = field(default_factory=list)  # inputs that live outside ``inputs`` (checksummed too)

    def path(self, name: str) -> Path:
        return self.inputs / name

    def register(self, *extra: str, drop: tuple[str, ...] = (), qc: bool = False, **replace: str | None) -> list[str]:
        """``textscf register`` on the good pair; ``replace`` swaps a file (fixed=..., fixed_labels=...) or an
        option value (checkpoint=..., out=...); ``drop`` removes options; ``qc`` renders the QC figure."""
        files = {"fixed": self.path("fixed.nii.gz"), "moving": self.path("moving.nii.gz"),
                 "fixed_labels": self.path("fixed_labels.nii.gz"), "moving_labels": self.path("moving_labels.nii.gz"),
                 "out": self.out, "checkpoint": self.ckpt}
        files.update({k: v for k, v in replace.items()})
        argv = ["register", str(files["fixed"]), str(files["moving"]), "-o", str(files["out"])]
        options = {"--checkpoint": files["checkpoint"], "--fixed-labels": files["fixed_labels"],
                   "--moving-labels": files["moving_labels"], "--preset": "abdomen-ct",
                   "--unmapped-labels": "background", "--device": "cpu"}
        for option, value in options.items():
            if option not in drop and value is not None:
                argv += [option, str(value)]
        # the network alone (no refinement schedule): these cases test input handling, not registration quality
        return argv + ["--quiet", "--refine", "0", *([] if qc else ["--no-qc"]), *extra]

    def evaluate(self, pairs: Path, *extra: str) -> list[str]:
        return ["evaluate", "--pairs", str(pairs), "-o", str(self.out), "--checkpoint", str(self.ckpt),
                "--device", "cpu", "--init", "none", "--unmapped-labels", "background", "--quiet", *extra]

    def pairs_csv(self, rows: list[tuple[str, str, str, str]], name: str = "pairs.csv") -> Path:
        path = self.path(name)
        path.write_text("fixed,moving,fixed_labels,moving_labels\n" + "".join(",".join(r) + "\n" for r in rows))
        return path


def _read(ctx: Ctx, name: str) -> sitk.Image:
    return sitk.ReadImage(str(ctx.path(name)))


def _write(ctx: Ctx, img: sitk.Image, name: str) -> Path:
    sitk.WriteImage(img, str(ctx.path(name)), useCompression=name.endswith((".gz", ".mha", ".nrrd")))
    return ctx.path(name)


def _array_image(arr_kji: np.ndarray, like: sitk.Image | None = None) -> sitk.Image:
    img = sitk.GetImageFromArray(arr_kji)
    if like is not None:
        img.CopyInformation(like)
    return img


def _truncated(ctx: Ctx, source: str, name: str, keep: float = 0.6) -> Path:
    """``source`` written in ``name``'s format, then cut to ``keep`` of its bytes (a copy that did not finish)."""
    full = ctx.tmp / ("full_" + name)
    sitk.WriteImage(_read(ctx, source), str(full), useCompression=not name.endswith(".nii"))
    data = full.read_bytes()
    ctx.path(name).write_bytes(data[: int(len(data) * keep)])
    full.unlink()
    return ctx.path(name)


def _nifti_with_zero_spacing(ctx: Ctx) -> Path:
    """A NIfTI whose pixdim[1] is 0 (ITK would read 1 mm), written by patching the header of a valid file."""
    raw = ctx.tmp / "raw.nii"
    sitk.WriteImage(_read(ctx, "moving.nii.gz"), str(raw))
    data = bytearray(raw.read_bytes())
    data[80:84] = struct.pack("<f", 0.0)  # pixdim[1]
    path = ctx.path("zero_spacing.nii.gz")
    path.write_bytes(gzip.compress(bytes(data)))
    raw.unlink()
    return path


def _with_geometry(ctx: Ctx, source: str, name: str, spacing=None, direction=None, origin=None) -> Path:
    img = _read(ctx, source)
    if spacing is not None:
        img.SetSpacing(spacing)
    if origin is not None:
        img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return _write(ctx, img, name)


def _fifo(ctx: Ctx, name: str) -> Path:
    path = ctx.path(name)
    os.mkfifo(path)
    return path


def _labels_array(ctx: Ctx, name: str = "fixed_labels.nii.gz") -> np.ndarray:
    return sitk.GetArrayFromImage(_read(ctx, name))


def _torch_save(obj, path: Path) -> Path:
    import torch

    torch.save(obj, path)
    return path


def _foreign_state_dict(path: Path) -> Path:
    import torch

    torch.save({"weight": torch.zeros(2)}, path)
    return path


class _RunsCode:
    """A pickled object that would run code on loading (textscf must never execute it)."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/textscf-pwned",))


# ------------------------------------------------------------------------------------------------ checks
def _checksums(*roots: Path) -> dict[str, str]:
    sums = {}
    for root in roots:
        if root.is_file():
            sums[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
        elif root.is_dir():
            for p in sorted(root.rglob("*")):
                if p.is_file() and not p.is_symlink():
                    sums[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return sums


def _temp_leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if "textscf-tmp" in p.name or p.name.startswith(".textscf-probe")]


def _run_main(argv: list[str], capsys, timeout: int = 120) -> tuple[int, str, str]:
    """``textscf.cli.main(argv)`` in this process; argparse's exit becomes its code; SIGALRM guards against hangs."""
    def hang(signum, frame):
        raise TimeoutError(f"textscf {' '.join(argv[:1])} did not return within {timeout} s (a hang)")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(timeout)
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------------------ the matrix
@dataclass
class Case:
    """One row: ``argv(ctx)`` builds the inputs and the command; ``code`` and ``words`` are what must come back.

    ``words``: every one must appear in stderr (case-insensitive): the problem and the fix. ``prepare(ctx)`` runs
    before the checksums are taken (e.g. a previous run in the output folder). ``check(ctx)`` asserts more after
    the run (a successful run's files). ``absent``: words that must not appear.
    """

    group: str
    id: str
    argv: Callable[[Ctx], list[str]]
    code: int = EXIT_INPUT
    words: tuple[str, ...] = ()
    prepare: Callable[[Ctx], None] | None = None
    check: Callable[[Ctx], None] | None = None
    absent: tuple[str, ...] = ("Traceback",)


def _previous_run(*extra: str, field_format: str = "h5"):
    """A successful run with QC, moving labels and the initial transform already in the output folder."""
    def prepare(ctx: Ctx):
        assert main(ctx.register("--field-format", field_format, *extra, qc=True)) == EXIT_OK
    return prepare


def _expect_files(*names: str):
    def check(ctx: Ctx):
        present = sorted(p.name for p in ctx.out.iterdir())
        assert present == sorted([*names, "textscf-manifest.json"]), present
        manifest = json.loads((ctx.out / "textscf-manifest.json").read_text())
        assert sorted(manifest["files"]) == present
    return check


def _output_is_input(name: str, how: str, role: str = "moving"):
    """An input of the run at ``out/name``: the input itself ("moved"), or a hard or symbolic link to it."""
    def argv(ctx: Ctx) -> list[str]:
        ctx.out.mkdir()
        target, source = ctx.out / name, ctx.path(f"{role}.nii.gz")
        if how == "moved":
            shutil.copy(source, target)
            source = target
        elif how == "hardlink":
            os.link(source, target)
        else:
            os.symlink(source, target)
        ctx.protect.append(target)
        return ctx.register("--overwrite", **{role: source})
    return argv


def _register_cases() -> list[Case]:
    r = "register input"
    cases = [
        # missing and special files
        Case(r, "missing fixed", lambda c: c.register(fixed=c.path("nope.nii.gz")), words=("fixed image", "not found", "fix")),
        Case(r, "missing moving", lambda c: c.register(moving=c.path("nope.nii.gz")), words=("moving image", "not found")),
        Case(r, "missing fixed labels", lambda c: c.register(fixed_labels=c.path("nope.nii.gz")),
             words=("fixed label map", "not found")),
        Case(r, "missing moving labels", lambda c: c.register(moving_labels=c.path("nope.nii.gz")),
             words=("moving label map", "not found")),
        Case(r, "missing initial transform", lambda c: c.register("--initial-transform", str(c.path("nope.tfm"))),
             words=("initial transform", "not found")),
        Case(r, "fixed is an empty folder", lambda c: (c.path("folder").mkdir(), c.register(fixed=c.path("folder")))[1],
             words=("folder without a DICOM series", "fix")),
        Case(r, "fixed labels are a folder", lambda c: (c.path("f").mkdir(), c.register(fixed_labels=c.path("f")))[1],
             words=("fixed label map", "folder")),
        Case(r, "moving is a FIFO", lambda c: c.register(moving=_fifo(c, "pipe.nii.gz")),
             words=("moving image", "named pipe", "fix")),
        Case(r, "fixed labels are a FIFO", lambda c: c.register(fixed_labels=_fifo(c, "pipe.nii.gz")),
             words=("fixed label map", "named pipe")),
        Case(r, "initial transform is a FIFO", lambda c: c.register("--initial-transform", str(_fifo(c, "t.tfm"))),
             words=("initial transform", "named pipe")),
        Case(r, "empty path", lambda c: c.register(fixed=""), words=("fixed image", "empty", "fix")),
        # unreadable, truncated, empty files
        Case(r, "fixed is text", lambda c: (c.path("t.nii.gz").write_text("hello"), c.register(fixed=c.path("t.nii.gz")))[1],
             words=("fixed image", "cannot read", "fix")),
        Case(r, "moving labels are text", lambda c: (c.path("t.nrrd").write_text("x"),
                                                      c.register(moving_labels=c.path("t.nrrd")))[1],
             words=("moving label map", "cannot read")),
        Case(r, "zero-byte moving", lambda c: (c.path("z.nii.gz").write_bytes(b""), c.register(moving=c.path("z.nii.gz")))[1],
             words=("moving image", "fix")),
        Case(r, "truncated .nii.gz image", lambda c: c.register(fixed=_truncated(c, "fixed.nii.gz", "t.nii.gz")),
             words=("fixed image", "truncated", "copy or export the file again")),
        Case(r, "truncated .nii image", lambda c: c.register(moving=_truncated(c, "moving.nii.gz", "t.nii", 0.9)),
             words=("moving image", "truncated", "fix")),
        Case(r, "truncated .mha image", lambda c: c.register(moving=_truncated(c, "moving.nii.gz", "t.mha")),
             words=("moving image", "truncated", "fix"), absent=("Traceback", "No such file")),
        Case(r, "truncated .nrrd image", lambda c: c.register(fixed=_truncated(c, "fixed.nii.gz", "t.nrrd")),
             words=("fixed image", "cannot read", "fix")),
        Case(r, "truncated .nii.gz label map", lambda c: c.register(fixed_labels=_truncated(c, "fixed_labels.nii.gz",
                                                                                           "t.nii.gz", 0.95)),
             words=("fixed label map", "truncated", "fix")),
        Case(r, "truncated .nii label map", lambda c: c.register(moving_labels=_truncated(c, "moving_labels.nii.gz",
                                                                                         "t.nii", 0.97)),
             words=("moving label map", "truncated", "fix")),
        # shape and values
        Case(r, "2-D image", lambda c: c.register(fixed=_write(c, sitk.Image([20, 20], sitk.sitkFloat32) + 1, "2d.nii.gz")),
             words=("2-D", "3-D volume is needed")),
        Case(r, "4-D image", lambda c: c.register(moving=_write(c, sitk.JoinSeries([_read(c, "moving.nii.gz")] * 2),
                                                                 "4d.nii.gz")),
             words=("4-D", "extract one 3-D frame")),
        Case(r, "vector image", lambda c: c.register(fixed=_write(c, sitk.Compose([_read(c, "fixed.nii.gz")] * 3), "v.mha")),
             words=("3 components", "scalar")),
        Case(r, "single slice", lambda c: c.register(moving=_write(c, _array_image(np.random.rand(1, 30, 30).astype(np.float32)),
                                                                    "s.nii.gz")),
             words=("single slice", "whole 3-D volume")),
        Case(r, "NaN voxels (.mha)", lambda c: c.register(fixed=_write(c, _nan_image(c, np.nan), "nan.mha")),
             words=("NaN", "replace them")),
        Case(r, "Inf voxels (.nrrd)", lambda c: c.register(moving=_write(c, _nan_image(c, np.inf), "inf.nrrd")),
             words=("Inf", "replace them")),
        Case(r, "constant moving", lambda c: c.register(moving=_write(c, _array_image(np.full((20, 20, 20), -1000, np.float32)),
                                                                       "const.nii.gz")),
             words=("moving image", "constant", "fix")),
        Case(r, "moving with one non-zero voxel", lambda c: c.register(moving=_write(c, _one_voxel(c), "one.nii.gz")),
             words=("moving image", "nearly empty", "fix")),
        # geometry
        Case(r, "spacing 0 in NIfTI", lambda c: c.register(moving=_nifti_with_zero_spacing(c)),
             words=("moving image", "spacing", "0 is not a spacing", "fix")),
        Case(r, "spacing 1e6 mm", lambda c: c.register(moving=_with_geometry(c, "moving.nii.gz", "big.nii.gz",
                                                                             spacing=(1e6, 8, 8))),
             words=("spacing", "not physical", "fix")),
        Case(r, "spacing 1e-6 mm", lambda c: c.register(fixed=_with_geometry(c, "fixed.nii.gz", "small.mha",
                                                                             spacing=(1e-6, 1e-6, 1e-6))),
             words=("spacing", "not physical", "millimetres")),
        Case(r, "sheared direction (.mha)", lambda c: c.register(moving=_with_geometry(
            c, "moving.nii.gz", "shear.mha", direction=(1, 0.5, 0, 0, 1, 0, 0, 0, 1))),
             words=("sheared", "orthonormal", "fix")),
        Case(r, "scaled direction (.mha)", lambda c: c.register(fixed=_with_geometry(
            c, "fixed.nii.gz", "scaled.mha", direction=(2, 0, 0, 0, 1, 0, 0, 0, 1))),
             words=("direction", "rotation", "fix")),
        Case(r, "no overlap with --init none", lambda c: c.register("--init", "none", moving=_with_geometry(
            c, "moving.nii.gz", "far.nii.gz", origin=(10000.0, 0.0, 0.0)), moving_labels=_with_geometry(
            c, "moving_labels.nii.gz", "far_labels.nii.gz", origin=(10000.0, 0.0, 0.0))),
             words=("does not overlap", "--init center")),
        # label maps
        Case(r, "non-integer labels", lambda c: c.register(fixed_labels=_write(
            c, _array_image(_labels_array(c).astype(np.float32) * 0.5, _read(c, "fixed_labels.nii.gz")), "half.nii.gz")),
             words=("non-integer", "label map file")),
        Case(r, "negative labels", lambda c: c.register(moving_labels=_write(
            c, _array_image(-_labels_array(c, "moving_labels.nii.gz").astype(np.int16), _read(c, "moving_labels.nii.gz")),
            "neg.nii.gz")), words=("negative", "0 for background")),
        Case(r, "labels on another grid", lambda c: c.register(fixed_labels=_with_geometry(
            c, "fixed_labels.nii.gz", "other.nii.gz", spacing=(4.0, 4.0, 4.0))), words=("spacing", "resample"),
             absent=("Traceback", "np.float64")),
        Case(r, "labels with another origin", lambda c: c.register(moving_labels=_with_geometry(
            c, "moving_labels.nii.gz", "shifted.nii.gz", origin=(50.0, 0.0, 0.0))), words=("origin", "resample"),
             absent=("Traceback", "np.float64")),
        Case(r, "label value without a prompt", lambda c: c.register("--prompts", "liver", "--label-values", "6",
                                                                     drop=("--unmapped-labels",)),
             words=("no region/prompt", "fix")),
        # identical inputs
        Case(r, "same file as fixed and moving", lambda c: c.register(moving=c.path("fixed.nii.gz")),
             words=("same file", "two different scans")),
        Case(r, "hard link as moving", lambda c: (os.link(c.path("fixed.nii.gz"), c.path("link.nii.gz")),
                                                  c.register(moving=c.path("link.nii.gz")))[1],
             words=("same file", "fix")),
        Case(r, "identical copy as moving", lambda c: (shutil.copy(c.path("fixed.nii.gz"), c.path("copy.nii.gz")),
                                                       c.register(moving=c.path("copy.nii.gz")))[1],
             words=("identical content", "two different scans")),
        # prompts, model, segmentor, transform
        Case(r, "empty prompt list", lambda c: c.register("--prompts", " , ", "--label-values", "1,2"), words=("empty",)),
        Case(r, "duplicate prompts", lambda c: c.register("--prompts", "liver,Liver", "--label-values", "6,1"),
             words=("duplicate",)),
        Case(r, "prompts without enough label values", lambda c: c.register("--prompts", "liver,spleen", "--label-values", "6"),
             words=("label values",)),
        Case(r, "prompt unknown to a one-hot model", lambda c: c.register("--prompts", "liver,lung", "--label-values", "6,20"),
             words=("knows only", "lung", "fix")),
        Case(r, "another text encoder", lambda c: c.register("--encoder", "open_clip:ViT-B-32:none"),
             words=("trained with the text encoder",)),
        Case(r, "fresh network without --refine", lambda c: c.register(checkpoint="fresh"), words=("fresh", "--refine")),
        Case(r, "no labels and no segmentor registers without regions", lambda c: c.register(drop=("--fixed-labels",)),
             code=EXIT_OK, check=_expect_files("displacement.nii.gz", "warped.nii.gz", "jacobian.nii.gz",
                                               "report.json", "warped_labels.nii.gz", "initial_transform.tfm")),
        Case(r, "initial transform is text", lambda c: (c.path("t.tfm").write_text("not a transform"),
                                                         c.register("--initial-transform", str(c.path("t.tfm"))))[1],
             words=("initial transform", "cannot read", "fix")),
        Case(r, "2-D initial transform", lambda c: (sitk.WriteTransform(sitk.TranslationTransform(2), str(c.path("t2.tfm"))),
                                                     c.register("--initial-transform", str(c.path("t2.tfm"))))[1],
             words=("2-D transform", "fix")),
    ]
    k = "checkpoint"
    cases += [
        Case(k, "missing", lambda c: c.register(checkpoint=c.path("none.pt")), words=("checkpoint", "does not exist")),
        Case(k, "a folder", lambda c: (c.path("ckdir").mkdir(), c.register(checkpoint=c.path("ckdir")))[1],
             words=("checkpoint", "is a folder", "fix"), absent=("Traceback", "does not exist")),
        Case(k, "a FIFO", lambda c: c.register(checkpoint=_fifo(c, "model.pt")), words=("checkpoint", "named pipe")),
        Case(k, "zero bytes", lambda c: (c.path("e.pt").write_bytes(b""), c.register(checkpoint=c.path("e.pt")))[1],
             words=("checkpoint", "empty")),
        Case(k, "zeros", lambda c: (c.path("z.pt").write_bytes(b"\0" * 100), c.register(checkpoint=c.path("z.pt")))[1],
             words=("checkpoint", "corrupted", "fix"), absent=("Traceback", "weights_only")),
        Case(k, "text", lambda c: (c.path("t.pt").write_text("hello"), c.register(checkpoint=c.path("t.pt")))[1],
             words=("checkpoint", "corrupted"), absent=("Traceback", "weights_only")),
        Case(k, "carries code", lambda c: c.register(checkpoint=_torch_save({"x": _RunsCode()}, c.path("evil.pt"))),
             words=("checkpoint", "never loads", "fix"), absent=("Traceback", "weights_only", "False")),
        Case(k, "a foreign state dict", lambda c: c.register(checkpoint=_foreign_state_dict(c.path("sd.pt"))),
             words=("not a textscf checkpoint",)),
        Case(k, "truncated", lambda c: (c.path("cut.pt").write_bytes(c.ckpt.read_bytes()[:2000]),
                                        c.register(checkpoint=c.path("cut.pt")))[1],
             words=("checkpoint", "truncated")),
    ]
    return cases


def _nan_image(ctx: Ctx, value: float) -> sitk.Image:
    arr = sitk.GetArrayFromImage(_read(ctx, "fixed.nii.gz"))
    arr[3, 4, 5] = value
    return _array_image(arr, _read(ctx, "fixed.nii.gz"))


def _one_voxel(ctx: Ctx) -> sitk.Image:
    arr = np.zeros(sitk.GetArrayFromImage(_read(ctx, "moving.nii.gz")).shape, np.float32)
    arr[10, 10, 10] = 100.0
    return _array_image(arr, _read(ctx, "moving.nii.gz"))


def _output_cases() -> list[Case]:
    o = "outputs"
    return [
        Case(o, "output name is the moving image (the issue's case)", _output_is_input("warped.nii.gz", "moved"),
             words=("is the moving image", "another output folder")),
        Case(o, "output name is a hard link to the moving image", _output_is_input("warped.nii.gz", "hardlink"),
             words=("through a link", "another output folder")),
        Case(o, "output name is a symbolic link to the moving image", _output_is_input("jacobian.nii.gz", "symlink"),
             words=("moving image", "another output folder")),
        Case(o, "output name is the moving label map", _output_is_input("warped_labels.nii.gz", "moved", "moving_labels"),
             words=("moving label map", "replace")),
        Case(o, "the previous run's file is this run's initial transform",
             lambda c: c.register("--overwrite", "--initial-transform", str(c.out / "displacement.h5")),
             prepare=_previous_run(), words=("initial transform", "remove", "another output folder")),
        Case(o, "existing outputs without --overwrite", lambda c: c.register(), prepare=_previous_run(field_format="nii.gz"),
             words=("already holds", "--overwrite")),
        Case(o, "a previous run with other names without --overwrite", lambda c: c.register(),
             prepare=_previous_run(field_format="h5"), words=("textscf-manifest.json", "previous run", "--overwrite")),
        Case(o, "--overwrite replaces the previous run and removes its other files",
             lambda c: c.register("--overwrite", "--init", "none", drop=("--moving-labels",)),
             prepare=_previous_run(), code=EXIT_OK,
             check=_expect_files("displacement.nii.gz", "warped.nii.gz", "jacobian.nii.gz", "report.json")),
        Case(o, "--overwrite and a failing run keep the previous run whole",
             lambda c: c.register("--overwrite", checkpoint=c.path("none.pt")), prepare=_previous_run(),
             words=("checkpoint", "does not exist")),
        Case(o, "output folder is a file", lambda c: c.register(out=c.path("fixed_labels.nii.gz")),
             words=("output folder", "choose a folder")),
        Case(o, "output folder below a file", lambda c: c.register(out=c.path("fixed.nii.gz") / "out"),
             words=("cannot create the output folder", "fix")),
        Case(o, "a good run writes exactly its files", lambda c: c.register(), code=EXIT_OK,
             check=_expect_files("displacement.nii.gz", "warped.nii.gz", "jacobian.nii.gz", "report.json",
                                 "warped_labels.nii.gz", "initial_transform.tfm")),
    ]


def _option_cases() -> list[Case]:
    a = "options"
    bad = [
        ("--refine", "-5", "out of range"), ("--refine", "abc", "expected"), ("--refine-field", "-1", "out of range"),
        ("--refine-lr", "nan", "out of range"), ("--refine-lr", "inf", "out of range"), ("--refine-lr", "0", "out of range"),
        ("--refine-lr", "-0.001", "out of range"), ("--refine-lr", "1e4", "out of range"),
        ("--refine-smooth", "-1", "out of range"), ("--refine-smooth", "nan", "out of range"),
        ("--seed", "-1", "out of range"), ("--seed", "99999999999999999999", "out of range"),
        ("--seed", str(2**32), "out of range"), ("--seed", "1.5", "expected"), ("--init", "bogus", "invalid choice"),
        ("--device", "tpu", "invalid choice"), ("--field-format", "png", "invalid choice"),
        ("--unmapped-labels", "drop", "invalid choice"), ("--similarity", "l1", "invalid choice"),
    ]
    cases = [Case(a, f"register {opt} {val}", (lambda o, v: lambda c: c.register(o, v))(opt, val),
                  words=(f"argument {opt}", why)) for opt, val, why in bad]
    cases += [
        Case(a, "register -o ''", lambda c: c.register(out=""), words=("-o/--output", "empty", "fix")),
        Case(a, "register --checkpoint ''", lambda c: c.register(checkpoint=""), words=("--checkpoint", "empty", "fix")),
        Case(a, "register --fixed-labels ''", lambda c: c.register(fixed_labels=""), words=("--fixed-labels", "empty")),
        Case(a, "register --refine-smooth 1e9", lambda c: c.register("--refine-smooth", "1e9"),
             words=("--refine-smooth", "out of range")),
        Case(a, "evaluate --checkpoint ''", lambda c: ["evaluate", "--pairs", "p.csv", "-o", "o", "--checkpoint", ""],
             words=("--checkpoint", "empty")),
        Case(a, "demo -o ''", lambda c: ["demo", "-o", ""], words=("-o/--output", "empty")),
        Case(a, "demo --refine -3", lambda c: ["demo", "--refine", "-3", "-o", str(c.out)], words=("--refine", "out of range")),
        Case(a, "evaluate --refine -1", lambda c: c.evaluate(c.path("p.csv"), "--refine", "-1"),
             words=("--refine", "out of range")),
        Case(a, "evaluate --seed -1", lambda c: c.evaluate(c.path("p.csv"), "--seed", "-1"), words=("--seed", "out of range")),
        Case(a, "evaluate --refine-lr nan", lambda c: c.evaluate(c.path("p.csv"), "--refine-lr", "nan"),
             words=("--refine-lr", "out of range")),
        Case(a, "evaluate --limit 0", lambda c: c.evaluate(c.path("p.csv"), "--limit", "0"), words=("--limit", "out of range")),
        Case(a, "evaluate -o ''", lambda c: ["evaluate", "--pairs", "p.csv", "-o", ""], words=("-o/--output", "empty")),
        Case(a, "unknown command", lambda c: ["registre"], words=("invalid choice",)),
    ]
    return cases


def _good_rows(c: Ctx) -> tuple[str, str, str, str]:
    return ("fixed.nii.gz", "moving.nii.gz", "fixed_labels.nii.gz", "moving_labels.nii.gz")


def _evaluate_cases() -> list[Case]:
    e = "evaluate"
    return [
        Case(e, "pairs CSV missing", lambda c: c.evaluate(c.path("none.csv")), words=("pairs CSV not found", "fix")),
        Case(e, "pairs CSV is a FIFO", lambda c: c.evaluate(_fifo(c, "p.csv")), words=("pairs CSV", "named pipe")),
        Case(e, "pairs CSV without columns", lambda c: (c.path("p.csv").write_text("a,b\n1,2\n"), c.evaluate(c.path("p.csv")))[1],
             words=("lacks the column",)),
        Case(e, "pairs CSV without pairs", lambda c: (c.path("p.csv").write_text("fixed,moving\n"), c.evaluate(c.path("p.csv")))[1],
             words=("lists no pairs", "fix")),
        Case(e, "Learn2Reg JSON that is not JSON", lambda c: (c.path("d.json").write_text("{"), c.evaluate(c.path("d.json")))[1],
             words=("not a readable JSON", "fix")),
        Case(e, "--pairs of another kind", lambda c: c.evaluate(c.path("fixed.nii.gz")), words=("neither a .csv",)),
        Case(e, "a pair with a missing file", lambda c: c.evaluate(c.pairs_csv([_good_rows(c), ("fixed.nii.gz", "gone.nii.gz",
                                                                                                  "", "")])),
             words=("gone.nii.gz", "not found")),
        Case(e, "a truncated label map fails its pair by name; the other pair is kept",
             lambda c: c.evaluate(c.pairs_csv([("fixed.nii.gz", "moving.nii.gz", "fixed_labels.nii.gz",
                                                str(_truncated(c, "moving_labels.nii.gz", "cut_labels.nii.gz", 0.9))),
                                               ("moving.nii.gz", "fixed.nii.gz", "moving_labels.nii.gz",
                                                "fixed_labels.nii.gz")])),
             words=("1 of 2 pair(s) failed", "truncated", "kept", "--resume"), check=_one_pair_kept),
        Case(e, "a truncated .nii image fails its pair by name",
             lambda c: c.evaluate(c.pairs_csv([("fixed.nii.gz", str(_truncated(c, "moving.nii.gz", "cut.nii", 0.8)),
                                                "fixed_labels.nii.gz", "moving_labels.nii.gz")])),
             words=("1 of 1 pair(s) failed", "cut.nii", "truncated", "fix")),
        Case(e, "existing reports need --overwrite", lambda c: c.evaluate(c.pairs_csv([_good_rows(c)])),
             prepare=_finished_evaluation, words=("already holds", "--overwrite")),
        Case(e, "--resume with other settings", lambda c: c.evaluate(c.pairs_csv([_good_rows(c)]), "--resume"),
             prepare=_unfinished_evaluation, words=("other settings", "--overwrite")),
        Case(e, "an unfinished evaluation needs --resume or --overwrite",
             lambda c: c.evaluate(c.pairs_csv([_good_rows(c)])), prepare=_unfinished_evaluation,
             words=("unfinished evaluation", "--resume", "--overwrite")),
    ]


def _one_pair_kept(ctx: Ctx):
    lines = (ctx.out / "partial" / "pairs.jsonl").read_text().splitlines()
    assert [json.loads(x).get("pair") for x in lines[1:]] == ["moving<-fixed"]


def _finished_evaluation(ctx: Ctx):
    assert main(ctx.evaluate(ctx.pairs_csv([_good_rows(ctx)], "first.csv"))) == EXIT_OK


def _unfinished_evaluation(ctx: Ctx):
    (ctx.out / "partial").mkdir(parents=True)
    (ctx.out / "partial" / "pairs.jsonl").write_text(json.dumps({"settings": {}}) + "\n")


def _train_cases() -> list[Case]:
    t = "train"
    small = ["--shape", "16", "16", "16", "--start-channels", "2", "--hidden-channels", "8", "--device", "cpu", "--quiet"]
    return [
        Case(t, "unknown data source", lambda c: ["train", "--data", "nonsense", "-o", str(c.out), *small],
             words=("unknown data source", "phantom")),
        Case(t, "malformed folder source", lambda c: ["train", "--data", "folder:only-one", "-o", str(c.out), *small],
             words=("folder:IMAGES_DIR:LABELS_DIR",)),
        Case(t, "-o on a read-only file system", lambda c: ["train", "--data", "phantom", "--phantoms", "2", "--epochs",
                                                             "1", "-o", "/sys/textscf-train-out", *small],
             words=("cannot read or write", "/sys/textscf-train-out", "read-only")),
    ]


CASES = _register_cases() + _output_cases() + _option_cases() + _evaluate_cases() + _train_cases()
_results: collections.Counter = collections.Counter()


def _report_counts():
    groups = collections.Counter(case.group for case in CASES)
    total = len(CASES) + len(SUBPROCESS_CASES)
    lines = [f"bad-input matrix: {total} cases ({len(CASES)} in-process, {len(SUBPROCESS_CASES)} in a subprocess)"]
    lines += [f"  {group}: {n}" for group, n in sorted(groups.items())]
    lines += [f"  signals and start-up (subprocess): {len(SUBPROCESS_CASES)}"]
    lines += [f"  so far: {_results['passed']} passed"]
    return "\n".join(lines)


def test_the_matrix_has_at_least_90_cases():
    print("\n" + _report_counts())
    assert len(CASES) + len(SUBPROCESS_CASES) >= 90
    assert len({(c.group, c.id) for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.group}: {c.id}" for c in CASES])
def test_bad_input(case: Case, base_inputs, tiny_abdomen_checkpoint, tmp_path, capsys):
    inputs = tmp_path / "in"
    shutil.copytree(base_inputs, inputs)
    ctx = Ctx(inputs=inputs, out=tmp_path / "out", ckpt=Path(tiny_abdomen_checkpoint), tmp=tmp_path)
    if case.prepare is not None:
        case.prepare(ctx)
        capsys.readouterr()
    argv = case.argv(ctx)
    before_inputs = _checksums(inputs, ctx.ckpt, *ctx.protect)
    before_out = _checksums(ctx.out)
    started = time.perf_counter()
    code, out, err = _run_main(argv, capsys)
    seconds = time.perf_counter() - started

    assert code == case.code, f"exit {code}, expected {case.code}; stderr:\n{err}"
    for word in case.words:
        assert word.lower() in err.lower(), f"{word!r} not in the message:\n{err}"
    for word in case.absent:
        assert word not in err, f"{word!r} in the message:\n{err}"
    if case.code == EXIT_INPUT:
        assert err.strip(), "no message"
    assert _checksums(inputs, ctx.ckpt, *ctx.protect) == before_inputs, "an input changed"
    assert _temp_leftovers(tmp_path) == [], "a temporary file was left"
    if case.code != EXIT_OK and ctx.out.exists():
        after_out = _checksums(ctx.out)
        new = sorted(set(after_out) - set(before_out) - {str(p) for p in ctx.protect})
        if case.group != "evaluate":  # evaluate keeps finished pairs in partial/ by design
            assert new == [], f"partial output: {new}"
        assert {k: v for k, v in after_out.items() if k in before_out} == before_out, "a previous output changed"
    if case.check is not None:
        case.check(ctx)
    assert seconds < 120
    _results["passed"] += 1


# ------------------------------------------------------------------------------------------------ subprocess cases
def _textscf(*args: str) -> list[str]:
    return [sys.executable, "-m", "textscf.cli", *args]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _interrupt(signum: int, base_inputs: Path, ckpt: Path, tmp_path: Path) -> None:
    """Start a long registration, send ``signum`` once it is running, expect exit 3, a message and no file."""
    inputs = tmp_path / "in"
    shutil.copytree(base_inputs, inputs)
    before = _checksums(inputs)
    out = tmp_path / "out"
    ctx = Ctx(inputs=inputs, out=out, ckpt=ckpt, tmp=tmp_path)
    argv = ctx.register("--refine", "100000")  # never finishes by itself
    # A shell that starts a job in the background without job control (e.g. a CI runner's `cmd &`) makes it ignore
    # SIGINT, and the ignore is inherited: give the child the default disposition, as a terminal would.
    proc = subprocess.Popen(_textscf(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    try:
        deadline = time.monotonic() + 120
        while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the output folder appears when the registration starts
        time.sleep(1.0)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_CANCELLED, err
    assert ("terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted") in err
    assert "no output was written" in err and "Traceback" not in err
    assert not out.exists() or [p for p in out.rglob("*")] == []
    assert _temp_leftovers(tmp_path) == []
    assert _checksums(inputs) == before


def _fifo_subprocess(base_inputs: Path, ckpt: Path, tmp_path: Path) -> None:
    """The real command with a FIFO as the fixed image: refused at once (it used to block, deaf to Ctrl-C)."""
    inputs = tmp_path / "in"
    shutil.copytree(base_inputs, inputs)
    ctx = Ctx(inputs=inputs, out=tmp_path / "out", ckpt=ckpt, tmp=tmp_path)
    done = subprocess.run(_textscf(*ctx.register(fixed=_fifo(ctx, "pipe.nii.gz"))), capture_output=True, text=True,
                          timeout=120, env=_env())
    assert done.returncode == EXIT_INPUT and "named pipe" in done.stderr, done.stderr
    assert not ctx.out.exists()


def _help_is_fast(base_inputs: Path, ckpt: Path, tmp_path: Path) -> None:
    """``textscf --help`` builds every parser without importing torch; the time is printed (target < 1 s)."""
    probe = "import sys, textscf.cli as c; c.build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          env=_env()).stdout.strip() == "False"
    times = []
    for _ in range(3):
        start = time.perf_counter()
        done = subprocess.run(_textscf("--help"), capture_output=True, text=True, env=_env())
        times.append(time.perf_counter() - start)
        assert done.returncode == 0 and "Exit codes" in done.stdout and "SIGTERM" in done.stdout
    print(f"\ntextscf --help: median {sorted(times)[1]:.2f} s of 3 runs")
    assert sorted(times)[1] < 5.0  # 0.3 s on an idle 2-core machine; generous for a loaded CI runner


SUBPROCESS_CASES = {
    "SIGTERM during register": lambda b, k, t: _interrupt(signal.SIGTERM, b, k, t),
    "SIGINT during register": lambda b, k, t: _interrupt(signal.SIGINT, b, k, t),
    "FIFO as the fixed image (real process)": _fifo_subprocess,
    "--help without torch": _help_is_fast,
}


@pytest.mark.parametrize("name", list(SUBPROCESS_CASES))
def test_fault_in_a_subprocess(name, base_inputs, tiny_abdomen_checkpoint, tmp_path):
    SUBPROCESS_CASES[name](base_inputs, Path(tiny_abdomen_checkpoint), tmp_path)
    _results["passed"] += 1
    if _results["passed"] == len(CASES) + len(SUBPROCESS_CASES):
        print("\n" + _report_counts())

"""The ``textscf`` command line: register, demo, train, evaluate.

Exit codes: 0 success, 1 unexpected error (a bug: please report it with the traceback), 2 bad input or
options (the message says what to fix), 3 cancelled / interrupted (Ctrl-C, or SIGTERM as a scheduler sends it; the
unfinished outputs are removed in both cases).

Only what a command needs is imported: ``textscf --help`` never imports torch.
"""
from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # the pipeline imports torch; the CLI loads it only when a command needs it
    from textscf.pipeline import RegistrationOptions

EXIT_OK, EXIT_BUG, EXIT_INPUT, EXIT_CANCELLED = 0, 1, 2, 3


SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit


def _range_text(low, high) -> str:
    return f">= {low}" if high is None else f"between {low} and {high}"


def int_option(low: int, high: int | None = None, what: str = "a whole number") -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[low, high]`` (``high`` None = no upper bound)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} {_range_text(low, high)}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range. Fix: give {what} {_range_text(low, high)}")
        return value
    parse.__name__ = "integer"  # argparse names the type in "invalid integer value"
    return parse


def float_option(low: float, high: float, low_inclusive: bool = True, what: str = "a number") -> Callable[[str], float]:
    """An argparse ``type``: a finite float in ``[low, high]`` (``(low, high]`` when not ``low_inclusive``)."""
    bounds = f"{'>=' if low_inclusive else '>'} {low:g} and <= {high:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} {bounds}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (value == low and not low_inclusive) or value > high:
            raise argparse.ArgumentTypeError(f"{text} is out of range. Fix: give {what} {bounds}")
        return value
    parse.__name__ = "number"
    return parse


def output_folder_option(text: str) -> str:
    """An argparse ``type`` for ``-o``: a non-empty folder path (an empty one would write into the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the output folder is empty. Fix: give a folder name, e.g. -o out")
    return text


def path_option(text: str) -> str:
    """An argparse ``type`` for an input path: non-empty (an empty --checkpoint would quietly mean the default)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the path is empty. Fix: give the file's path, or leave the option out")
    return text


refine_iterations_option = int_option(0, what="a number of iterations (0 = off)")
label_weight_option = float_option(0.0, 1e4, low_inclusive=False, what="a label loss weight")
refine_lr_option = float_option(0.0, 1.0, low_inclusive=False, what="a learning rate")
seed_option = int_option(0, SEED_MAX, what="a seed")


def comma_list_option(text: str) -> list[str]:
    return [part.strip() for part in text.split(",")]


def int_list_option(text: str) -> list[int]:
    try:
        return [int(v) for v in comma_list_option(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and prompts")
    g.add_argument("--checkpoint", type=path_option, help="textscf checkpoint (.pt); default: the bundled abdomen CT model. "
                   "'fresh' starts from a new network and needs --refine")
    g.add_argument("--preset", help="prompt preset: abdomen-ct (13 organs) or brain-mri (FreeSurfer structures)")
    g.add_argument("--prompts", type=comma_list_option, help='region names, e.g. "liver,spleen" (with --label-values)')
    g.add_argument("--label-values", type=int_list_option, help='label value of each prompt in the label maps, e.g. "6,1"')
    g.add_argument("--template", help='prompt template with one "{}", or a name: photo, photo-abdomen, ct-abdomen, mri-brain')
    g.add_argument("--encoder", help="the text encoder the checkpoint must have been trained with (a check: "
                   "onehot or open_clip:MODEL:PRETRAINED)")
    g.add_argument("--unmapped-labels", choices=["error", "background"], default="error",
                   help="label values without a prompt: stop with an error (default) or treat them as background")


def _add_register_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("registration")
    g.add_argument("--init", choices=["none", "center", "affine"], default="center",
                   help="initial alignment before the network (default: center of mass)")
    g.add_argument("--initial-transform", type=path_option, help="an ITK transform file (fixed -> moving) to start from; replaces --init")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the network runs; cuda falls back to the CPU with a message when unavailable")
    g.add_argument("--integrate", dest="integrate", action="store_true", default=None,
                   help="diffeomorphic integration (scaling and squaring, 7 steps)")
    g.add_argument("--no-integrate", dest="integrate", action="store_false", help="no integration")
    add_debias_option(g)
    g.add_argument("--refine", type=refine_iterations_option, default=None, metavar="N",
                   help="instance optimisation: N steps on the network's weights on this pair (0 = none; with no "
                   "--refine-field either, the network's forward pass alone). Default: the default schedule, printed "
                   "at the start and recorded in report.json (no network steps: the field itself is optimised, "
                   "100 steps at 1/4 and 100 at 1/2 of the model grid, MIND-SSC similarity (+ intensity MSE for CT))")
    g.add_argument("--refine-lr", type=refine_lr_option, default=1e-3,
                   help="learning rate of the network steps, in (0, 1] (default 1e-3)")
    g.add_argument("--refine-field", type=refine_iterations_option, default=None, metavar="M",
                   help="after the network steps, at most M steps on the displacement field itself at each level of "
                   "the pyramid (1/4, then 1/2 of the model grid; a fresh network's also the model grid itself) (default: the "
                   "schedule's, 100; 0 with --refine 0)")
    g.add_argument("--refine-smooth", type=float_option(0.0, 1e4, what="a smoothness weight"), default=None,
                   help="refinement smoothness weight λ of ‖∇u‖² (default: the schedule's for its similarity: 0.1, "
                   "1.5 with local NCC)")
    g.add_argument("--similarity", choices=["auto", "mind", "mind+mse", "mse", "ncc"], default="auto",
                   help="refinement image term: mind = MIND-SSC self-similarity descriptors (any modality), mse = "
                   "intensity difference (same scanner), mind+mse = both, ncc = local normalised cross-correlation; "
                   "auto = mind+mse for CT, ncc for MRI")
    g.add_argument("--segmentor-weights", type=path_option, help="SwinUNETR weights (state dict or MONAI bundle folder), used when "
                   "no --fixed-labels is given; without either the pair is registered without regions (the shared "
                   "filter alone: plain LKU-Net)")
    add_label_guidance_options(g)
    g.add_argument("--seed", type=seed_option, default=0,
                   help=f"random seed, 0 to {SEED_MAX} (refinement is deterministic on the CPU)")


def add_debias_option(g) -> None:
    g.add_argument("--no-debias", dest="debias", action="store_false",
                   help="run the network once; by default it also runs on the fixed image paired with itself and "
                   "that response (which should be zero) is removed from the field, so an image registered to "
                   "itself gets a zero field")


def add_label_guidance_options(g) -> None:
    """--guide-with-labels and --label-loss-weight (register and evaluate): the moving labels in the loss."""
    g.add_argument("--guide-with-labels", action="store_true",
                   help="also put the moving label map into the refinement loss (a Dice term). Off by default: "
                   "--moving-labels then only scores the run and never changes the field. It raises Dice but can "
                   "worsen the correspondence (on a real CT with a known field: Dice 88 -> 90 %%, endpoint error "
                   "2.8 -> 4.1 mm)")
    g.add_argument("--label-loss-weight", type=label_weight_option, default=None, metavar="W",
                   help="weight of that Dice term, > 0 (default 1; only with --guide-with-labels)")


def label_guidance(args) -> dict:
    """The ``RegistrationOptions`` fields of --guide-with-labels / --label-loss-weight (InputError if inconsistent)."""
    from textscf.errors import InputError

    if args.label_loss_weight is not None and not args.guide_with_labels:
        raise InputError("--label-loss-weight weighs the moving labels in the refinement loss, which only happens "
                         "with --guide-with-labels. Fix: add --guide-with-labels, or leave out --label-loss-weight")
    return {"refine_use_moving_labels": bool(args.guide_with_labels),
            "refine_label_weight": 1.0 if args.label_loss_weight is None else args.label_loss_weight}


def _add_output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("outputs")
    g.add_argument("--field-format", choices=["nii.gz", "h5", "nrrd", "mha"], default="nii.gz",
                   help="displacement field file format (all are ITK displacement fields in LPS mm)")
    g.add_argument("--no-qc", action="store_true", help="do not render the QC figure")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the previous run in the output folder: its files are replaced, and those this run "
                   "does not write again are removed, once the new run has succeeded (inputs are never touched)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="textscf",
        description="Deformable CT/MRI registration with spatially covariant filters driven by text prompts (textSCF).",
        epilog="Exit codes: 0 ok, 1 unexpected error, 2 bad input or options, 3 cancelled (Ctrl-C or SIGTERM; "
        "unfinished outputs are removed).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    from textscf.io import MANIFEST_NAME

    reg = sub.add_parser("register", help="register a moving image to a fixed image",
                         description="Register MOVING to FIXED and write the displacement field (ITK, LPS mm), "
                         "the warped image, the Jacobian determinant, a JSON report and a QC figure to OUTDIR.")
    reg.add_argument("fixed", help="fixed image (NIfTI, NRRD, MHA/MHD)")
    reg.add_argument("moving", help="moving image")
    reg.add_argument("-o", "--output", required=True, type=output_folder_option,
                     help=f"output folder; it gets a {MANIFEST_NAME} listing the run's files, and --overwrite replaces "
                     "that run as a whole")
    reg.add_argument("--fixed-labels", type=path_option, help="label map of the fixed image (stands in for the segmentor)")
    reg.add_argument("--moving-labels", type=path_option, help="label map of the moving image: scores the run (Dice/HD95 "
                     "against --fixed-labels, warped labels) and never changes the field, unless --guide-with-labels")
    _add_model_options(reg)
    _add_register_options(reg)
    _add_output_options(reg)

    from textscf.samples import SLICER_SAMPLES

    demo = sub.add_parser("demo", help="register the bundled example pair with the bundled model",
                          description="Generate the example abdominal phantom pair, register it with the bundled "
                          "model and write all outputs and the QC figure (offline). With --sample, use one of "
                          "3D Slicer's public sample CTs instead (downloaded once), deformed by a known field.")
    demo.add_argument("-o", "--output", default="demo-output", type=output_folder_option,
                      help="output folder (default: demo-output)")
    demo.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    demo.add_argument("--refine", type=refine_iterations_option, default=None, metavar="N",
                      help="network steps on the pair (default: the default schedule, as `textscf register` and the "
                      "Slicer module: no network steps, the field optimised at 1/4 and 1/2 of the model grid; 0 = "
                      "the network alone)")
    demo.add_argument("--overwrite", action="store_true", help="replace existing output files")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    online = demo.add_argument_group("public sample CT (needs the internet once)")
    online.add_argument("--sample", choices=sorted(SLICER_SAMPLES),
                        help="3D Slicer SampleData CT to register instead of the phantom: downloaded into the cache "
                        "and checked by SHA-256, resampled to 2 mm; the fixed image is it deformed by a known smooth "
                        "field, so the endpoint error is reported")
    online.add_argument("--segmentor-weights", type=path_option, metavar="PATH",
                        help="SwinUNETR weights (state dict or MONAI bundle folder) that find the organs of the "
                        "sample, which has no label map (default: MONAI's swin_unetr_btcv_segmentation bundle, "
                        "downloaded into the cache)")
    online.add_argument("--segmentor-feature-size", type=int, choices=[12, 24, 48], default=None,
                        help="feature size of those weights: 12/24/48 = tiny/small/base (default 48, as the BTCV bundle)")
    online.add_argument("--cache-dir", metavar="DIR",
                        help="cache root for the download: DIR/samples and DIR/models (default: $TEXTSCF_CACHE, "
                        "else ~/.cache/textscf)")

    from textscf import training_cli

    training_cli.add_train_parser(sub)
    from textscf import evaluate_cli

    evaluate_cli.add_evaluate_parser(sub)
    return parser


class _ProgressBar:
    """A tqdm bar for the whole run, fed the pipeline's (stage, fraction, seconds left), as the Slicer bar is."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=100, unit="%", bar_format="{l_bar}{bar}| {elapsed}{postfix}", leave=False)

    def __call__(self, stage: str, fraction: float, seconds_left: float | None = None) -> None:
        from textscf.schedule import describe_duration

        if self.bar is not None:
            self.bar.set_description(stage, refresh=False)
            self.bar.n = int(round(100 * fraction))
            self.bar.set_postfix_str("" if seconds_left is None else f"{describe_duration(seconds_left)} left",
                                     refresh=False)
            self.bar.refresh()

    def write(self, line: str) -> None:
        """A line for the user that does not break the bar."""
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far in MiB (``ru_maxrss``); None where the platform has no such count."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / 1024 ** (2 if sys.platform == "darwin" else 1), 1)  # bytes on macOS, KiB on Linux


class _StagePeaks:
    """A progress callback that passes every call on and notes :func:`peak_rss_mib` as each stage ends.

    ``peaks`` maps a stage to the peak so far at its end: it never decreases, so the stage where it rises set the
    peak. The last stage still running has no entry.
    """

    def __init__(self, progress: Callable):
        self.progress = progress
        self.peaks: dict[str, float | None] = {}
        self._stage: str | None = None

    def __call__(self, stage: str, fraction: float, seconds_left: float | None = None) -> None:
        if stage != self._stage:
            if self._stage is not None:
                self.peaks[self._stage] = peak_rss_mib()
            self._stage = stage
        self.progress(stage, fraction, seconds_left)


def _options_from_args(args) -> RegistrationOptions:
    from textscf.pipeline import RegistrationOptions

    return RegistrationOptions(
        checkpoint=args.checkpoint, preset=args.preset, region_names=args.prompts, label_values=args.label_values,
        template=args.template, text_encoder=args.encoder, init=args.init, device=args.device, integrate=args.integrate,
        refine_iterations=args.refine, refine_learning_rate=args.refine_lr, refine_smooth_weight=args.refine_smooth,
        refine_field_iterations=args.refine_field,
        refine_similarity=args.similarity, segmentor_weights=args.segmentor_weights,
        unmapped_labels=args.unmapped_labels, seed=args.seed, debias=args.debias, **label_guidance(args),
    )


def run_registration(fixed, moving, output, options, fixed_labels=None, moving_labels=None, initial_transform=None,
                     field_format="nii.gz", qc=True, overwrite=False, quiet=False, inputs=None, add_stats=None,
                     input_files=None) -> dict:
    """Register already-read images and write every output into ``output`` (all or nothing).

    ``add_stats(result)`` may add entries to ``result.stats`` before the report is written. ``input_files``
    (``{role: path}``) are the files read: no output may replace or remove one of them. The folder's manifest
    lists the run's files; with ``overwrite`` the previous run's other files are removed after success.
    """
    from textscf.io import MANIFEST_NAME, OutputFolder
    from textscf.outputs import all_output_names, output_names, write_outputs
    from textscf.pipeline import register

    names = output_names(field_format, moving_labels is not None, qc, initial_transform is not None or options.init != "none")
    bar = _ProgressBar(not quiet)
    try:
        with OutputFolder(output, overwrite=overwrite, names=names, inputs=input_files, manifest=MANIFEST_NAME,
                          known_names=all_output_names()) as out:
            stages = _StagePeaks(bar)
            result = register(fixed, moving, options, fixed_labels, moving_labels, initial_transform, progress=stages,
                              log=lambda line: bar.write(f"textscf: {line}"))
            if add_stats is not None:
                add_stats(result)
            stages("write outputs", 1.0, None)
            result.stats["peak_rss_mib_after_stage"] = stages.peaks
            modality = "mri" if (options.preset or "").startswith("brain") else "ct"
            write_outputs(out, result, fixed, moving, inputs or {}, field_format, qc, fixed_labels, modality)
    finally:
        bar.close()
    return result.stats


def _print_summary(stats: dict, output) -> None:
    parts = [f"SDlogJ {stats['sdlogj']:.3f}", f"|J|<=0 {stats['folding_percent']:.3f} %"]
    if "mean_dice" in stats:
        parts.append(f"Dice {100 * stats['mean_dice_before']:.1f} % -> {100 * stats['mean_dice']:.1f} %")
    parts.append(f"{stats['seconds_total']:.1f} s on {stats['device']}")
    print(f"textscf: wrote {output}: " + ", ".join(parts))


def _check_distinct(fixed_path: str, moving_path: str) -> None:
    """InputError when the fixed and moving image are one file, or two files with the same bytes."""
    import filecmp

    from textscf.errors import InputError
    from textscf.io import same_file

    fixed_path, moving_path = Path(fixed_path), Path(moving_path)
    same = same_file(fixed_path, moving_path)
    if same or (fixed_path.is_file() and moving_path.is_file() and filecmp.cmp(fixed_path, moving_path, shallow=False)):
        how = "the same file" if same else "two files with identical content"
        raise InputError(f"the fixed image '{fixed_path}' and the moving image '{moving_path}' are {how}: "
                         "registering an image to itself gives the identity and measures nothing. Fix: give two "
                         "different scans (fixed = the reference, moving = the scan to deform).")


def cmd_register(args) -> int:
    from textscf.io import read_image, read_label_map, read_transform

    fixed = read_image(args.fixed, "fixed image")
    moving = read_image(args.moving, "moving image")
    _check_distinct(args.fixed, args.moving)
    fixed_labels = read_label_map(args.fixed_labels, fixed, "fixed label map") if args.fixed_labels else None
    moving_labels = read_label_map(args.moving_labels, moving, "moving label map") if args.moving_labels else None
    initial = read_transform(args.initial_transform) if args.initial_transform else None
    options = _options_from_args(args)
    inputs = {k: getattr(args, k) for k in ("fixed", "moving", "fixed_labels", "moving_labels", "initial_transform",
                                            "checkpoint", "preset", "template", "init", "device", "refine")}
    input_files = {"fixed image": args.fixed, "moving image": args.moving, "fixed label map": args.fixed_labels,
                   "moving label map": args.moving_labels, "initial transform": args.initial_transform,
                   "segmentor weights": args.segmentor_weights,
                   "checkpoint": None if (args.checkpoint or "").lower() == "fresh" else args.checkpoint}
    stats = run_registration(fixed, moving, args.output, options, fixed_labels, moving_labels, initial,
                             args.field_format, not args.no_qc, args.overwrite, args.quiet, inputs,
                             input_files=input_files)
    _print_summary(stats, args.output)
    return EXIT_OK


def _demo_cache_root(args) -> Path:
    from textscf.text import default_cache_directory

    return Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_directory().parent


def _demo_segmentor_weights(args, cache_root: Path) -> str:
    """--segmentor-weights, else MONAI's BTCV SwinUNETR bundle from (or downloaded into) ``cache_root/models``."""
    from textscf import segmentation
    from textscf.errors import CheckpointError

    if args.segmentor_weights:
        return args.segmentor_weights
    folder = cache_root / "models"
    bundle = folder / segmentation.BTCV_BUNDLE_NAME
    if (bundle / "models" / "model.pt").is_file():
        return str(bundle)
    print(f"textscf: downloading MONAI's {segmentation.BTCV_BUNDLE_NAME} bundle (SwinUNETR, 13 abdominal organs) "
          f"into {folder}", flush=True)
    try:
        return str(segmentation.download_btcv_bundle(folder))
    except CheckpointError as exc:
        raise CheckpointError(
            f"the {args.sample} sample has no organ label map, so textscf finds the fixed image's organs with a "
            f"SwinUNETR segmentor, and its weights could not be downloaded ({exc.__cause__ or exc}). Fix: pass "
            "--segmentor-weights PATH (a SwinUNETR state dict, or a MONAI bundle folder with models/model.pt: e.g. "
            f"MONAI's {segmentation.BTCV_BUNDLE_NAME} bundle downloaded on another machine and placed at {bundle}), "
            "or run `textscf demo` without --sample, which works offline."
        ) from exc


def _demo_sample(args) -> int:
    """``textscf demo --sample NAME``: a public CT, deformed by a known field, registered; reports endpoint error."""
    import numpy as np
    import SimpleITK as sitk

    from textscf.errors import InputError
    from textscf.pipeline import RegistrationOptions
    from textscf.metrics import mean_endpoint_error_mm
    from textscf.samples import SLICER_SAMPLES, fetch_sample, make_sample_pair
    from textscf.spatial import body_threshold_for, image_to_array, physical_displacement_to_voxel

    start = time.perf_counter()
    sample = SLICER_SAMPLES[args.sample]
    root = _demo_cache_root(args)
    path = fetch_sample(args.sample, cache_dir=root / "samples", log=lambda line: print(f"textscf: {line}", flush=True))
    weights = _demo_segmentor_weights(args, root)
    try:
        ct = sitk.ReadImage(str(path))  # its own pixel type: a float32 copy of a 0.7 mm CT would be large
    except RuntimeError as exc:
        raise InputError(f"cannot read the cached sample {path}: {exc}. Fix: delete it so that it is downloaded "
                         "again.") from None
    pair = make_sample_pair(ct, seed=0)
    del ct
    fixed, moving, u_true = pair["fixed"], pair["moving"], pair["displacement"]
    options = RegistrationOptions(preset="abdomen-ct", init="center", device=args.device,
                                  refine_iterations=args.refine, refine_field_iterations=None,
                                  segmentor_weights=weights, segmentor_feature_size=args.segmentor_feature_size or 48)
    how = f"resampled to {pair['spacing_mm']:g} mm"
    inputs = {"fixed": f"{args.sample} sample CT, {how}, warped by a known smooth random field (seed 0, at most "
                       f"{pair['max_displacement_mm']:g} mm)",
              "moving": f"{args.sample} sample CT, {how}", "sample": args.sample, "source": sample.description,
              "source_url": sample.url, "licence": sample.licence, "sample_file": str(path),
              "segmentor_weights": weights, "preset": "abdomen-ct", "init": "center", "refine": args.refine}

    def add_endpoint_error(result):
        body = image_to_array(fixed) > body_threshold_for(fixed)
        body = body if body.any() else None
        u = physical_displacement_to_voxel(result.displacement, fixed)
        spacing = fixed.GetSpacing()
        result.stats["mean_endpoint_error_mm_before"] = mean_endpoint_error_mm(np.zeros_like(u), u_true, spacing, body)
        result.stats["mean_endpoint_error_mm"] = mean_endpoint_error_mm(u, u_true, spacing, body)
        result.stats["endpoint_error_region"] = "body voxels of the fixed image" if body is not None else "all voxels"

    stats = run_registration(fixed, moving, args.output, options, overwrite=args.overwrite, quiet=args.quiet,
                             inputs=inputs, add_stats=add_endpoint_error)
    _print_summary(stats, args.output)
    print(f"textscf: mean endpoint error over {stats['endpoint_error_region']}: "
          f"{stats['mean_endpoint_error_mm_before']:.2f} mm -> {stats['mean_endpoint_error_mm']:.2f} mm")
    print(f"textscf: data: {sample.description}, {sample.licence}, from {sample.url}")
    print(f"textscf: demo finished in {time.perf_counter() - start:.1f} s; look at {Path(args.output) / 'qc.png'}")
    return EXIT_OK


def cmd_demo(args) -> int:
    from textscf.errors import InputError
    from textscf.phantom import make_example_pair
    from textscf.pipeline import RegistrationOptions

    if args.sample is not None:
        return _demo_sample(args)
    stray = [flag for flag, value in (("--segmentor-weights", args.segmentor_weights),
                                      ("--segmentor-feature-size", args.segmentor_feature_size),
                                      ("--cache-dir", args.cache_dir)) if value is not None]
    if stray:
        raise InputError(f"{', '.join(stray)} only apply with --sample NAME (the phantom pair has label maps). "
                         "Fix: add --sample CTLiver, or leave them out.")
    start = time.perf_counter()
    pair = make_example_pair(seed=0)
    options = RegistrationOptions(preset="abdomen-ct", init="center", device=args.device,
                                  refine_iterations=args.refine, refine_field_iterations=None)
    inputs = {"fixed": "example phantom subject (generated by textscf.phantom, seed 0)",
              "moving": "another phantom subject deformed by a known smooth field", "preset": "abdomen-ct"}
    stats = run_registration(pair["fixed"], pair["moving"], args.output, options, pair["fixed_labels"],
                             pair["moving_labels"], None, "nii.gz", True, args.overwrite, args.quiet, inputs)
    _print_summary(stats, args.output)
    print(f"textscf: demo finished in {time.perf_counter() - start:.1f} s; look at {Path(args.output) / 'qc.png'}")
    return EXIT_OK


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds (and cleans up) exactly as Ctrl-C does."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _interrupted_note(args) -> str:
    if args.command == "train":
        return "training stopped; the checkpoints saved so far are kept"
    if args.command == "evaluate":
        return f"the finished pairs are kept in {args.output}; run the same command with --resume to continue"
    return "no output was written"


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"textscf: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from textscf.errors import CancelledError, TextSCFError

    handlers = {"register": cmd_register, "demo": cmd_demo}
    previous_sigterm = None
    if threading.current_thread() is threading.main_thread():
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            if args.command in handlers:
                return handlers[args.command](args)
            return args.handler(args)
    except CancelledError as exc:
        print(f"textscf: {exc}", file=sys.stderr)
        return EXIT_CANCELLED
    except TextSCFError as exc:
        print(f"textscf: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as exc:  # the file system said no (read-only, full, permissions) where no check caught it first
        where = f" '{exc.filename}'" if exc.filename else ""
        print(f"textscf: error: cannot read or write{where}: {exc.strerror or exc}. Fix: check the path, the "
              "permissions, the free disk space, and that the file system is not read-only (or choose another "
              "folder with -o).", file=sys.stderr)
        return EXIT_INPUT
    except Terminated:
        print(f"textscf: terminated (SIGTERM); {_interrupted_note(args)}", file=sys.stderr)
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        print(f"textscf: interrupted; {_interrupted_note(args)}", file=sys.stderr)
        return EXIT_CANCELLED
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


if __name__ == "__main__":
    sys.exit(main())

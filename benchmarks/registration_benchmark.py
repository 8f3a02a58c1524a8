"""Side-by-side registration benchmark: textSCF vs its no-SCF baseline vs ANTs SyN vs Elastix, in one run.

    scripts/with-env python benchmarks/registration_benchmark.py --abdomen --brain --real-ct -o benchmarks/results

Sections (each optional):
- ``--abdomen``: the Learn2Reg/BTCV abdomen label maps with the paper's split (42 ordered test pairs). The CT images
  are not available, so CT-like images are SYNTHESISED from the label maps (textscf.phantom.synthesize_ct_from_labels);
  every number of this section is on synthetic, label-derived images. Evaluated on the 4 mm grid the models use.
- ``--brain``: the two real FreeSurfer-labelled T1 MRI subjects (1 mm), 30 evaluation labels; textSCF runs as
  instance optimisation from a fresh network (we ship no brain model), with both label maps or with the fixed labels only.
- ``--real-ct``: the real example CT with its organ labels, warped by a known smooth random field and by a known
  affine; endpoint error (mm) and organ Dice before/after.

Every method gets the same pairs on the same machine; the script prints Markdown tables with ratios (our time /
peer time, our Dice - peer Dice) and writes CSV/JSON next to them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import peers  # noqa: E402
from textscf import metrics  # noqa: E402
from textscf.datasets import (  # noqa: E402
    BTCV_SPLIT, brain_eval_labels, brain_subjects, load_btcv_labels, load_example_ct, ordered_pairs,
)
from textscf.phantom import PHANTOM_DIRECTION, random_affine, random_smooth_displacement, affine_to_displacement  # noqa: E402
from textscf.pipeline import RegistrationOptions, register  # noqa: E402
from textscf.presets import load_preset  # noqa: E402
from textscf.schedule import FRESH_FIELD_STEPS, FRESH_NETWORK_STEPS  # noqa: E402
from textscf.spatial import image_to_array, physical_displacement_to_voxel  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MODELS = Path(__file__).resolve().parents[1] / "TextSCFRegistration" / "textscf" / "resources" / "models"
def to_sitk(arr: np.ndarray, spacing, direction=PHANTOM_DIRECTION, origin=(0.0, 0.0, 0.0), pixel=sitk.sitkFloat32):
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetDirection(direction)
    img.SetOrigin(origin)
    return sitk.Cast(img, pixel)


def pair_metrics(warped_labels, fixed_labels, labels, spacing, displacement_voxels=None, jacobian=None,
                 moving_labels=None):
    """Dice and HD95 per label, mean Dice, SDlogJ and folding % of one registered pair.

    ``mean_dice`` averages every label present in either map (one present in only one map scores 0). With
    ``moving_labels``, ``mean_dice_both`` averages only the labels present in both the moving and the fixed map,
    the Learn2Reg convention (an organ missing from a scan cannot be aligned).
    """
    dice = metrics.dice_per_label(warped_labels, fixed_labels, labels)
    hd = metrics.hd95_per_label(warped_labels, fixed_labels, labels, spacing)
    if jacobian is None:
        jacobian = metrics.jacobian_determinant(displacement_voxels)
    out = {
        "dice": {int(k): float(v) for k, v in dice.items()}, "hd95": {int(k): float(v) for k, v in hd.items()},
        "mean_dice": metrics.mean_ignoring_nan(dice), "mean_hd95": metrics.mean_ignoring_nan(hd),
        "sdlogj": metrics.sdlogj(jacobian), "folding_percent": metrics.folding_percent(jacobian),
    }
    if moving_labels is not None:
        both = set(np.unique(moving_labels).tolist()) & set(np.unique(fixed_labels).tolist())
        out["mean_dice_both"] = metrics.mean_ignoring_nan({k: v for k, v in dice.items() if k in both})
    return out


def run_textscf(fixed, moving, fixed_labels, moving_labels, spacing, options, direction=PHANTOM_DIRECTION,
                with_fixed_labels=True):
    """Our pipeline on arrays of one shared grid; returns (metrics-ready warped labels, jacobian, seconds, stats).

    The moving labels only score the run (unless the options guide with them); ``with_fixed_labels=False`` gives the
    pipeline no fixed label map either (a pair without regions), the metrics still use ``fixed_labels``."""
    f, m = to_sitk(fixed, spacing, direction), to_sitk(moving, spacing, direction)
    fl = to_sitk(fixed_labels, spacing, direction, pixel=sitk.sitkInt16) if with_fixed_labels else None
    ml = to_sitk(moving_labels, spacing, direction, pixel=sitk.sitkInt16)
    start = time.perf_counter()
    result = register(f, m, options, fl, ml)
    seconds = time.perf_counter() - start
    return (image_to_array(result.warped_labels).astype(np.int64), image_to_array(result.jacobian), seconds,
            result, physical_displacement_to_voxel(result.displacement, f))


def summarise(rows: list[dict], method: str) -> dict:
    sel = [r for r in rows if r["method"] == method]
    def stat(key):
        vals = np.array([r.get(key, np.nan) for r in sel], float)
        if np.isnan(vals).all():
            return float("nan"), float("nan")
        return float(np.nanmean(vals)), float(np.nanstd(vals))
    out = {"method": method, "pairs": len(sel)}
    for key in ("mean_dice", "mean_dice_both", "mean_hd95", "sdlogj", "folding_percent", "seconds"):
        out[key], out[key + "_std"] = stat(key)
    return out


def paired_difference(rows: list[dict], method: str, baseline: str, key: str = "mean_dice") -> str:
    """``method - baseline`` per pair (same pairs only): mean, sd and wins, as one Markdown sentence."""
    by_pair = {}
    for r in rows:
        by_pair.setdefault(r["pair"], {})[r["method"]] = r.get(key, np.nan)
    diffs = np.array([100 * (v[method] - v[baseline]) for v in by_pair.values() if method in v and baseline in v])
    diffs = diffs[np.isfinite(diffs)]
    if diffs.size == 0:
        return ""
    return (f"Paired over {diffs.size} pairs, {method} - {baseline}: Dice {diffs.mean():+.2f} ± {diffs.std():.2f} "
            f"points (mean ± sd), {method} higher on {int((diffs > 0).sum())} of {diffs.size}.")


def markdown(summaries: list[dict], ours: list[str], title: str, note: str) -> str:
    """One row per method; for each of ``ours`` (present ones), our time / its time and our Dice - its Dice."""
    by = {s["method"]: s for s in summaries}
    ours = [o for o in ours if o in by]
    both = any(not np.isnan(s["mean_dice_both"]) for s in summaries)
    header = ["method", "pairs", "Dice %"] + (["Dice % (organs in both)"] if both else []) + \
        ["HD95 mm", "SDlogJ", "% \\|J\\|<=0", "s / pair"]
    for o in ours:
        header += [f"{o} time / its time", f"{o} Dice - its Dice"]
    lines = [f"### {title}", "", note, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        cells = [s["method"], str(s["pairs"]), f"{100 * s['mean_dice']:.2f} ± {100 * s['mean_dice_std']:.2f}"]
        if both:
            cells.append(f"{100 * s['mean_dice_both']:.2f}")
        cells += [f"{s['mean_hd95']:.2f}", f"{s['sdlogj']:.3f}", f"{s['folding_percent']:.3f}", f"{s['seconds']:.2f}"]
        for o in ours:
            if s["method"] == o:
                cells += ["", ""]
                continue
            cells.append(f"{by[o]['seconds'] / s['seconds']:.2f}" if s["seconds"] > 0 else "")
            cells.append(f"{100 * (by[o]['mean_dice'] - s['mean_dice']):+.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ abdomen
REFINE_FIXED = "textSCF + refine (fixed labels only)"
# The same network given no regions (every voxel background, confidence 0): the shared filter w_r alone, i.e. what the
# network does without SCF (training shows it pairs without regions on part of the steps).
NO_REGIONS = "textSCF network without regions (w_r alone)"
REFINE_BOTH = "textSCF + refine (both label maps)"
# The network alone without the null-pair correction (RegistrationOptions.debias=False): one forward pass.
ONE_PASS = "textSCF network alone, one pass (no null-pair correction)"
DEFAULTS = "textSCF defaults (textscf register, no options)"
# What `textscf register fixed moving -o out` runs: the default schedule (textscf.schedule.default_schedule).
DEFAULT_OPTIONS = dict(refine_iterations=None, refine_field_iterations=None, refine_similarity="auto")
# Variants of the default refinement, each one change (--variants NAME ...).
VARIANTS = {
    "mind": ("field pyramid, MIND-SSC alone", dict(refine_similarity="mind")),
    "mse": ("field pyramid, intensity MSE alone", dict(refine_similarity="mse")),
    "ncc": ("field pyramid, local NCC", dict(refine_similarity="ncc")),
    "network4": ("4 network steps, then the field pyramid", dict(refine_iterations=4)),
    "network": ("12 network steps, then the field pyramid", dict(refine_iterations=12)),
    "previous-model": ("defaults with the previous bundled model (4 mm, weakly trained: its field is about zero)",
                       dict(checkpoint=str(MODELS / "abdomen-ct-onehot-ns8.pt"))),
    "guided": ("defaults + Dice of the moving labels in the loss", dict(refine_use_moving_labels=True)),
    "fresh": ("defaults without a trained network (a fresh one on the pair, as for anatomy no model covers)",
              dict(checkpoint="fresh", refine_iterations=FRESH_NETWORK_STEPS,
                   refine_field_iterations=FRESH_FIELD_STEPS)),
}


def default_rows(args, **common) -> dict:
    """``{method: RegistrationOptions}`` for the defaults and the variants asked for."""
    rows = {DEFAULTS: RegistrationOptions(**common, **DEFAULT_OPTIONS)}
    for name in args.variants:
        label, change = VARIANTS[name]
        rows[f"textSCF {label}"] = RegistrationOptions(**{**common, **DEFAULT_OPTIONS, **change})
    return rows


def downsample(subject):
    """The 2 mm BTCV grid halved to 4 mm (image: 2x2x2 mean; labels: the voxel at 2i, as the network does)."""
    img = subject.image
    i, j, k = (s // 2 * 2 for s in img.shape)
    image = img[:i, :j, :k].reshape(i // 2, 2, j // 2, 2, k // 2, 2).mean((1, 3, 5)).astype(np.float32)
    return image, subject.labels[:i:2, :j:2, :k:2].astype(np.int64)


def abdomen(args) -> tuple[list[dict], str]:
    preset = load_preset("abdomen-ct")
    labels = list(preset.label_values)
    test_ids = BTCV_SPLIT["test"]
    subjects = {s.name: s for s in load_btcv_labels(SHARED, test_ids, synthetic_ct=True, seed=123,
                                                     anatomical_orientation=True)}
    data = {name: downsample(s) for name, s in subjects.items()}
    names = sorted(data)
    if args.pair_offsets:
        # (subject i, subject i + offset): every subject is moving and fixed once per offset.
        pairs = [(names[i], names[(i + o) % len(names)]) for i in range(len(names)) for o in args.pair_offsets]
    else:
        pairs = ordered_pairs(names)
    pairs = pairs[: args.pairs]
    spacing = (4.0, 4.0, 4.0)
    methods = {"unregistered": None}
    for name, ckpt in (("textSCF", args.checkpoint), ("LKU-Net (no SCF)", args.no_scf_checkpoint)):
        if ckpt and not (name == "textSCF" and args.no_network_row):
            methods[name] = RegistrationOptions(checkpoint=ckpt, preset="abdomen-ct", init=args.abdomen_init,
                                                device=args.device)
    if args.one_pass_row:
        methods[ONE_PASS] = RegistrationOptions(checkpoint=args.checkpoint, preset="abdomen-ct", init=args.abdomen_init,
                                                device=args.device, debias=False)
    if args.no_regions_row:
        methods[NO_REGIONS] = RegistrationOptions(checkpoint=args.checkpoint, preset="abdomen-ct",
                                                  init=args.abdomen_init, device=args.device)
    if not args.no_defaults:
        methods.update(default_rows(args, checkpoint=args.checkpoint, preset="abdomen-ct", init=args.abdomen_init,
                                    device=args.device))
    if args.refine:
        # Peers see intensities only; the fixed-labels-only variant is the like-for-like one (the fixed labels stand
        # in for the segmentor), the other also puts the moving labels into its Dice term.
        for name, use_moving in ((REFINE_FIXED, False), (REFINE_BOTH, True)):
            methods[name] = RegistrationOptions(
                checkpoint=args.checkpoint, preset="abdomen-ct", init=args.abdomen_init, device=args.device,
                refine_iterations=args.refine, refine_field_iterations=30, refine_similarity="mse",
                refine_use_moving_labels=use_moving)
    rows = []

    def add(pair, method, seconds, m):
        rows.append({"section": "abdomen", "method": method, "pair": pair, "seconds": seconds, **m})
        print(f"abdomen {pair} {method}: Dice {100 * m['mean_dice']:.1f} % ({seconds:.1f} s)", flush=True)

    for moving_name, fixed_name in pairs:
        fixed, fixed_lab = data[fixed_name]
        moving, moving_lab = data[moving_name]
        pair = f"{moving_name}->{fixed_name}"
        for method, options in methods.items():
            if options is None:
                res = peers.identity(fixed, moving, spacing, moving_lab)
                add(pair, method, 0.0, pair_metrics(res.warped_labels, fixed_lab, labels, spacing,
                                                    res.displacement_voxels, moving_labels=moving_lab))
            else:
                warped, jac, seconds, _, _ = run_textscf(fixed, moving, fixed_lab, moving_lab, spacing, options,
                                                         with_fixed_labels=method != NO_REGIONS)
                add(pair, method, seconds, pair_metrics(warped, fixed_lab, labels, spacing, jacobian=jac,
                                                        moving_labels=moving_lab))
        for method, fn in (("ANTs SyN", peers.register_ants_syn), ("Elastix B-spline", peers.register_elastix_bspline)):
            if method in args.skip_peers:
                continue
            res = fn(fixed, moving, spacing, moving_labels=moving_lab, threads=args.threads)
            add(pair, method, res.seconds, pair_metrics(res.warped_labels.astype(np.int64), fixed_lab, labels, spacing,
                                                        res.displacement_voxels, moving_labels=moving_lab))
    summaries = [summarise(rows, m) for m in dict.fromkeys(r["method"] for r in rows)]
    subset = (f" (moving = subject i, fixed = subject i + {' and i + '.join(map(str, args.pair_offsets))} in sorted "
              f"order: a balanced subset of the 42)") if args.pair_offsets else ""
    note = (f"{len(pairs)} ordered test pairs{subset} of subjects {', '.join(names)} (the paper's split). Images are "
            "**synthetic CT generated from the BTCV label maps** (the real CT images are not available here); 4 mm "
            f"grid 96x80x128; 13 organs; textSCF init = {args.abdomen_init}. Peers: antspyx SyN defaults, "
            "itk-elastix default affine + B-spline maps."
            + (f" Refinement: {args.refine} network + 30 field steps; 'fixed labels only' uses the fixed label map "
               "as the region map J_f and image MSE + λ‖∇u‖² (like-for-like with the peers, which see intensities "
               "only); 'both label maps' adds the Dice of the warped moving labels." if args.refine else "")
            + (" Defaults: what `textscf register` runs with no options (the fixed label map given as the region "
               "map, the moving one only scoring)." if not args.no_defaults else ""))
    note += " " + paired_difference(rows, "textSCF", "LKU-Net (no SCF)")
    note += " " + paired_difference(rows, "textSCF", NO_REGIONS)
    note += " " + paired_difference(rows, "textSCF", ONE_PASS)
    note += " " + paired_difference(rows, DEFAULTS, "Elastix B-spline") + " " + \
        paired_difference(rows, DEFAULTS, "ANTs SyN")
    return rows, markdown(summaries, ["textSCF", DEFAULTS, REFINE_FIXED], "Abdomen CT (label-derived synthetic images)",
                          note)


# ------------------------------------------------------------------------------------------------ brain
def brain(args) -> tuple[list[dict], str]:
    subjects = {s.name: s for s in brain_subjects(SHARED)}
    fixed_s, moving_s = subjects["vxm"], subjects["l2r"]
    eval_labels = [int(v) for v in brain_eval_labels(SHARED)]
    spacing = tuple(fixed_s.spacing)
    fixed, moving = fixed_s.image.astype(np.float32), moving_s.image.astype(np.float32)
    fixed_lab, moving_lab = fixed_s.labels.astype(np.int64), moving_s.labels.astype(np.int64)
    identity_dir = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    rows = []

    def add(method, seconds, m, extra=None):
        rows.append({"section": "brain", "method": method, "pair": "l2r->vxm", "seconds": seconds, **m, **(extra or {})})
        print(f"brain {method}: Dice {100 * m['mean_dice']:.1f} % ({seconds:.1f} s)", flush=True)

    res = peers.identity(fixed, moving, spacing, moving_lab)
    add("unregistered", 0.0, pair_metrics(res.warped_labels, fixed_lab, eval_labels, spacing, res.displacement_voxels))
    runs = []
    if not args.no_defaults:
        # No checkpoint named: the bundled model is a CT model, so the default schedule for an MRI pair runs.
        common = dict(preset="brain-mri", init="none", device=args.device, unmapped_labels="background", seed=0)
        runs += [(DEFAULTS + ", fixed labels", RegistrationOptions(**common, **DEFAULT_OPTIONS), True),
                 (DEFAULTS + ", no label map", RegistrationOptions(**common, **DEFAULT_OPTIONS), False)]
        for name in args.variants:
            label, change = VARIANTS[name]
            if name != "guided":
                runs.append((f"textSCF {label}, fixed labels",
                             RegistrationOptions(**common, **{**DEFAULT_OPTIONS, **change}), True))
    if args.brain_iterations:
        for variant, use_moving in (("textSCF refine (both label maps)", True),
                                    ("textSCF refine (fixed labels only)", False)):
            runs.append((variant, RegistrationOptions(
                checkpoint="fresh", preset="brain-mri", init="none", device=args.device,
                refine_iterations=args.brain_iterations, refine_learning_rate=args.brain_lr,
                refine_smooth_weight=args.brain_smooth, refine_similarity="ncc", unmapped_labels="background", seed=0,
                refine_field_iterations=args.brain_field_iterations, refine_use_moving_labels=use_moving), True))
    for variant, options, with_fixed in runs:
        warped, jac, seconds, result, _ = run_textscf(fixed, moving, fixed_lab, moving_lab, spacing, options,
                                                      identity_dir, with_fixed_labels=with_fixed)
        add(variant, seconds, pair_metrics(warped, fixed_lab, eval_labels, spacing, jacobian=jac),
            {"refine": result.stats.get("refine"), "schedule": result.stats.get("schedule")})
    for method, fn in (("ANTs SyN", peers.register_ants_syn), ("Elastix B-spline", peers.register_elastix_bspline)):
        if method in args.skip_peers:
            continue
        res = fn(fixed, moving, spacing, moving_labels=moving_lab, threads=args.threads)
        add(method, res.seconds, pair_metrics(res.warped_labels.astype(np.int64), fixed_lab, eval_labels, spacing,
                                              res.displacement_voxels))
    summaries = [summarise(rows, m) for m in dict.fromkeys(r["method"] for r in rows)]
    note = ("Real T1 MRI, moving = learn2reg subject, fixed = voxelmorph subject, 160x192x224 at 1 mm, mean over the "
            "30 FreeSurfer evaluation labels; no pretrained brain model. Defaults: what `textscf register` runs "
            "with no options (the fixed label map given, or none; the moving one only scores)."
            + (" 'textSCF refine': instance optimisation of a fresh network "
               f"({args.brain_iterations} iterations, local NCC, lr {args.brain_lr}, λ {args.brain_smooth}, then "
               f"{args.brain_field_iterations} field iterations)." if args.brain_iterations else ""))
    ours = [DEFAULTS + ", fixed labels"] if not args.no_defaults else ["textSCF refine (fixed labels only)"]
    return rows, markdown(summaries, ours, "Brain MRI (real)", note)


# ------------------------------------------------------------------------------------------------ real CT
def real_ct(args) -> tuple[list[dict], str]:
    ct, btcv = load_example_ct(SHARED)
    labels = sorted(set(np.unique(btcv).tolist()) - {0})
    spacing = ct.GetSpacing()
    ct_arr = image_to_array(ct)
    rows = []
    shape = ct_arr.shape
    fields = {
        "smooth random field (max 15 mm)": random_smooth_displacement(shape, spacing, max_displacement_mm=15.0,
                                                                      smoothness_mm=50.0, seed=3),
    }
    if args.more_real_ct:
        fields.update({
            "smooth random field (max 15 mm, seed 4)": random_smooth_displacement(
                shape, spacing, max_displacement_mm=15.0, smoothness_mm=50.0, seed=4),
            "smooth random field (max 25 mm, seed 5)": random_smooth_displacement(
                shape, spacing, max_displacement_mm=25.0, smoothness_mm=50.0, seed=5),
            "identity (the CT as fixed and moving)": np.zeros((3,) + shape, np.float32),
        })
    fields.update({
        "affine (5 deg, 8 mm, 5 %)": affine_to_displacement(
            random_affine(max_rotation_deg=5, max_translation_mm=8, max_scale=0.05, seed=4,
                          center=ct.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in ct.GetSize()])),
            shape, spacing, ct.GetOrigin(), ct.GetDirection()),
    })
    from textscf.phantom import deform_pair

    for case, u_true in fields.items():
        # fixed(x) = ct(x + u_true(x)): registering ct (moving) to it should recover u_true.
        fixed_arr, fixed_lab = deform_pair(ct_arr, btcv, u_true)
        organ = fixed_lab > 0
        epe_before = metrics.mean_endpoint_error_mm(np.zeros_like(u_true), u_true, spacing, organ)
        dice_before = metrics.mean_ignoring_nan(metrics.dice_per_label(btcv, fixed_lab, labels))

        def add(method, seconds, u, m):
            errors = metrics.endpoint_errors_mm(u, u_true, spacing, organ)
            epe, worst = float(errors.mean()), float(errors.max())
            rows.append({"section": "real-ct", "method": method, "pair": case, "seconds": seconds, "epe_mm": epe,
                         "epe_max_mm": worst, "epe_mm_before": epe_before, "mean_dice_before": dice_before, **m})
            print(f"real CT {case} {method}: EPE {epe_before:.2f} -> {epe:.2f} mm (max {worst:.2f}), Dice "
                  f"{100 * dice_before:.1f} -> {100 * m['mean_dice']:.1f} % ({seconds:.1f} s)", flush=True)

        init = "affine" if case.startswith("affine") else "none"
        candidates = []
        if not args.no_network_row:
            candidates.append(("textSCF network alone", RegistrationOptions(
                checkpoint=args.checkpoint, preset="abdomen-ct", init=init, device=args.device)))
        if args.one_pass_row:
            candidates.append((ONE_PASS, RegistrationOptions(
                checkpoint=args.checkpoint, preset="abdomen-ct", init=init, device=args.device, debias=False)))
        if not args.no_defaults:
            candidates += list(default_rows(args, checkpoint=args.checkpoint, preset="abdomen-ct", init=init,
                                            device=args.device).items())
        if args.refine:
            candidates.append(("textSCF + refine", RegistrationOptions(
                checkpoint=args.checkpoint, preset="abdomen-ct", init=init, device=args.device,
                refine_iterations=args.refine, refine_field_iterations=30, refine_similarity="mse")))
        for method, options in candidates:
            warped, jac, seconds, _, u = run_textscf(fixed_arr, ct_arr, fixed_lab, btcv, spacing, options,
                                                     ct.GetDirection())
            add(method, seconds, u, pair_metrics(warped, fixed_lab, labels, spacing, jacobian=jac))
        for method, fn in (("ANTs SyN", peers.register_ants_syn), ("Elastix B-spline", peers.register_elastix_bspline)):
            if method in args.skip_peers:
                continue
            res = fn(fixed_arr, ct_arr, spacing, moving_labels=btcv, threads=args.threads)
            add(method, res.seconds, res.displacement_voxels,
                pair_metrics(res.warped_labels.astype(np.int64), fixed_lab, labels, spacing, res.displacement_voxels))
    lines = ["### Real CT with known deformations", "",
             f"The TotalSegmentator example CT ({'x'.join(map(str, shape))} at {spacing[0]:g} mm) and its organ labels "
             f"(mapped to the BTCV organs: {len(labels)} present), warped by a known field; endpoint error = mean |u - "
             "u_true| over organ voxels.", "",
             "| deformation | method | EPE before mm | EPE after mm | max error after mm | Dice before % | Dice after % "
             "| SDlogJ | % \\|J\\|<=0 | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pair']} | {r['method']} | {r['epe_mm_before']:.2f} | {r['epe_mm']:.2f} | "
                     f"{r['epe_max_mm']:.2f} | "
                     f"{100 * r['mean_dice_before']:.1f} | {100 * r['mean_dice']:.1f} | {r['sdlogj']:.3f} | "
                     f"{r['folding_percent']:.3f} | {r['seconds']:.1f} |")
    return rows, "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--abdomen", action="store_true")
    p.add_argument("--brain", action="store_true")
    p.add_argument("--real-ct", action="store_true")
    p.add_argument("--checkpoint", default=None, help="textSCF model (default: the bundled one)")
    p.add_argument("--no-scf-checkpoint", default=None, help="the no-SCF baseline trained the same way")
    p.add_argument("--abdomen-init", default="none", choices=["none", "center", "affine"])
    p.add_argument("--more-real-ct", action="store_true", help="with --real-ct: two more smooth fields (seeds 4, 5) "
                   "and the identity case (the CT as fixed and moving: the field should be zero)")
    p.add_argument("--pairs", type=int, default=None, help="first N abdomen test pairs (default all 42)")
    p.add_argument("--pair-offsets", type=int, nargs="+", default=None, help="a balanced subset of the abdomen test "
                   "pairs: moving = subject i, fixed = subject i + offset (mod 7) for each offset; '1 3' gives 14 pairs "
                   "with every subject moving twice and fixed twice (default: all 42 ordered pairs)")
    p.add_argument("--refine", type=int, default=0, help="also run textSCF + N network steps + 30 field steps per "
                   "level, fixed labels only and both label maps")
    p.add_argument("--no-defaults", action="store_true", help="leave out the row of `textscf register`'s defaults")
    p.add_argument("--no-network-row", action="store_true", help="leave out the network-alone row")
    p.add_argument("--one-pass-row", action="store_true", help="also the network alone with one forward pass "
                   "(--abdomen, --real-ct; the network rows remove the network's response to the null pair by "
                   "default: RegistrationOptions.debias)")
    p.add_argument("--no-regions-row", action="store_true", help="also the network alone given no regions (the "
                   "shared filter w_r alone: the same weights without SCF)")
    p.add_argument("--variants", nargs="*", default=[], choices=sorted(VARIANTS),
                   help="variants of the default refinement to run as rows too: " +
                   "; ".join(f"{k}: {v[0]}" for k, v in VARIANTS.items()))
    p.add_argument("--brain-iterations", type=int, default=0, help="also the fresh network refined N steps (old rows)")
    p.add_argument("--brain-field-iterations", type=int, default=50)
    p.add_argument("--brain-lr", type=float, default=1e-3)
    p.add_argument("--brain-smooth", type=float, default=1.0)
    p.add_argument("--skip-peers", nargs="*", default=[], help='e.g. "Elastix B-spline"')
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("-o", "--output", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    if not (SHARED / "README.md").is_file():
        print(f"benchmark needs the real data at {SHARED}", file=sys.stderr)
        return 2
    if args.checkpoint is None:
        from textscf.presets import bundled_model_path

        args.checkpoint = str(bundled_model_path())
    peers.set_threads(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    header = (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
              f"{args.threads}, device {args.device}; command: python benchmarks/registration_benchmark.py "
              + " ".join(argv if argv is not None else sys.argv[1:]))
    tables, all_rows = [header], []
    for flag, fn in (("abdomen", abdomen), ("brain", brain), ("real_ct", real_ct)):
        if getattr(args, flag):
            rows, table = fn(args)
            all_rows += rows
            tables.append(table)
            (args.output / "results.md").write_text("\n\n".join(tables) + "\n")
            (args.output / "results.json").write_text(json.dumps(all_rows, indent=1, default=str))
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory and time of ``textscf register`` on a clinical-size CT pair (512 x 512 x 400), as a user runs it.

The pair is made from the real example CT (``../shared/data/abdomen/ct_example.nii.gz``, TotalSegmentator's) by
resampling it onto a 512 x 512 x 400 grid over the same field of view (about 0.7 x 0.6 x 0.8 mm voxels): the fixed
image is that CT, the moving image the same CT under a small rigid motion (5 degrees, 8 mm), with their label maps
(nearest neighbour). Inputs are written as uncompressed MetaImage, then ``textscf register`` runs in a child process
with the default schedule (and ``--fixed-labels``/``--moving-labels``, so Dice and HD95 are computed too); the peak
resident memory of the child (``ru_maxrss`` of RUSAGE_CHILDREN) and its wall time are reported with the per-stage
seconds from its ``report.json`` and the peak per stage: the child's peak so far at each stage's end
(``peak_rss_mib_after_stage`` in the report), "write outputs" taking the child's overall peak. A stage whose value
rises above the previous one's set a new peak; one that stays level peaked at most there.

Usage::

    python benchmarks/clinical_ct_memory.py [--shape 512,512,400] [--threads 2] [--budget-gib 8]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GIB = 1024 ** 3


def clinical_pair(shape, shared: Path = SHARED):
    """(fixed, moving, fixed_labels, moving_labels) on a ``shape`` grid over the example CT's field of view."""
    from textscf.datasets import load_example_ct

    ct, labels = load_example_ct(shared)
    extent = np.array(ct.GetSize()) * np.array(ct.GetSpacing())
    spacing = extent / np.array(shape)
    ref = sitk.Image([int(s) for s in shape], sitk.sitkInt16)
    ref.SetSpacing(tuple(spacing))
    ref.SetDirection(ct.GetDirection())
    # voxel centres spread over the same physical box
    ref.SetOrigin(ct.TransformContinuousIndexToPhysicalPoint(tuple((np.array(spacing) / ct.GetSpacing() - 1) / 2)))
    lab = sitk.GetImageFromArray(np.ascontiguousarray(labels.transpose(2, 1, 0)).astype(np.int16))
    lab.CopyInformation(ct)
    centre = ct.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in ct.GetSize()])
    motion = sitk.Euler3DTransform(centre, 0.0, 0.0, np.deg2rad(5.0), (8.0, 0.0, 0.0))
    fixed = sitk.Resample(ct, ref, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkInt16)
    moving = sitk.Resample(ct, ref, motion, sitk.sitkLinear, -1024.0, sitk.sitkInt16)
    fixed_labels = sitk.Resample(lab, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkInt16)
    moving_labels = sitk.Resample(lab, ref, motion, sitk.sitkNearestNeighbor, 0, sitk.sitkInt16)
    return fixed, moving, fixed_labels, moving_labels


def stage_peaks_gib(after_stage_mib: dict, overall_bytes: int) -> dict:
    """The child's peak RSS so far at each stage's end (MiB, from its report) in GiB, with "write outputs" (the
    last stage, after the report's numbers were taken) given the child's overall peak (bytes)."""
    peaks = {stage: round(mib / 1024, 2) for stage, mib in after_stage_mib.items() if mib is not None}
    peaks.pop("done", None)  # the pipeline's end marker: no work of its own
    peaks["write outputs"] = round(overall_bytes / GIB, 2)
    return peaks


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="512,512,400", help="grid I,J,K (default 512,512,400)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget-gib", type=float, default=8.0)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further `textscf register` options")
    args = p.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    if not (SHARED / "abdomen" / "ct_example.nii.gz").is_file():
        raise SystemExit(f"the example CT is needed at {SHARED}/abdomen (see ../shared/data/README.md)")
    with tempfile.TemporaryDirectory(prefix="textscf-clinical-") as tmp:
        tmp = Path(tmp)
        images = dict(zip(("fixed", "moving", "fixed_labels", "moving_labels"), clinical_pair(shape)))
        for name, image in images.items():
            sitk.WriteImage(image, str(tmp / f"{name}.mha"))
        voxels = images["fixed"].GetNumberOfPixels()
        spacing = images["fixed"].GetSpacing()
        del images
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        command = [sys.executable, "-m", "textscf.cli", "register", str(tmp / "fixed.mha"), str(tmp / "moving.mha"),
                   "-o", str(tmp / "out"), "--fixed-labels", str(tmp / "fixed_labels.mha"), "--moving-labels",
                   str(tmp / "moving_labels.mha"), *args.extra]
        start = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"textscf register failed ({done.returncode}):\n{done.stderr[-3000:]}")
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux
        report = json.loads((tmp / "out" / "report.json").read_text())
    stats = report.get("stats", report)
    peaks = stage_peaks_gib(stats.get("peak_rss_mib_after_stage") or {}, peak)
    result = {"shape": list(shape), "spacing_mm": [round(s, 3) for s in spacing], "voxels": voxels,
              "threads": args.threads, "peak_rss_gib": round(peak / GIB, 2), "budget_gib": args.budget_gib,
              "within_budget": peak <= args.budget_gib * GIB, "seconds": round(seconds, 1),
              "seconds_per_stage": stats.get("seconds_per_stage"), "peak_rss_gib_after_stage": peaks,
              "schedule": stats.get("schedule"),
              "mean_dice_before": stats.get("mean_dice_before"), "mean_dice": stats.get("mean_dice")}
    print(f"| pair | voxels | peak RSS GiB | budget GiB | s | Dice before -> after |\n|---|---:|---:|---:|---:|---|\n"
          f"| example CT resampled to {'x'.join(map(str, shape))} | {voxels / 1e6:.0f} M | {result['peak_rss_gib']} | "
          f"{args.budget_gib:g} | {result['seconds']} | {100 * (result['mean_dice_before'] or float('nan')):.1f} -> "
          f"{100 * (result['mean_dice'] or float('nan')):.1f} % |")
    print("\n| stage | s | peak RSS GiB so far at its end |\n|---|---:|---:|")
    for stage, gib in peaks.items():
        print(f"| {stage} | {(result['seconds_per_stage'] or {}).get(stage, '')} | {gib} |")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

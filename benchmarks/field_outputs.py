"""The "resample field" stage of ``register()``: the torch path against the ITK path, side by side in one run.

Both turn a model-grid voxel field into what the outputs need on the fixed grid: the physical field, its Jacobian
determinant, the field composed with the initial alignment, the warped moving image and the warped label map
(``textscf.pipeline.field_outputs``; the ITK path is the one it takes for non-matrix-offset initial transforms).
Geometry of the bundled abdomen model: fixed 192 x 160 x 256 at 2 mm, model grid 96 x 80 x 128 at 4 mm, an affine
initial alignment, a smooth random field of up to 15 mm. The two paths alternate, ``--repeats`` times each; the
fastest run of each is reported, with the largest differences between their outputs.

Usage::

    python benchmarks/field_outputs.py --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import SimpleITK as sitk
import torch


def make_case(shape=(192, 160, 256), spacing=2.0, seed=0):
    from textscf.phantom import random_smooth_displacement
    from textscf.spatial import ModelGrid

    rng = np.random.default_rng(seed)

    def image(arr):
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
        img.SetSpacing((spacing,) * 3)
        return img

    fixed = image(rng.normal(size=shape).astype(np.float32))
    moving = image(np.cumsum(rng.normal(size=shape) * 30, 0).astype(np.int16))
    labels = image(rng.integers(0, 14, size=shape).astype(np.int16))
    model_shape = tuple(s // 2 for s in shape)
    grid = ModelGrid(model_shape, (2 * spacing,) * 3, (1.0, 1.0, 1.0))
    u = random_smooth_displacement(model_shape, grid.spacing, 15.0, 60.0, seed=seed + 1) / (2 * spacing)
    init = sitk.AffineTransform(3)
    init.SetMatrix((1.02, 0.01, 0.0, -0.01, 0.99, 0.0, 0.0, 0.02, 1.01))
    init.SetTranslation((3.0, -2.0, 4.0))
    return u.astype(np.float32), grid, fixed, init, moving, labels


def itk_path(u, grid, fixed, init, moving, labels):
    """The ITK path of field_outputs (forced: a copy of the initial transform wrapped in a composite)."""
    from textscf.pipeline import field_outputs

    return field_outputs(u, grid, fixed, sitk.CompositeTransform([init]), moving, labels)


def torch_path(u, grid, fixed, init, moving, labels):
    from textscf.pipeline import field_outputs

    return field_outputs(u, grid, fixed, init, moving, labels)


def differences(a, b) -> dict:
    from textscf.spatial import image_to_array

    return {
        "total_mm": float(np.abs(image_to_array(a.total) - image_to_array(b.total)).max()),
        "jacobian": float(np.abs(a.jacobian - b.jacobian).max()),
        "warped": float(np.abs(sitk.GetArrayViewFromImage(a.warped).astype(np.float64)
                               - sitk.GetArrayViewFromImage(b.warped)).max()),
        "labels_differing_fraction": float((sitk.GetArrayViewFromImage(a.warped_labels)
                                            != sitk.GetArrayViewFromImage(b.warped_labels)).mean()),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch and ITK threads (default 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    case = make_case()
    seconds = {"itk": [], "torch": []}
    outputs = {}
    load = [round(x, 2) for x in os.getloadavg()]
    for _ in range(args.repeats):
        for name, fn in (("itk", itk_path), ("torch", torch_path)):
            t0 = time.perf_counter()
            outputs[name] = fn(*case)
            seconds[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in seconds.items()}
    result = {"threads": args.threads, "load_average_at_start": load, "seconds_best": best,
              "seconds_all": seconds, "speed-up": best["itk"] / best["torch"],
              "max_differences": differences(outputs["itk"], outputs["torch"])}
    print(f"resample-field stage at 192x160x256 (model grid 96x80x128, affine initial alignment), "
          f"{args.threads} threads, load {load}:\n"
          f"| path | best of {args.repeats} (s) |\n|---|---:|\n| ITK (spatial.py) | {best['itk']:.2f} |\n"
          f"| torch (deformation.py) | {best['torch']:.2f} |\nspeed-up {result['speed-up']:.1f}x; "
          f"largest differences {json.dumps(result['max_differences'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

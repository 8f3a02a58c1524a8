"""Peak memory and time of the Slicer logic (``TextSCFRegistrationLogic.process``) on a clinical-size CT pair.

Headless (slicer-core: a real MRML scene, no Qt), as a script or a test uses the logic. The pair is synthesised
straight into the two volume nodes' buffers, one slice at a time (int16 HU, 512 x 512 x 300 voxels of
0.78 x 0.78 x 1.5 mm by default: a body ellipse with fat, muscle, spine, liver, spleen and kidneys; the moving image
has the organs moved and the body narrowed, as breathing and posture do). The registration is the bundled network
alone (``refine_iterations=0``), no regions, on the CPU: what Apply runs with "Refine" set to 0.

Measured (Linux ``/proc`` and ``getrusage``):

- Slicer side: this process's peak resident memory during ``process()`` (``VmHWM``, reset just before by writing
  ``5`` to ``/proc/self/clear_refs``) and its resident memory before (the scene with the two volumes);
- engine process: its peak resident memory (``getrusage(RUSAGE_CHILDREN).ru_maxrss``, the largest waited-for child);
- both together: the largest sum of the two resident sizes, sampled every 50 ms while the engine runs;
- time: wall seconds of ``process()`` and the engine's seconds per stage.

Side by side (``--field``): the displacement field of that grid reaching the grid transform node, each way in a fresh
process, as the extra peak memory over the field's input (``VmHWM`` minus ``VmRSS`` before the call):

- ``previous``: the module before the engine process (a float64 copy of the SimpleITK field, its sign-flipped copy,
  a VTK deep copy), reproduced here as it was;
- ``now, engine file``: the engine process's float32 raw NRRD read straight into the grid's buffer, flipped in place;
- ``now, SimpleITK image``: ``setGridTransformFromDisplacement`` given an in-memory float64 field (one copy: the grid).

Usage::

    python benchmarks/slicer_logic_memory.py                       # 512 x 512 x 300 (a few minutes, ~8 GB free RAM)
    python benchmarks/slicer_logic_memory.py --shape 128,128,80    # quick
    python benchmarks/slicer_logic_memory.py --field               # the field -> transform comparison (~10 GB free)
    python benchmarks/slicer_logic_memory.py --json out.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: the repository root holds the benchmarks package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.pipeline_resources import _reset_peak, _status_bytes  # noqa: E402  (the /proc probes, one home)

GIB = 1024 ** 3
BUDGET_BYTES = 8 * GIB
MODULE_PATH = Path(__file__).resolve().parents[1] / "TextSCFRegistration" / "TextSCFRegistration.py"


def _rss_bytes(pid: int | str = "self") -> int | None:
    """Resident memory of a process (``/proc/<pid>/statm``), or None when unreadable (it has ended, not Linux)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _ellipse(shape2d, spacing, centre_mm, radii_mm):
    """Boolean mask of an ellipse in one axial slice (``[j, i]``)."""
    j, i = np.ogrid[: shape2d[0], : shape2d[1]]
    x = (i * spacing[0] - centre_mm[0]) / radii_mm[0]
    y = (j * spacing[1] - centre_mm[1]) / radii_mm[1]
    return x * x + y * y <= 1.0


def _organs(moving: bool):
    """(HU, centre x/y/z mm, radii mm) of the synthetic organs; the moving subject's are shifted and resized."""
    d = np.array([6.0, -4.0, 9.0]) if moving else np.zeros(3)
    s = 0.93 if moving else 1.0
    return [
        (60, np.array([120.0, 190.0, 260.0]) + d, np.array([85.0, 70.0, 90.0]) * s),    # liver
        (45, np.array([300.0, 200.0, 280.0]) + d * 1.5, np.array([40.0, 35.0, 50.0]) * s),  # spleen
        (150, np.array([150.0, 260.0, 180.0]) + d * 0.5, np.array([25.0, 22.0, 45.0])),  # right kidney
        (150, np.array([250.0, 260.0, 185.0]) + d * 0.5, np.array([25.0, 22.0, 45.0])),  # left kidney
        (400, np.array([200.0, 290.0, 225.0]), np.array([16.0, 16.0, 400.0])),           # spine
    ]


def fill_ct(volume_node, shape, spacing, moving: bool, seed: int) -> None:
    """Synthesise a CT into the node's own int16 buffer, slice by slice (no full-size temporary)."""
    import vtk
    from vtk.util import numpy_support as vtk_np

    image = vtk.vtkImageData()
    image.SetDimensions(*shape)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    voxels = vtk_np.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape[2], shape[1], shape[0])
    rng = np.random.default_rng(seed)
    body_radii = np.array([170.0 * (0.95 if moving else 1.0), 120.0])
    centre = np.array([shape[0] * spacing[0] / 2, shape[1] * spacing[1] / 2])
    for k in range(shape[2]):
        z = k * spacing[2]
        plane = np.full((shape[1], shape[0]), -1000.0, np.float32)
        plane[_ellipse(plane.shape, spacing, centre, body_radii)] = -90.0                # fat
        plane[_ellipse(plane.shape, spacing, centre, body_radii - 15.0)] = 40.0         # muscle and organs' bed
        for hu, c, r in _organs(moving):
            if abs(z - c[2]) < r[2]:
                scale = np.sqrt(1.0 - ((z - c[2]) / r[2]) ** 2)
                plane[_ellipse(plane.shape, spacing, c[:2], r[:2] * scale)] = hu
        plane += rng.normal(0.0, 15.0, plane.shape).astype(np.float32)
        voxels[k] = np.clip(plane, -1024, 3000).astype(np.int16)
    volume_node.SetAndObserveImageData(image)
    volume_node.SetSpacing(*spacing)
    volume_node.SetOrigin(-shape[0] * spacing[0] / 2, -shape[1] * spacing[1] / 2, -shape[2] * spacing[2] / 2)


class _PairSampler(threading.Thread):
    """Samples the resident memory of this process plus the running engine process every 50 ms."""

    def __init__(self, logic):
        super().__init__(daemon=True)
        self.logic, self.peak_sum, self.stop = logic, 0, threading.Event()

    def run(self):
        while not self.stop.wait(0.05):
            job = self.logic.job
            process = job.process if job is not None else None
            child = _rss_bytes(process.pid) if process is not None else None
            self.peak_sum = max(self.peak_sum, (_rss_bytes() or 0) + (child or 0))


def measure(shape=(512, 512, 300), spacing=(0.78, 0.78, 1.5), threads: int = 1) -> dict:
    import slicer

    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    spec = importlib.util.spec_from_file_location("TextSCFRegistration", MODULE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    scene = slicer.vtkMRMLScene()
    fixed = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fixed CT")
    moving = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "moving CT")
    fill_ct(fixed, shape, spacing, moving=False, seed=0)
    fill_ct(moving, shape, spacing, moving=True, seed=1)
    logic = module.TextSCFRegistrationLogic(scene=scene)
    options = {"preset": "abdomen-ct", "device": "cpu", "init": "center", "refine_iterations": 0,
               "refine_field_iterations": 0}

    rss_before = _status_bytes("VmRSS")
    _reset_peak()
    sampler = _PairSampler(logic)
    sampler.start()
    start = time.perf_counter()
    nodes = logic.process(fixed, moving, options)
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    slicer_peak = _status_bytes("VmHWM")
    engine_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    grid = nodes["outputTransformNode"].GetTransformFromParent().GetDisplacementGrid()
    result = {
        "shape": list(shape), "spacing": list(spacing), "voxels": int(np.prod(shape)),
        "seconds": round(seconds, 1),
        "engine_seconds_per_stage": logic.lastResult.stats.get("seconds_per_stage"),
        "slicer_rss_before_gib": round(rss_before / GIB, 2) if rss_before else None,
        "slicer_peak_gib": round(slicer_peak / GIB, 2) if slicer_peak else None,
        "engine_peak_gib": round(engine_peak / GIB, 2),
        "both_peak_gib": round(sampler.peak_sum / GIB, 2),
        "grid_transform_scalar_type": grid.GetPointData().GetScalars().GetDataTypeAsString(),
        "budget_gib": BUDGET_BYTES / GIB,
    }
    result["within_budget"] = max(result["both_peak_gib"], result["engine_peak_gib"],
                                  result["slicer_peak_gib"] or 0) <= result["budget_gib"]
    return result


def _previous_set_grid_transform(transform_node, displacement):
    """The module's conversion before this benchmark's change (kept here only as the baseline)."""
    import SimpleITK as sitk
    import slicer
    import vtk
    from vtk.util import numpy_support as vtk_np

    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    vectors_lps = sitk.GetArrayFromImage(displacement).astype(np.float64)
    vectors_ras = vectors_lps * np.array([-1.0, -1.0, 1.0])
    grid = vtk.vtkImageData()
    grid.SetDimensions(*[int(s) for s in displacement.GetSize()])
    grid.SetSpacing(*displacement.GetSpacing())
    grid.SetOrigin(*(lps_to_ras @ np.array(displacement.GetOrigin())))
    vectors = vtk_np.numpy_to_vtk(np.ascontiguousarray(vectors_ras.reshape(-1, 3)), deep=True,
                                  array_type=vtk.VTK_DOUBLE)
    vectors.SetNumberOfComponents(3)
    grid.GetPointData().SetScalars(vectors)
    direction_ras = lps_to_ras @ np.array(displacement.GetDirection()).reshape(3, 3)
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, direction_ras[r, c])
    grid_transform = slicer.vtkOrientedGridTransform()
    grid_transform.SetDisplacementGridData(grid)
    grid_transform.SetGridDirectionMatrix(matrix)
    grid_transform.SetInterpolationModeToLinear()
    transform_node.SetAndObserveTransformFromParent(grid_transform)


def _field_child(method: str, shape, field_path: str) -> None:
    """In a fresh process: load the field as the method gets it, then measure the conversion's extra peak."""
    import SimpleITK as sitk
    import slicer

    sys.path.insert(0, str(MODULE_PATH.parent))
    from TextSCFRegistrationLib import conversions

    field = field_path if method == "now, engine file" else sitk.ReadImage(field_path, sitk.sitkVectorFloat64)
    node = slicer.vtkMRMLScene().AddNewNodeByClass("vtkMRMLGridTransformNode", "field")
    before = _status_bytes("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    if method == "previous":
        _previous_set_grid_transform(node, field)
    else:
        conversions.setGridTransformFromDisplacement(node, field)
    seconds = time.perf_counter() - start
    print("FIELD-RESULT " + json.dumps({"method": method, "seconds": round(seconds, 2),
                                        "extra_peak_gib": round((_status_bytes("VmHWM") - before) / GIB, 2)}))


def compare_field(shape=(512, 512, 300)) -> list[dict]:
    """The field -> grid transform conversion, previous and now, each in a fresh process."""
    import subprocess
    import tempfile

    import SimpleITK as sitk

    rows = []
    with tempfile.TemporaryDirectory(prefix="textscf-field-") as folder:
        path = os.path.join(folder, "displacement.nrrd")
        field = sitk.Image([int(s) for s in shape], sitk.sitkVectorFloat32, 3)
        field.SetSpacing((0.78, 0.78, 1.5))
        sitk.WriteImage(field, path, False)
        del field
        for method in ("previous", "now, engine file", "now, SimpleITK image"):
            output = subprocess.run([sys.executable, __file__, "--field-child", method, "--shape",
                                     ",".join(map(str, shape)), "--field-path", path],
                                    capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(output.split("FIELD-RESULT ", 1)[1].splitlines()[0]))
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="512,512,300", help="I,J,K voxels (default 512,512,300)")
    parser.add_argument("--spacing", default="0.78,0.78,1.5", help="mm (default 0.78,0.78,1.5)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--field", action="store_true", help="compare the field -> transform conversions instead")
    parser.add_argument("--field-child", help=argparse.SUPPRESS)
    parser.add_argument("--field-path", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    if args.field_child:
        _field_child(args.field_child, shape, args.field_path)
        return {}
    if args.field:
        rows = compare_field(shape)
        previous = rows[0]["extra_peak_gib"]
        for row in rows:
            ratio = (f", {previous / row['extra_peak_gib']:.1f}x less than previous"
                     if row is not rows[0] and row["extra_peak_gib"] > 0 else "")
            print(f"field {'x'.join(map(str, shape))} -> grid transform, {row['method']}: "
                  f"+{row['extra_peak_gib']} GiB peak, {row['seconds']} s{ratio}")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return {"field": rows}
    result = measure(shape, tuple(float(v) for v in args.spacing.split(",")), args.threads)
    print(f"Slicer logic, {'x'.join(map(str, result['shape']))} CT pair, network alone (refine 0), CPU: "
          f"{result['seconds']} s; peak RSS: Slicer side {result['slicer_peak_gib']} GiB (before "
          f"{result['slicer_rss_before_gib']} GiB), engine process {result['engine_peak_gib']} GiB, both together "
          f"{result['both_peak_gib']} GiB (budget {result['budget_gib']:.0f} GiB: "
          f"{'within' if result['within_budget'] else 'OVER'}); grid transform {result['grid_transform_scalar_type']}")
    print("engine seconds per stage:", json.dumps(result["engine_seconds_per_stage"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

"""Per-stage time and peak memory of ``textscf.pipeline.register`` on the CPU (or a GPU), side by side in one run.

Worst case for the abdomen: a phantom pair at the BTCV geometry (192 x 160 x 256 voxels of 2 mm, two different
subjects made with ``make_abdomen_phantom(..., variation=0.6)``, seeds 0 and 1) and a randomly initialised textSCF
checkpoint (N_s = 8, one-hot prompts for the 13 BTCV organs, CΦ = 64 like the bundled model) whose model grid *is* the
full 192 x 160 x 256 grid at 2 mm, so the network runs at full resolution (the bundled model runs at 4 mm).
The weights are random: the numbers measure cost, not accuracy.

Three runs of ``register`` (all with the fixed and moving label maps, so Dice/HD95 are computed):

1. ``forward``: the network alone (``refine_iterations=0``): its forward pass on the pair and on the null pair, whose
   response is removed from the field (``debias``, the default);
2. ``one pass``: the same with ``debias=False`` (``--no-debias``): the cost of the null-pair correction;
3. ``refine N``: instance optimisation, ``refine_iterations=N`` (default 2), to show what one refinement iteration
   (forward + backward + Adam step at full resolution) costs in time and memory.

``--segmentor`` gives register() no fixed label map, so the segmentation stage runs a randomly initialised MONAI
SwinUNETR (sliding window, its own 1.5 x 1.5 x 2 mm grid) as it would for a user without labels: segmentation +
network + outputs, end to end (no Dice then: the moving labels alone only warp). ``--device cuda`` runs the networks on
the GPU and also reports the peak GPU memory per stage (``torch.cuda.max_memory_allocated``, reset at every stage
boundary); the stages' times then include waiting for the GPU, since every stage ends by reading its result back.

Each run happens in a fresh Python subprocess, so runs do not share memory. Inside the child, peak resident memory
is read from ``/proc/self/status`` (``VmHWM``); the child resets the high-water mark at every stage boundary by
writing ``5`` to ``/proc/self/clear_refs`` (Linux), so each stage gets its own peak; the whole-process peak is the
largest of them (it includes the interpreter, torch and the input images). Stage times are
``result.stats["seconds_per_stage"]``. The memory ratio is the whole-process peak over the 24 GiB budget.

Usage::

    python benchmarks/pipeline_resources.py                          # 192x160x256 at 2 mm (a few minutes on 2 cores)
    python benchmarks/pipeline_resources.py --shape 96,80,128 --spacing 4,4,4
    python benchmarks/pipeline_resources.py --json out.json --threads 2
    python benchmarks/pipeline_resources.py --device cuda --segmentor      # on a GPU, segmentation included
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1024 ** 3
RESULT_MARK = "PIPELINE-RESOURCES-RESULT "


# ----------------------------------------------------------------------------------------------------------------------
# memory probes (Linux /proc)


def _status_bytes(key: str) -> int | None:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``VmRSS``) in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _peak_bytes() -> int | None:
    """Peak RSS of this process: ``VmHWM`` (resettable), else ``getrusage`` (never reset) where /proc is missing."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource
    except ImportError:  # Windows
        return None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024  # bytes on macOS, KiB on Linux


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------------------------
# the child: one register() call


def child_main(spec: dict) -> dict:
    """Runs in a fresh subprocess: read the inputs, run register() once, report times and peaks."""
    if spec.get("threads"):
        import torch

        torch.set_num_threads(int(spec["threads"]))
    import SimpleITK as sitk
    import torch

    from textscf.pipeline import RegistrationOptions, register

    rss_after_imports = _status_bytes("VmRSS")
    work = Path(spec["workdir"])
    fixed = sitk.ReadImage(str(work / "fixed.mha"))
    moving = sitk.ReadImage(str(work / "moving.mha"))
    fixed_labels = sitk.ReadImage(str(work / "fixed_labels.mha"))
    moving_labels = sitk.ReadImage(str(work / "moving_labels.mha"))
    segmentor = spec.get("segmentor_feature_size")
    device = torch.device(spec.get("device", "cpu"))
    on_gpu = device.type == "cuda"
    options = RegistrationOptions(checkpoint=str(work / "model.pt"), device=str(device),
                                  init="center", refine_iterations=int(spec["refine_iterations"]), seed=0,
                                  debias=bool(spec.get("debias", True)),
                                  segmentor_weights=str(work / "segmentor.pt") if segmentor else None,
                                  segmentor_feature_size=int(segmentor or 48))
    rss_before = _status_bytes("VmRSS")
    peak_before = _peak_bytes()
    resettable = _reset_peak()
    peaks: dict[str, int] = {}
    gpu_peaks: dict[str, int] = {}
    current: list[str | None] = [None]

    def on_progress(stage: str, _fraction: float) -> None:
        if current[0] is not None:
            peaks[current[0]] = _peak_bytes()
            if resettable:
                _reset_peak()
            if on_gpu:
                gpu_peaks[current[0]] = int(torch.cuda.max_memory_allocated(device))
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        current[0] = None if stage == "done" else stage

    start = time.perf_counter()
    result = register(fixed, moving, options, fixed_labels=None if segmentor else fixed_labels,
                      moving_labels=moving_labels, progress=on_progress)
    wall = time.perf_counter() - start
    peak_tail = _peak_bytes()  # from "done" to here (building the result object)
    stats = result.stats
    whole = max([p for p in [peak_before, peak_tail, *peaks.values()] if p is not None], default=None)
    return {
        "refine_iterations": int(spec["refine_iterations"]),
        "threads": torch.get_num_threads(),
        "seconds_per_stage": stats["seconds_per_stage"],
        "seconds_total": stats["seconds_total"],
        "wall_seconds_register": round(wall, 3),
        "refine": stats.get("refine"),
        "mean_dice_before": stats.get("mean_dice_before"),
        "mean_dice": stats.get("mean_dice"),
        "mean_dice_initial_alignment": stats.get("mean_dice_initial_alignment"),
        "model_grid": stats.get("model_grid"),
        "device": stats.get("device"),
        "gpu": torch.cuda.get_device_name(device) if on_gpu else None,
        "gpu_peak_per_stage_bytes": gpu_peaks,
        "gpu_peak_bytes": max(gpu_peaks.values(), default=None),
        "segmentor": f"SwinUNETR feature size {segmentor}, random weights" if segmentor else None,
        "rss_after_imports_bytes": rss_after_imports,
        "rss_before_register_bytes": rss_before,
        "peak_before_register_bytes": peak_before,
        "peak_per_stage_bytes": peaks,
        "peak_per_stage_is_cumulative": not resettable,
        "peak_whole_process_bytes": whole,
    }


# ----------------------------------------------------------------------------------------------------------------------
# the parent: inputs, subprocesses, table


def prepare_inputs(workdir: Path, shape, spacing, model_shape, start_channels: int, hidden: int,
                   variation: float, segmentor_feature_size: int | None = None) -> dict:
    """Phantom pair, label maps and a random-init checkpoint whose model grid is ``model_shape`` at ``spacing``; with
    ``segmentor_feature_size``, also a random-init SwinUNETR state dict (``segmentor.pt``) for the BTCV classes."""
    import SimpleITK as sitk

    from textscf.checkpoint import save_checkpoint
    from textscf.phantom import BTCV_ORGANS, PHANTOM_DIRECTION, make_abdomen_phantom
    from textscf.train import build_model

    start = time.perf_counter()
    fixed, fixed_labels = make_abdomen_phantom(shape=shape, spacing=spacing, seed=0, variation=variation)
    moving, moving_labels = make_abdomen_phantom(shape=shape, spacing=spacing, seed=1, variation=variation)
    for name, image in (("fixed", fixed), ("moving", moving), ("fixed_labels", fixed_labels),
                        ("moving_labels", moving_labels)):
        sitk.WriteImage(image, str(workdir / f"{name}.mha"))
    net = build_model(list(BTCV_ORGANS), list(range(1, len(BTCV_ORGANS) + 1)), "onehot", "ct-abdomen",
                      start_channels=start_channels, hidden_channels=hidden, head="textscf", modality="ct",
                      spacing=spacing, input_shape=model_shape, direction=PHANTOM_DIRECTION, seed=0)
    save_checkpoint(net, workdir / "model.pt", metadata={"note": "random initialisation, benchmark only"})
    if segmentor_feature_size:
        import torch
        from monai.networks.nets import SwinUNETR

        torch.manual_seed(0)
        swin = SwinUNETR(in_channels=1, out_channels=len(BTCV_ORGANS) + 1, feature_size=segmentor_feature_size)
        torch.save(swin.state_dict(), workdir / "segmentor.pt")
    return {"seconds_to_prepare": round(time.perf_counter() - start, 1),
            "params": sum(p.numel() for p in net.parameters())}


def run_child(workdir: Path, refine_iterations: int, threads: int | None, debias: bool = True, device: str = "cpu",
              segmentor_feature_size: int | None = None) -> dict:
    spec = {"workdir": str(workdir), "refine_iterations": refine_iterations, "threads": threads, "debias": debias,
            "device": device, "segmentor_feature_size": segmentor_feature_size}
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the register subprocess (refine_iterations={refine_iterations}) failed with exit code "
                           f"{proc.returncode}:\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len(RESULT_MARK):])
    result["subprocess_seconds"] = round(elapsed, 1)
    return result


def _gib(n: int | None) -> str:
    return "—" if n is None else f"{n / GIB:.2f}"


def _num(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def markdown_table(runs: list[tuple[str, dict]]) -> str:
    """Seconds and peak RSS per stage for each run, and peak GPU memory where the runs used a GPU."""
    gpu = any(r.get("gpu_peak_per_stage_bytes") for _, r in runs)
    columns = ("s", "peak RSS GiB", "peak GPU GiB") if gpu else ("s", "peak RSS GiB")
    head = "| stage | " + " | ".join(f"{name}: {c}" for name, _ in runs for c in columns) + " |"
    sep = "|---|" + "---:|" * len(columns) * len(runs)
    lines = [head, sep]

    def row(label: str, cells) -> str:
        return f"| {label} | " + " | ".join(cells) + " |"

    before = [c for _, r in runs for c in ("—", _gib(r["peak_before_register_bytes"]), "—")[:len(columns)]]
    lines.append(row("before register (interpreter, torch, inputs)", before))
    stages = list(dict.fromkeys(stage for _, r in runs for stage in r["seconds_per_stage"]))  # register()'s order
    for stage in stages:
        cells = []
        for _, r in runs:
            seconds = r["seconds_per_stage"].get(stage)
            values = ("—", "—", "—") if seconds is None else (
                f"{seconds:.2f}", _gib(r["peak_per_stage_bytes"].get(stage)),
                _gib((r.get("gpu_peak_per_stage_bytes") or {}).get(stage)))
            cells.extend(values[:len(columns)])
        lines.append(row(stage, cells))
    lines.append(row("**whole register() / whole process**",
                     [c for _, r in runs for c in (f"**{r['seconds_total']:.2f}**",
                                                   f"**{_gib(r['peak_whole_process_bytes'])}**",
                                                   f"**{_gib(r.get('gpu_peak_bytes'))}**")[:len(columns)]]))
    return "\n".join(lines)


def _parse_triplet(kind, text: str):
    parts = tuple(kind(p) for p in text.replace("x", ",").split(","))
    if len(parts) != 3 or any(p <= 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: give three positive values, e.g. 192,160,256")
    return parts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=lambda s: _parse_triplet(int, s), default=(192, 160, 256),
                   help="phantom grid (I,J,K) voxels (default 192,160,256)")
    p.add_argument("--spacing", type=lambda s: _parse_triplet(float, s), default=(2.0, 2.0, 2.0),
                   help="phantom voxel spacing in mm (default 2,2,2)")
    p.add_argument("--model-shape", type=lambda s: _parse_triplet(int, s), default=None,
                   help="model grid (default: --shape rounded up to multiples of 16, at --spacing)")
    p.add_argument("--start-channels", type=int, default=8, help="N_s of the checkpoint (default 8)")
    p.add_argument("--hidden-channels", type=int, default=64, help="CΦ of the checkpoint (default 64)")
    p.add_argument("--refine-iterations", type=int, default=2, help="iterations of the refinement run (default 2)")
    p.add_argument("--variation", type=float, default=0.6, help="phantom subject variation (default 0.6)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads in the children")
    p.add_argument("--budget-gib", type=float, default=24.0, help="memory budget the peaks are compared to")
    p.add_argument("--workdir", default=None, help="keep the inputs and checkpoint here (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write all numbers to this JSON file")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where register() runs its networks (default cpu; cuda also reports peak GPU memory)")
    p.add_argument("--segmentor", action="store_true",
                   help="no fixed label map: the segmentation stage runs a random-init SwinUNETR (end to end)")
    p.add_argument("--segmentor-feature-size", type=int, default=48,
                   help="SwinUNETR feature size for --segmentor (48 = the BTCV bundle's base model)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.child is not None:
        result = child_main(json.loads(args.child))
        print(RESULT_MARK + json.dumps(result), flush=True)
        return result
    if args.refine_iterations < 1:
        raise SystemExit("--refine-iterations must be >= 1 (the second run shows the refinement's cost)")
    shape = tuple(int(s) for s in args.shape)
    spacing = tuple(float(s) for s in args.spacing)
    model_shape = args.model_shape or tuple(int(16 * math.ceil(s / 16)) for s in shape)
    if any(s % 16 for s in model_shape):
        raise SystemExit(f"--model-shape {model_shape} must be divisible by 16 along every axis")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no GPU here")
    started = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    temp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        temp = tempfile.mkdtemp(prefix="textscf-pipeline-resources-")
        workdir = Path(temp)
    try:
        segmentor = args.segmentor_feature_size if args.segmentor else None
        prep = prepare_inputs(workdir, shape, spacing, model_shape, args.start_channels, args.hidden_channels,
                              args.variation, segmentor)
        forward = run_child(workdir, 0, args.threads, device=args.device, segmentor_feature_size=segmentor)
        one_pass = run_child(workdir, 0, args.threads, debias=False, device=args.device,
                             segmentor_feature_size=segmentor)
        refine = run_child(workdir, args.refine_iterations, args.threads, device=args.device,
                           segmentor_feature_size=segmentor)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    runs = [("forward", forward), ("one pass (--no-debias)", one_pass), (f"refine {args.refine_iterations}", refine)]
    table = markdown_table(runs)

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    per_iteration = (refine["seconds_per_stage"]["register"] - forward["seconds_per_stage"]["register"]) \
        / args.refine_iterations
    budget = args.budget_gib * GIB
    size = "x".join(map(str, shape))
    msize = "x".join(map(str, model_shape))
    where = f"the GPU ({forward['gpu']})" if forward.get("gpu") else "the CPU"
    labels = (f"fixed regions from a random-init SwinUNETR (feature size {args.segmentor_feature_size}; no fixed "
              "label map, so no Dice)" if args.segmentor else "labels given (Dice on)")
    print(f"# register() resources on {where}\n\nPhantom pair {size} at {'x'.join(f'{s:g}' for s in spacing)} mm "
          f"(two subjects, variation {args.variation}); random-init textSCF checkpoint N_s = {args.start_channels}, "
          f"CΦ = {args.hidden_channels}, {prep['params']:,} parameters, model grid {msize} at the same spacing; "
          f"{labels}, centre alignment, device {forward['device']}.\nCPU: {cpu} ({os.cpu_count()} logical CPUs), torch "
          f"{torch.__version__}, {forward['threads']} intra-op threads in each child, load average {load_start} at "
          "start. Each run in a fresh subprocess.\n")
    print(table)
    print()
    cumulative = forward["peak_per_stage_is_cumulative"] or refine["peak_per_stage_is_cumulative"]
    print("Peak RSS per stage: VmHWM of the child process, " + (
        "cumulative (this kernel does not allow resetting it)." if cumulative else
        "reset at every stage boundary (/proc/self/clear_refs), so each stage shows its own peak.") +
        " 'before register' is the peak while importing and reading the inputs.")
    for name, r in runs:
        peak = r["peak_whole_process_bytes"]
        increment = None if peak is None or r["rss_before_register_bytes"] is None else \
            peak - r["rss_before_register_bytes"]
        share = "not measurable here" if not peak else \
            f"{100 * peak / budget:.1f} % of the {args.budget_gib:g} GiB budget ({budget / peak:.1f}x headroom)"
        print(f"- {name}: whole-process peak {_gib(peak)} GiB = {share}; register() adds up to "
              f"{_gib(increment)} GiB over the {_gib(r['rss_before_register_bytes'])} GiB resident before it; "
              f"register() {r['seconds_total']:.1f} s; mean Dice {_num(r['mean_dice_before'])} unaligned, "
              f"{_num(r['mean_dice_initial_alignment'])} after the centre alignment, {_num(r['mean_dice'])} after "
              "register() (random weights: the cost is what counts here)" +
              (f"; peak GPU memory {_gib(r['gpu_peak_bytes'])} GiB." if r.get("gpu_peak_bytes") else "."))
    ratio_peak = (refine["peak_whole_process_bytes"] or math.nan) / (forward["peak_whole_process_bytes"] or math.nan)
    print(f"- refinement: register stage {refine['seconds_per_stage']['register']:.1f} s vs "
          f"{forward['seconds_per_stage']['register']:.1f} s for the forward alone, i.e. about {per_iteration:.1f} s "
          f"per iteration (forward + backward + Adam step at {msize}); peak memory {ratio_peak:.2f}x the forward run's"
          f" (the refine summary's own figure, which includes the final forward: "
          f"{refine['refine']['seconds_per_iteration']:.1f} s per iteration).")
    elapsed = time.perf_counter() - started
    print(f"\nInputs prepared in {prep['seconds_to_prepare']:.0f} s; total {elapsed:.0f} s; load average at end "
          f"{[round(x, 2) for x in os.getloadavg()]}.")
    result = {
        "shape": list(shape), "spacing": list(spacing), "model_shape": list(model_shape),
        "start_channels": args.start_channels, "hidden_channels": args.hidden_channels, "params": prep["params"],
        "budget_gib": args.budget_gib, "cpu": cpu, "logical_cpus": os.cpu_count(), "torch": torch.__version__,
        "load_average_at_start": load_start,
        "runs": {name: r for name, r in runs},
        "seconds_per_refine_iteration": round(per_iteration, 3),
        "peak_fraction_of_budget": {name: (r["peak_whole_process_bytes"] or math.nan) / budget for name, r in runs},
        "markdown": table, "seconds_total": round(elapsed, 1),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"Wrote {args.json}")
    return result


if __name__ == "__main__":
    main()

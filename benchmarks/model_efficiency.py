"""Model size, multiply-adds and CPU forward time of TextSCFNet, side by side in one run.

For every geometry and every N_s (LKU-Net start channels) the script builds four networks that differ only in the
flow head and reports, for each, the parameter count, the multiply-adds (MACs) of one forward pass and the median CPU
forward time, with ratios to N_s = 8 (same head) and to the no-SCF baseline (same N_s):

- ``textscf-onehot``: the textSCF head, one-hot text matrix (C1 = N regions) and CΦ = 64, as in the bundled model;
- ``textscf-clip``: the textSCF head at the paper's configuration, C1 = 768 (CLIP ViT-L/14@336px width) and CΦ = 2048;
- ``no_scf``: the shared filter alone (the LKU-Net baseline, the ablation without spatially covariant filters);
- ``reference``: the head of the authors' released brain model (one MLP per axis, a 3x3x3 conv), C1 = 768, CΦ = 2048.

The 768-wide text matrices are random stand-ins for CLIP embeddings: parameter counts, MACs and run time do not
depend on their values.

Geometries: ``abdomen`` = 96 x 80 x 128 voxels, 14 regions (the paper's halved Learn2Reg abdomen CT volumes);
``oasis`` = 160 x 192 x 224 voxels, 36 regions (Learn2Reg OASIS brain MRI).

Multiply-adds are counted with ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2). It counts matrix
products and convolutions only: ``aten.convolution`` (3-D and transposed convolutions) and ``mm``/``addmm``/``bmm``/
``baddbmm`` (the heads' einsums and the filter MLP's linear layers). Bias additions, PReLU/ReLU, the per-voxel filter
gather (embedding lookup), the trilinear upsampling of the field and the grid_sample warp are not counted.

The network is fully convolutional, so the count is affine in the number of voxels V: ``FLOPs(V) = a V + b``, where
``b`` is the filter MLP Φθ that runs once per forward on the N x C1 text matrix. The script counts at two small
grids (the second with twice the voxels), solves for ``a`` and ``b`` exactly (integers), checks the fit exactly on a
third grid of another shape, and extrapolates to the full geometry; no full-size forward is needed for the count.
Whenever a full-size forward runs anyway (the untimed warm-up), it runs under the counter and must match the
extrapolation exactly.

Times are wall-clock medians of ``--repeats`` forwards under ``torch.no_grad()`` on the CPU, with the thread count and
load average printed. Forwards of the heads at one (geometry, N_s) are interleaved round-robin so that the ratios
compare runs taken side by side. Each configuration gets at most ``--max-seconds-per-config`` of timed forwards
(fewer runs when a forward is slow); one whose single forward is expected to exceed it is not timed and the table
shows the estimate, marked "est." (the same head and N_s timed at another geometry scaled by the voxel count, else
its MACs over the MAC/s measured so far).

``--inference`` runs another comparison instead: our inference path (``textscf.networks.inference.for_inference``:
folded large-kernel blocks, fused convolution + PReLU, channels-last, ``torch.inference_mode``) against the plain eager
forward (``torch.no_grad()``) of the same network, side by side, for

- ``reference``: the ``reference``-head model (which reproduces the authors' computation op for op), N_s = 8,
  C1 = 768, CΦ = 2048, 36 regions, on the OASIS grid 160 x 192 x 224; He-normal weights (``initialise("kaiming")``)
  with the output layer at N(0, 0.05) so that the field is voxels, not 1e-5, and random inputs;
- ``bundled``: the bundled abdomen model (``abdomen-ct-onehot-ns8.pt``) on its own grid, on a phantom pair (its
  label map as the fixed regions).

It reports the median times of the eager forward, the inference path with the full output (displacement and warped
image), the inference path for the field alone (what ``register()`` runs) and, as ablations, the inference path with
the contiguous memory format and (``--compile``) with its backbone under ``torch.compile``, with the compile time; the
ratios to the eager forward; and the largest output differences against the eager forward.

Usage::

    python benchmarks/model_efficiency.py                 # abdomen + OASIS, N_s 8/16/32 (several minutes on 2 cores)
    python benchmarks/model_efficiency.py --quick         # abdomen only, N_s 8 and 16
    python benchmarks/model_efficiency.py --json out.json
    python benchmarks/model_efficiency.py --inference --inference-threads 1,2 --compile   # inference path vs eager
    python benchmarks/model_efficiency.py --inference --device cuda      # the same on a GPU, with peak GPU memory
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from textscf.networks import TextSCFConfig, TextSCFNet

GEOMETRIES: dict[str, dict] = {
    "abdomen": {"shape": (96, 80, 128), "regions": 14,
                "what": "Learn2Reg abdomen CT halved (the paper's input), 13 organs + background"},
    "oasis": {"shape": (160, 192, 224), "regions": 36,
              "what": "Learn2Reg OASIS brain MRI, 35 structures + background"},
}

# name -> (head kind, C1 (None = N, one-hot), CΦ, description)
VARIANTS: dict[str, tuple[str, int | None, int, str]] = {
    "textscf-onehot": ("textscf", None, 64, "textSCF head, one-hot prompts C1 = N, CΦ = 64 (bundled model)"),
    "textscf-clip": ("textscf", 768, 2048, "textSCF head, C1 = 768 (CLIP width), CΦ = 2048 (paper)"),
    "no_scf": ("no_scf", None, 64, "shared filter only: LKU-Net baseline without SCF"),
    "reference": ("reference", 768, 2048, "authors' released head (3 MLPs + 3x3x3 conv), C1 = 768, CΦ = 2048"),
}

# Three small grids for the count: V, 2V, and a third of another shape to check the affine fit.
COUNT_SHAPES = ((16, 16, 16), (32, 16, 16), (16, 32, 48))

COUNTED_OPS = "aten.convolution (3-D conv and transposed conv), mm, addmm, bmm, baddbmm (einsum -> bmm)"
NOT_COUNTED = ("bias adds, PReLU/ReLU, per-voxel filter gather (embedding), trilinear upsampling, grid_sample warp, "
               "elementwise ops")

# The textSCF paper's abstract (arXiv 2311.15607v2): in abdominal registration "its smaller variant maintained similar
# accuracy [to the second-best model] but with an 89.13% reduction in network parameters and a 98.34% decrease in
# computational operations".
PAPER_CLAIM = {"params_reduction_percent": 89.13, "operations_reduction_percent": 98.34,
               "source": "arXiv 2311.15607v2 abstract: smaller textSCF variant vs the second-best model (abdomen)"}


@dataclass
class Row:
    geometry: str
    variant: str
    start_channels: int
    head: str
    text_dim: int
    hidden: int
    regions: int
    shape: tuple[int, int, int]
    params: int
    head_params: int
    flops: int  # extrapolated to ``shape``
    flops_per_voxel: int  # a
    flops_constant: int  # b (filter MLP, once per forward)
    flops_by_op: dict = field(default_factory=dict)
    direct_count_checked: bool = False
    seconds: list[float] = field(default_factory=list)
    seconds_estimate: float | None = None

    @property
    def macs(self) -> float:
        return self.flops / 2.0

    @property
    def median_seconds(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None


# ----------------------------------------------------------------------------------------------------------------------
# building and counting


def build_net(variant: str, start_channels: int, regions: int, seed: int = 0) -> TextSCFNet:
    """The network of ``variant`` for ``regions`` regions (index 0 = background), eval mode, on the CPU."""
    head, text_dim, hidden, _ = VARIANTS[variant]
    text_dim = regions if text_dim is None else text_dim
    generator = torch.Generator().manual_seed(seed)
    if VARIANTS[variant][1] is None:  # one-hot prompts
        text_matrix = torch.eye(regions)
    else:  # random unit rows standing in for CLIP embeddings
        text_matrix = torch.randn(regions, text_dim, generator=generator)
        text_matrix = text_matrix / text_matrix.norm(dim=1, keepdim=True)
    config = TextSCFConfig(num_regions=regions, text_dim=text_dim, start_channels=start_channels,
                           hidden_channels=hidden, head=head)
    torch.manual_seed(seed)
    return TextSCFNet(config, text_matrix).eval()


def make_inputs(shape, regions: int, seed: int = 0):
    """Random moving/fixed images in [0, 1] and random fixed regions, ``(1, 1, I, J, K)``."""
    g = torch.Generator().manual_seed(seed)
    moving = torch.rand((1, 1, *shape), generator=g)
    fixed = torch.rand((1, 1, *shape), generator=g)
    fixed_regions = torch.randint(0, regions, (1, 1, *shape), generator=g)
    return moving, fixed, fixed_regions


def count_flops(net: TextSCFNet, shape) -> dict[str, int]:
    """FLOPs of one forward at ``shape`` per counted aten op (FlopCounterMode, no_grad)."""
    moving, fixed, fixed_regions = make_inputs(shape, net.num_regions)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(moving, fixed, fixed_regions)
    return {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}


def affine_flop_model(net: TextSCFNet, shapes=COUNT_SHAPES) -> tuple[dict[str, tuple[int, int]], dict]:
    """Per op, ``(a, b)`` with FLOPs(V) = a V + b, solved exactly from ``shapes[0]`` and ``shapes[1]`` and checked on
    ``shapes[2]``. Raises if the count is not exactly affine in the voxel count."""
    voxels = [s[0] * s[1] * s[2] for s in shapes]
    counts = [count_flops(net, s) for s in shapes]
    model: dict[str, tuple[int, int]] = {}
    for op in sorted(set().union(*counts)):
        f = [c.get(op, 0) for c in counts]
        da, dv = f[1] - f[0], voxels[1] - voxels[0]
        if da % dv:
            raise AssertionError(f"{op}: FLOPs {f[:2]} at {voxels[:2]} voxels are not affine with an integer slope")
        a = da // dv
        b = f[0] - a * voxels[0]
        if a * voxels[2] + b != f[2]:
            raise AssertionError(f"{op}: FLOPs are not affine in the voxel count: predicted {a * voxels[2] + b} at "
                                 f"{shapes[2]}, counted {f[2]}")
        model[op] = (a, b)
    check = {"shapes": [list(s) for s in shapes], "voxels": voxels,
             "flops": [sum(c.values()) for c in counts], "affine_exact": True}
    return model, check


def extrapolate(model: dict[str, tuple[int, int]], voxels: int) -> dict[str, int]:
    return {op: a * voxels + b for op, (a, b) in model.items()}


def filter_mlp_flops(regions: int, text_dim: int, hidden: int, feature_channels: int, head: str) -> int:
    """FLOPs of the filter MLP(s) on the N x C1 text matrix (what ``b`` must be): 2 per multiply-add."""
    if head == "no_scf":
        return 0
    per_mlp_out = 3 * feature_channels if head == "textscf" else feature_channels
    one = regions * (text_dim * hidden + hidden * 2 * hidden + 2 * hidden * per_mlp_out)
    return 2 * one * (1 if head == "textscf" else 3)


# ----------------------------------------------------------------------------------------------------------------------
# timing


def time_forward(net: TextSCFNet, inputs) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        net(*inputs)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------------------------
# output


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _ratio(x, ref) -> str:
    if x is None or ref is None or ref == 0:
        return "—"
    return f"{x / ref:.2f}x"


def _fmt_seconds(row: Row) -> str:
    if row.median_seconds is not None:
        return f"{row.median_seconds:.2f} ({len(row.seconds)})"
    if row.seconds_estimate is not None:
        return f"est. {row.seconds_estimate:.0f}"
    return "—"


def markdown_table(rows: list[Row]) -> str:
    by_key = {(r.geometry, r.variant, r.start_channels): r for r in rows}
    lines = [
        "| geometry | head | N_s | params | x N_s=8 | head params | GMACs | x N_s=8 | x no-SCF | CPU forward s (runs) "
        "| x N_s=8 | x no-SCF |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base8 = by_key.get((r.geometry, r.variant, 8))
        nos = by_key.get((r.geometry, "no_scf", r.start_channels))
        t = r.median_seconds
        t8 = base8.median_seconds if base8 else None
        tn = nos.median_seconds if nos else None
        lines.append(
            f"| {r.geometry} {'x'.join(map(str, r.shape))} | {r.variant} | {r.start_channels} | {_fmt_int(r.params)} | "
            f"{_ratio(r.params, base8.params if base8 else None)} | {_fmt_int(r.head_params)} | {r.macs / 1e9:.2f} | "
            f"{_ratio(r.macs, base8.macs if base8 else None)} | {_ratio(r.macs, nos.macs if nos else None)} | "
            f"{_fmt_seconds(r)} | {_ratio(t, t8)} | {_ratio(t, tn)} |"
        )
    return "\n".join(lines)


def environment(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads,
        "torch_interop_threads": torch.get_num_interop_threads(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


# ----------------------------------------------------------------------------------------------------------------------
# main


def _parse_shape(text: str) -> tuple[int, int, int]:
    parts = tuple(int(p) for p in text.replace("x", ",").split(","))
    if len(parts) != 3 or any(p <= 0 or p % 16 for p in parts):
        raise argparse.ArgumentTypeError(f"shape {text!r} must be three positive sizes divisible by 16, e.g. 96,80,128")
    return parts


def _parse_ints(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="abdomen geometry only, N_s 8 and 16")
    p.add_argument("--geometries", default=None, help="comma list of " + ", ".join(GEOMETRIES) + " (default: all)")
    p.add_argument("--ns", type=_parse_ints, default=None, help="comma list of N_s (default 8,16,32)")
    p.add_argument("--variants", default=None, help="comma list of " + ", ".join(VARIANTS) + " (default: all)")
    p.add_argument("--shape", type=_parse_shape, default=None,
                   help="override the input shape of every geometry (e.g. 32,32,32 for a smoke test)")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per configuration (median reported)")
    p.add_argument("--max-seconds-per-config", type=float, default=40.0,
                   help="time at most this much per configuration; fewer runs, or none (estimate shown), beyond it")
    p.add_argument("--no-timing", action="store_true", help="parameters and MACs only")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-paper-context", action="store_true", help="skip the N_s = 64 count for the paper comparison")
    p.add_argument("--json", default=None, help="also write all numbers to this JSON file")
    p.add_argument("--inference", action="store_true",
                   help="compare the inference path with the eager forward instead (reference-head and bundled models)")
    p.add_argument("--inference-models", default=",".join(INFERENCE_MODELS),
                   help="comma list of " + ", ".join(INFERENCE_MODELS) + " for --inference")
    p.add_argument("--inference-threads", type=_parse_ints, default=[2],
                   help="comma list of intra-op thread counts for --inference (default 2)")
    p.add_argument("--compile", action="store_true", help="with --inference: also time torch.compile of the folded net")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="with --inference: run the networks on this device (default cpu; cuda also reports peak GPU "
                        "memory)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.inference:
        return inference_main(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    geometries = (["abdomen"] if args.quick else list(GEOMETRIES)) if args.geometries is None else \
        [g.strip() for g in args.geometries.split(",")]
    ns_list = args.ns or ([8, 16] if args.quick else [8, 16, 32])
    variants = list(VARIANTS) if args.variants is None else [v.strip() for v in args.variants.split(",")]
    for g in geometries:
        if g not in GEOMETRIES:
            raise SystemExit(f"unknown geometry {g!r}; choose from {', '.join(GEOMETRIES)}")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    ns_list = sorted(set(ns_list) | {8})  # the ratios are relative to N_s = 8; cheapest first
    env = environment(threads)
    started = time.perf_counter()
    print(f"# TextSCFNet model efficiency\n\nCPU: {env['cpu']} ({env['logical_cpus']} logical CPUs), torch "
          f"{env['torch']}, {threads} intra-op threads, load average {env['load_average_1_5_15']} at start.\n")

    rows: list[Row] = []
    linearity: list[dict] = []
    throughput = None  # MAC/s, from the first forward timed in this run
    timed: list[Row] = []
    for geometry in geometries:
        spec = GEOMETRIES[geometry]
        shape = args.shape or spec["shape"]
        voxels = shape[0] * shape[1] * shape[2]
        regions = spec["regions"]
        inputs = None if args.no_timing else make_inputs(shape, regions, seed=1)
        for ns in ns_list:
            nets: dict[str, TextSCFNet] = {}
            group: list[Row] = []
            for variant in variants:
                head, text_dim, hidden, _ = VARIANTS[variant]
                net = build_net(variant, ns, regions)
                model, check = affine_flop_model(net)
                by_op = extrapolate(model, voxels)
                a = sum(m[0] for m in model.values())
                b = sum(m[1] for m in model.values())
                expected_b = filter_mlp_flops(regions, net.config.text_dim, hidden, 2 * ns, head)
                if b != expected_b:
                    raise AssertionError(f"{variant} N_s={ns}: voxel-independent FLOPs {b} != filter MLP {expected_b}")
                linearity.append({"geometry": geometry, "variant": variant, "start_channels": ns, **check,
                                  "flops_per_voxel": a, "flops_constant": b})
                row = Row(geometry, variant, ns, head, net.config.text_dim, hidden, regions, tuple(shape),
                          params=sum(p.numel() for p in net.parameters()),
                          head_params=sum(p.numel() for p in net.head.parameters()),
                          flops=sum(by_op.values()), flops_per_voxel=a, flops_constant=b, flops_by_op=by_op)
                rows.append(row)
                group.append(row)
                nets[variant] = net
            if not args.no_timing:
                throughput = _time_group(group, nets, inputs, args, throughput, timed)
            del nets

    context = None
    if not args.no_paper_context:
        context = _paper_context(rows, args.shape)
    table = markdown_table(rows)
    print(table)
    print()
    _print_notes(rows, linearity, context, args)
    elapsed = time.perf_counter() - started
    env["load_average_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\nTotal {elapsed:.0f} s; load average at end {env['load_average_1_5_15_at_end']}.")
    result = {
        "environment": env,
        "counted_ops": COUNTED_OPS,
        "not_counted": NOT_COUNTED,
        "rows": [dict(asdict(r), macs=r.macs, median_seconds=r.median_seconds) for r in rows],
        "linearity_checks": linearity,
        "paper_context": context,
        "markdown": table,
        "seconds_total": round(elapsed, 1),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"Wrote {args.json}")
    return result


def _estimate_seconds(row: Row, timed: list[Row], throughput: float) -> float:
    """A single forward's expected time: the same head and N_s timed at another geometry, scaled by the voxel count
    (the network is fully convolutional), else its MACs over the MAC/s measured in this run."""
    voxels = row.shape[0] * row.shape[1] * row.shape[2]
    for other in timed:
        if other.variant == row.variant and other.start_channels == row.start_channels and other.seconds:
            other_voxels = other.shape[0] * other.shape[1] * other.shape[2]
            return other.median_seconds * voxels / other_voxels
    return row.macs / throughput


def _time_group(group: list[Row], nets: dict, inputs, args, throughput: float | None, timed: list[Row]) -> float:
    """Times the heads of one (geometry, N_s) round-robin; returns the updated MAC/s throughput.

    ``timed``: rows timed earlier in this run (for estimates). Before anything was timed, one untimed forward of the
    group's first head gives the throughput (and warms up)."""
    if throughput is None:
        first = group[0]
        throughput = first.macs / max(time_forward(nets[first.variant], inputs), 1e-6)
    plan: dict[str, int] = {}
    for row in group:
        est = _estimate_seconds(row, timed, throughput)
        row.seconds_estimate = est
        runs = min(args.repeats, int(args.max_seconds_per_config // max(est, 1e-9)))
        plan[row.variant] = max(0, runs)
    # Warm-up (untimed) under the FLOP counter for the cheap ones: the direct full-size count must equal the
    # extrapolation from the small grids.
    for row in group:
        if plan[row.variant] and row.seconds_estimate * (plan[row.variant] + 1) <= args.max_seconds_per_config:
            counter = FlopCounterMode(display=False)
            with torch.no_grad(), counter:
                nets[row.variant](*inputs)
            direct = int(counter.get_total_flops())
            if direct != row.flops:
                raise AssertionError(f"{row.geometry} {row.variant} N_s={row.start_channels}: direct count {direct} "
                                     f"!= extrapolated {row.flops}")
            row.direct_count_checked = True
    for r in range(max(plan.values(), default=0)):
        for row in group:
            if r < plan[row.variant]:
                row.seconds.append(time_forward(nets[row.variant], inputs))
    measured = [row for row in group if row.seconds]
    if measured:
        throughput = statistics.median(row.macs / row.median_seconds for row in measured)
    for row in group:
        row.seconds_estimate = None if row.seconds else _estimate_seconds(row, timed, throughput)
    timed.extend(measured)
    return throughput


def _paper_context(rows: list[Row], shape_override) -> dict:
    """Our N_s = 8 vs N_s = 64 (bundled textSCF configuration, abdomen geometry) next to the paper's claim."""
    spec = GEOMETRIES["abdomen"]
    shape = shape_override or spec["shape"]
    voxels = shape[0] * shape[1] * shape[2]
    out = {"paper": PAPER_CLAIM, "lapirn_absolute_figures": None,
           "lapirn_note": "LapIRN's absolute parameter and operation counts from the paper were not available offline; "
                          "only the paper's relative claim is shown",
           "geometry": "abdomen", "shape": list(shape), "variant": "textscf-onehot"}
    for ns in (8, 64):
        existing = [r for r in rows
                    if r.geometry == "abdomen" and r.variant == "textscf-onehot" and r.start_channels == ns]
        if existing and tuple(existing[0].shape) == tuple(shape):
            params, flops = existing[0].params, existing[0].flops
        else:
            net = build_net("textscf-onehot", ns, spec["regions"])
            model, _ = affine_flop_model(net)
            params = sum(p.numel() for p in net.parameters())
            flops = sum(extrapolate(model, voxels).values())
        out[f"ns{ns}"] = {"params": params, "macs": flops / 2}
    out["params_reduction_percent_ns8_vs_ns64"] = 100.0 * (1 - out["ns8"]["params"] / out["ns64"]["params"])
    out["macs_reduction_percent_ns8_vs_ns64"] = 100.0 * (1 - out["ns8"]["macs"] / out["ns64"]["macs"])
    return out


def _print_notes(rows: list[Row], linearity: list[dict], context: dict | None, args) -> None:
    print("Ratios: `x N_s=8` is relative to the same head at N_s = 8, `x no-SCF` to the no-SCF baseline at the same "
          "N_s (same geometry, measured in this run). Heads:")
    for name, (_, _, _, what) in VARIANTS.items():
        print(f"- `{name}`: {what}")
    print(f"\nMACs = FLOPs / 2 from torch.utils.flop_counter.FlopCounterMode, which counts {COUNTED_OPS}; "
          f"not counted: {NOT_COUNTED}.")
    small = ", ".join("x".join(map(str, s)) for s in COUNT_SHAPES)
    print(f"The count is exactly affine in the voxel count V, FLOPs = a V + b, for all {len(linearity)} networks "
          f"(a, b solved from {small.rsplit(', ', 1)[0]}, checked exactly on {COUNT_SHAPES[2][0]}x{COUNT_SHAPES[2][1]}x"
          f"{COUNT_SHAPES[2][2]}); b is the filter MLP on the N x C1 text matrix (once per forward, not per voxel) and "
          "equals its analytic count. The full-size MACs are extrapolated from these small grids, not counted on a "
          "full-size forward.")
    checked = sum(r.direct_count_checked for r in rows)
    if checked:
        print(f"Cross-check: {checked} of {len(rows)} configurations also ran a full-size forward under the counter "
              "(the untimed warm-up); each matched the extrapolation exactly.")
    constant = [r for r in rows if r.flops_constant]
    if constant:
        worst = max(constant, key=lambda r: r.flops_constant / r.flops)
        print(f"The voxel-independent part is at most {100 * worst.flops_constant / worst.flops:.2f} % of a forward "
              f"({worst.variant}, N_s = {worst.start_channels}, {worst.geometry}).")
    if not args.no_timing:
        print(f"\nCPU forward: median wall time of up to {args.repeats} forwards under torch.no_grad() (runs in "
              "parentheses), after an untimed warm-up where it fits the per-configuration limit, the heads of one "
              "(geometry, N_s) interleaved round-robin; "
              f"`est.` = not timed, one forward expected beyond {args.max_seconds_per_config:.0f} s; the estimate is "
              "the "
              "same head and N_s timed at another geometry in this run scaled by the voxel count, else its MACs "
              "divided by the MAC/s measured in this run.")
    if context:
        print(f"\nContext (abdomen {'x'.join(map(str, context['shape']))}, textscf-onehot): N_s = 8 vs N_s = 64, "
              "the comparison LKU-Net papers make: "
              f"{context['ns8']['params']:,} vs {context['ns64']['params']:,} parameters "
              f"(-{context['params_reduction_percent_ns8_vs_ns64']:.2f} %), "
              f"{context['ns8']['macs'] / 1e9:.2f} vs {context['ns64']['macs'] / 1e9:.2f} GMACs "
              f"(-{context['macs_reduction_percent_ns8_vs_ns64']:.2f} %).")
        print(f"The textSCF paper ({PAPER_CLAIM['source']}) claims -{PAPER_CLAIM['params_reduction_percent']} % "
              f"parameters and -{PAPER_CLAIM['operations_reduction_percent']} % operations. "
              f"{context['lapirn_note']}.")


# ----------------------------------------------------------------------------------------------------------------------
# the inference path vs the plain eager forward

INFERENCE_MODELS = {
    "reference": "reference head (authors' computation), N_s = 8, C1 = 768, CΦ = 2048, 36 regions, random weights",
    "bundled": "bundled abdomen model abdomen-ct-onehot-ns8.pt on its own grid, phantom pair",
}

# what is timed: label -> description
INFERENCE_RUNS = {
    "eager": "plain eager forward under torch.no_grad() (displacement + warped image)",
    "inference": "inference path, full output (displacement + warped image)",
    "field": "inference path, displacement only (what register() runs)",
    "contiguous": "inference path, full output, contiguous memory format instead of channels_last_3d (ablation)",
    "compiled": "inference path with its backbone under torch.compile (inductor, freezing, no FX graph cache), full "
                "output, after compilation; the first call's time (compilation) is shown separately (ablation)",
}


@dataclass
class InferenceRow:
    model: str
    shape: tuple[int, int, int]
    threads: int
    seconds: dict = field(default_factory=dict)  # run label -> list of seconds
    compile_first_call_seconds: float | None = None
    max_abs_displacement: float = 0.0
    max_diff_displacement: float = 0.0
    max_diff_warped: float = 0.0
    max_diff_compiled: float | None = None
    device: str = "cpu"
    gpu_peak_bytes: dict = field(default_factory=dict)  # run label -> peak CUDA memory allocated by one call

    def median(self, run: str) -> float | None:
        return statistics.median(self.seconds[run]) if self.seconds.get(run) else None

    def ratio(self, run: str) -> float | None:
        t, eager = self.median(run), self.median("eager")
        return eager / t if t and eager else None


def inference_model(name: str, shape_override=None):
    """``(net, inputs)`` for a model of :data:`INFERENCE_MODELS`: the network in eval mode and
    ``(moving, fixed, fixed_regions, confidence)``."""
    if name == "reference":
        spec = GEOMETRIES["oasis"]
        net = build_net("reference", 8, spec["regions"])
        net.initialise("kaiming", seed=0)
        net.head.init_output(0.05)
        moving, fixed, fixed_regions = make_inputs(shape_override or spec["shape"], spec["regions"], seed=1)
        return net.eval(), (moving, fixed, fixed_regions, None)
    if name == "bundled":
        from textscf.checkpoint import load_checkpoint
        from textscf.phantom import make_example_pair
        from textscf.presets import bundled_model_path
        from textscf.spatial import IntensityNormaliser, image_to_array

        net, _ = load_checkpoint(bundled_model_path())
        cfg = net.config
        pair = make_example_pair(seed=0, shape=shape_override or cfg.input_shape, spacing=cfg.spacing)
        normalise = IntensityNormaliser.from_config(cfg)
        lut = {value: index + 1 for index, value in enumerate(cfg.label_values)}
        labels = image_to_array(pair["fixed_labels"])
        regions = np.zeros(labels.shape, np.int64)
        for value, index in lut.items():
            regions[labels == value] = index

        def tensor(a, dtype=torch.float32):
            return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)[None, None]

        inputs = (tensor(normalise(image_to_array(pair["moving"]))), tensor(normalise(image_to_array(pair["fixed"]))),
                  tensor(regions, torch.long), torch.ones((1, 1, *regions.shape)))
        return net.eval(), inputs
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(INFERENCE_MODELS)}")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device = torch.device("cpu")) -> tuple[float, object]:
    """Wall-clock seconds of ``fn()`` and its result; on a GPU the queued kernels are waited for before and after."""
    _synchronize(device)
    start = time.perf_counter()
    out = fn()
    _synchronize(device)
    return time.perf_counter() - start, out


def _gpu_peak(fn, device: torch.device) -> int:
    """Peak CUDA memory allocated while ``fn()`` runs on the GPU ``device`` (bytes)."""
    _synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def compare_inference(name: str, threads_list: list[int], repeats: int, compile_too: bool,
                      shape_override=None, device: str = "cpu") -> list[InferenceRow]:
    """One row per thread count: every run of :data:`INFERENCE_RUNS` timed round-robin after an untimed warm-up.
    ``device``: where the networks and inputs live ("cpu" or "cuda"; on a GPU the thread count only sets the CPU
    side, and each row also records every run's peak GPU memory)."""
    from textscf.networks.inference import for_inference

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU here")
    net, inputs = inference_model(name, shape_override)
    net = net.to(device)
    inputs = tuple(None if t is None else t.to(device) for t in inputs)
    inference = for_inference(net)
    contiguous = for_inference(net, torch.contiguous_format)

    def eager():
        with torch.no_grad():
            return net(*inputs)

    runs = {"eager": eager, "inference": lambda: inference(*inputs), "field": lambda: inference.displacement(*inputs),
            "contiguous": lambda: contiguous(*inputs)}
    compiled_net, compile_seconds = None, None
    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        row = InferenceRow(name, tuple(inputs[0].shape[2:]), threads, {run: [] for run in runs}, device=str(device))
        outputs = {run: fn() for run, fn in runs.items()}  # warm-up (MONAI's grid caches, oneDNN primitives)
        if device.type == "cuda":
            row.gpu_peak_bytes = {run: _gpu_peak(fn, device) for run, fn in runs.items()}
        expected, ours = outputs["eager"], outputs["inference"]
        row.max_abs_displacement = float(expected.displacement.abs().max())
        row.max_diff_displacement = float(max((ours.displacement - expected.displacement).abs().max(),
                                              (outputs["field"][0] - expected.displacement).abs().max(),
                                              (outputs["contiguous"].displacement - expected.displacement).abs().max()))
        row.max_diff_warped = float((ours.warped - expected.warped).abs().max())
        if compile_too:
            import torch._inductor.config as inductor_config

            if compiled_net is None:
                # Only the backbone (all the convolutions) is compiled: MONAI's warp and grid caches make dynamo
                # break the graph and recompile on every call, which is slower than eager.
                compiled_net = for_inference(net)
                compiled_net.net.backbone = torch.compile(compiled_net.net.backbone)

            def compiled():
                with inductor_config.patch(freezing=True, fx_graph_cache=False):
                    return compiled_net(*inputs)

            seconds, out = _timed(compiled, device)
            if compile_seconds is None:
                compile_seconds = seconds
            row.compile_first_call_seconds = compile_seconds
            row.max_diff_compiled = float((out.displacement - expected.displacement).abs().max())
            runs["compiled"] = compiled
            row.seconds["compiled"] = []
        for _ in range(repeats):
            for run, fn in runs.items():
                row.seconds[run].append(_timed(fn, device)[0])
        print(f"  {name} {'x'.join(map(str, row.shape))} on {device}, {threads} threads: "
              f"eager {row.median('eager'):.2f} s, "
              f"inference path {row.median('inference'):.2f} s ({row.ratio('inference'):.2f}x)", flush=True)
        rows.append(row)
    return rows


def inference_table(rows: list[InferenceRow]) -> str:
    def cell(row: InferenceRow, run: str) -> str:
        t = row.median(run)
        return "—" if t is None else f"{t:.2f} ({row.ratio(run):.2f}x)"

    gpu = any(r.gpu_peak_bytes for r in rows)
    lines = ["| model | grid | device | threads | eager s | inference path s (x eager) | field only s (x eager) "
             "| contiguous format s (x eager) | torch.compile s (x eager) | max abs u | max diff u | max diff warped |"
             + (" peak GPU GiB eager / field only |" if gpu else ""),
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "")]
    for r in rows:
        compiled = cell(r, "compiled")
        if r.compile_first_call_seconds is not None:
            compiled += f", first call {r.compile_first_call_seconds:.0f}"
        line = (f"| {r.model} | {'x'.join(map(str, r.shape))} | {r.device} | {r.threads} | {r.median('eager'):.2f} | "
                f"{cell(r, 'inference')} | {cell(r, 'field')} | {cell(r, 'contiguous')} | {compiled} | "
                f"{r.max_abs_displacement:.3g} | {_max_diff(r):.2g} | {r.max_diff_warped:.2g} |")
        if gpu:
            peaks = r.gpu_peak_bytes
            line += (f" {peaks['eager'] / 2 ** 30:.2f} / {peaks['field'] / 2 ** 30:.2f} |" if peaks else " — |")
        lines.append(line)
    return "\n".join(lines)


def _max_diff(row: InferenceRow) -> float:
    return max(row.max_diff_displacement, row.max_diff_compiled or 0.0)


def inference_main(args) -> dict:
    """``--inference``: the inference path vs the eager forward (see the module docstring)."""
    models = [m.strip() for m in args.inference_models.split(",") if m.strip()]
    env = environment(torch.get_num_threads())
    started = time.perf_counter()
    print(f"# Inference path vs eager forward\n\nCPU: {env['cpu']} ({env['logical_cpus']} logical CPUs), torch "
          f"{env['torch']}, load average {env['load_average_1_5_15']} at start; device {args.device}"
          f"{' (' + env['gpu'] + ')' if args.device == 'cuda' and env['gpu'] else ''}; {args.repeats} timed runs per "
          "entry (median), round-robin.\n", flush=True)
    rows: list[InferenceRow] = []
    for name in models:
        rows.extend(compare_inference(name, args.inference_threads, args.repeats, args.compile, args.shape,
                                      args.device))
    table = inference_table(rows)
    print("\n" + table + "\n")
    for run, what in INFERENCE_RUNS.items():
        print(f"- `{run}`: {what}")
    for name in models:
        print(f"- model `{name}`: {INFERENCE_MODELS[name]}")
    print("Times are medians in seconds; (x eager) = eager time / this time. Differences are max |ours - eager| in "
          "voxels (displacement u) and intensity in [0, 1] (warped), over every inference run.")
    elapsed = time.perf_counter() - started
    env["load_average_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\nTotal {elapsed:.0f} s; load average at end {env['load_average_1_5_15_at_end']}.")
    result = {"environment": env, "runs": INFERENCE_RUNS, "models": {m: INFERENCE_MODELS[m] for m in models},
              "rows": [dict(asdict(r), median_seconds={k: r.median(k) for k in r.seconds},
                            ratio_to_eager={k: r.ratio(k) for k in r.seconds}) for r in rows],
              "markdown": table, "seconds_total": round(elapsed, 1)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"Wrote {args.json}")
    return result


if __name__ == "__main__":
    main()

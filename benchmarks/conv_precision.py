"""Float32 against bfloat16 convolution on this CPU, for the inference path's largest layers, side by side in one run.

The inference path (``textscf.networks.inference``) must match the training forward to 1e-4. This script measures
whether the CPU's bfloat16 units (AMX / AVX512-BF16, used by oneDNN) could speed up its convolutions within that
tolerance. For each layer it times, median of ``--repeats`` after a warm-up, on random unit-scale data in the
``channels_last_3d`` format the inference path uses:

- ``float32``: the plain convolution (what the inference path runs);
- ``bf16 math``: the same call with ``torch.backends.mkldnn.conv.fp32_precision = "bf16"`` (oneDNN rounds inputs and
  weights to bfloat16 and accumulates in float32);
- ``bf16 x3``: float32 accuracy from three bfloat16 products, ``x_hi w_hi + x_hi w_lo + x_lo w_hi`` with
  ``x = x_hi + x_lo``, run as one convolution over three times the input channels in bf16 math (the input split
  included in the time).

and the largest error of each against a float64 convolution.

Usage::

    python benchmarks/conv_precision.py --threads 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

# (name, channels, grid, kernel): the costliest layers of the N_s = 8 network on the OASIS grid 160 x 192 x 224
LAYERS = (
    ("decoder 3^3, 32 -> 32, half resolution", 32, (80, 96, 112), 3),
    ("folded large kernel 5^3, 16 -> 16, half resolution", 16, (80, 96, 112), 5),
    ("encoder 3^3, 8 -> 8, full resolution", 8, (160, 192, 224), 3),
)


def _split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t = hi + lo`` to about 16 significant bits, both exactly representable in bfloat16 (held as float32)."""
    hi = t.to(torch.bfloat16).float()
    return hi, (t - hi).to(torch.bfloat16).float()


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(channels: int, grid, kernel: int, repeats: int, seed: int = 0) -> dict:
    """Seconds and largest error against float64 of the three variants for one layer."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, channels, *grid, generator=g).contiguous(memory_format=torch.channels_last_3d)
    w = (torch.randn(channels, channels, kernel, kernel, kernel, generator=g) / (channels * kernel ** 3) ** 0.5)
    w = w.contiguous(memory_format=torch.channels_last_3d)
    b = torch.randn(channels, generator=g)
    pad = kernel // 2
    exact = F.conv3d(x.double(), w.double(), b.double(), padding=pad)
    w_hi, w_lo = _split(w)
    w3 = torch.cat((w_hi, w_lo, w_hi), 1).contiguous(memory_format=torch.channels_last_3d)

    def float32():
        return F.conv3d(x, w, b, padding=pad)

    def bf16x3():
        x_hi, x_lo = _split(x)
        x3 = torch.cat((x_hi, x_hi, x_lo), 1).contiguous(memory_format=torch.channels_last_3d)
        return F.conv3d(x3, w3, b, padding=pad)

    setting = torch.backends.mkldnn.conv.fp32_precision
    result = {}
    try:
        with torch.inference_mode():
            for name, fn, precision in (("float32", float32, "ieee"), ("bf16 math", float32, "bf16"),
                                        ("bf16 x3", bf16x3, "bf16")):
                torch.backends.mkldnn.conv.fp32_precision = precision
                error = float((fn().double() - exact).abs().max())
                result[name] = {"seconds": _median_seconds(fn, repeats), "max_error": error}
    finally:
        torch.backends.mkldnn.conv.fp32_precision = setting
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median)")
    p.add_argument("--scale", type=float, default=1.0, help="grid scale (e.g. 0.25 for a quick check)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    units = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 units: {', '.join(units) or 'none'}\n")
    print("| layer | grid | float32 s | bf16 math s (error) | bf16 x3 s (error) | float32 error |")
    print("|---|---|---:|---:|---:|---:|")
    rows = []
    for name, channels, grid, kernel in LAYERS:
        grid = tuple(max(16, int(round(s * args.scale))) for s in grid)
        r = measure(channels, grid, kernel, args.repeats)
        rows.append({"layer": name, "grid": grid, **r})
        print(f"| {name} | {'x'.join(map(str, grid))} | {r['float32']['seconds']:.3f} | "
              f"{r['bf16 math']['seconds']:.3f} ({r['bf16 math']['max_error']:.1e}) | "
              f"{r['bf16 x3']['seconds']:.3f} ({r['bf16 x3']['max_error']:.1e}) | {r['float32']['max_error']:.1e} |",
              flush=True)
    return rows


if __name__ == "__main__":
    main()

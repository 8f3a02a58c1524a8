"""Start-up time of the ``textscf`` command line: the median wall time of ``textscf --help`` over N runs.

Every run is a fresh process (the installed ``textscf`` entry point when it is on the PATH, else
``python -m textscf.cli``), so the number is what a user waits for before argparse answers: the interpreter, the
imports of :mod:`textscf.cli` and the building of every sub-command's parser. ``--help`` must not import torch
(issue 12: it took about 10 s when the CLI imported torch through the training module); the row also says whether
torch was imported, measured in a separate child that builds the parser and looks at ``sys.modules``.

Usage::

    python benchmarks/cli_startup.py                 # median of 5 runs, a Markdown row
    python benchmarks/cli_startup.py --runs 9 --json out.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time

TARGET_SECONDS = 1.0


def help_command() -> list[str]:
    """The command a user types: the entry point when installed, else the module."""
    entry = shutil.which("textscf")
    return [entry, "--help"] if entry else [sys.executable, "-m", "textscf.cli", "--help"]


def time_once(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {done.returncode}: {done.stderr[-2000:]}")
    return seconds


def parser_imports_torch() -> bool:
    """Whether building the whole parser (what --help does) imports torch."""
    probe = "import sys, textscf.cli as c; c.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return out.strip() == "True"


def measure(runs: int = 5) -> dict:
    command = help_command()
    times = [time_once(command) for _ in range(runs)]
    median = statistics.median(times)
    return {"command": " ".join(command), "runs": runs, "seconds": [round(t, 3) for t in times],
            "median_seconds": round(median, 3), "target_seconds": TARGET_SECONDS,
            "ratio_to_target": round(median / TARGET_SECONDS, 3), "imports_torch": parser_imports_torch()}


def markdown_row(row: dict) -> str:
    header = "| command | runs | median s | min s | max s | median / 1 s target | imports torch |\n|---|---:|---:|---:|---:|---:|---|"
    return (f"{header}\n| `textscf --help` | {row['runs']} | {row['median_seconds']:.3f} | {min(row['seconds']):.3f} | "
            f"{max(row['seconds']):.3f} | {row['ratio_to_target']:.2f} | {'yes' if row['imports_torch'] else 'no'} |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes to time (default 5)")
    parser.add_argument("--json", help="also write the row as JSON to this file")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    row = measure(args.runs)
    print(markdown_row(row))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(row, f, indent=2)
    return row


if __name__ == "__main__":
    main()

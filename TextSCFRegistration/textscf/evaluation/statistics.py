"""An evaluation's numbers: the per-region and per-pair rows of one registration, and their summaries."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from textscf.errors import InputError

PER_REGION_COLUMNS = ("pair", "region", "dice", "hd95_mm", "dice_before", "hd95_mm_before")

PER_PAIR_COLUMNS = (
    "pair", "fixed", "moving", "mean_dice_before", "mean_dice_initial_alignment", "mean_dice", "mean_dice_before_in_both",
    "mean_dice_in_both", "mean_hd95_mm_before", "mean_hd95_mm", "sdlogj", "folding_percent", "jacobian_min", "seconds", "seconds_network", "device",
)

TEXT_COLUMNS = frozenset({"pair", "region", "fixed", "moving", "device", "method"})


def as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan

def rows_from_result(name: str, result, seconds: float | None = None, fixed: str = "", moving: str = ""
                     ) -> tuple[list[dict], dict]:
    """Per-region rows and the per-pair row of one :class:`~textscf.results.RegistrationResult`.

    ``result.stats`` must come from a registration with both label maps for the Dice / HD95 numbers (else they
    are NaN and there are no region rows). ``seconds``: the wall time to report (default: the pipeline's total).
    """
    stats = result.stats
    dice, hd = stats.get("dice") or {}, stats.get("hd95_mm") or {}
    dice_before, hd_before = stats.get("dice_before") or {}, stats.get("hd95_mm_before") or {}
    regions = list(dice) or list(dice_before)
    region_rows = [
        {"pair": name, "region": region, "dice": as_float(dice.get(region)), "hd95_mm": as_float(hd.get(region)),
         "dice_before": as_float(dice_before.get(region)), "hd95_mm_before": as_float(hd_before.get(region))}
        for region in regions
    ]
    pair_row = {
        "pair": name, "fixed": fixed, "moving": moving,
        "mean_dice_before": as_float(stats.get("mean_dice_before")),
        "mean_dice_initial_alignment": as_float(stats.get("mean_dice_initial_alignment")),
        "mean_dice": as_float(stats.get("mean_dice")),
        "mean_dice_before_in_both": as_float(stats.get("mean_dice_before_in_both")),
        "mean_dice_in_both": as_float(stats.get("mean_dice_in_both")),
        "mean_hd95_mm_before": as_float(stats.get("mean_hd95_mm_before")),
        "mean_hd95_mm": as_float(stats.get("mean_hd95_mm")),
        "sdlogj": as_float(stats.get("sdlogj")), "folding_percent": as_float(stats.get("folding_percent")),
        "jacobian_min": as_float(stats.get("jacobian_min")),
        "seconds": as_float(seconds if seconds is not None else stats.get("seconds_total")),
        "seconds_network": as_float((stats.get("seconds_per_stage") or {}).get("register")),
        "device": str(stats.get("device", "")),
    }
    return region_rows, pair_row

def _stats(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray([as_float(v) for v in values], dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    n = int(arr.size)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {
        "mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if n > 1 else math.nan,
        "median": float(np.median(arr)), "min": float(arr.min()), "max": float(arr.max()), "n": n,
    }

def _numeric_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key in columns or key in TEXT_COLUMNS or isinstance(value, (str, bool)) or value is None:
                continue
            if isinstance(value, (int, float, np.floating, np.integer)):
                columns.append(key)
    return columns

def summarise(rows: Iterable[Mapping[str, Any]], by: str | None = None,
              columns: Sequence[str] | None = None) -> dict:
    """Mean, sample standard deviation (``ddof=1``; NaN for one value), median, min, max and count of every
    numeric column, ignoring NaN.

    Args:
        rows: per-pair or per-region rows (dicts), e.g. ``EvaluationResult.per_pair``.
        by: None for one summary over all rows (``{column: stats}``); a column name (``"region"``) for one
            summary per value of that column, in order of first appearance (``{value: {column: stats}}``).
        columns: the columns to summarise; None = every numeric one.
    """
    rows = list(rows)
    cols = list(columns) if columns is not None else _numeric_columns(rows)
    if by is None:
        return {c: _stats([r.get(c, math.nan) for r in rows]) for c in cols}
    groups: dict[str, list] = {}
    for row in rows:
        if by not in row:
            raise InputError(f"a row has no {by!r} column to group by; its columns are {', '.join(row)}")
        groups.setdefault(str(row[by]), []).append(row)
    return {key: {c: _stats([r.get(c, math.nan) for r in group]) for c in cols} for key, group in groups.items()}

def before_summary(pair_summary: Mapping[str, Mapping[str, float]]) -> dict:
    """The "before registration" entry of a per-pair summary (its ``*_before`` columns under the plain names)."""
    return {"mean_dice": pair_summary.get("mean_dice_before"),
            "mean_dice_in_both": pair_summary.get("mean_dice_before_in_both"),
            "mean_hd95_mm": pair_summary.get("mean_hd95_mm_before")}


def evaluation_summary(per_pair: Sequence[Mapping[str, Any]], per_region: Sequence[Mapping[str, Any]]) -> dict:
    """``{"pairs": summary of the per-pair rows, "regions": summary of the per-region rows by region}``: the
    numbers ``summary.md`` shows and :class:`textscf.evaluate.EvaluationResult` carries, computed once."""
    return {"pairs": summarise(per_pair, columns=[c for c in PER_PAIR_COLUMNS if c not in TEXT_COLUMNS]),
            "regions": summarise(per_region, by="region", columns=list(PER_REGION_COLUMNS[2:]))}

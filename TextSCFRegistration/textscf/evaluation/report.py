"""An evaluation's reports: CSV rows, Markdown tables, ``summary.md`` and the Dice box plot."""
from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from textscf.errors import InputError
from textscf.evaluation.statistics import TEXT_COLUMNS, as_float, before_summary

BEFORE_NAME = "before registration"


def format_mean_std(stats: Mapping[str, float] | None, scale: float = 1.0, digits: int = 2) -> str:
    """``"mean ± std"`` of a :func:`summarise` entry times ``scale``; ``"–"`` when there is no value."""
    if not stats or not stats.get("n") or math.isnan(stats.get("mean", math.nan)):
        return "–"
    mean = stats["mean"] * scale
    std = stats.get("std", math.nan)
    if std is None or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std * scale:.{digits}f}"

def _cell(value: Any, digits: int) -> str:
    if isinstance(value, (float, np.floating)):
        return "–" if math.isnan(value) else f"{float(value):.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")

def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 2) -> str:
    """A GitHub Markdown table; float cells get ``digits`` decimals (NaN shows as ``–``), text is escaped."""
    columns = [_cell(c, digits) for c in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] * len(columns)) + "|"]
    for row in rows:
        cells = [_cell(v, digits) for v in row]
        if len(cells) != len(columns):
            raise InputError(f"a table row has {len(cells)} cells for {len(columns)} columns")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

METHOD_TABLE_COLUMNS = (
    ("Dice (%)", "mean_dice", 100.0, 2), ("Dice, regions in both (%)", "mean_dice_in_both", 100.0, 2),
    ("HD95 (mm)", "mean_hd95_mm", 1.0, 2), ("SDlogJ", "sdlogj", 1.0, 3),
    ("|J| ≤ 0 (%)", "folding_percent", 1.0, 3), ("time (s)", "seconds", 1.0, 2),
)

def methods_table(summaries: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """Markdown table, one row per method: Dice (%), HD95 (mm), SDlogJ, % |J| <= 0 and time, mean ± std over pairs.

    ``summaries``: method name -> :func:`summarise` of its per-pair rows (add ``before_summary(...)`` under
    ``"before registration"`` for the initial row).
    """
    rows = []
    for method, summary in summaries.items():
        n = max((s.get("n", 0) for s in summary.values() if s), default=0)
        rows.append([method, str(n)] + [format_mean_std(summary.get(key), scale, digits)
                                        for _, key, scale, digits in METHOD_TABLE_COLUMNS])
    return markdown_table(["method", "pairs"] + [title for title, *_ in METHOD_TABLE_COLUMNS], rows)

def regions_table(region_summary: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """Markdown table, one row per region: Dice and HD95 before and after, mean ± std over pairs."""
    rows = []
    for region, s in region_summary.items():
        rows.append([region, str(s.get("dice", {}).get("n", 0)),
                     format_mean_std(s.get("dice_before"), 100.0), format_mean_std(s.get("dice"), 100.0),
                     format_mean_std(s.get("hd95_mm_before")), format_mean_std(s.get("hd95_mm"))])
    return markdown_table(["region", "pairs", "Dice before (%)", "Dice (%)", "HD95 before (mm)", "HD95 (mm)"], rows)

def rows_to_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """CSV text with a header; floats at full precision, NaN as ``nan``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([repr(float(v)) if isinstance(v, (float, np.floating)) else v
                         for v in (row.get(c, "") for c in columns)])
    return buffer.getvalue()

def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a ``per_region.csv`` / ``per_pair.csv`` written here, numbers as floats (``nan`` included)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"results CSV not found: '{path}'. Fix: give the per_region.csv or per_pair.csv of an "
                         "evaluation folder")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        out.append({k: (v if k in TEXT_COLUMNS else as_float(v) if v != "" else math.nan) for k, v in row.items()})
    return out

def dice_boxplot(results_by_method: Mapping[str, Sequence[Mapping[str, Any]]], path,
                 title: str | None = None, value: str = "dice") -> Path | Any:
    """Box plot of Dice per region, methods side by side (the textSCF paper's Figure 3 kind of plot).

    Args:
        results_by_method: method name -> its per-region rows (``region`` and ``value`` keys), in legend order.
            Regions appear in order of first appearance; NaN values are left out.
        path: PNG path (or a writable binary file object).
        title: figure title.
        value: the row key to plot (``"dice"``; ``"dice_before"`` for the unregistered overlap).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    methods = list(results_by_method)
    regions: list[str] = []
    data: dict[tuple[str, str], list[float]] = {}
    for method in methods:
        for row in results_by_method[method]:
            region = str(row["region"])
            if region not in regions:
                regions.append(region)
            v = as_float(row.get(value))
            if not math.isnan(v):
                data.setdefault((method, region), []).append(v)
    n_methods = max(len(methods), 1)
    width = 0.8 / n_methods
    fig = Figure(figsize=(max(6.0, len(regions) * (0.18 * n_methods + 0.25) + 1.5), 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colours = [f"C{i % 10}" for i in range(n_methods)]
    for m, method in enumerate(methods):
        positions, values = [], []
        for r, region in enumerate(regions):
            if (method, region) in data:
                positions.append(r + (m - (n_methods - 1) / 2) * width)
                values.append(data[(method, region)])
        if values:
            boxes = ax.boxplot(values, positions=positions, widths=width * 0.85, patch_artist=True,
                               showfliers=True, flierprops={"markersize": 2})
            for patch in boxes["boxes"]:
                patch.set_facecolor(colours[m])
                patch.set_alpha(0.75)
            for median in boxes["medians"]:
                median.set_color("black")
    if not data:
        ax.text(0.5, 0.5, "no Dice values: the pairs have no label maps", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xticks(range(len(regions)))
    ax.set_xticklabels(regions, rotation=40, ha="right", fontsize=8)
    ax.set_xlim(-0.6, max(len(regions), 1) - 0.4)
    ax.set_ylim(0.0, 1.02)
    ax.set_ylabel("Dice")
    ax.grid(axis="y", alpha=0.3)
    if methods:  # above the axes, so that it never hides a box
        ax.legend(handles=[Patch(facecolor=colours[m], alpha=0.75, label=method) for m, method in enumerate(methods)],
                  loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(n_methods, 4), fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=10, pad=22 if methods else 6)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path

def summary_markdown(method_name: str, per_pair: Sequence[Mapping], summary: Mapping[str, Any],
                     notes: Sequence[str] = (), settings: Mapping[str, Any] | None = None) -> str:
    """The text of ``summary.md``: settings, notes, the method table (with the unregistered row), per region and per
    pair. ``summary``: :func:`textscf.evaluation.statistics.evaluation_summary` of the rows."""
    pair_summary, region_summary = summary["pairs"], summary["regions"]
    lines = [f"# Evaluation: {method_name}", ""]
    lines.append(f"{len(per_pair)} pair(s). Mean ± sample standard deviation (ddof = 1) over the pairs; Dice in %, "
                 "HD95 in mm (per region, then averaged over the regions of a pair), SDlogJ and % |J| ≤ 0 of the "
                 "deformable field on the fixed grid (Learn2Reg's SDlogJ: 2-voxel border dropped), wall time of the "
                 "registration including model loading.")
    lines.append("")
    for note in notes:
        lines += [f"> **Note:** {note}", ""]
    if settings:
        lines += ["Settings: " + ", ".join(f"{k} = {v}" for k, v in settings.items() if v is not None), ""]
    lines += ["## Over pairs", "",
              "Dice averages every region present in either label map (a region in only one map scores 0); "
              "\"regions in both\" averages only the regions present in both scans (the Learn2Reg convention).", ""]
    lines.append(methods_table({BEFORE_NAME: before_summary(pair_summary), method_name: pair_summary}))
    if region_summary:
        lines += ["## Per region", "", regions_table(region_summary)]
    lines += ["## Per pair", ""]
    lines.append(markdown_table(
        ["pair", "Dice before (%)", "Dice (%)", "HD95 (mm)", "SDlogJ", "|J| ≤ 0 (%)", "time (s)", "device"],
        [[r["pair"], 100 * as_float(r["mean_dice_before"]), 100 * as_float(r["mean_dice"]), as_float(r["mean_hd95_mm"]),
          _cell(as_float(r["sdlogj"]), 3), _cell(as_float(r["folding_percent"]), 3), as_float(r["seconds"]),
          r.get("device", "")]
         for r in per_pair],
    ))
    return "\n".join(lines)

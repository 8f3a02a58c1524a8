"""Writing a registration's outputs to a folder: all files appear together, or none do."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from textscf.io import OutputFolder
from textscf.results import RegistrationResult

FIELD_FORMATS = ("nii.gz", "h5", "nrrd", "mha")


def output_names(field_format: str = "nii.gz", warped_labels: bool = False, qc: bool = True,
                 initial_transform: bool = False) -> list[str]:
    """The files :func:`write_outputs` writes, so existing ones can be refused before any work."""
    if field_format not in FIELD_FORMATS:
        from textscf.errors import OutputError

        raise OutputError(f"unknown displacement format {field_format!r}; choose one of {', '.join(FIELD_FORMATS)}")
    names = [f"displacement.{field_format}", "warped.nii.gz", "jacobian.nii.gz", "report.json"]
    if warped_labels:
        names.append("warped_labels.nii.gz")
    if initial_transform:
        names.append("initial_transform.tfm")
    if qc:
        names.append("qc.png")
    return names


def all_output_names() -> list[str]:
    """Every name :func:`write_outputs` may write, whatever the options (a folder's files from an older run)."""
    names = [f"displacement.{f}" for f in FIELD_FORMATS]
    return names + [n for n in output_names("nii.gz", True, True, True) if n not in names]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item"):
        return _json_safe(value.item())
    return value


def report_dict(result: RegistrationResult, inputs: dict[str, Any], prompts: list[str], files: list[str]) -> dict:
    """The JSON report: inputs, prompts, device, timings, field statistics and per-region metrics."""
    return _json_safe({
        "inputs": inputs,
        "prompts": prompts,
        "outputs": files,
        "conventions": "displacement: ITK displacement field, LPS mm, resampling convention (fixed point x maps "
                       "to moving point x + d(x)), composed with the initial alignment",
        **result.stats,
    })


def write_outputs(out: OutputFolder, result: RegistrationResult, fixed: sitk.Image, moving: sitk.Image,
                  inputs: dict[str, Any], field_format: str = "nii.gz", qc: bool = True,
                  fixed_labels: sitk.Image | None = None, modality: str = "ct") -> list[Path]:
    """Write every output into an entered :class:`OutputFolder`; they appear when its block ends."""
    names = output_names(field_format, result.warped_labels is not None, qc, result.initial_transform is not None)
    out.write_displacement(result.displacement, names[0])
    out.write_image(result.warped, "warped.nii.gz")
    out.write_image(result.jacobian, "jacobian.nii.gz")
    if result.warped_labels is not None:
        out.write_image(result.warped_labels, "warped_labels.nii.gz")
    if result.initial_transform is not None:
        out.write_transform(result.initial_transform, "initial_transform.tfm")
    if qc:
        from textscf.qc import render_qc_figure

        render_qc_figure(fixed, moving, result, out.temp_path("qc.png"), fixed_labels=fixed_labels,
                         modality=modality, title="TextSCF registration")
    report = report_dict(result, inputs, result.region_names[1:], names)
    out.write_text("report.json", json.dumps(report, indent=2))
    return [out.final_path(n) for n in names]

"""The engine as a process of its own: ``python -m textscf.worker JOB.json``.

The 3D Slicer module runs every registration through this (as SlicerTotalSegmentator and SlicerMONAIAuto3DSeg run
their engines), so that a crash or an out-of-memory in torch or ITK ends this process, never Slicer and its scene,
and Cancel can stop any stage by ending the process. No Slicer dependency.

The job file (JSON; paths relative to the job file's folder)::

    {"fixed": "fixed.nrrd", "moving": "moving.nrrd",          # scalar images (any format SimpleITK reads)
     "fixed_labels": null, "moving_labels": null,             # label maps (the regions' label values), optional
     "initial_transform": null,                               # an ITK transform file, optional
     "options": {...},                                        # textscf.pipeline.RegistrationOptions fields
     "segment": null,                                         # or {"images": ["fixed", "moving"], "settings": {...},
                                                              #     "region_names": [...], "label_values": [...]}:
                                                              # segment with options.segmentor_weights (SwinUNETR)
     "output": "output"}                                      # folder to create (must not exist)

Standard output carries only JSON lines (everything else the engine prints goes to standard error)::

    {"stage": "register", "fraction": 0.42, "seconds_left": 12.5}   # fraction of the whole job, never decreasing
    {"log": "schedule: ..."}                                        # lines for the user
    {"warning": "...", "category": "UserWarning"}
    {"error": "...", "type": "InputError"}                          # the last line when the job fails

Outputs (written into ``<output>.partial`` and renamed to ``<output>`` when complete, so a folder named ``output``
is always whole): ``displacement.nrrd`` (ITK displacement field, float32 3-vectors, LPS mm, resampling convention),
``warped.nrrd``, ``jacobian.nrrd``, ``warped_labels.nrrd`` (with moving labels), ``fixed_labels.nrrd`` /
``moving_labels.nrrd`` (automatic segmentations), ``result.json`` (``stats``, ``region_names``, ``files``), all raw
(uncompressed) NRRD on the fixed grid except the segmentations, on their image's grid.

Exit status: 0 done, 1 unexpected error (the message says what happened), 2 bad input (a ``TextSCFError``: the
message says what to fix), 3 cancelled (Ctrl-C, or the process that started it is gone). Killed by a signal (the
caller's Cancel, or the system when memory runs out): no output folder.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import warnings
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_CANCELLED = 0, 1, 2, 3


class Channel:
    """The JSON-lines channel to the caller, on the process's original standard output.

    Standard output itself is redirected to standard error, so that whatever else the engine or a native library
    prints never mixes with these lines; each line is written whole, with one ``write``.
    """

    def __init__(self):
        sys.stdout.flush()
        self._fd = os.dup(1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        self._last_fraction = 0.0

    def send(self, **message) -> None:
        line = json.dumps(message, allow_nan=False, default=str) + "\n"
        os.write(self._fd, line.encode("utf-8"))

    def progress(self, stage: str, fraction: float, seconds_left: float | None = None) -> None:
        self._last_fraction = max(self._last_fraction, min(1.0, max(0.0, float(fraction))))
        known = seconds_left is not None and math.isfinite(float(seconds_left))
        self.send(stage=stage, fraction=round(self._last_fraction, 6),
                  seconds_left=round(float(seconds_left), 1) if known else None)


def read_job(path: str | os.PathLike) -> tuple[dict, Path]:
    """The job's settings and its folder; InputError when the file is not a job."""
    from textscf.errors import InputError

    path = Path(path)
    try:
        job = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the job file {path}: {exc}") from exc
    for key in ("fixed", "moving", "output"):
        if not job.get(key):
            raise InputError(f"the job file {path} names no '{key}'")
    return job, path.parent


def read_image(folder: Path, name: str | None, role: str):
    """An input image of the job, or None; InputError when it cannot be read (a truncated or corrupt file)."""
    import SimpleITK as sitk

    from textscf.errors import InputError

    if not name:
        return None
    path = folder / name
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), str(exc))
        raise InputError(f"cannot read the {role} ({path.name}): {first.strip()}") from exc


def read_transform(folder: Path, name: str | None):
    import SimpleITK as sitk

    if not name:
        return None
    transform = sitk.ReadTransform(str(folder / name))
    if isinstance(transform, sitk.CompositeTransform) and transform.GetNumberOfTransforms() == 1:
        transform = transform.GetNthTransform(0)
    return transform.Downcast() if hasattr(transform, "Downcast") else transform


def segment_images(images, segment: dict, options, progress) -> list:
    """Segment images with SwinUNETR (MONAI's BTCV classes, ``options.segmentor_weights``); one label map per image,
    with the regions' values.

    Each class named as a region (aliases resolved) gets the region's label value (``segment["label_values"]``),
    other classes are background, regions the network does not segment stay empty. ``segment["settings"]``: more
    keyword arguments of ``SwinUNETRSegmentor`` (roi_size, target_spacing, overlap, ...).
    """
    import numpy as np
    import SimpleITK as sitk

    from textscf.pipeline import select_device
    from textscf.presets import same_region
    from textscf.segmentation import SwinUNETRSegmentor, btcv_bundle_region_names

    classes = btcv_bundle_region_names()
    lookup = np.zeros(len(classes) + 1, np.int32)
    for index, class_name in enumerate(classes, start=1):
        for name, value in zip(segment["region_names"], segment["label_values"]):
            if same_region(name, class_name):
                lookup[index] = int(value)
    device, _note = select_device(options.device)
    segmentor = SwinUNETRSegmentor(options.segmentor_weights, classes, feature_size=options.segmentor_feature_size,
                                   device=str(device), **dict(segment.get("settings") or {}))
    labels = []
    for number, (role, image) in enumerate(images):
        progress(f"Segmenting the {role} image", number / len(images))
        segmentation = segmentor.predict(image)
        label_image = sitk.GetImageFromArray(lookup[sitk.GetArrayViewFromImage(segmentation.regions)])
        label_image.CopyInformation(image)
        labels.append(label_image)
    return labels


def write_outputs(folder: Path, result, segmentations: dict, channel: Channel) -> None:
    """Write the result into ``folder`` (created here), ``result.json`` last."""
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    files = {}

    def write(image, name):
        sitk.WriteImage(image, str(folder / f"{name}.nrrd"), False)
        files[name] = f"{name}.nrrd"

    # float32 halves what the caller holds (a 512 x 512 x 300 field: 0.9 instead of 1.9 GB); the error (< 1e-5 mm
    # for displacements under 100 mm) is far below any voxel.
    displacement = result.displacement
    if displacement.GetPixelID() != sitk.sitkVectorFloat32:
        displacement = sitk.Cast(displacement, sitk.sitkVectorFloat32)
    write(displacement, "displacement")
    channel.progress("Writing the results", 0.97)
    write(result.warped, "warped")
    write(result.jacobian, "jacobian")
    if result.warped_labels is not None:
        write(result.warped_labels, "warped_labels")
    for role, image in segmentations.items():
        write(image, f"{role}_labels")
    summary = {"stats": result.stats, "region_names": list(result.region_names), "files": files}
    (folder / "result.json").write_text(json.dumps(summary, indent=1, default=_plain), encoding="utf-8")


def _plain(value):
    """JSON for what ``json`` does not know: numpy numbers and arrays as numbers and lists, anything else as text."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def run(job_path: str | os.PathLike, channel: Channel) -> None:
    """Run the job: read the inputs, segment (when asked), register, write the outputs."""
    from textscf.pipeline import RegistrationOptions, register

    job, folder = read_job(job_path)
    output = folder / job["output"]
    partial = output.with_name(output.name + ".partial")
    channel.progress("Reading inputs", 0.0)
    fixed = read_image(folder, job["fixed"], "fixed image")
    moving = read_image(folder, job["moving"], "moving image")
    fixed_labels = read_image(folder, job.get("fixed_labels"), "fixed label map")
    moving_labels = read_image(folder, job.get("moving_labels"), "moving label map")
    initial = read_transform(folder, job.get("initial_transform"))
    options = RegistrationOptions(**(job.get("options") or {}))

    segmentations, start = {}, 0.0
    segment = job.get("segment")
    if segment:
        start = 0.1
        images = [(role, {"fixed": fixed, "moving": moving}[role]) for role in segment["images"]]
        labels = segment_images(images, segment, options, lambda stage, f: channel.progress(stage, start * f))
        segmentations = dict(zip(segment["images"], labels))
        fixed_labels = segmentations.get("fixed", fixed_labels)
        moving_labels = segmentations.get("moving", moving_labels)

    result = register(fixed, moving, options, fixed_labels=fixed_labels, moving_labels=moving_labels,
                      initial_transform=initial,
                      progress=lambda stage, f, left: channel.progress(stage, start + (0.95 - start) * f, left),
                      log=lambda line: channel.send(log=str(line)))
    channel.progress("Writing the results", 0.95)
    shutil.rmtree(partial, ignore_errors=True)
    write_outputs(partial, result, segmentations, channel)
    os.replace(partial, output)
    channel.progress("Done", 1.0)


def exit_with_parent(interval: float = 0.5) -> None:
    """End this process when the one that started it is gone (Slicer closed or crashed): a registration nobody waits
    for must not hold gigabytes. POSIX only (there an orphan is adopted by another process and its parent ID
    changes)."""
    if os.name != "posix":
        return
    import threading
    import time

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(EXIT_CANCELLED)

    threading.Thread(target=watch, name="textscf worker parent watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    from textscf.errors import CancelledError, TextSCFError

    argv = sys.argv[1:] if argv is None else argv
    exit_with_parent()
    channel = Channel()

    def show_warning(message, category, filename, lineno, file=None, line=None):
        channel.send(warning=str(message), category=getattr(category, "__name__", "UserWarning"))

    warnings.showwarning = show_warning
    if len(argv) != 1:
        channel.send(error="usage: python -m textscf.worker JOB.json", type="UsageError")
        return EXIT_BAD_INPUT
    try:
        run(argv[0], channel)
        return EXIT_OK
    except (CancelledError, KeyboardInterrupt):
        channel.send(error="cancelled", type="CancelledError")
        return EXIT_CANCELLED
    except TextSCFError as exc:
        channel.send(error=str(exc), type=type(exc).__name__)
        return EXIT_BAD_INPUT
    except MemoryError:
        channel.send(error="out of memory", type="MemoryError")
        return EXIT_ERROR
    except Exception as exc:  # the caller shows it; the traceback goes to standard error
        import traceback

        traceback.print_exc()
        channel.send(error=f"{type(exc).__name__}: {exc}", type=type(exc).__name__)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

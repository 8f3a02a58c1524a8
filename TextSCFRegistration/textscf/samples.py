"""3D Slicer's public sample volumes for the online demo (``textscf demo --sample NAME``).

:func:`fetch_sample` downloads a volume once into the textscf cache (``$TEXTSCF_CACHE/samples`` or
``~/.cache/textscf/samples``) and checks its SHA-256; :func:`make_sample_pair` turns one CT into a registration pair
with a known deformation, so the demo can report the endpoint error.
"""
from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from textscf.errors import CheckpointError, InputError, OutputError
from textscf.files import replace_atomically, sha256_of, verify_sha256

__all__ = [
    "SlicerSample",
    "SLICER_SAMPLES",
    "default_samples_directory",
    "sample_path",
    "fetch_sample",
    "make_sample_pair",
]

_SLICER_TESTING_DATA = "https://github.com/Slicer/SlicerTestingData/releases/download/SHA256/"
_DOWNLOAD_TIMEOUT_S = 60.0  # per socket operation, not for the whole file


@dataclass(frozen=True)
class SlicerSample:
    """One volume of 3D Slicer's SampleData module (Modules/Scripted/SampleData/SampleData.py)."""

    file_name: str
    sha256: str  # hex, of the file as downloaded
    url: str
    description: str
    licence: str
    size_mb: float


SLICER_SAMPLES: dict[str, SlicerSample] = {
    "CTLiver": SlicerSample(
        file_name="CTLiver.nrrd",
        sha256="e16eae0ae6fefa858c5c11e58f0f1bb81834d81b7102e021571056324ef6f37e",
        url=_SLICER_TESTING_DATA + "e16eae0ae6fefa858c5c11e58f0f1bb81834d81b7102e021571056324ef6f37e",
        description="abdominal CT, Medical Segmentation Decathlon Task03_Liver imagesTr/liver_100.nii.gz "
                    "(3D Slicer SampleData 'CTLiver'; no organ label map)",
        licence="CC BY-SA 4.0",
        size_mb=35.0,
    ),
}


def _sample(name: str) -> SlicerSample:
    try:
        return SLICER_SAMPLES[name]
    except (KeyError, TypeError):
        raise InputError(
            f"unknown sample {name!r}. Fix: use one of {', '.join(sorted(SLICER_SAMPLES))}."
        ) from None


def default_samples_directory() -> Path:
    """``$TEXTSCF_CACHE/samples`` when TEXTSCF_CACHE is set, else ``~/.cache/textscf/samples``."""
    from textscf.text import default_cache_directory

    return default_cache_directory().parent / "samples"


def sample_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`fetch_sample` keeps sample ``name`` (whether or not it is there yet)."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_samples_directory()
    return folder / _sample(name).file_name


def _is_valid(path: Path, sha256: str) -> bool:
    """True if ``path`` holds the expected file; a corrupt or truncated copy is removed."""
    if not path.is_file():
        return False
    try:
        verify_sha256(path, sha256, remove_on_mismatch=True)
    except CheckpointError:
        return False
    return True


def fetch_sample(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    url: str | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """The local path of sample ``name``, downloaded (once) and checked against its SHA-256.

    A cached copy is used when its SHA-256 matches; a mismatching one is removed and downloaded again. The download
    goes to a temporary file in the cache folder, which is renamed onto the final name only after the check, so an
    interrupted or failed download never leaves a partial file under the final name.

    Args:
        name: a key of :data:`SLICER_SAMPLES`, e.g. "CTLiver".
        cache_dir: folder for the file; None = :func:`default_samples_directory`.
        url: download from here instead of the registry's URL (e.g. a mirror, or ``file://`` in tests).
        log: called with one line before a download starts (the demo prints it).

    Raises:
        InputError: unknown name; download failed; downloaded file has the wrong SHA-256.
        OutputError: the cache folder cannot be created or written.
    """
    sample = _sample(name)
    target = sample_path(name, cache_dir)
    if _is_valid(target, sample.sha256):
        return target
    source = url or sample.url
    def cache_error(exc: OSError) -> OutputError:
        return OutputError(f"cannot write the sample cache folder {target.parent}: {exc}. "
                           "Fix: give a writable folder with --cache-dir, or set TEXTSCF_CACHE.")

    def download_and_check(temp: Path) -> None:
        try:
            out = open(temp, "xb")
        except OSError as exc:
            raise cache_error(exc) from exc
        with out:
            try:
                with urllib.request.urlopen(source, timeout=_DOWNLOAD_TIMEOUT_S) as response:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError,
                    ValueError) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise InputError(
                    f"could not download sample {name} from {source}: {reason}. Fix: check the internet "
                    f"connection and try again; or download {source} on another machine and place it at {target}; "
                    "or run `textscf demo` without --sample, which works offline."
                ) from exc
        actual = sha256_of(temp)
        if actual != sample.sha256.lower():
            raise InputError(
                f"the file downloaded from {source} has SHA-256 {actual}, not the expected {sample.sha256} of "
                f"sample {name}, so it was discarded (a truncated download, a proxy page or a different file). "
                f"Fix: try again, or download {sample.url} yourself and place it at {target}."
            )

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cache_error(exc) from exc
    if log is not None:
        log(f"downloading sample {name} (about {sample.size_mb:g} MB, {sample.licence}) from {source} to {target}")
    # The download goes to a temporary sibling, renamed onto the final name only after the check (also on
    # KeyboardInterrupt the temporary file is removed).
    replace_atomically(target, download_and_check)
    return target


def _isotropic(ct: sitk.Image, spacing_mm: float) -> sitk.Image:
    """``ct`` resampled (linear, float32, background = its minimum) onto an isotropic ``spacing_mm`` grid."""
    background = float(sitk.GetArrayViewFromImage(ct).min())
    # Average whole bins first: anti-aliasing, and a 0.7 mm CT never has to exist as float32 at full size.
    factors = [max(1, int(spacing_mm / s)) for s in ct.GetSpacing()]
    small = sitk.BinShrink(ct, factors) if max(factors) > 1 else ct
    small = sitk.Cast(small, sitk.sitkFloat32)
    extent = (np.asarray(small.GetSize()) - 1) * np.asarray(small.GetSpacing())
    reference = sitk.Image([int(n) for n in np.floor(extent / spacing_mm + 1e-6).astype(int) + 1], sitk.sitkFloat32)
    reference.SetSpacing([float(spacing_mm)] * 3)
    reference.SetOrigin(small.GetOrigin())
    reference.SetDirection(small.GetDirection())
    return sitk.Resample(small, reference, sitk.Transform(), sitk.sitkLinear, background, sitk.sitkFloat32)


def make_sample_pair(
    ct: sitk.Image,
    seed: int = 0,
    spacing_mm: float = 2.0,
    max_displacement_mm: float = 8.0,
    smoothness_mm: float = 40.0,
) -> dict:
    """A registration pair with a known deformation from one CT.

    The CT is averaged over whole bins of voxels finer than ``spacing_mm``, then resampled (linear, background =
    its minimum) onto an isotropic ``spacing_mm`` grid over the same extent and direction; ``moving`` is that image and ``fixed(x) = moving(x + u(x))`` with ``u`` a
    random smooth field (:func:`textscf.phantom.random_smooth_displacement`). Registering ``moving`` to ``fixed``
    should recover ``u``.

    Returns:
        dict with ``fixed``, ``moving`` (float32 SimpleITK images on one grid, ``(I, J, K)`` voxels of
        ``spacing_mm``), ``displacement`` (``(3, I, J, K)`` float32, voxels of that grid, resampling convention;
        its largest length is ``max_displacement_mm``), ``spacing_mm`` and ``max_displacement_mm``.
    """
    from textscf.phantom import deform_pair, random_smooth_displacement

    if not isinstance(ct, sitk.Image) or ct.GetDimension() != 3 or ct.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("make_sample_pair needs a 3-D scalar SimpleITK image. Fix: read it with textscf.io.read_image.")
    if not (np.isfinite(spacing_mm) and spacing_mm > 0):
        raise InputError(f"spacing_mm must be a positive number of millimetres, got {spacing_mm}.")
    moving = _isotropic(ct, float(spacing_mm))
    displacement = random_smooth_displacement(moving.GetSize(), moving.GetSpacing(), max_displacement_mm,
                                              smoothness_mm, seed=seed)
    fixed, _ = deform_pair(moving, None, displacement)
    return {"fixed": fixed, "moving": moving, "displacement": displacement, "spacing_mm": float(spacing_mm),
            "max_displacement_mm": float(max_displacement_mm)}

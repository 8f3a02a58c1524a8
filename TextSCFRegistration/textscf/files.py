"""File-system helpers every part of the engine shares: atomic replacement of a file, and SHA-256 checks.

No SimpleITK or torch import: checkpoints, the text embedding cache, training logs, downloads and the image
writers of :mod:`textscf.io` all use these.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Callable

from textscf.errors import CheckpointError


def file_suffix(path: str | os.PathLike) -> str:
    """The lower-case extension, two parts for ``.nii.gz`` (``.nii.gz``, ``.nrrd``, ``.h5`` ...)."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def temp_sibling(final: Path) -> Path:
    """A hidden, unique name in the same folder that keeps the extension (ITK picks the writer by it)."""
    suffix = file_suffix(final)
    stem = final.name[: len(final.name) - len(suffix)] if suffix else final.name
    return final.with_name(f".{stem}.textscf-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def replace_atomically(final: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Run ``write(temp)`` on a :func:`temp_sibling` of ``final``, then move it onto ``final`` with ``os.replace``.

    Readers see the old file or the complete new one, never a partial write. Whatever ``write`` or the move raises
    (KeyboardInterrupt included) propagates unchanged, and the temporary file is removed.
    """
    final = Path(final)
    temp = temp_sibling(final)
    try:
        write(temp)
        os.replace(temp, final)
    finally:
        temp.unlink(missing_ok=True)  # after os.replace the temporary name no longer exists
    return final


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str, remove_on_mismatch: bool = True) -> None:
    """Check ``path`` against the hex SHA-256 ``expected``; on mismatch remove the file and raise CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist, so its SHA-256 cannot be checked. Fix: download it again.")
    actual = sha256_of(path)
    if actual.lower() != expected.strip().lower():
        if remove_on_mismatch:
            path.unlink()
        raise CheckpointError(
            f"SHA-256 mismatch for {path}: expected {expected.strip().lower()}, got {actual}"
            + (" (the file was removed)" if remove_on_mismatch else "")
            + ". The download is corrupted, truncated or a different version. "
            "Fix: download it again, or update the expected hash if the new version is intended."
        )

"""Reading and writing images, label maps and ITK displacement-field transforms.

Every reader checks its input and raises :class:`textscf.errors.InputError` naming the file, the problem
and the fix; every writer refuses to overwrite unless asked (:class:`textscf.errors.OutputError`) and writes
to a temporary name in the target folder first, so a failed write never leaves a partial file behind.

Displacement fields
-------------------
A displacement field is a 3-component float64 SimpleITK vector image in ITK's LPS millimetres, resampling
convention: the fixed point ``x`` maps to the moving point ``x + d(x)`` (``warped(x) = moving(x + d(x))``).
:func:`write_displacement_transform` stores it so that both ITK and 3D Slicer read it back as that transform:

- ``.h5`` / ``.hdf5``: an ITK transform file holding one ``DisplacementFieldTransform_double_3_3``
  (read with ``sitk.ReadTransform``). Slicer reads every ITK transform file as a resampling
  ("TransformFromParent") transform in LPS and converts it to RAS itself.
- ``.nii`` / ``.nii.gz``: a NIfTI-1 vector image, 5-D layout ``(I, J, K, 1, 3)`` (dim[0] = 5, dim[4] = 1,
  dim[5] = 3), qform = sform = the grid's RAS affine, and by default intent code 1006
  (``NIFTI_INTENT_DISPVECT``) with the vectors stored in **RAS** (first two components negated). This is what
  Slicer itself writes (vtkMRMLTransformStorageNode::WriteToImageFile sets intent_code 1006), what Slicer's
  reader expects (it warns "may not contain valid displacement field" for any other intent, and loads a dropped
  NIfTI/NRRD file as a transform rather than a vector volume only when its intent_code is 1006), and what
  ITK >= 5.3 converts back to LPS on reading (NiftiImageIO, ConvertRASDisplacementVectors). SimpleITK cannot
  write that variant itself (its vector images are variable-length vectors, which ITK's RAS conversion
  refuses), so the file is written with nibabel. ``nifti_intent=1007`` (``NIFTI_INTENT_VECTOR``) instead writes
  what plain ``sitk.WriteImage`` writes: the vectors in **LPS** unchanged (the ANTs/ITK convention). ITK reads
  both kinds back as LPS; Slicer reads the 1007 kind correctly too (the vectors are taken as LPS) but warns.
- ``.nrrd``: a vector NRRD (``kinds: vector domain domain domain``, ``space: left-posterior-superior``) with
  LPS vectors and the key/values ``intent_code:=1006`` and ``displacement field type:=resampling``, the two
  fields Slicer's transform reader looks at (the NRRD reader never converts vectors: they stay LPS).
- ``.mha``: a MetaImage vector image, LPS vectors.

In every image format Slicer (vtkMRMLTransformStorageNode::ReadFromImageFile) takes the vectors ITK's reader
returns as LPS (for a 1006 NIfTI, ITK has already converted them from the file's RAS), converts them to RAS by
negating the first two components, and uses the field as a resampling transform (TransformFromParent) unless
an NRRD says ``displacement field type:=modeling``. So a Slicer user applies our file to the *moving* volume
(it maps fixed-space points to moving-space points). Testing/test_io.py loads every format with Slicer's own
vtkMRMLTransformStorageNode (slicer-core) and checks the mapped points against ITK.
"""
from __future__ import annotations

import json
import os
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import SimpleITK as sitk

from textscf.errors import InputError, OutputError
from textscf.files import file_suffix, replace_atomically, temp_sibling
from textscf.spatial import grid_mismatch, ijk_to_ras_matrix, plain_numbers

__all__ = [
    "IMAGE_WRITE_SUFFIXES",
    "DISPLACEMENT_WRITE_SUFFIXES",
    "read_image",
    "read_label_map",
    "read_transform",
    "write_image",
    "write_displacement_transform",
    "write_transform",
    "write_bytes_atomically",
    "check_same_grid",
    "check_geometry",
    "special_file_kind",
    "check_input_path",
    "same_file",
    "OutputFolder",
    "MANIFEST_NAME",
]

#: Single-file image formats we write (a two-file .mhd/.raw or .nhdr could not be moved into place atomically).
IMAGE_WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
DISPLACEMENT_WRITE_SUFFIXES = (".h5", ".hdf5", ".nii.gz", ".nii", ".nrrd", ".mha")
TRANSFORM_WRITE_SUFFIXES = (".h5", ".hdf5", ".tfm", ".txt", ".mat")
_READ_FORMATS_HINT = "NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr), MetaImage (.mha/.mhd) or a DICOM series folder"
NIFTI_INTENT_DISPVECT = 1006
NIFTI_INTENT_VECTOR = 1007
NIFTI_SLAB_VOXELS = 1 << 22  # voxels converted at a time when a displacement NIfTI is written (16 MB of float32)
#: Voxel spacings outside this range (mm) are refused as non-physical (a header in metres or micrometres, or 0).
SPACING_RANGE_MM = (1e-3, 100.0)
#: Largest |DᵀD - I| entry of a direction matrix still taken as a rotation (NIfTI stores it in float32).
_ORTHONORMAL_TOL = 1e-3
#: An image with fewer informative voxels than this fraction is refused as (nearly) empty.
MIN_INFORMATIVE_FRACTION = 1e-3
#: The file listing what one run wrote into its output folder (see :class:`OutputFolder`).
MANIFEST_NAME = "textscf-manifest.json"


# ----------------------------------------------------------------------------------------------- helpers
def _first_line(exc: BaseException) -> str:
    """The informative last line of an ITK exception (they start with a long source location)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def special_file_kind(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it is not a regular file ("a folder", "a named pipe (FIFO)", ...); None for a file.

    Looked up with ``stat`` only: nothing is opened (opening a FIFO blocks until someone writes to it).
    Raises FileNotFoundError for a missing path.
    """
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a regular file"


def check_input_path(path: str | os.PathLike, role: str, what: str = "file", folder_ok: bool = False,
                     error: type[Exception] = InputError) -> Path:
    """``path`` as a Path when it names an existing regular file (or folder, with ``folder_ok``), else ``error``.

    Special files (FIFOs, sockets, devices) are refused before anything opens them.
    """
    if not str(path).strip():  # before Path(): Path("") is the current folder
        raise error(f"{role}: the path is empty. Fix: give the path of the {what}.")
    path = Path(path)
    try:
        kind = special_file_kind(path)
    except FileNotFoundError:
        raise error(f"{role}: {what} not found: '{path}' does not exist. Fix: check the path (relative paths are relative "
                    f"to the current folder '{Path.cwd()}').") from None
    except OSError as exc:
        raise error(f"{role}: cannot access '{path}' ({exc.strerror or exc}). Fix: check the path and its "
                    "permissions.") from None
    if kind is None or (folder_ok and kind == "a folder"):
        return path
    raise error(f"{role}: '{path}' is {kind}, not a regular {what}; it was not opened (reading "
                f"{'it' if kind == 'a folder' else 'a pipe or device'} would fail or wait forever). Fix: give the "
                f"path of the {what} itself{' (save the data to a file first)' if kind != 'a folder' else ''}.")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file: resolved paths, symbolic links and hard links (st_dev, st_ino)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _read_sitk_image(path: Path, role: str) -> sitk.Image:
    """Read any SimpleITK-readable file, or the single DICOM series of a folder."""
    check_input_path(path, role, folder_ok=True)
    if path.is_dir():
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
        if not ids:
            raise InputError(f"{role}: '{path}' is a folder without a DICOM series. Fix: give an image file "
                             f"({_READ_FORMATS_HINT}).")
        if len(ids) > 1:
            raise InputError(f"{role}: folder '{path}' holds {len(ids)} DICOM series ({', '.join(ids)}). "
                             "Fix: put one series per folder, or convert the one you want to NIfTI/NRRD.")
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), ids[0]))
        try:
            return reader.Execute()
        except RuntimeError as exc:
            raise InputError(f"{role}: cannot read the DICOM series in '{path}' ({_first_line(exc)}). "
                             "Fix: convert it to NIfTI or NRRD (e.g. with Slicer or dcm2niix).") from None
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = _first_line(exc)
        if "No such file or directory" in reason:
            # MetaImage's reader says this when the voxel data ends early (or a .mhd's data file is missing)
            raise InputError(f"{role}: '{path}' is truncated or damaged: its header was read but not all of its "
                             "voxel data" + (" (or the data file named by ElementDataFile is missing)"
                                             if file_suffix(path) == ".mhd" else "") +
                             ". Fix: copy or export the file again.") from None
        raise InputError(f"{role}: cannot read '{path}' as an image ({reason}). Fix: give an image "
                         f"file SimpleITK can read: {_READ_FORMATS_HINT}.") from None


def _check_3d_scalar(img: sitk.Image, path: Path, role: str) -> None:
    """3-D, one component, at least 2 voxels along each axis."""
    size = img.GetSize()
    size_txt = "x".join(str(s) for s in size)
    if img.GetDimension() != 3:
        raise InputError(f"{role}: '{path}' is {img.GetDimension()}-D (size {size_txt}); a 3-D volume is needed. "
                         "Fix: give a 3-D CT/MRI volume (for a 4-D series, extract one 3-D frame first).")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{role}: '{path}' has {img.GetNumberOfComponentsPerPixel()} components per voxel "
                         f"({img.GetPixelIDTypeAsString()}); a scalar (grey-value) volume is needed. "
                         "Fix: give a single-channel CT/MRI volume (convert colour or vector images to scalar).")
    if min(size) == 0:
        raise InputError(f"{role}: '{path}' is empty (size {size_txt}, zero voxels). Fix: give a non-empty "
                         "3-D volume; the file may be truncated or was written incorrectly.")
    if min(size) < 2:
        raise InputError(f"{role}: '{path}' is a single slice (size {size_txt}); a 3-D volume is needed. "
                         "Fix: give the whole 3-D volume, not one slice.")
    check_geometry(img, f"{role} '{path}'")


def check_geometry(img: sitk.Image, what: str) -> None:
    """InputError unless ``img`` has a physical grid: finite origin, spacing in :data:`SPACING_RANGE_MM`, and a
    rotation (orthonormal) direction matrix."""
    spacing = np.array(img.GetSpacing(), dtype=float)
    origin = np.array(img.GetOrigin(), dtype=float)
    lo, hi = SPACING_RANGE_MM
    spacing_txt = ", ".join(f"{v:g}" for v in spacing)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"{what} has the voxel spacing ({spacing_txt}) mm: a spacing must be a positive number. "
                         "Fix: correct the spacing in the header (e.g. SimpleITK's image.SetSpacing, or the NIfTI "
                         "pixdim) and save the image again.")
    if np.any(spacing < lo) or np.any(spacing > hi):
        raise InputError(f"{what} has the voxel spacing ({spacing_txt}) mm, which is not physical for a CT or MRI "
                         f"(textscf accepts {lo:g} to {hi:g} mm; a header in metres or micrometres looks like this). "
                         "Fix: correct the spacing in the header (in millimetres) and save the image again.")
    if not np.all(np.isfinite(origin)):
        raise InputError(f"{what} has a non-finite origin {plain_numbers(origin)}. Fix: correct the origin in the header.")
    direction = np.array(img.GetDirection(), dtype=float).reshape(3, 3)
    gram = direction.T @ direction
    if not np.all(np.isfinite(direction)) or np.abs(gram - np.eye(3)).max() > _ORTHONORMAL_TOL:
        lengths = ", ".join(f"{v:.3g}" for v in np.sqrt(np.abs(np.diag(gram))))
        raise InputError(f"{what} has a sheared or scaled direction matrix {plain_numbers(direction.ravel())} "
                         f"(column lengths {lengths}; a direction must be a rotation, orthonormal columns). Fix: "
                         "resample the image onto a grid without shear (e.g. harden the transform in 3D Slicer and "
                         "save the volume again), or correct the direction (TransformMatrix, sform) in the header.")


def _nifti_stored_values(path: Path, role: str) -> np.ndarray | None:
    """The voxel values a NIfTI file stores, read by nibabel (None for other formats).

    ITK's NIfTI reader zero-fills a truncated file, turns NaN into 0 and a zero pixdim into 1 mm without a word;
    this re-read catches all three: InputError for a truncated/damaged file or a zero spacing.
    """
    if not (path.is_file() and path.name.lower().endswith((".nii", ".nii.gz"))):
        return None
    import nibabel
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as f:
            block = f.read(540)
        for klass in (nibabel.Nifti1Header, nibabel.Nifti2Header):
            if klass.may_contain_header(block):
                header = klass(block[:klass.sizeof_hdr], check=False)  # unchecked: nibabel would "fix" a 0
                ndim = int(min(max(int(header["dim"][0]), 0), 7))
                pixdim = np.asarray(header["pixdim"][1:1 + min(ndim, 3)], dtype=float)
                if np.any(pixdim == 0) or not np.all(np.isfinite(pixdim)):
                    raise InputError(f"{role}: '{path}' stores the voxel spacing (pixdim) "
                                     f"{plain_numbers(pixdim)} mm: 0 is not a spacing (ITK would silently "
                                     "use 1 mm). Fix: set the real spacing in the header (e.g. nibabel: "
                                     "img.header.set_zooms(...)) and save the image again.")
                break
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asanyarray(nibabel.load(str(path)).dataobj)
    except InputError:
        raise
    except Exception as exc:  # EOFError, zlib.error, OSError "Expected N bytes", nibabel's header errors
        raise InputError(f"{role}: '{path}' is truncated or damaged ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0][:160]}); ITK would fill the missing voxels with 0. "
                         "Fix: copy or export the file again.") from None


def _non_finite_count(arr: np.ndarray) -> int:
    if not np.issubdtype(arr.dtype, np.floating):
        return 0
    return int(arr.size - np.count_nonzero(np.isfinite(arr)))


# ----------------------------------------------------------------------------------------------- readers
def read_image(path: str | os.PathLike, role: str = "fixed image") -> sitk.Image:
    """Read a 3-D scalar CT/MRI volume as float32 in ITK's LPS physical space.

    Args:
        path: a NIfTI, NRRD, MetaImage or any other SimpleITK-readable file, or a folder holding one DICOM series.
        role: how to name the input in error messages ("fixed image", "moving image", ...).

    Returns:
        ``sitk.Image`` of ``sitkFloat32``, size ``(I, J, K)``, with the file's origin, spacing and direction
        (a NIfTI's RAS affine is converted to LPS by ITK).

    Raises:
        InputError: missing / unreadable file, not 3-D, several components, empty, NaN or Inf voxels, constant.
    """
    path = check_input_path(path, role, folder_ok=True)
    img = _read_sitk_image(path, role)
    _check_3d_scalar(img, path, role)
    try:
        img = sitk.Cast(img, sitk.sitkFloat32)
    except RuntimeError as exc:
        raise InputError(f"{role}: '{path}' has pixel type {img.GetPixelIDTypeAsString()} which cannot be "
                         f"converted to a grey value ({_first_line(exc)}). Fix: give a real-valued scalar volume.") \
            from None
    arr = sitk.GetArrayViewFromImage(img)
    arr_nifti = _nifti_stored_values(path, role)
    if arr_nifti is not None and arr_nifti.dtype.kind == "f" and _non_finite_count(arr_nifti):
        arr = arr_nifti  # ITK's NIfTI reader turns NaN into 0 without a word
    del arr_nifti
    bad = _non_finite_count(arr)
    if bad:
        n_nan = int(np.count_nonzero(np.isnan(arr)))
        raise InputError(f"{role}: '{path}' has {bad} non-finite voxels ({n_nan} NaN, {bad - n_nan} Inf) of "
                         f"{arr.size}. Fix: replace them with the background value (e.g. -1024 HU for CT, 0 for "
                         "MRI) before registering.")
    lo, hi = float(arr.min()), float(arr.max())
    if lo == hi:
        raise InputError(f"{role}: '{path}' is constant (every voxel is {lo:g}), so there is nothing to register. "
                         "Fix: check that the right file was given and that it is not an empty mask or a blank "
                         "export.")
    informative = min(int(np.count_nonzero(arr != lo)), int(np.count_nonzero(arr != hi)))
    if informative < MIN_INFORMATIVE_FRACTION * arr.size:
        raise InputError(f"{role}: '{path}' is nearly empty: only {informative} of {arr.size} voxels differ from "
                         f"its background value ({lo:g} or {hi:g}), so there is nothing to register. Fix: check that "
                         "the right file was given and that it is not a mask, a marker image or a blank export.")
    return img


def check_same_grid(image: sitk.Image, reference: sitk.Image, what: str, reference_what: str = "the image") -> None:
    """Raise InputError unless ``image`` lies on ``reference``'s voxel grid (within :func:`grid_mismatch`'s tolerances)."""
    problems = grid_mismatch(reference, image)
    if problems:
        raise InputError(f"{what} is not on the voxel grid of {reference_what}: " + "; ".join(problems) +
                         f". Fix: resample {what} onto {reference_what}'s grid with nearest-neighbour "
                         "interpolation (e.g. Slicer's 'Resample Image (BRAINS)' with the image as reference, or "
                         "textscf.spatial.resample_to_grid(label, image, interpolator='nearest')).")


def read_label_map(path: str | os.PathLike, reference: sitk.Image | None = None,
                   role: str = "fixed label map") -> sitk.Image:
    """Read a 3-D label map (segmentation) with integer label values.

    Args:
        path: a SimpleITK-readable file.
        reference: the image the label map belongs to; when given, the label map must lie on its voxel grid
            (within :func:`check_same_grid`'s tolerance) and takes over its exact geometry.
        role: how to name the input in error messages.

    Returns:
        ``sitk.Image`` of ``sitkInt32``, size ``(I, J, K)``.

    Raises:
        InputError: missing / unreadable, not 3-D scalar, empty, non-finite, non-integer or negative values,
            or a grid different from ``reference``'s.
    """
    path = check_input_path(path, role, folder_ok=True)
    img = _read_sitk_image(path, role)
    _check_3d_scalar(img, path, role)
    if "complex" in img.GetPixelIDTypeAsString():
        raise InputError(f"{role}: '{path}' has complex voxels. Fix: give an integer label map.")
    _nifti_stored_values(path, role)  # the truncation and zero-spacing checks images get
    arr = sitk.GetArrayViewFromImage(img)
    bad = _non_finite_count(arr)
    if bad:
        raise InputError(f"{role}: '{path}' has {bad} NaN/Inf voxels. Fix: give an integer label map "
                         "(a segmentation exported as labels, background 0).")
    if np.issubdtype(arr.dtype, np.floating):
        frac = arr != np.round(arr)
        n_frac = int(np.count_nonzero(frac))
        if n_frac:
            example = float(arr[frac].flat[0])
            raise InputError(f"{role}: '{path}' has {n_frac} non-integer voxel values (e.g. {example:g}); label maps "
                             "hold integer labels. Fix: give the segmentation / label map file, not an intensity "
                             "image or a probability map (threshold or argmax it first).")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0:
        raise InputError(f"{role}: '{path}' has negative labels (minimum {lo:g}). Fix: use 0 for background and "
                         "positive integers for the structures.")
    if hi > np.iinfo(np.int32).max:
        raise InputError(f"{role}: '{path}' has labels up to {hi:g}, too large for a label map. "
                         "Fix: relabel the structures with small positive integers.")
    labels = sitk.Cast(img, sitk.sitkInt32)
    if reference is not None:
        check_same_grid(labels, reference, f"{role} '{path}'", "the image")
        labels.CopyInformation(reference)  # snap float32 header rounding onto the image's exact grid
    return labels


def read_transform(path: str | os.PathLike, role: str = "initial transform") -> sitk.Transform:
    """Read a 3-D ITK transform (resampling convention, LPS: maps fixed points to moving points).

    Args:
        path: an ITK transform file (``.h5``, ``.hdf5``, ``.tfm``, ``.txt``, ``.mat`` — Slicer's linear and
            composite transform files) or a displacement-field image (3-component vector ``.nii.gz`` / ``.nrrd``
            / ``.mha``; vectors as ITK reads them, i.e. LPS, see the module notes).

    Returns:
        the ``sitk.Transform`` (a ``DisplacementFieldTransform`` for a field image).

    Raises:
        InputError: missing or unreadable file, or a transform that is not 3-D.
    """
    path = check_input_path(path, role)
    try:
        transform = sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        transform = None
        itk_message = _first_line(exc)
        if file_suffix(path) not in (".h5", ".hdf5", ".tfm", ".txt", ".mat"):
            try:
                field = sitk.ReadImage(str(path))
            except RuntimeError:
                field = None
            if field is not None:
                if field.GetDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
                    raise InputError(f"{role}: '{path}' is an image with {field.GetNumberOfComponentsPerPixel()} "
                                     f"component(s) in {field.GetDimension()}-D, not a 3-D displacement field. "
                                     "Fix: give an ITK transform file (.h5/.tfm/.txt) or a 3-component "
                                     "displacement-field image.") from None
                transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
        if transform is None:
            raise InputError(f"{role}: cannot read '{path}' as a transform ({itk_message}). Fix: give an ITK "
                             "transform file (.h5, .tfm, .txt, .mat; in Slicer: save the transform node) or a "
                             "displacement-field image. Slicer's inverse-only transform classes are not readable "
                             "outside Slicer: harden or invert the transform in Slicer and save it again.") from None
    if transform.GetDimension() != 3:
        raise InputError(f"{role}: '{path}' holds a {transform.GetDimension()}-D transform; a 3-D transform is "
                         "needed. Fix: give the 3-D transform of the volumes.")
    return transform


# ----------------------------------------------------------------------------------------------- writers
def _check_target(path: Path, overwrite: bool, allowed: Iterable[str], what: str) -> None:
    allowed = tuple(allowed)
    if file_suffix(path) not in allowed:
        raise OutputError(f"cannot write {what} to '{path}': unsupported extension '{file_suffix(path) or '(none)'}'. "
                          f"Fix: use one of {', '.join(allowed)}.")
    if not path.parent.is_dir():
        raise OutputError(f"cannot write {what} to '{path}': folder '{path.parent}' does not exist. "
                          "Fix: create it first or choose an existing folder.")
    if path.exists() and not overwrite:
        raise OutputError(f"'{path}' already exists. Fix: pass --overwrite (overwrite=True) or choose another "
                          "file name.")


def _replace_atomically(write, final: Path, what: str) -> None:
    """:func:`textscf.files.replace_atomically`, a failed write reported as an :class:`OutputError`."""
    try:
        replace_atomically(final, write)
    except (RuntimeError, OSError) as exc:
        raise OutputError(f"writing {what} to '{final}' failed ({_first_line(exc)}). Fix: check the free disk "
                          "space and the folder's permissions.") from None


def write_bytes_atomically(data: bytes, path: str | os.PathLike, what: str = "the file") -> None:
    """Write ``data`` to ``path`` (replacing it) through a temporary sibling: the file is whole or absent."""
    _replace_atomically(lambda temp: temp.write_bytes(data), Path(path), what)


def _write_image_file(image: sitk.Image, path: Path) -> None:
    sitk.WriteImage(image, str(path), useCompression=file_suffix(path) in (".nii.gz", ".nrrd", ".mha"))


def write_image(image: sitk.Image, path: str | os.PathLike, overwrite: bool = False) -> None:
    """Write ``image`` (any pixel type, geometry kept) to ``.nii.gz``, ``.nii``, ``.nrrd`` or ``.mha``.

    Raises:
        OutputError: unsupported extension, missing folder, existing file without ``overwrite``, failed write.
    """
    path = Path(path)
    _check_target(path, overwrite, IMAGE_WRITE_SUFFIXES, "an image")
    _replace_atomically(lambda temp: _write_image_file(image, temp), path, "the image")


def _checked_field(field: sitk.Image) -> sitk.Image:
    """The field as a float32 or float64 3-vector image (other pixel types cast to float64), or InputError.

    Float32 fields stay float32 (no full-size float64 copy): every format but ``.h5`` stores float32, and
    :func:`_float64_field` casts for ``.h5`` when it writes.
    """
    if (not isinstance(field, sitk.Image) or field.GetDimension() != 3
            or field.GetNumberOfComponentsPerPixel() != 3):
        raise InputError("a displacement field must be a 3-D SimpleITK image with 3 components per voxel "
                         "(LPS millimetres). Fix: build it with textscf.spatial.voxel_displacement_to_physical.")
    if field.GetPixelID() not in (sitk.sitkVectorFloat32, sitk.sitkVectorFloat64):
        field = sitk.Cast(field, sitk.sitkVectorFloat64)
    bad = _non_finite_count(sitk.GetArrayViewFromImage(field))
    if bad:
        raise InputError(f"the displacement field has {bad} NaN/Inf components. Fix: this is a bug upstream "
                         "(the network or the field conversion produced non-finite values); do not save it.")
    return field


def _float64_field(field: sitk.Image) -> sitk.Image:
    """A float64 copy of a 3-vector image (ITK's displacement-field transform needs float64 and empties the image
    it is given, so the caller's image is never handed over)."""
    if field.GetPixelID() == sitk.sitkVectorFloat64:
        return sitk.Image(field)
    return sitk.Cast(field, sitk.sitkVectorFloat64)


def _write_nifti_dispvect(field: sitk.Image, path: Path) -> None:
    """NIfTI-1, intent 1006, RAS vectors, 5-D ``(I, J, K, 1, 3)`` layout, qform = sform = RAS affine.

    nibabel makes the header (from a zero-stride stand-in of the data's shape); the voxels follow in NIfTI's order
    (component, then k, j, i), a few k-slices at a time, so no full-size copy of the field is made.
    """
    import nibabel as nib
    from nibabel.openers import ImageOpener

    view = sitk.GetArrayViewFromImage(field)  # [k, j, i, c], no copy
    size = field.GetSize()
    affine = ijk_to_ras_matrix(field)
    nii = nib.Nifti1Image(np.broadcast_to(np.float32(0), (size[0], size[1], size[2], 1, 3)), affine)
    nii.header.set_intent(NIFTI_INTENT_DISPVECT)
    nii.header.set_qform(affine, code=1)
    nii.header.set_sform(affine, code=1)
    nii.header.set_xyzt_units("mm")
    nii.update_header()
    nii.header.set_slope_inter(1.0, 0.0)  # unscaled: what nibabel stores for float32 data
    dtype = nii.header.get_data_dtype()  # float32 in the header's byte order
    slices = max(1, NIFTI_SLAB_VOXELS // (size[0] * size[1]))
    with ImageOpener(str(path), "wb") as f:
        nii.header.write_to(f)  # ends at the data offset (no extensions)
        for c, sign in enumerate((-1.0, -1.0, 1.0)):  # LPS -> RAS vectors
            for k in range(0, size[2], slices):
                f.write((view[k:k + slices, :, :, c] * np.float32(sign)).astype(dtype, copy=False).tobytes())


def _write_field_file(field: sitk.Image, path: Path, nifti_intent: int) -> None:
    suffix = file_suffix(path)
    if suffix in (".h5", ".hdf5"):
        sitk.WriteTransform(sitk.DisplacementFieldTransform(_float64_field(field)), str(path))
    elif suffix in (".nii", ".nii.gz") and nifti_intent == NIFTI_INTENT_DISPVECT:
        _write_nifti_dispvect(field, path)
    else:
        out = field  # float32: 1e-5 mm resolution, half the size of float64
        if field.GetPixelID() != sitk.sitkVectorFloat32:
            out = sitk.Cast(field, sitk.sitkVectorFloat32)
        elif suffix == ".nrrd":
            out = sitk.Image(field)  # the metadata below stays off the caller's image
        if suffix == ".nrrd":
            out.SetMetaData("intent_code", str(NIFTI_INTENT_DISPVECT))
            out.SetMetaData("displacement field type", "resampling")
        _write_image_file(out, path)


def write_displacement_transform(field: sitk.Image, path: str | os.PathLike, overwrite: bool = False,
                                 nifti_intent: int = NIFTI_INTENT_DISPVECT) -> None:
    """Write a displacement field so that ITK and Slicer read it as a resampling transform.

    Args:
        field: 3-component vector image (float32 or float64; ``.h5`` stores float64), LPS mm, resampling convention
            (fixed point ``x`` -> moving point ``x + field(x)``).
        path: ``.h5``/``.hdf5`` (ITK transform file, float64), ``.nii.gz``/``.nii``, ``.nrrd`` or ``.mha``
            (vector images, float32). See the module docstring for the exact layout of each format.
        overwrite: replace an existing file.
        nifti_intent: 1006 (default: NIfTI displacement intent, RAS vectors, Slicer's own format) or 1007
            (vector intent, LPS vectors as plain ITK / ANTs write them). Ignored for other formats.

    Read back with ``sitk.ReadTransform`` (``.h5``) or
    ``sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(p), sitk.sitkVectorFloat64))`` (images), or with
    :func:`read_transform` for any of them.

    Raises:
        InputError: not a 3-D 3-component field, or non-finite values.
        OutputError: unsupported extension, missing folder, existing file without ``overwrite``, failed write.
    """
    path = Path(path)
    if nifti_intent not in (NIFTI_INTENT_DISPVECT, NIFTI_INTENT_VECTOR):
        raise InputError(f"nifti_intent must be {NIFTI_INTENT_DISPVECT} (displacement, RAS vectors) or "
                         f"{NIFTI_INTENT_VECTOR} (vector, LPS vectors), not {nifti_intent!r}.")
    _check_target(path, overwrite, DISPLACEMENT_WRITE_SUFFIXES, "a displacement field")
    field = _checked_field(field)
    _replace_atomically(lambda temp: _write_field_file(field, temp, nifti_intent), path, "the displacement field")


def write_transform(transform: sitk.Transform, path: str | os.PathLike, overwrite: bool = False) -> None:
    """Write any SimpleITK transform as an ITK transform file (``.h5``, ``.hdf5``, ``.tfm``, ``.txt``, ``.mat``).

    Raises:
        OutputError: unsupported extension, missing folder, existing file without ``overwrite``, failed write.
    """
    path = Path(path)
    _check_target(path, overwrite, TRANSFORM_WRITE_SUFFIXES, "a transform")
    _replace_atomically(lambda temp: sitk.WriteTransform(transform, str(temp)), path, "the transform")


# ----------------------------------------------------------------------------------------------- output folder
class OutputFolder:
    """All-or-nothing writing of a set of result files into one folder.

    Every file is written under a hidden temporary name in the folder and moved onto its final name only when
    the ``with`` block ends without an exception; on an exception every temporary file is removed and the files
    that were there before are left untouched.

    Example::

        with OutputFolder(out_dir, overwrite=False, names=["warped.nii.gz", "displacement.h5", "qc.png"]) as out:
            out.write_image(warped, "warped.nii.gz")
            out.write_displacement(field, "displacement.h5")
            fig.savefig(out.temp_path("qc.png"))

    Args:
        path: the folder; created (with parents) when missing.
        overwrite: allow replacing existing files.
        names: file names that will be written, so that existing ones are refused on entering the block,
            before any work. Names written without being declared are checked when first used.
        inputs: ``{role: path}`` of the files the run reads. An output name (or a file the previous run wrote)
            that is one of them, by resolved path, symbolic or hard link, is refused on entering: an output never
            replaces or removes an input.
        manifest: when given (e.g. :data:`MANIFEST_NAME`), the run is tracked as a whole: on success this JSON
            file lists the files the run wrote, and with ``overwrite`` the files the previous run listed there
            and this run did not write again are removed, after the new files are in place. Without
            ``overwrite`` an existing manifest (a previous run) is refused like any existing output.
        known_names: for a folder written before manifests existed: the names such a run may have left; they
            count as the previous run's files when there is no manifest.

    Raises:
        OutputError: on entering, when the folder cannot be created or written, when an output is an input, or
            when declared files exist and ``overwrite`` is False (all of them are listed); while writing, for an
            undeclared name that exists.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False, names: Iterable[str] = (),
                 inputs: Mapping[str, str | os.PathLike | None] | None = None, manifest: str | None = None,
                 known_names: Iterable[str] = ()):
        self.path = Path(path)
        self.overwrite = overwrite
        self.names = [str(n) for n in names]
        self.inputs = {role: Path(p) for role, p in (inputs or {}).items() if p is not None and str(p).strip()}
        self.manifest = manifest
        self.known_names = [str(n) for n in known_names]
        self._previous: list[str] = []
        self._temps: dict[str, Path] = {}
        self._entered = False
        self.written: list[Path] = []
        self.removed: list[Path] = []

    # -- checks
    def _check_name(self, name: str) -> None:
        if not name or Path(name).name != name or name in (".", ".."):
            raise OutputError(f"'{name}' is not a plain file name. Fix: give a name without folders, e.g. "
                              "'warped.nii.gz'.")

    def _existing(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if (self.path / n).exists()]

    def _previous_run(self) -> list[str]:
        """The plain file names the previous run in this folder wrote (its manifest, else the known names)."""
        listed = None
        if self.manifest and (self.path / self.manifest).is_file():
            try:
                listed = json.loads((self.path / self.manifest).read_text(encoding="utf-8")).get("files")
            except (OSError, ValueError, AttributeError):
                listed = None
        if not isinstance(listed, list):
            listed = [n for n in self.known_names if (self.path / n).is_file()]
        # a damaged or hand-edited manifest must not point outside the folder
        return [n for n in listed if isinstance(n, str) and n and Path(n).name == n and n not in (".", "..")]

    def _refuse_inputs(self, names: Iterable[str], previous: Iterable[str]) -> None:
        for name, verb in [(n, "replace") for n in names] + [(n, "remove") for n in previous]:
            target = self.path / name
            for role, source in self.inputs.items():
                if same_file(target, source):
                    raise OutputError(
                        f"the output '{target}' is the {role} '{source}' (the same file"
                        f"{'' if target.resolve() == source.resolve() else ', through a link'}): this run would "
                        f"{verb} one of its own inputs. Fix: choose another output folder (-o), or move the input "
                        "out of it.")

    def __enter__(self) -> "OutputFolder":
        for n in self.names:
            self._check_name(n)
        if self.manifest:
            self._check_name(self.manifest)
        if self.path.is_dir():
            self._previous = self._previous_run() if self.overwrite else []
            self._refuse_inputs(self.names + ([self.manifest] if self.manifest else []), self._previous)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the output folder '{self.path}' ({exc.strerror or exc}). "
                              "Fix: choose a folder you can write to.") from None
        try:  # the only reliable writability test (access() lies for root and for some network file systems)
            fd, probe = tempfile.mkstemp(prefix=".textscf-probe-", dir=self.path)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise OutputError(f"the output folder '{self.path}' is not writable ({exc.strerror or exc}). "
                              "Fix: choose a folder you can write to, or fix its permissions.") from None
        if not self.overwrite:
            existing = self._existing(self.names + ([self.manifest] if self.manifest else []))
            if existing:
                raise OutputError(f"the output folder '{self.path}' already holds {', '.join(existing)}"
                                  f"{' (a previous run)' if self.manifest in existing else ''}. "
                                  "Fix: pass --overwrite (overwrite=True) to replace that run, or choose another "
                                  "folder.")
        self._entered = True
        return self

    def temp_path(self, name: str) -> Path:
        """The temporary path to write ``name`` to (for writers such as matplotlib); moved into place on exit."""
        if not self._entered:
            raise OutputError("OutputFolder must be used as a context manager ('with OutputFolder(...) as out').")
        self._check_name(name)
        if name not in self._temps:
            if not self.overwrite and (self.path / name).exists():
                raise OutputError(f"'{self.path / name}' already exists. Fix: pass --overwrite (overwrite=True) "
                                  "or choose another folder.")
            if name not in self.names:
                self._refuse_inputs([name], [])
            self._temps[name] = temp_sibling(self.path / name)
        return self._temps[name]

    def final_path(self, name: str) -> Path:
        """Where ``name`` will be once the block has finished."""
        return self.path / name

    # -- writers
    def _write(self, name: str, write, what: str) -> Path:
        temp = self.temp_path(name)
        try:
            write(temp)
        except (RuntimeError, OSError) as exc:
            raise OutputError(f"writing {what} '{self.path / name}' failed ({_first_line(exc)}). Fix: check the "
                              "free disk space and the folder's permissions.") from None
        return self.path / name

    def write_image(self, image: sitk.Image, name: str) -> Path:
        """Write an image (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``); returns the final path."""
        if file_suffix(name) not in IMAGE_WRITE_SUFFIXES:
            raise OutputError(f"cannot write image '{name}': use one of {', '.join(IMAGE_WRITE_SUFFIXES)}.")
        return self._write(name, lambda t: _write_image_file(image, t), "image")

    def write_displacement(self, field: sitk.Image, name: str, nifti_intent: int = NIFTI_INTENT_DISPVECT) -> Path:
        """Write a displacement field transform (see :func:`write_displacement_transform`)."""
        if file_suffix(name) not in DISPLACEMENT_WRITE_SUFFIXES:
            raise OutputError(f"cannot write displacement field '{name}': use one of "
                              f"{', '.join(DISPLACEMENT_WRITE_SUFFIXES)}.")
        field = _checked_field(field)
        return self._write(name, lambda t: _write_field_file(field, t, nifti_intent), "displacement field")

    def write_transform(self, transform: sitk.Transform, name: str) -> Path:
        """Write an ITK transform file (``.h5``, ``.hdf5``, ``.tfm``, ``.txt``, ``.mat``)."""
        if file_suffix(name) not in TRANSFORM_WRITE_SUFFIXES:
            raise OutputError(f"cannot write transform '{name}': use one of {', '.join(TRANSFORM_WRITE_SUFFIXES)}.")
        return self._write(name, lambda t: sitk.WriteTransform(transform, str(t)), "transform")

    def write_text(self, name: str, text: str) -> Path:
        """Write UTF-8 text."""
        return self._write(name, lambda t: t.write_text(text, encoding="utf-8"), "text file")

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Write raw bytes."""
        return self._write(name, lambda t: t.write_bytes(data), "file")

    # -- commit / roll back
    def _discard(self) -> None:
        for temp in self._temps.values():
            try:
                temp.unlink(missing_ok=True)
            except OSError:
                pass
        self._temps.clear()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self._discard()
            return False
        # reserved through temp_path() but never written (e.g. a skipped figure): nothing to move
        pending = {n: t for n, t in self._temps.items() if t.exists()}
        if self.manifest and pending:  # a run that writes nothing here leaves no manifest (the old one goes)
            try:  # moved into place last: a folder with a manifest holds the whole run
                self.write_text(self.manifest, json.dumps(
                    {"format": "textscf-run-manifest", "format_version": 1,
                     "files": sorted(pending) + [self.manifest]}, indent=2))
            except BaseException:
                self._discard()
                raise
            pending[self.manifest] = self._temps[self.manifest]
        try:
            for name, temp in pending.items():
                os.replace(temp, self.path / name)
                self.written.append(self.path / name)
        except OSError as exc:
            self._discard()
            raise OutputError(f"moving the results into '{self.path}' failed ({exc.strerror or exc}); "
                              f"already in place: {', '.join(p.name for p in self.written) or 'none'}. "
                              "Fix: check the free disk space and permissions, then run again with --overwrite.") \
                from None
        self._temps.clear()
        stale = [self.path / n for n in self._previous if n not in pending]
        failed = []
        for path in stale:
            try:
                if path.is_file() or path.is_symlink():
                    path.unlink()
                    self.removed.append(path)
            except OSError as exc:
                failed.append(f"{path.name} ({exc.strerror or exc})")
        if failed:
            raise OutputError(f"the new results are in '{self.path}', but files of the previous run could not be "
                              f"removed: {', '.join(failed)}. Fix: delete them by hand.")
        if self.removed and not pending:
            try:
                self.path.rmdir()  # only when that left it empty
            except OSError:
                pass
        return False

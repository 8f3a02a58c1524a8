"""The Learn2Reg submission layout of the fields ``textscf evaluate --learn2reg`` writes.

The files ``learn2reg/disp_FFFF_MMMM.npz`` follow the Learn2Reg 2020 / 2021 submission format (the format of the
abdomen CT task the textSCF paper evaluates on; learn2reg.grand-challenge.org "Submission" page and the
challenge's evaluation code):

- one file per pair, named ``disp_<fixed id>_<moving id>.npz``: the **fixed** image's case id first, then the
  moving one, each zero-padded to four digits (``disp_0034_0035.npz`` registers moving 0035 to fixed 0034);
- a single array stored under numpy's default key ``arr_0`` (``np.load(f)["arr_0"]``), dtype **float16**;
- shape ``(3, I/2, J/2, K/2)``: the **displacement only** (the evaluation adds the identity grid), components
  first, at **half resolution** of the fixed image (``3x96x80x128`` for the 192x160x256 abdomen CT task); the
  image sizes must therefore be even;
- component ``a`` is the displacement along voxel axis ``a`` of the image arrays as nibabel reads the NIfTI
  files (``get_fdata()``, axes ``i, j, k``; ITK / SimpleITK index order, the reverse of
  ``sitk.GetArrayFromImage``), in **voxels of the full-resolution grid**;
- the evaluation upsamples each component with ``scipy.ndimage.zoom(disp[a], 2, order=2)`` (corner-aligned: the
  first and last samples map onto the first and last voxels) and warps the moving label map with
  ``map_coordinates(moving, identity + disp, order=0)``: the field maps each voxel ``x`` of the fixed image to
  the voxel ``x + disp(x)`` of the moving image (the resampling convention, as everywhere in this engine).

Here the half-resolution samples are taken from the full displacement (initial alignment included) at exactly the
full-resolution positions ``m (N - 1) / (N/2 - 1)`` that this upsampling maps them to, and the vector is expressed
as moving-image voxel index minus fixed-image voxel index (which is the fixed grid's voxel displacement when both
images share a grid, as in Learn2Reg). The 2022+ Learn2Reg leaderboards (``MDL-UzL/L2R`` evaluation) instead take
full-resolution ``(I, J, K, 3)`` fields in ``disp_*.nii.gz``; this module writes the 2020/2021 kind.
"""
from __future__ import annotations

import io

import numpy as np
import SimpleITK as sitk

from textscf.errors import InputError
from textscf.io import check_same_grid

LEARN2REG_FOLDER = "learn2reg"


def learn2reg_displacement(displacement: sitk.Image, fixed: sitk.Image, moving: sitk.Image | None = None) -> np.ndarray:
    """A registration's displacement in the Learn2Reg 2020/2021 submission layout (see the module notes).

    Args:
        displacement: 3-vector image on the fixed grid, LPS mm, resampling convention (a
            :class:`~textscf.results.RegistrationResult`'s ``displacement``, initial alignment included).
        fixed: the fixed image (its grid); every size must be even.
        moving: the moving image (its grid gives the voxel indices the field points to); None = the fixed grid.

    Returns:
        ``(3, I/2, J/2, K/2)`` float16: at half-resolution sample ``m`` (full-resolution position
        ``x = m (N - 1) / (N/2 - 1)`` per axis), the moving-image voxel index that ``x`` maps to minus ``x``.
    """
    size = np.array(fixed.GetSize(), dtype=np.int64)
    if fixed.GetDimension() != 3 or np.any(size % 2) or np.any(size < 4):
        raise InputError(f"the Learn2Reg layout stores fields at half resolution and needs even fixed image sizes "
                         f"of at least 4; this fixed image is {'x'.join(str(int(s)) for s in size)}. Fix: pad or "
                         "crop the images to even sizes (Learn2Reg data already is), or drop --learn2reg")
    if displacement.GetNumberOfComponentsPerPixel() != 3:
        raise InputError("the displacement must be a 3-component vector image (LPS mm) on the fixed grid")
    check_same_grid(displacement, fixed, "the displacement field", "the fixed image")
    half = size // 2
    ratio = (size - 1) / (half - 1)
    reference = sitk.Image([int(h) for h in half], sitk.sitkUInt8)
    reference.SetOrigin(fixed.GetOrigin())
    reference.SetDirection(fixed.GetDirection())
    reference.SetSpacing(tuple(float(s) for s in np.array(fixed.GetSpacing()) * ratio))
    field64 = sitk.Cast(displacement, sitk.sitkVectorFloat64)
    field64.CopyInformation(fixed)
    sampled = sitk.Resample(field64, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    d = sitk.GetArrayFromImage(sampled).transpose(3, 2, 1, 0)  # (3, I/2, J/2, K/2), LPS mm
    axes = [np.arange(h, dtype=np.float64) * r for h, r in zip(half, ratio)]
    x = np.stack(np.meshgrid(*axes, indexing="ij"))  # full-resolution fixed voxel positions
    a_fixed = np.array(fixed.GetDirection()).reshape(3, 3) @ np.diag(fixed.GetSpacing())
    target = moving if moving is not None else fixed
    a_moving = np.array(target.GetDirection()).reshape(3, 3) @ np.diag(target.GetSpacing())
    offset = np.array(fixed.GetOrigin()) - np.array(target.GetOrigin())
    inv = np.linalg.inv(a_moving)
    # moving index = A_m^-1 (o_f + A_f x + d - o_m)
    y = np.einsum("ab,bijk->aijk", inv @ a_fixed, x) + np.einsum("ab,bijk->aijk", inv, d)
    y += (inv @ offset)[:, None, None, None]
    u = y - x
    if not np.all(np.isfinite(u)) or np.abs(u).max(initial=0.0) > np.finfo(np.float16).max:
        raise InputError("the displacement has non-finite values or exceeds the float16 range of the Learn2Reg "
                         "format; check the registration output")
    return u.astype(np.float16)

def learn2reg_file_name(fixed_id: str, moving_id: str) -> str:
    """``disp_FFFF_MMMM.npz``: fixed id first, both zero-padded to four digits."""
    return f"disp_{int(fixed_id):04d}_{int(moving_id):04d}.npz"

def npz_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, array)  # positional: stored as "arr_0", what the evaluation reads
    return buffer.getvalue()


def learn2reg_names(cases) -> dict[str, str]:
    """``{pair name: disp_FFFF_MMMM.npz}`` of :class:`~textscf.evaluation.pairs.PairCase` objects, checked before
    any registration: every fixed image has even sizes and no two pairs share a file."""
    names: dict[str, str] = {}
    for case in cases:
        names[case.name] = learn2reg_file_name(*case.learn2reg_ids())
        size = case.fixed_size()
        if any(s % 2 or s < 4 for s in size):
            raise InputError(f"pair {case.name!r}: the fixed image is {'x'.join(map(str, size))}; the Learn2Reg "
                             "layout stores fields at half resolution and needs even sizes. Fix: pad or crop the "
                             "images to even sizes, or drop --learn2reg")
    clashes = sorted({n for n in names.values() if list(names.values()).count(n) > 1})
    if clashes:
        raise InputError(f"several pairs would write {', '.join(clashes)}: their Learn2Reg case ids repeat. Fix: "
                         "give distinct fixed_id / moving_id per pair")
    return names

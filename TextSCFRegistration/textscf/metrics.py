"""Registration quality metrics: Jacobian determinant, SDlogJ, folding, Dice, HD95 and endpoint error.

numpy in, numpy / Python floats out (torch tensors are accepted and moved to the CPU). Arrays and displacements
follow the engine conventions stated in docs/ARCHITECTURE.md ("Array and physical-space conventions").

Jacobian and SDlogJ follow the Learn2Reg evaluation code (``MDL-UzL/L2R``, ``evaluation/utils.py`` and
``evaluation/evaluation.py``), checked there:

- the Jacobian of ``x -> x + u(x)`` uses central differences ``(u[n+1] - u[n-1]) / 2`` (a ``[-0.5, 0, 0.5]``
  correlation kernel) on a field in voxels;
- Learn2Reg zero-pads at the volume border, which corrupts the outermost layer, and crops 2 voxels on every side
  before anything else; SDlogJ is then ``std(log(clip(J + 3, 1e-9, 1e9)))`` (numpy ``std``, ``ddof=0``) over the
  cropped volume. The ``+ 3`` is Learn2Reg's: it keeps moderately folded voxels finite in the log.

Here :func:`jacobian_determinant` returns the full ``(I, J, K)`` volume (``np.gradient``: the same central
differences inside, one-sided differences on the outermost layer instead of zero padding), and :func:`sdlogj` crops
the same 2-voxel border, so the SDlogJ of a field equals Learn2Reg's. :func:`folding_percent` and the Jacobian
min/max/mean of :func:`displacement_stats` use the whole volume (or the mask): no border crop.

Dice and HD95 use MONAI (``compute_dice``, ``compute_hausdorff_distance``). Learn2Reg's HD95 uses DeepMind's
``surface_distance`` (surfel-area-weighted percentile), so HD95 values can differ slightly from the leaderboard's.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from monai.metrics import compute_dice, compute_hausdorff_distance

from textscf.errors import InputError

#: Learn2Reg crops this many voxels on every side before computing SDlogJ.
L2R_BORDER = 2
#: Voxels added on every side of the joint bounding box before HD95. At least one is needed so the erosion that
#: finds the surface sees background around objects that do not touch the volume edge (MONAI's own crop uses 1).
HD95_CROP_MARGIN = 2


# ----------------------------------------------------------------------------------------------- validation helpers


def _to_numpy(array: Any, name: str) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    if isinstance(array, np.ndarray):
        return array
    try:
        return np.asarray(array)
    except Exception as exc:  # pragma: no cover - exotic input
        raise InputError(f"{name} must be a numpy array or a torch tensor, got {type(array).__name__}.") from exc


def _as_field(displacement: Any) -> np.ndarray:
    """(3, I, J, K) float array from numpy/torch, also accepting a leading batch of one."""
    u = _to_numpy(displacement, "displacement")
    if u.ndim == 5 and u.shape[0] == 1:
        u = u[0]
    if u.ndim != 4:
        raise InputError(
            f"displacement must have shape (3, I, J, K) (or (1, 3, I, J, K)), got {tuple(u.shape)}; "
            "pass one 3-D vector field with the components first."
        )
    if u.shape[0] != 3:
        raise InputError(
            f"displacement must have 3 channels (one per array axis) first, got shape {tuple(u.shape)}; "
            "move the component axis first (e.g. field.transpose(3, 0, 1, 2) for an (I, J, K, 3) array)."
        )
    if min(u.shape[1:]) < 3:
        raise InputError(
            f"displacement grid {tuple(u.shape[1:])} is too small: central differences need at least 3 voxels "
            "along every axis."
        )
    if not np.issubdtype(u.dtype, np.floating) or u.dtype == np.float16:
        u = u.astype(np.float32)
    if not np.isfinite(u).all():
        raise InputError("displacement contains NaN or infinite values; check the registration output.")
    return u


def _as_spacing(spacing: Any, name: str = "spacing") -> np.ndarray:
    s = np.asarray(_to_numpy(spacing, name), dtype=np.float64).reshape(-1)
    if s.size != 3 or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise InputError(f"{name} must be 3 positive numbers (mm per voxel along axes i, j, k), got {spacing!r}.")
    return s


def _as_volume(array: Any, name: str) -> np.ndarray:
    v = _to_numpy(array, name)
    if v.ndim != 3:
        raise InputError(f"{name} must be a 3-D (I, J, K) array, got shape {tuple(v.shape)}.")
    return v


def _as_mask(mask: Any, shape: tuple[int, ...], name: str = "mask") -> np.ndarray | None:
    if mask is None:
        return None
    m = _to_numpy(mask, name)
    if m.shape != tuple(shape):
        raise InputError(f"{name} has shape {tuple(m.shape)} but the volume has shape {tuple(shape)}; "
                         "give a mask on the same grid.")
    return m.astype(bool, copy=False)


def _check_same_shape(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape != b.shape:
        raise InputError(f"{names} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}; "
                         "resample both label maps onto the same grid first.")


# ------------------------------------------------------------------------------------------------------- Jacobian


def jacobian_determinant(displacement: Any, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Determinant of the Jacobian of ``x -> x + u(x)``.

    Args:
        displacement: ``(3, I, J, K)`` (or ``(1, 3, I, J, K)``) numpy array or torch tensor; channel ``a`` is the
            displacement along array axis ``a``, in voxels when ``spacing`` is None.
        spacing: ``(s_i, s_j, s_k)`` in mm when ``displacement`` is in mm (still along the array axes).

    Returns:
        ``(I, J, K)`` float array (float64 for float64 input, else float32).

    With ``u`` in mm, ``v_a = u_a / s_a`` is the displacement in voxels and the index-space Jacobian is
    ``I + d v_a / d idx_b``. The physical Jacobian ``delta_ab + (d u_a / d idx_b) / s_b`` equals
    ``S (I + dv/didx) S^-1`` with ``S = diag(s)``, so both have the same determinant; a direction matrix
    conjugates it again and changes nothing either. Derivatives are central differences inside and one-sided on
    the outermost layer (``np.gradient``), exact for fields linear in the index.
    """
    u = _as_field(displacement)
    if spacing is not None:
        s = _as_spacing(spacing).astype(u.dtype)
        u = u / s[:, None, None, None]
    # g[a][b] = d u_a / d idx_b
    g = [np.gradient(u[a]) for a in range(3)]
    j00, j11, j22 = g[0][0] + 1, g[1][1] + 1, g[2][2] + 1
    j01, j02, j10, j12, j20, j21 = g[0][1], g[0][2], g[1][0], g[1][2], g[2][0], g[2][1]
    det = j00 * (j11 * j22 - j12 * j21) - j01 * (j10 * j22 - j12 * j20) + j02 * (j10 * j21 - j11 * j20)
    return det.astype(u.dtype, copy=False)


def sdlogj(jacobian: Any, mask: Any = None, border: int = L2R_BORDER) -> float:
    """Standard deviation of the log Jacobian determinant, as Learn2Reg computes it.

    Args:
        jacobian: ``(I, J, K)`` Jacobian determinant (from :func:`jacobian_determinant`, full volume).
        mask: optional ``(I, J, K)`` boolean array; only voxels inside it count.
        border: voxels dropped on every side first (Learn2Reg: 2). 0 keeps the whole volume.

    Returns:
        ``std(log(clip(J + 3, 1e-9, 1e9)))`` over the cropped (and masked) voxels, ``ddof=0``.
    """
    jac = _as_volume(jacobian, "jacobian")
    m = _as_mask(mask, jac.shape)
    border = int(border)
    if border < 0 or min(jac.shape) <= 2 * border:
        raise InputError(f"cannot drop a {border}-voxel border from a volume of shape {tuple(jac.shape)}; "
                         f"SDlogJ needs more than {2 * border} voxels along every axis.")
    if border:
        crop = (slice(border, -border),) * 3
        jac = jac[crop]
        m = None if m is None else m[crop]
    values = jac if m is None else jac[m]
    if values.size == 0:
        raise InputError("the mask selects no voxel inside the volume (after dropping the border); "
                         "give a mask that covers part of the image.")
    # one float64 copy (C order: the sums then add in the same order for any input layout), worked on in place
    log_j = values.astype(np.float64, order="C")
    log_j += 3.0
    np.clip(log_j, 1e-9, 1e9, out=log_j)
    np.log(log_j, out=log_j)
    return _std_in_place(log_j)


def _std_in_place(x: np.ndarray) -> float:
    """``np.std(x)`` (``ddof=0``), bit for bit: the same sums and steps, but ``x`` (float64) is overwritten with the
    squared deviations instead of a second full-size temporary holding them."""
    mean = np.add.reduce(x, axis=None, keepdims=True)
    np.true_divide(mean, x.size, out=mean)
    x -= mean
    np.multiply(x, x, out=x)
    return float(np.sqrt(np.add.reduce(x, axis=None) / x.size))


def folding_percent(jacobian: Any, mask: Any = None) -> float:
    """Percentage (0-100) of voxels with a Jacobian determinant ``<= 0``.

    Args:
        jacobian: ``(I, J, K)`` Jacobian determinant.
        mask: optional ``(I, J, K)`` boolean array; the percentage is of the voxels inside it.
    """
    jac = _as_volume(jacobian, "jacobian")
    m = _as_mask(mask, jac.shape)
    values = jac if m is None else jac[m]
    if values.size == 0:
        raise InputError("the mask selects no voxel; give a mask that covers part of the image.")
    return 100.0 * float(np.count_nonzero(values <= 0)) / values.size


def displacement_stats(displacement: Any, spacing: Sequence[float] | None = None, mask: Any = None) -> dict[str, float]:
    """Jacobian statistics of a displacement field.

    Args:
        displacement: ``(3, I, J, K)`` field, see :func:`jacobian_determinant`.
        spacing: mm per voxel when the field is in mm, else None (voxels).
        mask: optional ``(I, J, K)`` boolean array restricting every statistic.

    Returns:
        ``{"sdlogj", "folding_percent", "jacobian_min", "jacobian_max", "jacobian_mean"}`` as floats; SDlogJ drops
        Learn2Reg's 2-voxel border, the others use every (masked) voxel.
    """
    jac = jacobian_determinant(displacement, spacing)
    m = _as_mask(mask, jac.shape)
    values = jac if m is None else jac[m]
    if values.size == 0:
        raise InputError("the mask selects no voxel; give a mask that covers part of the image.")
    return {
        "sdlogj": sdlogj(jac, m),
        "folding_percent": folding_percent(jac, m),
        "jacobian_min": float(values.min()),
        "jacobian_max": float(values.max()),
        "jacobian_mean": float(values.mean(dtype=np.float64)),
    }


# ------------------------------------------------------------------------------------------------- label overlap


def _label_pair(pred: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    p = _as_volume(pred, "pred")
    t = _as_volume(target, "target")
    _check_same_shape(p, t, "pred and target")
    return p, t


def _label_list(labels: Iterable[Any]) -> list[int]:
    try:
        out = [int(v) for v in labels]
    except (TypeError, ValueError) as exc:
        raise InputError(f"labels must be integers, got {labels!r}.") from exc
    if not out:
        raise InputError("labels is empty; give the label values to evaluate (e.g. range(1, 14)).")
    return out


def label_boxes(labels_map: np.ndarray, values: Iterable[Any]) -> dict[int, tuple[slice, ...] | None]:
    """Bounding box of each label value in ``labels_map`` (None where absent), in one pass over the volume
    (``scipy.ndimage.find_objects``; values <= 0 by their own mask). Give it to :func:`overlap_per_label` as
    ``pred_boxes``/``target_boxes`` when the same map is scored more than once."""
    values = _label_list(values)
    positive = [v for v in values if v > 0]
    boxes: dict[int, tuple[slice, ...] | None] = {}
    if positive:
        integer = labels_map if labels_map.dtype.kind in "iu" else labels_map.astype(np.int64)
        found = ndimage.find_objects(integer, max_label=max(positive))
        boxes = {v: found[v - 1] for v in positive}
    for v in values:
        if v <= 0:
            mask = labels_map == v
            boxes[v] = None if not mask.any() else tuple(
                slice(int(idx[0]), int(idx[-1]) + 1)
                for idx in (np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
                            for axis in range(mask.ndim)))
    return boxes


def _label_crops(pred: np.ndarray, target: np.ndarray, labels: list[int], margin: int, pred_boxes=None,
                 target_boxes=None):
    """For each label: ``(label, pred == label, target == label)`` cropped to the label's joint bounding box in both
    maps grown by ``margin`` voxels (clipped to the volume); the masks are None when the label is in neither map.
    Only the boxes are compared, so the cost follows the labels' size, not the volume's."""
    in_pred = label_boxes(pred, labels) if pred_boxes is None else pred_boxes
    in_target = label_boxes(target, labels) if target_boxes is None else target_boxes
    for label in labels:
        boxes = [b for b in (in_pred[label], in_target[label]) if b is not None]
        if not boxes:
            yield label, None, None
            continue
        box = tuple(slice(max(min(b[axis].start for b in boxes) - margin, 0),
                          min(max(b[axis].stop for b in boxes) + margin, pred.shape[axis]))
                    for axis in range(pred.ndim))
        yield label, pred[box] == label, target[box] == label


def _channel(x: np.ndarray) -> torch.Tensor:
    # (1, 1, I, J, K): MONAI wants batch-first one-hot channels
    return torch.from_numpy(np.ascontiguousarray(x))[None, None]


def overlap_per_label(pred: Any, target: Any, labels: Iterable[Any], spacing: Sequence[float] | None = None,
                      pred_boxes: dict | None = None,
                      target_boxes: dict | None = None) -> tuple[dict[int, float], dict[int, float] | None]:
    """Dice per label and, given ``spacing``, the 95th-percentile symmetric Hausdorff distance per label (mm).

    Args:
        pred, target: ``(I, J, K)`` integer label maps on the same grid (e.g. warped moving labels, fixed labels).
        labels: label values to evaluate.
        spacing: ``(s_i, s_j, s_k)`` mm per voxel along the array axes (anisotropy honoured); None: no HD95.
        pred_boxes, target_boxes: :func:`label_boxes` of ``pred`` and ``target`` for ``labels``, when already found
            (e.g. several maps scored against one target).

    Returns:
        ``({label: dice}, {label: hd95_mm} or None)``. Dice is NaN when the label is absent from both maps, 0 when it
        is in only one; HD95 is NaN when the label is missing from either map.

    One label at a time, cropped to its joint bounding box (all labels' boxes found in one pass over each map) plus
    :data:`HD95_CROP_MARGIN` voxels, before MONAI's ``compute_dice`` and ``compute_hausdorff_distance(percentile=95)``:
    Dice does not see the background outside the box, the surfaces and their distances lie inside it, and the margin
    keeps background around objects that do not touch the volume edge, so the values are those of the whole volume,
    while time and memory follow the labels' size (192x160x256 with many labels included).
    """
    p, t = _label_pair(pred, target)
    s = None if spacing is None else [float(v) for v in _as_spacing(spacing)]
    dice: dict[int, float] = {}
    hd: dict[int, float] | None = None if s is None else {}
    for label, a, b in _label_crops(p, t, _label_list(labels), margin=0 if s is None else HD95_CROP_MARGIN,
                                    pred_boxes=pred_boxes, target_boxes=target_boxes):
        if a is None:
            dice[label] = math.nan
        else:
            dice[label] = float(compute_dice(_channel(a), _channel(b), include_background=True,
                                             ignore_empty=False).item())
        if hd is not None:
            hd[label] = _hd95(a, b, s) if a is not None and a.any() and b.any() else math.nan
    return dice, hd


def _hd95(a: np.ndarray, b: np.ndarray, spacing: list[float]) -> float:
    with warnings.catch_warnings():
        # MONAI-internal noise: a deprecated argument MONAI passes itself, and empty-mask warnings (both masks are
        # non-empty here)
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        warnings.filterwarnings("ignore", message=".*is all 0.*")
        hd = compute_hausdorff_distance(_channel(a), _channel(b), include_background=True, percentile=95,
                                        spacing=spacing)
    return float(hd.item())


def dice_per_label(pred: Any, target: Any, labels: Iterable[Any]) -> dict[int, float]:
    """Dice overlap per label (:func:`overlap_per_label`): ``{label: dice}``."""
    return overlap_per_label(pred, target, labels)[0]


def hd95_per_label(pred: Any, target: Any, labels: Iterable[Any], spacing: Sequence[float]) -> dict[int, float]:
    """95th-percentile symmetric Hausdorff distance per label in mm (:func:`overlap_per_label`):
    ``{label: hd95_mm}``."""
    return overlap_per_label(pred, target, labels, spacing)[1]


def mean_ignoring_nan(values: Mapping[Any, float]) -> float:
    """Mean of the dict's values ignoring NaN; NaN when there is no finite value."""
    arr = np.asarray([float(v) for v in values.values()], dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else math.nan


def endpoint_errors_mm(estimated: np.ndarray, true: np.ndarray, spacing, mask: np.ndarray | None = None) -> np.ndarray:
    """``|diag(spacing) (estimated - true)|`` in mm at the voxels of ``mask`` (all voxels if None), flattened.

    ``estimated`` and ``true`` are ``(3, I, J, K)`` voxel displacements on one grid of ``spacing`` (mm, I J K);
    ``mask`` is ``(I, J, K)`` bool. The direction matrix is a rotation, so it does not change lengths.
    """
    estimated, true = np.asarray(estimated, np.float64), np.asarray(true, np.float64)
    if estimated.shape != true.shape or estimated.ndim != 4 or estimated.shape[0] != 3:
        raise InputError(f"displacements must both be (3, I, J, K), got {estimated.shape} and {true.shape}.")
    length = np.linalg.norm((estimated - true) * np.asarray(spacing, np.float64)[:, None, None, None], axis=0)
    if mask is None:
        return length.ravel()
    mask = np.asarray(mask, bool)
    if mask.shape != length.shape or not mask.any():
        raise InputError(f"mask must be a non-empty (I, J, K) = {length.shape} boolean array.")
    return length[mask]


def mean_endpoint_error_mm(estimated: np.ndarray, true: np.ndarray, spacing, mask: np.ndarray | None = None) -> float:
    """The mean of :func:`endpoint_errors_mm`."""
    return float(endpoint_errors_mm(estimated, true, spacing, mask).mean())

"""Training losses: similarity (MSE, local NCC, MIND-SSC descriptors), soft Dice on warped one-hot labels, diffusion regulariser.

All functions take torch tensors ``(B, C, I, J, K)`` and are differentiable. The objective of textSCF is
``similarity + dice_weight * (1 - soft Dice) + smooth_weight * ||grad u||^2`` (:class:`RegistrationLoss`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.networks.layers import GaussianFilter
from monai.networks.utils import one_hot
from torch import nn

from textscf.errors import InputError


def _check_5d(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch tensor, got {type(x).__name__}.")
    if x.ndim != 5:
        raise InputError(f"{name} must have shape (B, C, I, J, K), got {tuple(x.shape)}.")


def _check_pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
    _check_5d(a, names[0])
    _check_5d(b, names[1])
    if a.shape != b.shape:
        raise InputError(f"{names[0]} and {names[1]} must have the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}.")


def one_hot_regions(regions: torch.Tensor, num_regions: int) -> torch.Tensor:
    """One-hot encode region indices.

    Args:
        regions: ``(B, 1, I, J, K)`` integer tensor of region indices in ``[0, num_regions)``.
        num_regions: N, the number of regions including the background (index 0).

    Returns:
        ``(B, N, I, J, K)`` float32 tensor.
    """
    _check_5d(regions, "regions")
    if regions.shape[1] != 1:
        raise InputError(f"regions must have one channel, got shape {tuple(regions.shape)}.")
    if regions.dtype.is_floating_point or regions.dtype == torch.bool:
        raise InputError(f"regions must hold integer region indices, got dtype {regions.dtype}; "
                         "map label values to region indices and pass them as torch.long.")
    num_regions = int(num_regions)
    if num_regions < 1:
        raise InputError(f"num_regions must be at least 1, got {num_regions}.")
    lo, hi = int(regions.min()), int(regions.max())
    if lo < 0 or hi >= num_regions:
        raise InputError(f"region indices must lie in [0, {num_regions - 1}], found values in [{lo}, {hi}]; "
                         "map raw label values to region indices (0 = background) first.")
    return one_hot(regions.long(), num_regions, dtype=torch.float32, dim=1)


def mse_loss(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Mean squared intensity difference of ``(B, C, I, J, K)`` images; a scalar tensor."""
    _check_pair(warped, fixed, ("warped", "fixed"))
    return F.mse_loss(warped, fixed)


# MONAI Dice with the squared denominator (sum p^2 + sum t^2) of the textSCF authors' Dice loss; per sample and
# region so absent regions can be dropped before averaging.
_DICE = DiceLoss(include_background=True, squared_pred=True, reduction="none")


def soft_dice_loss(warped_onehot: torch.Tensor, fixed_onehot: torch.Tensor,
                   include_background: bool = False) -> torch.Tensor:
    """``1 - mean soft Dice`` over regions; a scalar tensor in ``[0, 1]``.

    Args:
        warped_onehot: ``(B, N, I, J, K)`` warped moving one-hot labels (soft after interpolation).
        fixed_onehot: ``(B, N, I, J, K)`` fixed one-hot labels.
        include_background: whether channel 0 counts.

    The mean runs over the (sample, region) pairs where the region is present in either image: a region absent
    from both has no overlap to score, so it neither yields NaN nor pulls the mean towards 0 or 1. With no present
    region at all the loss is 0.
    """
    _check_pair(warped_onehot, fixed_onehot, ("warped_onehot", "fixed_onehot"))
    first = 0 if include_background else 1
    if warped_onehot.shape[1] <= first:
        raise InputError(f"soft Dice needs at least {first + 1} channel(s) (background + regions), got "
                         f"{warped_onehot.shape[1]}; one-hot encode with one_hot_regions().")
    warped_onehot, fixed_onehot = warped_onehot[:, first:], fixed_onehot[:, first:]
    per_region = _DICE(warped_onehot, fixed_onehot).reshape(warped_onehot.shape[:2])  # (B, N')
    with torch.no_grad():
        present = (warped_onehot.sum(dim=(2, 3, 4)) + fixed_onehot.sum(dim=(2, 3, 4))) > 0
    if not bool(present.any()):
        return per_region.sum() * 0.0  # keeps the graph for backward
    return per_region[present].mean()


def gradient_loss(field: torch.Tensor) -> torch.Tensor:
    """Diffusion regulariser ``||grad u||^2``: VoxelMorph's ``Grad('l2')``.

    Args:
        field: ``(B, C, I, J, K)`` displacement (C = 3).

    Returns:
        Scalar ``(mean(d_i^2) + mean(d_j^2) + mean(d_k^2)) / 3`` of the forward differences along each axis.
    """
    _check_5d(field, "field")
    if min(field.shape[2:]) < 2:
        raise InputError(f"field needs at least 2 voxels along every axis for differences, got {tuple(field.shape)}.")
    d_i = field[:, :, 1:] - field[:, :, :-1]
    d_j = field[:, :, :, 1:] - field[:, :, :, :-1]
    d_k = field[:, :, :, :, 1:] - field[:, :, :, :, :-1]
    return (d_i.pow(2).mean() + d_j.pow(2).mean() + d_k.pow(2).mean()) / 3.0


def multiscale_dice_loss(moving_onehot: torch.Tensor, fixed_onehot: torch.Tensor, displacement: torch.Tensor,
                         warp: nn.Module, sigmas=(0.0,)) -> torch.Tensor:
    """Soft Dice loss averaged over Gaussian-blurred copies of the label maps; a scalar tensor.

    ``warp(blur_s(moving), u)`` against ``blur_s(fixed)`` for each ``s`` in ``sigmas`` (voxels; 0 = the sharp
    labels). Sharp one-hot labels pass a gradient to ``u`` only where ``x + u(x)`` lies within a voxel of a moving
    boundary; blurred labels reach ``sigma`` voxels further, so large misalignments get a signal too.

    Args:
        moving_onehot, fixed_onehot: ``(B, N, I, J, K)``.
        displacement: ``(B, 3, I, J, K)`` voxels, resampling convention.
        warp: a :class:`textscf.warp.SpatialTransformer` (trilinear).
    """
    _check_pair(moving_onehot, fixed_onehot, ("moving_onehot", "fixed_onehot"))
    sigmas = [float(s) for s in sigmas]
    if not sigmas or min(sigmas) < 0:
        raise InputError(f"Dice blur sigmas must be >= 0 voxels (0 = sharp), got {sigmas}.")
    total = 0.0
    for sigma in sigmas:
        m, f = moving_onehot, fixed_onehot
        if sigma > 0:
            with torch.no_grad():
                blur = GaussianFilter(3, sigma).to(m.device)
                m, f = blur(m), blur(f)
        total = total + soft_dice_loss(warp(m, displacement), f)
    return total / len(sigmas)


def endpoint_error_loss(displacement: torch.Tensor, true_displacement: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean length of ``displacement - true_displacement`` (``(B, 3, I, J, K)``, voxels); a scalar."""
    _check_pair(displacement, true_displacement, ("displacement", "true_displacement"))
    return (displacement - true_displacement).pow(2).sum(1).add(1e-9).sqrt().mean()


def _check_window(window: int) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise InputError(f"the NCC window must be a positive odd integer (e.g. 9), got {window!r}.")
    return window


NCC_SMOOTH = 1e-5  # MONAI's smooth_dr: a flat window scores 0


def window_sums(x: torch.Tensor, window: int) -> torch.Tensor:
    """Sum of ``x`` over the ``window``-voxel cube around every voxel, zero outside the volume (MONAI's rectangular
    kernel with zero padding): running sums along each spatial axis, so the cost does not grow with the window.

    Args:
        x: ``(B, C, I, J, K)``.
        window: odd window side.
    """
    r = window // 2
    for axis in (2, 3, 4):
        n = x.shape[axis]
        running = F.pad(torch.cumsum(x, axis), [0, 0] * (4 - axis) + [1, 0])  # running[i] = sum of x[:i]
        at = torch.arange(n, device=x.device)
        x = running.index_select(axis, (at + r + 1).clamp(max=n)) - running.index_select(axis, (at - r).clamp(min=0))
    return x


class LocalNCC:
    """Negative local normalised cross-correlation against one fixed image, its window statistics computed once.

    The value of MONAI's ``LocalNormalizedCrossCorrelationLoss`` (rectangular window, zero padding, mean reduction):
    like VoxelMorph's NCC it averages the *squared* local correlation, so anti-correlated windows also score -1;
    windows where either image is flat score 0. A scalar in ``[-1, 0]``, ``-1`` for identical images. Every call
    filters only the warped image's three moments (the fixed image's two are kept), with :func:`window_sums`.

    Args:
        fixed: ``(B, C, I, J, K)`` image.
        window: side of the cubic window (odd).
    """

    def __init__(self, fixed: torch.Tensor, window: int = 9) -> None:
        _check_5d(fixed, "fixed")
        self.window = _check_window(window)
        self.fixed = fixed
        sums = window_sums(torch.cat([fixed, fixed * fixed], 1), self.window)
        channels = fixed.shape[1]
        self.fixed_sum = sums[:, :channels]
        self.fixed_var = torch.clamp(sums[:, channels:] - self.fixed_sum * self.fixed_sum / self.window ** 3, min=0)

    def __call__(self, warped: torch.Tensor) -> torch.Tensor:
        _check_pair(warped, self.fixed, ("warped", "fixed"))
        c = warped.shape[1]
        sums = window_sums(torch.cat([warped, warped * warped, warped * self.fixed], 1), self.window)
        warped_sum, warped_sq, cross_sum = sums[:, :c], sums[:, c:2 * c], sums[:, 2 * c:]
        warped_mean = warped_sum / self.window ** 3
        cross = cross_sum - warped_mean * self.fixed_sum
        warped_var = torch.clamp(warped_sq - warped_mean * warped_sum, min=0)
        return -(cross * cross / (self.fixed_var * warped_var + NCC_SMOOTH)).mean()


def local_ncc_loss(warped: torch.Tensor, fixed: torch.Tensor, window: int = 9) -> torch.Tensor:
    """Negative local normalised cross-correlation of two images (:class:`LocalNCC`); a scalar in ``[-1, 0]``.

    Args:
        warped, fixed: ``(B, C, I, J, K)`` images.
        window: side of the cubic window (odd).
    """
    return LocalNCC(fixed, window)(warped)  # checks both images


def mind_loss(warped: torch.Tensor, fixed: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """Mean squared difference of the MIND-SSC descriptors (:func:`textscf.mind.mind_ssc`) of two images; a scalar
    >= 0, 0 for identical images. Modality-independent: an image and any monotone or inverted remapping of its
    intensities have nearly the same descriptors.

    Args:
        warped, fixed: ``(B, 1, I, J, K)`` images.
        radius, dilation: MIND-SSC patch radius and neighbour distance (voxels).
    """
    from textscf.mind import mind_ssc

    _check_pair(warped, fixed, ("warped", "fixed"))
    with torch.no_grad():
        target = mind_ssc(fixed, radius, dilation)
    return F.mse_loss(mind_ssc(warped, radius, dilation), target)


SIMILARITIES = ("mse", "ncc", "mind")


class RegistrationLoss(nn.Module):
    """textSCF objective: ``similarity + dice_weight * soft Dice loss + smooth_weight * gradient loss``.

    Args:
        similarity: ``"mse"``, ``"ncc"`` (local NCC, :func:`local_ncc_loss`) or ``"mind"`` (:func:`mind_loss`).
        dice_weight: weight of :func:`soft_dice_loss` (used only when both label tensors are given).
        smooth_weight: weight of :func:`gradient_loss`.
        ncc_window: NCC window side (odd), used when ``similarity == "ncc"``.
    """

    def __init__(self, similarity: str = "mse", dice_weight: float = 1.0, smooth_weight: float = 0.1,
                 ncc_window: int = 9) -> None:
        super().__init__()
        if similarity not in SIMILARITIES:
            raise InputError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}.")
        for name, w in (("dice_weight", dice_weight), ("smooth_weight", smooth_weight)):
            if not math.isfinite(float(w)) or float(w) < 0:
                raise InputError(f"{name} must be a finite number >= 0, got {w!r}.")
        self.similarity = similarity
        self.dice_weight = float(dice_weight)
        self.smooth_weight = float(smooth_weight)
        self.ncc_window = _check_window(ncc_window)
        self._ncc: LocalNCC | None = None  # the last fixed image's window statistics (refinement: one fixed image)

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor, field: torch.Tensor,
                warped_labels_onehot: torch.Tensor | None = None,
                fixed_labels_onehot: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and its weighted parts.

        Args:
            warped, fixed: ``(B, 1, I, J, K)`` images.
            field: ``(B, 3, I', J', K')`` field to regularise (any grid).
            warped_labels_onehot, fixed_labels_onehot: ``(B, N, I, J, K)`` one-hot labels, both or neither.

        Returns:
            ``(total, components)``: ``total`` a scalar tensor; ``components`` maps ``"similarity"``,
            ``"smooth"`` and (with labels) ``"dice"`` to their *weighted* values as floats, summing to ``total``.
        """
        if (warped_labels_onehot is None) != (fixed_labels_onehot is None):
            raise InputError("give both warped_labels_onehot and fixed_labels_onehot for the Dice term, or neither.")
        if self.similarity == "mse":
            sim = mse_loss(warped, fixed)
        elif self.similarity == "mind":
            sim = mind_loss(warped, fixed)
        else:
            if self._ncc is None or self._ncc.fixed is not fixed:
                self._ncc = LocalNCC(fixed, self.ncc_window)
            sim = self._ncc(warped)
        smooth = self.smooth_weight * gradient_loss(field)
        total = sim + smooth
        components = {"similarity": float(sim.detach()), "smooth": float(smooth.detach())}
        if warped_labels_onehot is not None:
            dice = self.dice_weight * soft_dice_loss(warped_labels_onehot, fixed_labels_onehot)
            total = total + dice
            components["dice"] = float(dice.detach())
        return total, components

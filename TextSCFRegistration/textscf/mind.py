"""MIND-SSC: modality-independent self-similarity descriptors (Heinrich et al., MICCAI 2013).

Each voxel is described by how similar small patches around it are to each other, not by its intensity: for the
12 pairs of its six neighbours (at ``dilation`` voxels) that lie sqrt(2) * ``dilation`` apart, the patch distance
``D = box_r * (I(x + a) - I(x + b))^2`` (a box of side ``2 * radius + 1``, over the voxels inside the image at the border). The descriptor is
``exp(-(D - min D) / V)`` with ``V`` the mean of ``D - min D`` over the 12 channels (a local noise estimate, clamped
to a range around its image-wide mean), divided by its maximum over the channels. Two images of the same anatomy then
have similar descriptors whatever their contrast, so the mean squared descriptor difference is a similarity for CT
and MRI alike (deeds, ConvexAdam). Written from the paper's description.

Tensors are ``(B, 1, I, J, K)``; descriptors ``(B, 12, I, J, K)``, differentiable.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from textscf.errors import InputError

# The six face neighbours and the 12 pairs of them at squared distance 2 (opposite neighbours are left out).
_SIX = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))
PAIRS = tuple((a, b) for a, b in itertools.combinations(_SIX, 2)
              if sum((x - y) ** 2 for x, y in zip(a, b)) == 2)
CHANNELS = len(PAIRS)  # 12


def _shift(padded: torch.Tensor, offset, pad: int, shape) -> torch.Tensor:
    """``image(x + offset)`` from a copy padded by ``pad`` voxels on every side (replicate)."""
    i, j, k = (pad + o for o in offset)
    return padded[:, :, i:i + shape[0], j:j + shape[1], k:k + shape[2]]


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over a (2r+1)^3 box with replicate padding: separable sums of shifted slices (cheaper than pooling on
    the CPU, forward and backward)."""
    if radius <= 0:
        return x
    size = 2 * radius + 1
    for axis in range(3):
        n = x.shape[2 + axis]
        first = x.narrow(2 + axis, 0, 1)
        last = x.narrow(2 + axis, n - 1, 1)
        padded = torch.cat([first] * radius + [x] + [last] * radius, 2 + axis)
        total = padded.narrow(2 + axis, 0, n)
        for shift in range(1, size):
            total = total + padded.narrow(2 + axis, shift, n)
        x = total / size
    return x


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptors of ``image``.

    Args:
        image: ``(B, 1, I, J, K)``.
        radius: patch half-size (box side ``2 * radius + 1``).
        dilation: distance of the six neighbours, voxels.

    Returns:
        ``(B, 12, I, J, K)`` in (0, 1].
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 5 or image.shape[1] != 1:
        raise InputError(f"MIND-SSC needs a (B, 1, I, J, K) tensor, got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}.")
    if int(radius) < 0 or int(dilation) < 1:
        raise InputError(f"MIND-SSC needs radius >= 0 and dilation >= 1, got {radius} and {dilation}.")
    if min(image.shape[2:]) < 2:
        raise InputError(f"MIND-SSC needs at least 2 voxels along every axis, got {tuple(image.shape)}.")
    d, r = int(dilation), int(radius)
    shape = image.shape[2:]
    padded = F.pad(image, (d,) * 6, mode="replicate")
    distances = []
    for a, b in PAIRS:
        diff = _shift(padded, [d * v for v in a], d, shape) - _shift(padded, [d * v for v in b], d, shape)
        distances.append(diff * diff)
    ssd = torch.cat(distances, 1)
    if r > 0:  # the box mean over the patch; at the border, over its voxels inside the image
        ssd = F.avg_pool3d(ssd, 2 * r + 1, stride=1, padding=r, count_include_pad=False)
    ssd = ssd - ssd.min(1, keepdim=True).values
    variance = ssd.mean(1, keepdim=True)
    mean = float(variance.mean().detach())
    variance = variance.clamp(min=mean * 1e-3 + 1e-12, max=mean * 1e3 + 1e-12)
    descriptor = torch.exp(-ssd / variance)
    return descriptor / descriptor.max(1, keepdim=True).values

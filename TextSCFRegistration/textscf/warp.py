"""Warping, scaling-and-squaring integration and field resizing (MONAI's Warp/DVF2DDF underneath).

The shapes, units and resampling convention of displacements are stated once, in docs/ARCHITECTURE.md ("Array
and physical-space conventions"; the network's half-resolution field under "Model").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import DVF2DDF, Warp


class SpatialTransformer(torch.nn.Module):
    """``image(x + u(x))`` by ``grid_sample(align_corners=True)``; zero outside the image.

    Args:
        mode: "bilinear" (trilinear in 3-D) or "nearest" (labels).
        padding_mode: "zeros" (images) or "border" (fields).

    Shapes: ``image (B, C, I, J, K)``, ``displacement (B, 3, I, J, K)`` -> ``(B, C, I, J, K)``.
    """

    def __init__(self, mode: str = "bilinear", padding_mode: str = "zeros"):
        super().__init__()
        self.warp = Warp(mode=mode, padding_mode=padding_mode)

    def forward(self, image: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
        ref = self.warp.ref_grid
        if ref is not None and (ref.device != displacement.device or ref.dtype != displacement.dtype):
            self.warp.ref_grid = None  # MONAI caches the identity grid per shape, not per device/dtype
        return self.warp(image, displacement)


class ScalingAndSquaring(torch.nn.Module):
    """Integrate a stationary velocity field by scaling and squaring (``steps`` squarings, 7 in the paper).

    Shapes: ``(B, 3, I, J, K) -> (B, 3, I, J, K)``, both in voxels.
    """

    def __init__(self, steps: int = 7):
        super().__init__()
        self.steps = steps
        self.integrate = DVF2DDF(num_steps=steps, mode="bilinear", padding_mode="zeros")

    def forward(self, velocity: torch.Tensor) -> torch.Tensor:
        ref = self.integrate.warp_layer.ref_grid
        if ref is not None and (ref.device != velocity.device or ref.dtype != velocity.dtype):
            self.integrate.warp_layer.ref_grid = None
        return self.integrate(velocity)


def warp(image: torch.Tensor, displacement: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Functional form of :class:`SpatialTransformer` with zero padding."""
    return SpatialTransformer(mode=mode)(image, displacement)


def resize_field(field: torch.Tensor, size: tuple[int, int, int], rescale: bool = False) -> torch.Tensor:
    """Trilinear resize of a displacement field (``align_corners=False``).

    With ``rescale=False`` the values keep their units (the textSCF heads already emit full-resolution voxels);
    with ``rescale=True`` channel a is multiplied by ``size[a] / field.shape[2 + a]`` to convert voxel units.
    """
    out = F.interpolate(field, size=tuple(size), mode="trilinear", align_corners=False)
    if rescale:
        factors = torch.tensor([s / f for s, f in zip(size, field.shape[2:])], dtype=field.dtype, device=field.device)
        out = out * factors.view(1, 3, 1, 1, 1)
    return out


def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Displacement of ``x -> x + first(x) + second(x + first(x))`` (apply ``first``, then ``second``); ``second``
    sampled trilinearly with border padding (``grid_sample(align_corners=True)``, as :class:`SpatialTransformer`).
    Fields ``(B, 3, I, J, K)`` in voxels, done slab by slab along I (:data:`COMPOSE_SLAB_VOXELS`), so no full-size
    sampling grid is built."""
    size = first.shape[2:]
    rows = max(1, COMPOSE_SLAB_VOXELS // (size[1] * size[2]))
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in size], dtype=first.dtype, device=first.device)
    axes = [torch.arange(n, dtype=first.dtype, device=first.device) for n in size]
    out = torch.empty_like(first)
    for start in range(0, size[0], rows):
        stop = min(start + rows, size[0])
        index = torch.stack(torch.meshgrid(axes[0][start:stop], axes[1], axes[2], indexing="ij"))  # (3, i, J, K)
        where = (index[None] + first[:, :, start:stop]) * scale.view(1, 3, 1, 1, 1) - 1.0
        grid = where.permute(0, 2, 3, 4, 1).flip(-1)  # grid_sample's (x, y, z) are the (K, J, I) axes
        out[:, :, start:stop] = first[:, :, start:stop] + F.grid_sample(second, grid, mode="bilinear",
                                                                        padding_mode="border", align_corners=True)
    return out


#: Voxels per slab of :func:`compose`.
COMPOSE_SLAB_VOXELS = 1 << 20


def invert(displacement: torch.Tensor, iterations: int = 20, tolerance: float = 1e-4) -> torch.Tensor:
    """Displacement ``v`` of the inverse of ``x -> x + u(x)``, by the fixed-point iteration ``v(y) = -u(y + v(y))``
    (border padding outside the grid), until no voxel moves by more than ``tolerance`` voxels or after
    ``iterations`` steps.

    The iteration contracts where the field's voxel gradient is below 1 in norm (every non-folding smooth field of
    a registration); each step is one :func:`compose`. Shapes and units as
    :func:`compose`.
    """
    inverse = -displacement
    for _ in range(iterations - 1):
        step = compose(inverse, displacement).neg_()  # -u(y + v(y)) - v(y): the update, in place of one more field
        change = float(torch.maximum(step.max(), -step.min()))
        inverse = inverse + step if inverse.requires_grad or step.requires_grad else inverse.add_(step)
        if change < tolerance:
            break
    return inverse

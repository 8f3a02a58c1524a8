"""The registration's deformation on the fixed grid, computed slab by slab with torch.

:class:`Deformation` turns the network's half-resolution voxel field into everything the outputs need at full
resolution — the physical field, its Jacobian determinant, the field composed with the initial alignment and the
warped images — without building ITK transforms or full-size float64 copies. It reproduces, to float32 rounding,
the ITK path in :mod:`textscf.spatial` (``voxel_displacement_to_physical`` → ``resample_displacement`` →
``compose_with_initial`` → ``warp_image``; ``metrics.jacobian_determinant``), which stays the reference and handles
fields and transforms of any kind; the tests compare the two.

Conventions (docs/ARCHITECTURE.md): the model field comes in ITK index order, ``(3, I, J, K)``; LPS mm;
resampling convention (a fixed point ``x`` maps to the moving point ``initial(x + d(x))``). Sampling follows ITK's
resampler: a point within ``[-0.5, size - 0.5)`` voxels of an image on every axis is interpolated with the edge
voxels clamped, a point beyond gets the default value; nearest-neighbour ties (exactly half-way) round up, as ITK's
do, up to float32 rounding of the coordinates.

Arrays are kept in ITK's buffer order ``(K, J, I)`` (what SimpleITK's array views give and take), so no full-size array
is transposed, and work is done on slabs of its first axis (the fixed grid's K), so that the temporary coordinate
arrays stay small (cache and memory): the peak is the field itself plus a few slabs. When the fixed grid's axes are
the model grid's, the field is resampled axis by axis instead of by ``grid_sample``.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from textscf.errors import InputError
from textscf.spatial import GridLike, ModelGrid, _as_grid

SLAB_VOXELS = 1 << 20  # voxels per slab: few parallel regions for threads, temporaries of a few MB (no page-fault storm)
#: Voxel types a nearest-neighbour warp keeps (torch indexes them); others are picked from a float32 copy.
TORCH_INDEXABLE = tuple(np.dtype(t) for t in (np.uint8, np.int8, np.int16, np.int32, np.int64, np.float32, np.float64))


def matrix_offset(transform: sitk.Transform | None) -> tuple[np.ndarray, np.ndarray] | None:
    """``(M, t)`` with ``transform(y) = M y + t`` for ITK's matrix-offset transforms (affine, rigid, similarity,
    translation...); the identity for None; None for any other kind (B-spline, displacement field, composite)."""
    if transform is None:
        return np.eye(3), np.zeros(3)
    t = transform.Downcast() if hasattr(transform, "Downcast") else transform
    if isinstance(t, sitk.TranslationTransform):
        return np.eye(3), np.asarray(t.GetOffset(), dtype=np.float64)
    if not all(hasattr(t, name) for name in ("GetMatrix", "GetCenter", "GetTranslation")):
        return None
    m = np.asarray(t.GetMatrix(), dtype=np.float64).reshape(3, 3)
    centre = np.asarray(t.GetCenter(), dtype=np.float64)
    return m, np.asarray(t.GetTranslation(), dtype=np.float64) + centre - m @ centre


def supports(initial: sitk.Transform | None) -> bool:
    """Whether :class:`Deformation` can compose with this initial transform (else use the ITK path)."""
    return matrix_offset(initial) is not None


def _sampling_coordinates(a: np.ndarray, b: np.ndarray, size) -> tuple[np.ndarray, np.ndarray]:
    """``index = a p + b`` (ITK order i, j, k) -> the affine map to ``grid_sample``'s coordinates of a volume stored in
    ITK's buffer order ``(K, J, I)``: components (i, j, k) = grid_sample's (x, y, z), ``-1`` and ``1`` at the first
    and last voxel centres (``align_corners=True``). ``size``: the volume's ``(I, J, K)``."""
    scale = 2.0 / np.maximum(np.asarray(size, dtype=np.float64) - 1.0, 1.0)
    return scale[:, None] * a, scale * b - 1.0


def _grid_points(rows: range, shape, a: np.ndarray, b: np.ndarray) -> torch.Tensor:
    """``(len(rows), J, I, 3)`` float32 ``a @ p + b`` for the indices ``p = (i, j, k)`` with ``k`` in ``rows`` (the
    slowest axis of ITK's buffer order) and every ``j``, ``i`` of ``shape = (I, J, K)`` (set up in float64, so large
    origins lose nothing before the float32 result)."""
    k = torch.arange(rows.start, rows.stop, dtype=torch.float64)[:, None, None]
    j = torch.arange(shape[1], dtype=torch.float64)[None, :, None]
    i = torch.arange(shape[0], dtype=torch.float64)[None, None, :]
    out = torch.empty(len(rows), shape[1], shape[0], 3, dtype=torch.float32)
    for r in range(3):
        out[..., r] = k * a[r, 2] + j * a[r, 1] + (i * a[r, 0] + b[r])
    return out


def _linear_taps(position: np.ndarray, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear interpolation along one axis of ``n`` voxels at ``position`` (voxel indices), as :func:`sample` does:
    ``(first, second, w_first, w_second)``, clamped to the edge voxels within half a voxel beyond them and weight 0
    further out."""
    nearest = np.round(position)
    position = np.where(np.abs(position - nearest) < 1e-6, nearest, position)  # grid points stay exact (rounding)
    inside = (position >= -0.5) & (position < n - 0.5)
    q = np.clip(position, 0.0, n - 1.0)
    first = np.minimum(np.floor(q), max(n - 2, 0)).astype(np.int64)
    second = np.minimum(first + 1, n - 1)
    on_second = q - first == 1.0  # the last voxel: taken as the first tap, like every other grid point
    first = np.where(on_second, second, first)
    w_second = np.where(inside & ~on_second, q - first, 0.0)
    w_first = np.where(inside, 1.0 - w_second, 0.0)
    return (torch.from_numpy(first), torch.from_numpy(second), torch.from_numpy(w_first.astype(np.float32)),
            torch.from_numpy(w_second.astype(np.float32)))


def _picks_every_voxel(taps, n: int) -> bool:
    """Whether :func:`_linear_taps`' taps sample an axis of ``n`` voxels at the voxels themselves."""
    first, _, w_first, w_second = taps
    return (len(first) == n and torch.equal(first, torch.arange(n)) and bool((w_first == 1).all())
            and not bool(w_second.any()))


def _interpolate_axis(volume: torch.Tensor, axis: int, taps) -> torch.Tensor:
    """``volume`` resampled along ``axis`` by :func:`_linear_taps`' taps (``volume`` itself when they pick every voxel
    as it is, e.g. a field already on the fixed grid)."""
    if _picks_every_voxel(taps, volume.shape[axis]):
        return volume
    first, second, w_first, w_second = taps
    shape = [1] * volume.dim()
    shape[axis] = -1
    if not bool(w_second.any()):  # grid points only (e.g. a shift by whole voxels): one gather
        picked = volume.index_select(axis, first)
        return picked if bool((w_first == 1).all()) else picked.mul_(w_first.view(shape))
    return volume.index_select(axis, first).mul_(w_first.view(shape)).addcmul_(
        volume.index_select(axis, second), w_second.view(shape))


def sample(volume: torch.Tensor, coords: torch.Tensor, mode: str = "linear", default: float = 0.0) -> torch.Tensor:
    """``volume`` ``(C, D, H, W)`` sampled at ``coords`` ``(D', H', W', 3)`` (``grid_sample``'s convention: components
    (x, y, z) along (W, H, D), see :func:`_sampling_coordinates`), as ITK's resampler does: within half a voxel beyond
    the edge voxels the edge value, further out ``default``. Returns ``(C, D', H', W')``: float32 for "linear";
    for "nearest" the voxels themselves in ``volume``'s dtype (a label map is never converted to float), the nearest
    voxel rounded half up like ITK's."""
    if mode not in ("linear", "nearest"):
        raise InputError(f"interpolation must be 'linear' or 'nearest', got {mode!r}.")
    if mode == "nearest":
        return _sample_nearest(volume, coords, default)
    size = np.asarray(volume.shape[1:], dtype=np.float64)[::-1]
    margin = 1.0 / np.maximum(size - 1.0, 1.0)  # half a voxel in grid_sample's units
    out = F.grid_sample(volume[None].float(), coords[None], mode="bilinear", padding_mode="border",
                        align_corners=True)[0]
    outside = None
    for r in range(3):
        c = coords[..., r]
        lo, hi = -1.0 - margin[r], 1.0 + margin[r]
        if float(c.min()) < lo or float(c.max()) >= hi:
            o = (c < lo) | (c >= hi)
            outside = o if outside is None else outside.logical_or_(o)
    if outside is not None:
        out.masked_fill_(outside[None], float(default))
    return out


def _sample_nearest(volume: torch.Tensor, coords: torch.Tensor, default: float) -> torch.Tensor:
    """:func:`sample`'s "nearest": one gather of the nearest voxels' values."""
    sizes = volume.shape[1:][::-1]  # (W, H, D): the order of the coordinate components
    flat = torch.zeros(coords.shape[:-1], dtype=torch.int64)
    inside = torch.ones(coords.shape[:-1], dtype=torch.bool)
    stride = 1
    for r, n in enumerate(sizes):
        index = torch.floor((coords[..., r] + 1.0) * (max(n - 1, 1) / 2.0) + 0.5)  # ITK: round half up
        inside &= (index >= 0) & (index <= n - 1)
        flat += index.clamp_(0, n - 1).long() * stride
        stride *= n
    values = volume.reshape(volume.shape[0], -1)[:, flat.reshape(-1)].reshape(volume.shape[0], *flat.shape)
    return values.masked_fill_(~inside[None], default)


def _gradient(v: torch.Tensor, axis: int) -> torch.Tensor:
    """``np.gradient`` along ``axis``: central differences inside, one-sided on the first and last layer."""
    n = v.shape[axis]
    if n < 2:
        raise InputError(f"a Jacobian needs at least 2 voxels along every axis, got {tuple(v.shape)}.")
    d = torch.diff(v, dim=axis)
    g = torch.empty_like(v)
    g.narrow(axis, 1, n - 2).copy_(d.narrow(axis, 0, n - 2)).add_(d.narrow(axis, 1, n - 2)).mul_(0.5)
    g.narrow(axis, 0, 1).copy_(d.narrow(axis, 0, 1))
    g.narrow(axis, n - 1, 1).copy_(d.narrow(axis, n - 2, 1))
    return g


def _determinant(u: torch.Tensor) -> torch.Tensor:
    """Jacobian determinant of ``x -> x + u(x)`` for a voxel field stored ``(3, K, J, I)`` (ITK's buffer order;
    components i, j, k, so index axis ``c`` is tensor axis ``2 - c``; see metrics.jacobian_determinant)."""
    a = [[_gradient(u[r], 2 - c) for c in range(3)] for r in range(3)]
    for r in range(3):
        a[r][r].add_(1.0)
    det = (a[1][1] * a[2][2]).sub_(a[1][2] * a[2][1]).mul_(a[0][0])
    det.sub_((a[1][0] * a[2][2]).sub_(a[1][2] * a[2][0]).mul_(a[0][1]))
    det.add_((a[1][0] * a[2][1]).sub_(a[1][1] * a[2][0]).mul_(a[0][2]))
    return det


def resample_voxel_field(u: np.ndarray, source: ModelGrid, target: ModelGrid) -> np.ndarray:
    """A voxel field ``(3, I, J, K)`` of ``source`` on ``target`` (the same direction): trilinear, with the border value
    beyond ``source``'s voxel centres (a field carried onto a larger box continues, rather than dropping to zero), the
    components rescaled from ``source``'s voxels to ``target``'s. Between a grid and its
    :meth:`~textscf.spatial.ModelGrid.subdivided` box this equals :func:`textscf.warp.resize_field` with
    ``rescale=True``."""
    if not np.allclose(source.direction_matrix, target.direction_matrix, atol=1e-6):
        raise InputError("a voxel field is carried only between grids of the same direction")
    offset = source.direction_matrix.T @ (np.array(target.origin) - np.array(source.origin))  # mm along the axes
    axes = []
    for a in range(3):
        index = (offset[a] + target.spacing[a] * np.arange(target.shape[a])) / source.spacing[a]
        axes.append(torch.as_tensor(2.0 * index / max(source.shape[a] - 1, 1) - 1.0, dtype=torch.float32))
    gi, gj, gk = torch.meshgrid(*axes, indexing="ij")
    where = torch.stack([gk, gj, gi], dim=-1)[None]  # grid_sample's (x, y, z) are the (K, J, I) axes
    field = torch.from_numpy(np.ascontiguousarray(u, np.float32))[None]
    with torch.no_grad():
        out = F.grid_sample(field, where, mode="bilinear", padding_mode="border", align_corners=True)[0]
    scale = torch.tensor([s / t for s, t in zip(source.spacing, target.spacing)], dtype=torch.float32)
    return (out * scale.view(3, 1, 1, 1)).numpy()


class Deformation:
    """``x -> initial(x + d(x))`` on the fixed grid, with ``d`` the network's field resampled from the model grid.

    Everything is stored and computed in ITK's buffer order ``(K, J, I)`` (what ``sitk.GetArrayViewFromImage``
    gives and ``sitk.GetImageFromArray`` takes), so that no full-size array is transposed on its way in or out.

    Args:
        u_model: ``(3, I, J, K)`` voxel displacement on ``model_grid`` (resampling convention).
        model_grid: the grid ``u_model`` lives on.
        fixed: the fixed image (its grid is the output grid).
        initial: the initial alignment, a matrix-offset transform or None (see :func:`supports`).

    Attributes:
        d_mm: ``(K, J, I, 3)`` float32 LPS mm, the deformable part ``d`` on the fixed grid (:meth:`field_mm` gives
            the ``(3, I, J, K)`` view of :mod:`textscf.spatial`'s arrays).
    """

    def __init__(self, u_model, model_grid: GridLike, fixed: sitk.Image | ModelGrid,
                 initial: sitk.Transform | None = None):
        self.model_grid = _as_grid(model_grid)
        self.fixed_grid = _as_grid(fixed)
        affine = matrix_offset(initial)
        if affine is None:
            raise InputError(f"the fast deformation path composes only with matrix-offset initial transforms, got "
                             f"{initial.GetName()}; use textscf.spatial.compose_with_initial for it.")
        self.initial_matrix, self.initial_offset = affine
        self.has_initial = initial is not None
        u = torch.as_tensor(np.asarray(u_model), dtype=torch.float32)
        if tuple(u.shape) != (3, *self.model_grid.shape):
            raise InputError(f"voxel displacement must be (3, {', '.join(map(str, self.model_grid.shape))}), got "
                             f"{tuple(u.shape)}.")
        self.d_mm = self._resample(u)

    # ------------------------------------------------------------------------------------------------ the field
    def _slabs(self):
        """Ranges of the fixed grid's K axis (the first of ITK's buffer order)."""
        i, j, k = self.fixed_grid.shape
        rows = max(1, SLAB_VOXELS // (j * i))
        return (range(s, min(s + rows, k)) for s in range(0, k, rows))

    def _fixed_affine(self) -> tuple[np.ndarray, np.ndarray]:
        return self.fixed_grid.index_to_physical_matrix, np.asarray(self.fixed_grid.origin, dtype=np.float64)

    def field_mm(self) -> torch.Tensor:
        """``d`` as ``(3, I, J, K)`` (a view of :attr:`d_mm`)."""
        return self.d_mm.permute(3, 2, 1, 0)

    def _resample(self, u: torch.Tensor) -> torch.Tensor:
        """``d`` in mm on the fixed grid, ``(K, J, I, 3)``: the field mapped to mm on the model grid (the 3x3 map
        commutes with linear interpolation), then sampled linearly (zero beyond the model grid): axis by axis when
        the fixed grid's axes are the model grid's (same directions, so each fixed index moves along one model axis),
        else by ``grid_sample`` slab by slab."""
        g = self.model_grid
        to_model = np.linalg.inv(g.index_to_physical_matrix)
        mf, of = self._fixed_affine()
        a, b = to_model @ mf, to_model @ (of - np.asarray(g.origin))  # fixed index -> model index
        to_mm = torch.as_tensor(g.index_to_physical_matrix, dtype=torch.float32)
        volume = torch.einsum("ab,bijk->kjia", to_mm, u).contiguous()  # (K', J', I', 3) mm on the model grid
        shape = self.fixed_grid.shape
        if np.abs(a - np.diag(np.diag(a))).max() <= 1e-9 * np.abs(a).max():
            taps = [_linear_taps(a[r, r] * np.arange(shape[r]) + b[r], g.shape[r]) for r in range(3)]
            volume = _interpolate_axis(volume, 1, taps[1])  # (K', J, I', 3); K and I slab by slab below
            if _picks_every_voxel(taps[2], volume.shape[0]) and _picks_every_voxel(taps[0], volume.shape[2]):
                return volume  # a field on the fixed grid already: converted to mm, nothing to interpolate
            out = torch.empty(*shape[::-1], 3, dtype=torch.float32)
            first, second, w_first, w_second = taps[2]
            for rows in self._slabs():
                part = _interpolate_axis(volume, 0, (first[rows.start:rows.stop], second[rows.start:rows.stop],
                                                     w_first[rows.start:rows.stop], w_second[rows.start:rows.stop]))
                out[rows.start:rows.stop] = _interpolate_axis(part, 2, taps[0])
            return out
        a, b = _sampling_coordinates(a, b, g.shape)
        channels_first = volume.permute(3, 0, 1, 2).contiguous()  # (3, K', J', I') once, not per slab
        out = torch.empty(*shape[::-1], 3, dtype=torch.float32)
        for rows in self._slabs():
            out[rows.start:rows.stop] = sample(channels_first, _grid_points(rows, shape, a, b), "linear",
                                               0.0).permute(1, 2, 3, 0)
        return out

    def max_length_mm(self) -> float:
        """Largest ``|d(x)|`` in mm (the deformable part, without the initial alignment)."""
        return max(float(self.d_mm[r.start:r.stop].square().sum(-1).max()) for r in self._slabs()) ** 0.5

    def jacobian(self) -> np.ndarray:
        """``(I, J, K)`` float32 Jacobian determinant of ``x -> x + d(x)`` (as ``metrics.jacobian_determinant`` of
        the field in fixed-grid voxels): a view of a ``(K, J, I)`` array, whose ``.transpose(2, 1, 0)`` is ITK's
        buffer without a copy."""
        to_voxels = torch.as_tensor(np.linalg.inv(self.fixed_grid.index_to_physical_matrix), dtype=torch.float32)
        n = self.fixed_grid.shape[2]
        out = torch.empty(self.fixed_grid.shape[::-1], dtype=torch.float32)
        for rows in self._slabs():
            lo, hi = max(rows.start - 1, 0), min(rows.stop + 1, n)  # one row of halo for the central differences
            u = torch.einsum("ab,kjib->akji", to_voxels, self.d_mm[lo:hi])  # components i, j, k in voxels
            out[rows.start:rows.stop] = _determinant(u)[rows.start - lo:rows.stop - lo]
        return out.numpy().transpose(2, 1, 0)

    def total_image(self, pixel_type: int = sitk.sitkVectorFloat32, release: bool = False) -> sitk.Image:
        """``initial(x + d(x)) - x`` as a 3-vector image on the fixed grid (LPS mm); float32 (what the outputs
        store), ``sitkVectorFloat64`` on request (ITK's displacement-field transform casts to it anyway).
        ``release=True`` is the last use: the initial alignment is folded into the field in place and the field is
        dropped once its image is built (no second full-size array)."""
        arr = self.d_mm if release else torch.empty_like(self.d_mm)
        for rows in self._slabs():
            arr[rows.start:rows.stop] = self._total_slab(rows)
        values = arr.numpy()
        if pixel_type == sitk.sitkVectorFloat64:
            values = values.astype(np.float64)
        img = sitk.GetImageFromArray(values, isVector=True)
        if release:
            self.d_mm = None
        self.fixed_grid.apply_to(img)
        return img

    def _total_slab(self, rows: range) -> torch.Tensor:
        """``initial(x + d(x)) - x`` on ``rows`` of the fixed grid's K axis, ``(len(rows), J, I, 3)`` float32 LPS mm."""
        d = self.d_mm[rows.start:rows.stop]
        if not self.has_initial:
            return d
        # initial(x + d) - x = (M - I) x + t + M d
        m = torch.as_tensor(self.initial_matrix, dtype=torch.float32)
        mf, of = self._fixed_affine()
        x_a, x_b = (self.initial_matrix - np.eye(3)) @ mf, (self.initial_matrix - np.eye(3)) @ of + self.initial_offset
        return _grid_points(rows, self.fixed_grid.shape, x_a, x_b).add_(d @ m.T)

    # --------------------------------------------------------------------------------------------- warped images
    def warp(self, moving: sitk.Image, interpolator: str = "linear", default: float = 0.0) -> sitk.Image:
        """``moving(initial(x + d(x)))`` on the fixed grid, in ``moving``'s pixel type (ITK's cast: truncation
        towards zero for integer types)."""
        if moving.GetNumberOfComponentsPerPixel() != 1 or moving.GetDimension() != 3:
            raise InputError("only scalar 3-D images can be warped.")
        grid = ModelGrid.from_image(moving)
        to_moving = np.linalg.inv(grid.index_to_physical_matrix) @ self.initial_matrix
        mf, of = self._fixed_affine()
        a, b = _sampling_coordinates(to_moving @ mf, to_moving @ of + np.linalg.inv(grid.index_to_physical_matrix)
                                     @ (self.initial_offset - np.asarray(grid.origin)), grid.shape)
        to_coords = torch.as_tensor(_sampling_coordinates(to_moving, np.zeros(3), grid.shape)[0], dtype=torch.float32)
        # (1, K, J, I): ITK's buffer order, no transpose; a writable float32 copy to interpolate, the voxels as
        # they are (in a dtype torch indexes) to pick the nearest
        voxels = sitk.GetArrayViewFromImage(moving)
        dtype = np.float32 if interpolator == "linear" or voxels.dtype not in TORCH_INDEXABLE else voxels.dtype
        volume = torch.from_numpy(np.array(voxels, dtype=dtype))[None]
        out = np.empty(self.fixed_grid.shape[::-1], dtype=dtype)
        for rows in self._slabs():
            coords = _grid_points(rows, self.fixed_grid.shape, a, b).add_(self.d_mm[rows.start:rows.stop] @ to_coords.T)
            out[rows.start:rows.stop] = sample(volume, coords, interpolator, default)[0].numpy()
        del volume
        img = sitk.GetImageFromArray(out)
        self.fixed_grid.apply_to(img)
        return img if img.GetPixelID() == moving.GetPixelID() else sitk.Cast(img, moving.GetPixelID())

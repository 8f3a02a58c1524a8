"""Model grid <-> physical space, resampling, displacement-field conversions, LPS/RAS.

The index order, physical space (LPS mm) and displacement conventions this module implements are stated once,
in docs/ARCHITECTURE.md ("Array and physical-space conventions").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import SimpleITK as sitk

from textscf.errors import InputError

__all__ = [
    "ModelGrid",
    "grid_mismatch",
    "same_grid",
    "model_grid_for",
    "fit_box_centre",
    "body_threshold_for",
    "body_box_centre",
    "resample_to_grid",
    "image_to_array",
    "array_to_image",
    "IntensityNormaliser",
    "voxel_displacement_to_physical",
    "physical_displacement_to_voxel",
    "resample_displacement",
    "compose_with_initial",
    "warp_image",
    "ras_to_lps",
    "lps_to_ras",
    "ijk_to_ras_matrix",
]

_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}
_LPS_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class ModelGrid:
    """A voxel grid in LPS physical space (the geometry of an ITK image without its voxels).

    Attributes:
        shape: ``(I, J, K)`` number of voxels along each index axis.
        spacing: ``(3,)`` mm between voxel centres along each index axis.
        origin: ``(3,)`` LPS mm position of voxel ``(0, 0, 0)``.
        direction: 9 floats, the 3x3 direction cosine matrix row-major as SimpleITK's ``GetDirection`` (column
            ``a`` is the LPS direction of index axis ``a``). A nested 3x3 sequence or array is accepted too.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in np.asarray(self.shape).ravel())
        spacing = tuple(float(s) for s in np.asarray(self.spacing, dtype=float).ravel())
        origin = tuple(float(s) for s in np.asarray(self.origin, dtype=float).ravel())
        direction = tuple(float(s) for s in np.asarray(self.direction, dtype=float).ravel())
        if len(shape) != 3 or min(shape) < 1:
            raise InputError(f"ModelGrid shape must be 3 positive integers, got {self.shape}.")
        if len(spacing) != 3 or min(spacing) <= 0:
            raise InputError(f"ModelGrid spacing must be 3 positive numbers (mm), got {self.spacing}.")
        if len(origin) != 3 or len(direction) != 9:
            raise InputError(f"ModelGrid origin must have 3 and direction 9 numbers, got {self.origin}, "
                             f"{self.direction}.")
        d = np.array(direction).reshape(3, 3)
        if not np.allclose(d.T @ d, np.eye(3), atol=1e-4):
            raise InputError(f"ModelGrid direction must be orthonormal, got {direction}.")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)

    # -- construction / export
    @classmethod
    def from_image(cls, image: sitk.Image) -> "ModelGrid":
        """The grid of a 3-D SimpleITK image."""
        if image.GetDimension() != 3:
            raise InputError(f"a 3-D image is needed for a grid, got {image.GetDimension()}-D.")
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    def reference_image(self, pixel_type: int = sitk.sitkFloat32) -> sitk.Image:
        """A zero image on this grid (for ``sitk.Resample`` references)."""
        img = sitk.Image([int(s) for s in self.shape], pixel_type)
        self.apply_to(img)
        return img

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Set this grid's origin, spacing and direction on ``image`` (same size required); returns it."""
        if tuple(image.GetSize()) != self.shape:
            raise InputError(f"image size {image.GetSize()} does not match the grid shape {self.shape}.")
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        return image

    # -- geometry
    @property
    def direction_matrix(self) -> np.ndarray:
        """``(3, 3)`` direction cosines ``D``."""
        return np.array(self.direction).reshape(3, 3)

    @property
    def index_to_physical_matrix(self) -> np.ndarray:
        """``(3, 3)`` matrix ``D @ diag(spacing)`` (maps index steps and voxel displacements to LPS mm)."""
        return self.direction_matrix @ np.diag(self.spacing)

    def affine_lps(self) -> np.ndarray:
        """``(4, 4)`` homogeneous index -> LPS mm matrix."""
        a = np.eye(4)
        a[:3, :3] = self.index_to_physical_matrix
        a[:3, 3] = self.origin
        return a

    def index_to_physical(self, idx: np.ndarray) -> np.ndarray:
        """Continuous ITK indices ``(..., 3)`` (order i, j, k) -> LPS mm points ``(..., 3)``."""
        idx = np.asarray(idx, dtype=float)
        return idx @ self.index_to_physical_matrix.T + np.array(self.origin)

    def physical_to_index(self, points: np.ndarray) -> np.ndarray:
        """LPS mm points ``(..., 3)`` -> continuous ITK indices ``(..., 3)``."""
        points = np.asarray(points, dtype=float)
        return (points - np.array(self.origin)) @ np.linalg.inv(self.index_to_physical_matrix).T

    @property
    def half_extent(self) -> np.ndarray:
        """``(3,)`` mm from the centre to the outermost voxel centres along each index axis."""
        return np.array(self.spacing) * (np.array(self.shape) - 1) / 2.0

    def centred_at(self, centre) -> "ModelGrid":
        """This grid (shape, spacing, direction) moved so that its :meth:`centre` is ``centre`` (LPS mm)."""
        origin = np.asarray(centre, float) - self.direction_matrix @ self.half_extent
        return ModelGrid(self.shape, self.spacing, tuple(origin), self.direction)

    def centre(self) -> np.ndarray:
        """``(3,)`` LPS mm centre of the grid (the midpoint between the first and last voxel centres)."""
        return self.index_to_physical((np.array(self.shape) - 1) / 2.0)

    def subdivided(self, factor: int) -> "ModelGrid":
        """The same box cut ``factor`` times finer per axis: spacing / factor, shape x factor, same voxel edges (the
        voxel-edge alignment of ``F.interpolate(..., align_corners=False)``, so :func:`textscf.warp.resize_field`
        carries a field between the two grids exactly)."""
        factor = int(factor)
        if factor < 1:
            raise InputError(f"a grid is subdivided by an integer factor >= 1, got {factor}.")
        spacing = np.array(self.spacing) / factor
        # voxel 0 of the finer grid lies half a coarse voxel minus half a fine one before the coarse voxel 0's centre
        origin = self.index_to_physical(-(factor - 1) / (2.0 * factor) * np.ones(3))
        return ModelGrid(tuple(s * factor for s in self.shape), tuple(spacing), tuple(origin), self.direction)

    def physical_points(self) -> np.ndarray:
        """``(I, J, K, 3)`` LPS mm position of every voxel centre."""
        ii, jj, kk = np.meshgrid(*(np.arange(s, dtype=float) for s in self.shape), indexing="ij")
        return self.index_to_physical(np.stack([ii, jj, kk], axis=-1))


GridLike = Union[ModelGrid, sitk.Image]


def _as_grid(grid: GridLike) -> ModelGrid:
    return grid if isinstance(grid, ModelGrid) else ModelGrid.from_image(grid)


def _as_reference(grid: GridLike) -> sitk.Image:
    return grid.reference_image() if isinstance(grid, ModelGrid) else grid


# ----------------------------------------------------------------------------------------------- grid equality
# The one tolerance set for "the same voxel grid". NIfTI stores its affine in float32, so exact equality is too strict.
GRID_SPACING_RTOL = 1e-3
GRID_ORIGIN_TOL_FRACTION = 1e-3  # of the reference's smallest voxel spacing, in mm
GRID_DIRECTION_TOL = 1e-3


def plain_numbers(values, digits: int = 4) -> str:
    """``(2, 1.5, 3)``: plain numbers for messages (a tuple of numpy floats prints as ``np.float64(2.0)``)."""
    return "(" + ", ".join(f"{round(float(v), digits):g}" for v in values) + ")"


def _geometry(grid: GridLike) -> tuple[tuple[int, ...], np.ndarray, np.ndarray, np.ndarray]:
    """Size, spacing, origin and direction of a ModelGrid or an image (of any dimension)."""
    if isinstance(grid, ModelGrid):
        return grid.shape, np.array(grid.spacing), np.array(grid.origin), np.array(grid.direction)
    return (tuple(grid.GetSize()), np.array(grid.GetSpacing()), np.array(grid.GetOrigin()),
            np.array(grid.GetDirection()))


def grid_mismatch(reference: GridLike, other: GridLike) -> list[str]:
    """How ``other``'s grid differs from ``reference``'s, one sentence per differing property ([] = same grid)."""
    size_r, sp_r, or_r, dir_r = _geometry(reference)
    size_o, sp_o, or_o, dir_o = _geometry(other)
    problems = []
    if size_r != size_o:
        problems.append(f"size {size_o} vs {size_r}")
        # Still report the other properties: the fix is the same but the user sees the whole picture.
    if sp_r.shape != sp_o.shape:
        return problems + [f"{len(sp_o)}-D vs {len(sp_r)}-D"]
    d_sp = np.abs(sp_o - sp_r)
    if np.any(d_sp > GRID_SPACING_RTOL * sp_r):
        problems.append(
            f"spacing {plain_numbers(sp_o, 6)} vs {plain_numbers(sp_r, 6)} mm (differs by up to {d_sp.max():.4g} mm)"
        )
    d_or = float(np.abs(or_o - or_r).max())
    tol_or = GRID_ORIGIN_TOL_FRACTION * float(sp_r.min())
    if d_or > tol_or:
        problems.append(
            f"origin {plain_numbers(or_o)} vs {plain_numbers(or_r)} mm "
            f"(differs by up to {d_or:.4g} mm, tolerance {tol_or:.2g} mm)"
        )
    n = len(sp_r)
    dir_r, dir_o = dir_r.reshape(n, n), dir_o.reshape(n, n)
    d_dir = float(np.abs(dir_o - dir_r).max())
    if d_dir > GRID_DIRECTION_TOL:
        # Angle of the rotation taking one frame to the other (meaningful when both have the same handedness).
        cos = np.clip((np.trace(dir_r.T @ dir_o) - 1.0) / 2.0, -1.0, 1.0)
        problems.append(
            f"direction {plain_numbers(dir_o.ravel())} vs {plain_numbers(dir_r.ravel())} "
            f"(entries differ by up to {d_dir:.4g}, about {np.degrees(np.arccos(cos)):.3g} degrees)"
        )
    return problems


def same_grid(a: GridLike, b: GridLike) -> bool:
    """True when ``b`` lies on ``a``'s voxel grid within the engine's one tolerance set (:func:`grid_mismatch`)."""
    return not grid_mismatch(a, b)


def _interpolator(name: str) -> int:
    try:
        return _INTERPOLATORS[name]
    except KeyError:
        raise InputError(f"unknown interpolator {name!r}; choose one of {', '.join(_INTERPOLATORS)}.") from None


# ----------------------------------------------------------------------------------------------- model grid
def body_threshold_for(image: sitk.Image) -> float:
    """Intensity above which a voxel counts as body: -500 for CT in HU (minimum below -500), otherwise
    (MRI, or CT already rescaled) 10 % of the way from the 0.5th to the 99.5th intensity percentile."""
    arr = sitk.GetArrayViewFromImage(image)
    if float(arr.min()) < -500.0:
        return -500.0
    lo, hi = np.percentile(arr, [0.5, 99.5])
    return float(lo + 0.1 * (hi - lo))


def body_box_centre(image: sitk.Image, body_mask: sitk.Image | None = None,
                    body_threshold: float | None = None) -> np.ndarray | None:
    """LPS centre of the bounding box of all non-zero ``body_mask`` voxels (organs need not touch), or of the
    largest connected region above the threshold (specks and a detached CT table are ignored); None if empty."""
    # Work on a subsampled copy (<= ~128 voxels per axis): the box only needs voxel-scale precision.
    factors = [max(1, s // 128) for s in image.GetSize()]
    if body_mask is not None:
        if not same_grid(image, body_mask):
            body_mask = sitk.Resample(body_mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        # max-pooling keeps thin structures that plain subsampling could skip
        mask = sitk.Cast(sitk.NotEqual(body_mask, 0), sitk.sitkUInt8)
        labels = sitk.BinShrink(mask, factors) > 0 if max(factors) > 1 else mask
    else:
        small = sitk.Shrink(image, factors) if max(factors) > 1 else image
        thr = body_threshold_for(small) if body_threshold is None else float(body_threshold)
        labels = sitk.RelabelComponent(sitk.ConnectedComponent(small > thr), sortByObjectSize=True)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(labels, sitk.sitkUInt32))
    if not stats.HasLabel(1):
        return None
    box = stats.GetBoundingBox(1)  # (start i, j, k, size i, j, k) in the (shrunk) index space
    start, size = np.array(box[:3], float), np.array(box[3:], float)
    centre_idx = start + (size - 1.0) / 2.0
    return np.array(labels.TransformContinuousIndexToPhysicalPoint(centre_idx.tolist()))


def model_grid_for(fixed: sitk.Image, spacing: Sequence[float], shape: Sequence[int],
                   body_mask: sitk.Image | None = None, body_threshold: float | None = None) -> ModelGrid:
    """The network's input grid in the fixed image's physical space.

    The grid has the fixed image's direction, the given ``spacing`` (mm) and ``shape`` ``(I, J, K)``, and its
    centre on the centre of the body's bounding box. The body is ``body_mask`` (all non-zero voxels, e.g. the
    organs of a label map; resampled onto the fixed grid by nearest neighbour if needed) or the largest
    connected region above
    ``body_threshold`` (default :func:`body_threshold_for`: -500 HU for CT). Without a body the grid is centred
    on the fixed image's centre.

    Returns:
        :class:`ModelGrid`.
    """
    spacing = tuple(float(s) for s in spacing)
    shape = tuple(int(s) for s in shape)
    fixed_grid = ModelGrid.from_image(fixed)
    centre = body_box_centre(fixed, body_mask, body_threshold)
    if centre is None:
        centre = fixed_grid.centre()
    return ModelGrid(shape, spacing, (0.0, 0.0, 0.0), fixed_grid.direction).centred_at(centre)


def fit_box_centre(image: sitk.Image, centre, direction, half_extent) -> np.ndarray:
    """``centre`` (LPS mm) of a box of ``half_extent`` mm along each column of ``direction`` (3x3), moved along those
    axes as little as needed so that, on every axis, the box covers the image's voxel centres where it is at least as
    long as they span, and stays within them where it is shorter (no part of the image left outside a grid that could
    hold it, where its field would drop to zero and fold against the inside).
    """
    d = np.asarray(direction, float).reshape(3, 3)
    half = np.asarray(half_extent, float)
    grid = ModelGrid.from_image(image)
    corners = np.array(np.meshgrid(*[[0.0, n - 1.0] for n in grid.shape], indexing="ij")).reshape(3, -1).T
    along = grid.index_to_physical(corners) @ d  # the image's corners in the box's axes
    low, high = along.min(0), along.max(0)
    c = np.asarray(centre, float) @ d
    covers = 2.0 * half >= high - low
    c = np.where(covers, np.clip(c, high - half, low + half), np.clip(c, low + half, high - half))
    return d @ c


# ----------------------------------------------------------------------------------------------- resampling
def resample_to_grid(image: sitk.Image, grid: GridLike, transform: sitk.Transform | None = None,
                     interpolator: str = "linear", default_value: float = 0.0) -> sitk.Image:
    """``image`` resampled onto ``grid``: ``out(x) = image(T(x))`` for each grid point ``x`` (T = identity if None).

    Args:
        image: scalar or vector SimpleITK image.
        grid: :class:`ModelGrid` or an image whose grid to use.
        transform: resampling-convention transform (grid points -> ``image`` points), e.g. the initial alignment.
        interpolator: "linear", "nearest" (label maps) or "bspline".
        default_value: value outside ``image``.

    Returns:
        image of ``image``'s pixel type on ``grid``.
    """
    return sitk.Resample(image, _as_reference(grid), transform if transform is not None else sitk.Transform(),
                         _interpolator(interpolator), float(default_value), image.GetPixelID())


def field_of_view_weight(grid: GridLike, image: sitk.Image, transform: sitk.Transform | None = None,
                         margin_mm: float = 0.0) -> np.ndarray:
    """``(I, J, K)`` float32 on ``grid``: 1 where ``T(x)`` (T = ``transform``, the identity if None) lies inside
    ``image``'s extent (its voxels' outer faces) by at least ``margin_mm`` along each of its axes, else 0.

    Outside an image's field of view a resampled copy holds only the fill value: a similarity that counts those
    voxels pulls tissue towards the artificial edge. For matrix-offset transforms (every alignment the engine
    computes) the margin is exact; for any other transform the image's own voxels are resampled (nearest) and the
    margin is not applied."""
    from textscf.deformation import matrix_offset

    g = _as_grid(grid)
    affine = matrix_offset(transform)
    if affine is None:
        ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
        ones.CopyInformation(image)
        return image_to_array(resample_to_grid(ones, g, transform, "nearest", 0)).astype(np.float32)
    m, t = affine
    size = np.asarray(image.GetSize(), dtype=np.float64)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    to_index = np.linalg.inv(np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3) @ np.diag(spacing))
    # grid index -> image continuous index is affine: a @ idx + b
    a = to_index @ m @ g.index_to_physical_matrix
    b = to_index @ (m @ np.asarray(g.origin, dtype=np.float64) + t - np.asarray(image.GetOrigin(), dtype=np.float64))
    low = -0.5 + margin_mm / spacing  # the extent shrunk by the margin, in index units
    high = size - 0.5 - margin_mm / spacing
    inside = np.ones(g.shape, dtype=bool)
    axes = [np.arange(n, dtype=np.float64) for n in g.shape]
    for r in range(3):  # one image axis at a time: its index is a sum of one term per grid axis
        c = (a[r, 0] * axes[0] + b[r])[:, None, None] + (a[r, 1] * axes[1])[None, :, None] \
            + (a[r, 2] * axes[2])[None, None, :]
        inside &= (c >= low[r]) & (c <= high[r])
    return inside.astype(np.float32)


def image_to_array(img: sitk.Image) -> np.ndarray:
    """Scalar image -> ``(I, J, K)`` array; vector image -> ``(C, I, J, K)`` (a copy, in ITK index order)."""
    arr = sitk.GetArrayFromImage(img)
    if img.GetNumberOfComponentsPerPixel() == 1:
        return np.ascontiguousarray(arr.transpose(2, 1, 0))
    return np.ascontiguousarray(arr.transpose(3, 2, 1, 0))


def array_to_image(arr: np.ndarray, like: GridLike) -> sitk.Image:
    """``(I, J, K)`` array -> scalar image, ``(C, I, J, K)`` -> C-component vector image, on ``like``'s grid.

    The pixel type follows the array's dtype (bool becomes uint8).
    """
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    grid = _as_grid(like)
    if arr.ndim == 3:
        spatial, img = arr.shape, None
        if spatial == grid.shape:
            img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    elif arr.ndim == 4:
        spatial, img = arr.shape[1:], None
        if spatial == grid.shape:
            img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(3, 2, 1, 0)), isVector=True)
    else:
        raise InputError(f"expected an (I, J, K) or (C, I, J, K) array, got shape {arr.shape}.")
    if img is None:
        raise InputError(f"array spatial shape {tuple(spatial)} does not match the grid shape {grid.shape}.")
    return grid.apply_to(img)


@dataclass(frozen=True)
class IntensityNormaliser:
    """A model's intensity normalisation: the one object that training, validation and inference apply.

    Built from a model configuration's ``intensity`` entry (:meth:`from_config`), so a model always sees the
    intensities it was trained with. ``kind``:

    - ``"ct_window"``: clip to ``window`` (HU) and scale linearly (as the paper does for abdomen CT);
    - ``"percentile"`` (MRI): clip to the ``percentiles`` of the non-zero voxels (all voxels if fewer than 1 % are
      non-zero) and scale; a (nearly) constant foreground becomes 1, the background 0;
    - ``"minmax"``: the image's own range; constant images become 0.

    Call it on an any-shape intensity array (e.g. ``(I, J, K)``); returns float32 in [0, 1] of the same shape.
    """

    kind: str = "ct_window"
    window: tuple[float, float] = (-500.0, 800.0)
    percentiles: tuple[float, float] = (0.5, 99.5)

    KINDS = ("ct_window", "percentile", "minmax")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise InputError(f"unknown intensity normalisation {self.kind!r}; use one of {self.KINDS}")
        object.__setattr__(self, "window", tuple(float(v) for v in self.window))
        object.__setattr__(self, "percentiles", tuple(float(v) for v in self.percentiles))

    @classmethod
    def from_config(cls, config) -> "IntensityNormaliser":
        """From a :class:`textscf.networks.TextSCFConfig` (or its ``intensity`` dict)."""
        intensity = dict(getattr(config, "intensity", config))
        kind = intensity.pop("kind", None)
        unknown = set(intensity) - {"window", "percentiles"}
        if kind not in cls.KINDS or unknown:
            raise InputError(f"unknown intensity normalisation {dict(getattr(config, 'intensity', config))!r} in "
                             f"the model configuration; kinds are {cls.KINDS}")
        return cls(kind, **intensity)

    def __call__(self, array: np.ndarray) -> np.ndarray:
        x = np.asarray(array, dtype=np.float32)
        if self.kind == "ct_window":
            lo, hi = self.window
            if not hi > lo:
                raise InputError(f"ct_window must be (low, high) with high > low, got {self.window}.")
        elif self.kind == "percentile":
            fg = x[x != 0]
            if fg.size < max(1, x.size // 100):
                fg = x.ravel()
            lo, hi = (float(v) for v in np.percentile(fg, self.percentiles))
            if not hi > lo:  # (nearly) constant foreground: map it to 1, background to 0
                return (x > lo).astype(np.float32) if np.any(x != lo) else np.zeros_like(x)
        else:
            lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
            return np.zeros_like(x) if hi <= lo else (x - lo) / (hi - lo)
        out = (np.clip(x, lo, hi) - lo) / (hi - lo)
        return out.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------------- displacements
def voxel_displacement_to_physical(u: np.ndarray, grid: GridLike) -> sitk.Image:
    """Engine voxel displacement -> physical field.

    Args:
        u: ``(3, I, J, K)`` displacement in voxels of ``grid`` (channel a along index axis a), resampling convention.
        grid: the :class:`ModelGrid` (or image) ``u`` lives on.

    Returns:
        float64 3-vector image on ``grid``, ``v = D @ diag(spacing) @ u`` in LPS mm at each voxel.
    """
    u = np.asarray(u, dtype=np.float64)
    g = _as_grid(grid)
    if u.ndim != 4 or u.shape[0] != 3 or u.shape[1:] != g.shape:
        raise InputError(f"voxel displacement must be (3, {', '.join(map(str, g.shape))}), got {u.shape}.")
    v = np.einsum("ab,bijk->aijk", g.index_to_physical_matrix, u)
    return array_to_image(v, g)


def physical_displacement_to_voxel(field: sitk.Image, grid: GridLike | None = None) -> np.ndarray:
    """Physical field -> engine voxel displacement ``u = (D @ diag(spacing))^-1 @ v``.

    Args:
        field: 3-vector image, LPS mm.
        grid: the grid to express voxels of; must be ``field``'s own grid (checked). None = ``field``'s grid.

    Returns:
        ``(3, I, J, K)`` float64 array.
    """
    g = ModelGrid.from_image(field)
    if grid is not None:
        other = _as_grid(grid)
        if not same_grid(g, other):
            raise InputError("the displacement field is not on the requested grid; resample it first "
                             "(resample_displacement).")
    if field.GetNumberOfComponentsPerPixel() != 3:
        raise InputError(f"a displacement field needs 3 components, got {field.GetNumberOfComponentsPerPixel()}.")
    v = image_to_array(field).astype(np.float64, copy=False)
    return np.einsum("ab,bijk->aijk", np.linalg.inv(g.index_to_physical_matrix), v)


def resample_displacement(field: sitk.Image, reference: GridLike) -> sitk.Image:
    """Physical displacement field resampled (linearly) onto ``reference``'s grid, zero outside ``field``.

    The vectors are physical, so they are interpolated, not rescaled.

    Returns:
        float64 3-vector image on ``reference``.
    """
    field = sitk.Cast(field, sitk.sitkVectorFloat64)
    return sitk.Resample(field, _as_reference(reference), sitk.Transform(), sitk.sitkLinear, 0.0,
                         sitk.sitkVectorFloat64)


def _field_transform(field: sitk.Image) -> sitk.DisplacementFieldTransform:
    # the transform takes ownership of (empties) its image: give it a copy
    return sitk.DisplacementFieldTransform(sitk.Image(sitk.Cast(field, sitk.sitkVectorFloat64)))


def compose_with_initial(field: sitk.Image, initial: sitk.Transform | None) -> sitk.Image:
    """Fold the initial alignment into the deformable field.

    The network registered the fixed image to the moving image pre-resampled through ``initial``, so a fixed
    point ``x`` maps to the moving point ``initial(x + d(x))``.

    Args:
        field: float64 3-vector image ``d`` on the fixed grid, LPS mm.
        initial: resampling-convention transform or None.

    Returns:
        float64 3-vector image on the same grid: ``initial(x + d(x)) - x`` (``field`` itself when ``initial`` is None).
    """
    if initial is None:
        return field
    # ITK applies a composite's transforms last-added first: [initial, d] is initial(d(x)).
    total = sitk.CompositeTransform([initial, _field_transform(field)])
    return sitk.TransformToDisplacementField(total, sitk.sitkVectorFloat64, field.GetSize(), field.GetOrigin(),
                                             field.GetSpacing(), field.GetDirection())


def warp_image(moving: sitk.Image, field: sitk.Image, reference: GridLike | None = None,
               interpolator: str = "linear", default_value: float = 0.0) -> sitk.Image:
    """``moving`` resampled onto ``reference`` through the displacement field: ``out(x) = moving(x + d(x))``.

    Args:
        moving: scalar image.
        field: 3-vector image, LPS mm, resampling convention (zero = identity outside it).
        reference: output grid; default: ``field``'s grid.
        interpolator: "linear", "nearest" (label maps) or "bspline".

    Returns:
        image of ``moving``'s pixel type on ``reference``.
    """
    ref = field if reference is None else _as_reference(reference)
    return sitk.Resample(moving, ref, _field_transform(field), _interpolator(interpolator), float(default_value),
                         moving.GetPixelID())


# ----------------------------------------------------------------------------------------------- LPS / RAS
def ras_to_lps(points_or_vectors: np.ndarray) -> np.ndarray:
    """``(..., 3)`` RAS points or vectors -> LPS (negate the first two components). Returns a new array."""
    out = np.array(points_or_vectors, dtype=float, copy=True)
    if out.shape[-1] != 3:
        raise InputError(f"expected (..., 3) coordinates, got shape {out.shape}.")
    out[..., :2] *= -1.0
    return out


def lps_to_ras(points_or_vectors: np.ndarray) -> np.ndarray:
    """``(..., 3)`` LPS points or vectors -> RAS (the same flip). Returns a new array."""
    return ras_to_lps(points_or_vectors)


def ijk_to_ras_matrix(image: GridLike) -> np.ndarray:
    """``(4, 4)`` voxel index (i, j, k) -> RAS mm matrix of ``image`` (the NIfTI affine / Slicer's IJKToRAS).

    This is ``diag(-1, -1, 1, 1) @ [D @ diag(spacing) | origin]``. Slicer gives a loaded volume this IJKToRAS,
    except that for a file with a left-handed index frame it flips the K axis on loading
    (ForceRightHandedIJKCoordinateSystem): the voxels then sit at the same RAS points but with other indices.
    """
    a = _as_grid(image).affine_lps()
    a[:3, :] = _LPS_RAS @ a[:3, :]
    return a

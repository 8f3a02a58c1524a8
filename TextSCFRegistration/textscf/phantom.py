"""Synthetic abdominal CT: a parametric phantom, and CT-like images synthesised from real label maps.

Nothing here is patient data. Two generators share one tissue model and one CT renderer:

* :func:`make_abdomen_phantom` builds a whole synthetic subject (body, spine, bowel, lungs and the 13 BTCV organs)
  from analytic shapes; ``variation`` turns it into a population of subject-like variants. The project ships and
  generates it freely (``textscf demo``, tests).
* :func:`synthesize_ct_from_labels` paints a CT-like image around a *real* BTCV label map (whose CT images are not
  available): organs get the intensities of :data:`ORGAN_HU`, and the body around them (outline, fat, muscle,
  spine, bowel, lungs) is invented from the organ extent. The result is synthetic and label-derived.

Orientation. Arrays are in ITK index order ``(I, J, K)``. Both generators lay the anatomy out like the
Learn2Reg/BTCV abdomen arrays: array axis i runs patient right -> left, j posterior -> anterior, k inferior ->
superior. For the phantom the direction matrix is therefore ``diag(1, -1, 1)`` in LPS (:data:`PHANTOM_DIRECTION`),
so Slicer shows it the right way up (liver on the screen's left in axial views, like any CT).
The BTCV files claim an RAS identity header, but their anatomy (liver at low i, spleen at high i) says that
axis i runs right -> left; :func:`synthesize_ct_from_labels` reads the orientation from the organs themselves.

Intensities are portal-venous contrast CT (the BTCV/Learn2Reg acquisition phase), in HU; each entry is
``(mean, texture standard deviation)``; CT noise (``noise_sd``, 12 HU by default) and a slight partial-volume blur
come on top:

=========================  ======  =====   =========================  ======  =====
organ (BTCV label)          mean    sd     tissue                      mean    sd
=========================  ======  =====   =========================  ======  =====
1 spleen                    120      8     air                        -1000     5
2 right kidney              170     15     lung                        -850    40
3 left kidney               170     15     subcutaneous fat            -105    12
4 gall bladder               10      5     muscle                        50    10
5 esophagus                  45     10     visceral fat                 -95    15
6 liver                     100      8     bowel (wall, contents)        35    15
7 stomach (fluid-filled)     30     12     bowel gas                   -950    30
8 aorta                     160     10     cortical bone                700    80
9 inferior vena cava        130     10     cancellous bone              220    40
10 portal and splenic vein  180     10     rib                          400    60
11 pancreas                  85     10     intervertebral disc           90    10
12 right adrenal gland       55     10     spinal canal                  20     8
13 left adrenal gland        55     10     heart and mediastinum         45    12
=========================  ======  =====   =========================  ======  =====
"""
from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.interpolate import BSpline
from scipy.spatial.transform import Rotation

from textscf.errors import InputError

BTCV_ORGANS: tuple[str, ...] = (
    "spleen",
    "right kidney",
    "left kidney",
    "gall bladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior vena cava",
    "portal and splenic vein",
    "pancreas",
    "right adrenal gland",
    "left adrenal gland",
)
"""The 13 BTCV organ names; label value ``v`` is ``BTCV_ORGANS[v - 1]``."""

PHANTOM_DIRECTION: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
"""ITK (LPS) direction of the phantom: i towards patient left, j towards anterior, k towards superior."""

ORGAN_HU: dict[int, tuple[float, float]] = {
    1: (120.0, 8.0),
    2: (170.0, 15.0),
    3: (170.0, 15.0),
    4: (10.0, 5.0),
    5: (45.0, 10.0),
    6: (100.0, 8.0),
    7: (30.0, 12.0),
    8: (160.0, 10.0),
    9: (130.0, 10.0),
    10: (180.0, 10.0),
    11: (85.0, 10.0),
    12: (55.0, 10.0),
    13: (55.0, 10.0),
}
"""BTCV label -> (mean HU, texture sd HU), portal-venous contrast CT."""

TISSUE_HU: dict[str, tuple[float, float]] = {
    "air": (-1000.0, 5.0),
    "lung": (-850.0, 40.0),
    "subcutaneous fat": (-105.0, 12.0),
    "muscle": (50.0, 10.0),
    "visceral fat": (-95.0, 15.0),
    "bowel": (35.0, 15.0),
    "bowel gas": (-950.0, 30.0),
    "cortical bone": (700.0, 80.0),
    "cancellous bone": (220.0, 40.0),
    "rib": (400.0, 60.0),
    "intervertebral disc": (90.0, 10.0),
    "spinal canal": (20.0, 8.0),
    "heart and mediastinum": (45.0, 12.0),
}
"""Non-organ tissue -> (mean HU, texture sd HU)."""

# Tissue classes of the internal class map: TISSUE_HU keys in order, organs at _ORGAN0 + label.
_T = {name: index for index, name in enumerate(TISSUE_HU)}
_ORGAN0 = 32
_MEAN_LUT = np.zeros(_ORGAN0 + 14, np.float32)
_STD_LUT = np.zeros(_ORGAN0 + 14, np.float32)
for _name, (_m, _s) in TISSUE_HU.items():
    _MEAN_LUT[_T[_name]], _STD_LUT[_T[_name]] = _m, _s
for _label, (_m, _s) in ORGAN_HU.items():
    _MEAN_LUT[_ORGAN0 + _label], _STD_LUT[_ORGAN0 + _label] = _m, _s

# The phantom's anatomy is laid out for the BTCV field of view (192 x 160 x 256 voxels of 2 mm).
_NOMINAL_FOV_MM = np.array([384.0, 320.0, 512.0])
_HU_RANGE = (-1024.0, 3071.0)


# --------------------------------------------------------------------------------------------------------------
# smooth random fields


def _bspline_basis(coords_mm: np.ndarray, lo_mm: float, hi_mm: float, step_mm: float) -> np.ndarray:
    """Cubic B-spline weights ``(len(coords), n_control)`` of a uniform control grid covering ``[lo, hi]``."""
    n_ctrl = int(math.ceil((hi_mm - lo_mm) / step_mm)) + 3
    u = (np.asarray(coords_mm, np.float64) - (lo_mm - step_mm)) / step_mm  # in [1, n_ctrl - 2]
    knots = np.arange(-2.0, n_ctrl + 2.0)  # basis j is centred on control point j
    return BSpline.design_matrix(np.clip(u, 1.0, n_ctrl - 2.0), knots, 3).toarray()


def _smooth_noise(
    rng: np.random.Generator,
    channels: int,
    axes_mm: tuple[np.ndarray, np.ndarray, np.ndarray],
    step_mm: float,
    box_mm: tuple[tuple[float, float], ...],
) -> np.ndarray:
    """Smooth Gaussian noise ``(channels, I, J, K)`` float32 with unit standard deviation.

    A cubic B-spline with i.i.d. N(0, 1) coefficients on a control grid of spacing ``step_mm`` covering ``box_mm``,
    sampled at the voxel coordinates ``axes_mm`` (one 1-D array per axis). The control grid depends only on the box,
    so two grids covering the same box at different resolutions see the same field.
    """
    # the cubic B-spline's squared weights sum to 151/315 on average per axis: normalise to unit sd
    norm = (315.0 / 151.0) ** 0.5
    bases = [(_bspline_basis(x, lo, hi, step_mm) * norm).astype(np.float32) for x, (lo, hi) in zip(axes_mm, box_mm)]
    coef = rng.standard_normal((channels, *(b.shape[1] for b in bases)), dtype=np.float32)
    out = np.tensordot(coef, bases[2], axes=([3], [1]))  # (c, ni, nj, K)
    out = np.tensordot(out, bases[1], axes=([2], [1]))  # (c, ni, K, J)
    out = np.tensordot(out, bases[0], axes=([1], [1]))  # (c, K, J, I)
    return np.ascontiguousarray(out.transpose(0, 3, 2, 1))


def _grid_axes(shape, spacing) -> tuple[tuple[np.ndarray, ...], tuple[tuple[float, float], ...]]:
    """Voxel-centre coordinates in mm relative to the grid centre, one 1-D array per axis, and the grid's box."""
    axes = tuple((np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing))
    box = tuple((-n * s / 2.0, n * s / 2.0) for n, s in zip(shape, spacing))
    return axes, box


def _check_grid(shape, spacing) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    try:
        shape = tuple(int(n) for n in shape)
        spacing = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise InputError(f"shape {shape!r} and spacing {spacing!r} must be three numbers each") from None
    if len(shape) != 3 or len(spacing) != 3:
        raise InputError(f"shape {shape} and spacing {spacing} must have three entries each (I, J, K)")
    if min(shape) < 4:
        raise InputError(f"shape {shape} is too small: use at least 4 voxels along every axis")
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise InputError(f"spacing {spacing} must be positive millimetres")
    return shape, spacing


def random_smooth_displacement(
    shape,
    spacing,
    max_displacement_mm: float = 8.0,
    smoothness_mm: float = 25.0,
    seed: int = 0,
) -> np.ndarray:
    """A random smooth displacement field, ``(3, I, J, K)`` float32 in voxels (resampling convention).

    Each physical component (mm) is a cubic B-spline with random coefficients on a control grid of spacing
    ``smoothness_mm``; the per-component mean is removed and the field is scaled so that its largest physical
    length, ``max |spacing * u|``, is exactly ``max_displacement_mm``. Channel a is along array axis a, in voxels of
    ``spacing[a]``. With ``max_displacement_mm`` well below ``smoothness_mm`` (the default ratio is 0.32) the map
    ``x -> x + u(x)`` is diffeomorphic in practice (Jacobian determinant > 0 everywhere).
    """
    shape, spacing = _check_grid(shape, spacing)
    if not (max_displacement_mm >= 0 and smoothness_mm > 0):
        raise InputError(
            f"max_displacement_mm={max_displacement_mm} and smoothness_mm={smoothness_mm}: "
            "use max_displacement_mm >= 0 and smoothness_mm > 0"
        )
    axes, box = _grid_axes(shape, spacing)
    field = _smooth_noise(np.random.default_rng(seed), 3, axes, smoothness_mm, box)
    field -= field.mean(axis=(1, 2, 3), dtype=np.float64, keepdims=True).astype(np.float32)
    # the noise is in mm: its largest length sets the scale, then each channel goes to voxels of its axis
    length = float(np.sqrt((field.astype(np.float64) ** 2).sum(0)).max())
    if length == 0 or max_displacement_mm == 0:
        return np.zeros((3, *shape), np.float32)
    field *= (max_displacement_mm / length / np.asarray(spacing)).astype(np.float32)[:, None, None, None]
    return field


def random_affine(
    max_rotation_deg: float = 5.0,
    max_translation_mm: float = 5.0,
    max_scale: float = 0.05,
    seed: int = 0,
    center=(0.0, 0.0, 0.0),
) -> np.ndarray:
    """A random affine transform as a ``(4, 4)`` float64 homogeneous matrix acting on physical (LPS mm) points.

    Resampling convention, like ITK transforms: it maps a point of the fixed (output) space to the moving
    (input) space. ``y = A (x - center) + center + t`` with ``A = R diag(s)``: rotation angles uniform in
    ``[-max_rotation_deg, max_rotation_deg]`` about each axis, per-axis scales uniform in
    ``[1 - max_scale, 1 + max_scale]`` (``max_scale`` is a fraction), translations uniform in
    ``[-max_translation_mm, max_translation_mm]``. Use it in SimpleITK as
    ``sitk.AffineTransform(M[:3, :3].ravel(), M[:3, 3])``, or on a grid through :func:`affine_to_displacement`.
    """
    if not (0 <= max_rotation_deg <= 180 and max_translation_mm >= 0 and 0 <= max_scale < 1):
        raise InputError(
            f"random_affine(max_rotation_deg={max_rotation_deg}, max_translation_mm={max_translation_mm}, "
            f"max_scale={max_scale}): use 0..180 degrees, translation >= 0 mm and a scale fraction in [0, 1)"
        )
    rng = np.random.default_rng(seed)
    angles = rng.uniform(-max_rotation_deg, max_rotation_deg, 3)
    scales = rng.uniform(1.0 - max_scale, 1.0 + max_scale, 3)
    translation = rng.uniform(-max_translation_mm, max_translation_mm, 3)
    matrix = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(scales)
    center = np.asarray(center, np.float64)
    out = np.eye(4)
    out[:3, :3] = matrix
    out[:3, 3] = center + translation - matrix @ center
    return out


def affine_to_displacement(matrix, shape, spacing, origin=(0.0, 0.0, 0.0), direction=None) -> np.ndarray:
    """The voxel displacement ``(3, I, J, K)`` float32 of a ``(4, 4)`` physical affine on a grid.

    ``u(p) = index_of(M @ point_of(p)) - p`` with ``point_of(p) = origin + D diag(spacing) p``; same resampling
    convention as the matrix.
    """
    shape, spacing = _check_grid(shape, spacing)
    lin, off = affine_in_index_space(matrix, spacing, origin, direction)
    idx = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij"))
    disp = np.tensordot((lin - np.eye(3)).astype(np.float32), idx, axes=([1], [0]))
    disp += off.astype(np.float32)[:, None, None, None]
    return disp


def affine_in_index_space(matrix, spacing, origin=(0.0, 0.0, 0.0), direction=None) -> tuple[np.ndarray, np.ndarray]:
    """A physical ``(4, 4)`` affine as the voxel-index map ``p -> L p + c``: returns ``L (3, 3)`` and ``c (3,)``.

    With ``P = D diag(spacing)``: ``L = P^-1 A P`` and ``c = P^-1 (A o + t - o)``.
    """
    matrix = np.asarray(matrix, np.float64)
    if matrix.shape != (4, 4):
        raise InputError(f"affine matrix has shape {matrix.shape}; pass a (4, 4) homogeneous matrix")
    d = np.eye(3) if direction is None else np.asarray(direction, np.float64).reshape(3, 3)
    to_point = d @ np.diag(np.asarray(spacing, np.float64))
    origin = np.asarray(origin, np.float64)
    lin = np.linalg.solve(to_point, matrix[:3, :3] @ to_point)
    off = np.linalg.solve(to_point, matrix[:3, :3] @ origin + matrix[:3, 3] - origin)
    return lin, off


# --------------------------------------------------------------------------------------------------------------
# warping


def deform_pair(image, labels, displacement_voxels: np.ndarray):
    """Warp an image (trilinear) and its label map (nearest) by one displacement field on their own grid.

    ``warped(x) = image(x + u(x))`` with ``u = displacement_voxels`` ``(3, I, J, K)`` in voxels (channel a along
    array axis a); outside the grid the nearest edge value is used. ``image`` and ``labels`` are both numpy
    ``(I, J, K)`` arrays or both SimpleITK images (returned in kind, with the same geometry). ``labels`` may be
    None. Returns ``(warped_image, warped_labels)``.
    """
    as_sitk = isinstance(image, sitk.Image)
    if labels is not None and isinstance(labels, sitk.Image) != as_sitk:
        raise InputError("image and labels must both be SimpleITK images or both numpy arrays; convert one of them")
    if as_sitk:
        reference = image
        img = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
        lab = None if labels is None else sitk.GetArrayFromImage(labels).transpose(2, 1, 0)
    else:
        img = np.asarray(image)
        lab = None if labels is None else np.asarray(labels)
    disp = np.asarray(displacement_voxels)
    if img.ndim != 3:
        raise InputError(f"image has shape {img.shape}; pass a 3-D (I, J, K) volume")
    if lab is not None and lab.shape != img.shape:
        raise InputError(f"labels shape {lab.shape} differs from image shape {img.shape}; pass them on one grid")
    if disp.shape != (3, *img.shape):
        raise InputError(
            f"displacement has shape {disp.shape}; expected (3, {', '.join(map(str, img.shape))}) in voxels"
        )
    coords = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in img.shape), indexing="ij"))
    coords += disp
    warped = ndimage.map_coordinates(img.astype(np.float32, copy=False), coords, order=1, mode="nearest")
    warped = warped.astype(img.dtype if np.issubdtype(img.dtype, np.floating) else np.float32)
    warped_lab = None
    if lab is not None:
        # round first so that exact integer shifts land exactly on the source voxel
        warped_lab = ndimage.map_coordinates(lab, np.rint(coords), order=0, mode="nearest").astype(lab.dtype)
    if not as_sitk:
        return warped, warped_lab
    out = sitk.GetImageFromArray(warped.transpose(2, 1, 0))
    out.CopyInformation(reference)
    out_lab = None
    if warped_lab is not None:
        out_lab = sitk.GetImageFromArray(warped_lab.transpose(2, 1, 0))
        out_lab.CopyInformation(labels)
    return out, out_lab


# --------------------------------------------------------------------------------------------------------------
# tissue model shared by the phantom and the label-driven synthesis


def _ellipse_rho(x, y, cx, cy, a, b):
    """Normalised elliptic radius in the axial plane (1 on the ellipse)."""
    return np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)


def _tissue_classes(shape, x, y, z, body, spine, dome, fields, colon) -> np.ndarray:
    """The non-organ tissue class map ``(I, J, K)`` uint8.

    ``x, y, z``: mm coordinates (x to the patient's left, y anterior, z superior), arrays broadcastable to
    ``shape``. ``body = (cx, cy, a, b)``: the body ellipse per axial slice; ``spine = (sx, sy)``: the vertebral
    body centre; ``dome``: the diaphragm height (lungs above it); ``fields``: two unit-sd smooth noise volumes
    (bowel loops, gas); ``colon = (z_top, z_bottom)``: the colon's vertical extent. All broadcastable.
    """
    cx, cy, a, b = body
    sx, sy = spine
    f_loops, f_gas = fields
    classes = np.full(shape, _T["air"], np.uint8)
    rho_skin = _ellipse_rho(x, y, cx, cy, a, b)
    rho_wall = _ellipse_rho(x, y, cx, cy, a - 20.0, b - 20.0)
    rho_cavity = _ellipse_rho(x, y, cx, cy, a - 32.0, b - 32.0)
    body_mask = np.broadcast_to(rho_skin <= 1.0, shape)
    classes[body_mask] = _T["subcutaneous fat"]
    classes[np.broadcast_to(rho_wall <= 1.0, shape)] = _T["muscle"]
    cavity = np.broadcast_to(rho_cavity <= 1.0, shape)
    above = np.broadcast_to(z > dome, shape)
    classes[cavity] = _T["visceral fat"]
    abdomen = cavity & ~above
    loops = abdomen & (f_loops > 0.2)
    classes[loops] = _T["bowel"]
    classes[loops & (f_gas > 1.8)] = _T["bowel gas"]
    # colon: two lateral columns and the transverse colon on top, gas-rich
    z_top, z_bottom = colon
    in_z = (z <= z_top) & (z >= z_bottom)
    r_col = 22.0
    side = np.zeros(shape, bool)
    for sign in (-1.0, 1.0):
        side |= np.broadcast_to(
            ((x - (cx + sign * 0.7 * a)) ** 2 + (y - (cy - 0.05 * b)) ** 2 <= r_col**2) & in_z, shape
        )
    transverse = np.broadcast_to(
        ((y - (cy + 0.55 * b)) ** 2 + (z - z_top) ** 2 <= r_col**2) & (np.abs(x - cx) <= 0.7 * a), shape
    )
    colon_mask = (side | transverse) & abdomen
    classes[colon_mask] = _T["bowel"]
    classes[colon_mask & (f_gas > 0.4)] = _T["bowel gas"]
    # thorax above the diaphragm: lungs, with the heart and mediastinum anterior to the spine near the midline
    thorax = cavity & above
    classes[thorax] = _T["lung"]
    mediastinum = np.broadcast_to((np.abs(x - (sx + 12.0)) <= 55.0) & (y >= sy + 20.0), shape)
    classes[thorax & mediastinum] = _T["heart and mediastinum"]
    # ribs: oblique bands in the muscle wall, lateral and posterior, from the lower thorax down
    band = np.mod(z + 0.35 * y, 26.0) < 9.0
    rib_zone = (rho_wall > 0.93) & (rho_cavity <= 1.05) & (z >= dome - 110.0)
    rib_zone &= (np.abs(x - sx) >= 30.0) & ((y <= cy + 0.45 * b) | (z >= dome - 40.0))
    classes[np.broadcast_to(band & rib_zone, shape)] = _T["rib"]
    # muscles along the spine: erector spinae behind, psoas beside (growing towards the pelvis)
    for sign in (-1.0, 1.0):
        erector = ((x - (sx + sign * 38.0)) / 28.0) ** 2 + ((y - (sy - 58.0)) / 26.0) ** 2 <= 1.0
        classes[np.broadcast_to(erector & (rho_skin <= 0.97), shape)] = _T["muscle"]
        grow = np.clip((colon[0] + 40.0 - z) / 120.0, 0.0, 1.0)
        psoas = ((x - (sx + sign * 36.0)) / (4.0 + 14.0 * grow)) ** 2 + (
            (y - (sy + 4.0)) / (4.0 + 16.0 * grow)
        ) ** 2 <= 1.0
        classes[np.broadcast_to(psoas & (grow > 0), shape)] = _T["muscle"]
    # spine: vertebral bodies with discs, canal, posterior ring, spinous and transverse processes
    phase = np.mod(z, 32.0)
    disc = phase < 7.0
    rho_vb = _ellipse_rho(x, y, sx, sy, 22.0, 17.0)
    classes[np.broadcast_to((rho_vb <= 1.0) & ~disc, shape)] = _T["cortical bone"]
    classes[np.broadcast_to((rho_vb <= 0.78) & ~disc, shape)] = _T["cancellous bone"]
    classes[np.broadcast_to((rho_vb <= 1.0) & disc, shape)] = _T["intervertebral disc"]
    r_canal = np.sqrt((x - sx) ** 2 + (y - (sy - 30.0)) ** 2)
    ring = (r_canal <= 15.0) & (r_canal > 9.0) & (y < sy - 16.0) & ~disc
    spinous = (np.abs(x - sx) <= 5.0) & (y <= sy - 42.0) & (y >= sy - 80.0) & (phase >= 10.0)
    transverse_p = (np.abs(y - (sy - 24.0)) <= 5.0) & (np.abs(x - sx) >= 14.0) & (np.abs(x - sx) <= 48.0)
    transverse_p &= phase >= 14.0
    classes[np.broadcast_to(ring | spinous | transverse_p, shape)] = _T["cortical bone"]
    classes[np.broadcast_to(r_canal <= 9.0, shape)] = _T["spinal canal"]
    classes[~body_mask] = _T["air"]
    return classes


def _render_ct(classes: np.ndarray, spacing, rng: np.random.Generator, noise_sd: float) -> np.ndarray:
    """HU image ``(I, J, K)`` float32 from a class map: per-class mean + sd * smooth texture, blur, noise."""
    axes, box = _grid_axes(classes.shape, spacing)
    texture = _smooth_noise(rng, 1, axes, 6.0, box)[0]
    image = _MEAN_LUT[classes] + _STD_LUT[classes] * texture
    # slight partial-volume blur at edges (half a voxel)
    image = ndimage.gaussian_filter(image, sigma=0.5, mode="nearest", truncate=3.0)
    image += rng.standard_normal(classes.shape, dtype=np.float32) * np.float32(noise_sd)
    return np.clip(image, *_HU_RANGE).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# the parametric phantom

# Organ primitives in the nominal anatomy frame (mm from the centre of a 384 x 320 x 512 mm field of view; x to the
# patient's left, y anterior, z superior). Positions and sizes follow the average BTCV organ centroids and volumes.
# ("ellipsoid", centre, semi-axes, xyz Euler degrees) or ("tube", points, radii). Painted in this order, later
# organs over earlier ones.
_ORGAN_SHAPES: tuple[tuple[int, list, float], ...] = (
    # (label, primitives, boundary bumpiness)
    (6, [("ellipsoid", (-72, 18, 98), (66, 82, 74), (0, 0, 0)),
         ("ellipsoid", (-5, 48, 112), (62, 38, 42), (0, 0, -15))], 0.08),
    (7, [("tube", [(40, 5, 140), (62, 30, 110), (62, 52, 80), (35, 68, 58), (5, 58, 52)],
          [34, 38, 32, 22, 14])], 0.06),
    (1, [("ellipsoid", (104, -28, 96), (26, 50, 52), (-20, 0, 30))], 0.08),
    (2, [("ellipsoid", (-62, -25, 25), (25, 28, 52), (0, 15, -20))], 0.05),
    (3, [("ellipsoid", (78, -27, 34), (25, 28, 52), (0, -15, 20))], 0.05),
    (11, [("tube", [(-22, 36, 44), (0, 42, 52), (35, 38, 60), (65, 18, 72), (82, 2, 80)],
           [20, 15, 13, 12, 10])], 0.05),
    (4, [("ellipsoid", (-58, 52, 42), (15, 17, 26), (30, 0, 0))], 0.05),
    (9, [("tube", [(-14, 2, 215), (-20, -2, 150), (-16, 8, 80), (-8, 2, -40)], [11, 11, 11, 10])], 0.0),
    (8, [("tube", [(18, -18, 250), (17, -10, 150), (15, -6, 60), (10, -4, -30)], [11, 11, 10.5, 9])], 0.0),
    (10, [("tube", [(84, -12, 88), (62, 4, 70), (30, 18, 56), (2, 24, 54), (-22, 32, 80), (-45, 30, 98)],
           [6, 6.5, 7, 8, 8.5, 8])], 0.0),
    (5, [("tube", [(4, 8, 210), (14, 12, 165), (32, 18, 138)], [8, 8, 8])], 0.0),
    (12, [("ellipsoid", (-38, -24, 90), (6, 14, 18), (0, 0, 30))], 0.0),
    (13, [("ellipsoid", (40, -10, 80), (6, 14, 18), (0, 0, -30))], 0.0),
)
_BODY = (4.0, 0.0, 172.0, 135.0)  # body ellipse cx, cy, a, b (mm)
_SPINE = (2.0, -44.0)  # vertebral body centre (mm)
_DOME = (4.0, 0.0, 150.0, 115.0, 85.0, 90.0)  # diaphragm: ellipse cx, cy, a, b; base height; dome height
_COLON = (30.0, -140.0)  # colon z extent (top, bottom)


def _primitive_value(prim, p: np.ndarray) -> np.ndarray:
    """Implicit value of a primitive at points ``p (3, ...)``: < 0 inside, 0 on the surface (~ relative depth)."""
    if prim[0] == "ellipsoid":
        _, centre, semi, euler = prim
        rot = Rotation.from_euler("xyz", euler, degrees=True).as_matrix().astype(np.float32)
        d = p - np.asarray(centre, np.float32).reshape(3, *([1] * (p.ndim - 1)))
        q = np.tensordot(rot.T, d, axes=([1], [0])) / np.asarray(semi, np.float32).reshape(3, *([1] * (p.ndim - 1)))
        return np.sqrt((q**2).sum(0)) - 1.0
    _, points, radii = prim
    best = None
    for a, b, ra, rb in zip(points[:-1], points[1:], radii[:-1], radii[1:]):
        a = np.asarray(a, np.float32).reshape(3, *([1] * (p.ndim - 1)))
        ab = np.asarray(b, np.float32).reshape(3, *([1] * (p.ndim - 1))) - a
        t = np.clip(((p - a) * ab).sum(0) / float((ab**2).sum()), 0.0, 1.0)
        dist = np.sqrt(((p - a - t * ab) ** 2).sum(0))
        value = dist / (ra + t * (rb - ra)) - 1.0
        best = value if best is None else np.minimum(best, value)
    return best


def _primitive_extent(prim) -> tuple[np.ndarray, float]:
    """Centre and bounding radius (mm) of a primitive."""
    if prim[0] == "ellipsoid":
        return np.asarray(prim[1], float), float(max(prim[2]))
    pts = np.asarray(prim[1], float)
    centre = (pts.min(0) + pts.max(0)) / 2
    return centre, float(np.linalg.norm(pts.max(0) - pts.min(0)) / 2 + max(prim[2]))


def make_abdomen_phantom(
    shape=(96, 80, 128),
    spacing=(4.0, 4.0, 4.0),
    seed: int = 0,
    variation: float = 0.0,
    noise_sd: float = 12.0,
) -> tuple[sitk.Image, sitk.Image]:
    """A synthetic abdominal CT with the 13 BTCV organs labelled.

    Returns ``(ct, labels)``: ``ct`` a float32 SimpleITK image in HU (portal-venous contrast, see the module
    table), ``labels`` a uint8 image with BTCV labels 1..13 (:data:`BTCV_ORGANS`, 0 = everything else), on one grid
    of ``shape`` ``(I, J, K)`` voxels of ``spacing`` mm, centred on the origin, direction
    :data:`PHANTOM_DIRECTION` (i: right -> left, j: posterior -> anterior, k: inferior -> superior).

    The anatomy (body outline with subcutaneous fat and muscle wall, spine with discs and posterior elements,
    paraspinal and psoas muscles, ribs, lung bases and heart above the diaphragm, bowel loops and colon with gas,
    and the 13 organs at their average BTCV positions and volumes) is laid out for the BTCV field of view
    (384 x 320 x 512 mm, the default); a smaller field of view gets a uniformly smaller body.

    ``variation`` in [0, 1] makes a different subject per ``seed``: organ positions (~6-10 mm sd at 1), sizes
    (~7 % per axis), orientations, body size, a smooth whole-body deformation and the bowel pattern. With
    ``variation=0`` every seed has the same anatomy and only texture and noise change.
    """
    shape, spacing = _check_grid(shape, spacing)
    if not 0.0 <= float(variation) <= 1.0:
        raise InputError(f"variation={variation} is outside [0, 1]; pass a value between 0 (reference) and 1")
    v = float(variation)
    axes, box = _grid_axes(shape, spacing)
    fov = np.asarray([hi - lo for lo, hi in box])
    scale = float(min(1.0, *(fov / _NOMINAL_FOV_MM)))
    nominal_box = tuple((-n / 2.0, n / 2.0) for n in _NOMINAL_FOV_MM)
    anat_axes = tuple(ax / scale for ax in axes)  # coordinates in the nominal anatomy frame

    ref_rng = np.random.default_rng(20231126)  # the reference anatomy's fixed irregularities
    subj_rng = np.random.default_rng([int(seed), 1])
    noise_rng = np.random.default_rng([int(seed), 2])

    # subject-level deformation of the anatomy frame (mm) and smooth fields for bumps and bowel
    grid = np.stack(np.meshgrid(*(ax.astype(np.float32) for ax in anat_axes), indexing="ij"))
    warp_field = _smooth_noise(subj_rng, 3, anat_axes, 80.0, nominal_box)
    global_shift = subj_rng.normal(0.0, 6.0, 3) * np.array([0.7, 0.7, 1.5])
    grid -= (v * 4.0) * warp_field + (v * global_shift).astype(np.float32).reshape(3, 1, 1, 1)
    bumps = _smooth_noise(ref_rng, 1, anat_axes, 30.0, nominal_box)[0]
    bowel_rng = subj_rng if v > 0 else ref_rng
    fields = np.concatenate(  # bowel loops (coarse) and gas pockets (fine)
        [_smooth_noise(bowel_rng, 1, anat_axes, step, nominal_box) for step in (18.0, 9.0)]
    )
    if v > 0:
        bumps = (bumps + v * _smooth_noise(subj_rng, 1, anat_axes, 30.0, nominal_box)[0]) / math.sqrt(1 + v * v)

    body_scale = np.exp(v * 0.06 * subj_rng.standard_normal(2))
    cx, cy, a, b = _BODY
    a, b = a * body_scale[0], b * body_scale[1]
    dcx, dcy, da, db, z0, dz = _DOME
    x, y, z = grid
    dome = z0 + dz * np.sqrt(np.clip(1.0 - ((x - dcx) / da) ** 2 - ((y - dcy) / db) ** 2, 0.0, None))
    classes = _tissue_classes(shape, x, y, z, (cx, cy, a, b), _SPINE, dome, fields, _COLON)

    labels = _place_organs(shape, grid, anat_axes, bumps, subj_rng, v)
    organ = labels > 0
    classes[organ] = _ORGAN0 + labels[organ]
    # organs stay inside the body: nothing labelled in air
    labels[classes == _T["air"]] = 0

    image = _render_ct(classes, spacing, noise_rng, noise_sd)
    return _to_sitk(image, spacing), _to_sitk(labels, spacing)


def _place_organs(shape, grid: np.ndarray, anat_axes, bumps: np.ndarray, subj_rng: np.random.Generator,
                  v: float) -> np.ndarray:
    """``(I, J, K)`` uint8 BTCV labels: each organ of :data:`_ORGAN_SHAPES` moved, stretched and turned for this
    subject (by ``v``, the variation) in the anatomy frame ``grid``, its surface roughened by ``bumps``."""
    labels = np.zeros(shape, np.uint8)
    index_axes = [np.asarray(ax) for ax in anat_axes]
    margin = 12.0 + v * 40.0  # room for the whole-body warp (4 mm sd) and shift (up to ~4 sd of 9 mm along z)
    for label, prims, bumpiness in _ORGAN_SHAPES:
        shift = v * np.clip(subj_rng.standard_normal(3), -2, 2) * np.array([5.0, 6.0, 9.0])
        stretch = np.exp(v * 0.07 * np.clip(subj_rng.standard_normal(3), -2, 2))
        rot = Rotation.from_euler("xyz", v * 8.0 * np.clip(subj_rng.standard_normal(3), -2, 2), degrees=True)
        extents = [_primitive_extent(p) for p in prims]
        centre = np.mean([c for c, _ in extents], axis=0)
        radius = max(np.linalg.norm(c - centre) + r for c, r in extents) * float(stretch.max()) + margin
        lo, hi = centre + shift - radius, centre + shift + radius
        sl = tuple(
            slice(int(np.searchsorted(ax, lo[i])), int(np.searchsorted(ax, hi[i], side="right")))
            for i, ax in enumerate(index_axes)
        )
        if any(s.stop <= s.start for s in sl):
            continue
        p = grid[(slice(None), *sl)]
        # into the organ's own nominal frame: p_nom = c + R^T (x - c - shift) / stretch
        d = p - (centre + shift).astype(np.float32).reshape(3, 1, 1, 1)
        d = np.tensordot(rot.as_matrix().T.astype(np.float32), d, axes=([1], [0]))
        p_nom = d / stretch.astype(np.float32).reshape(3, 1, 1, 1) + centre.astype(np.float32).reshape(3, 1, 1, 1)
        value = np.min([_primitive_value(prim, p_nom) for prim in prims], axis=0)
        inside = value < bumpiness * bumps[sl]
        labels[sl][inside] = label
    return labels


def _to_sitk(array: np.ndarray, spacing) -> sitk.Image:
    """A SimpleITK image of an ``(I, J, K)`` array, centred on the origin, direction :data:`PHANTOM_DIRECTION`."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(PHANTOM_DIRECTION)
    centre_index = (np.asarray(array.shape, float) - 1) / 2
    direction = np.asarray(PHANTOM_DIRECTION).reshape(3, 3)
    image.SetOrigin(tuple(float(o) for o in -(direction @ (np.asarray(spacing) * centre_index))))
    return image


def make_example_pair(
    seed: int = 0,
    shape=(96, 80, 128),
    spacing=(4.0, 4.0, 4.0),
    variation: float = 0.6,
    max_displacement_mm: float = 8.0,
    smoothness_mm: float = 40.0,
) -> dict:
    """A realistic registration example: two different phantom subjects, the moving one further deformed.

    The fixed image is subject ``2 * seed`` and the moving image subject ``2 * seed + 1`` (both with
    ``variation``), the latter warped by a known smooth field. Returns a dict with ``fixed``, ``moving`` (float32
    SimpleITK images, HU), ``fixed_labels``, ``moving_labels`` (uint8 images, BTCV labels), ``displacement``
    (``(3, I, J, K)`` float32 voxels: the known field applied to the second subject, ``moving = subject(x + u(x))``;
    the fixed -> moving correspondence also contains the unknown inter-subject difference, so evaluate with the
    labels), and ``label_names`` (``{label: name}``).
    """
    fixed, fixed_labels = make_abdomen_phantom(shape, spacing, seed=2 * seed, variation=variation)
    subject, subject_labels = make_abdomen_phantom(shape, spacing, seed=2 * seed + 1, variation=variation)
    displacement = random_smooth_displacement(
        subject.GetSize(), subject.GetSpacing(), max_displacement_mm, smoothness_mm, seed=seed
    )
    moving, moving_labels = deform_pair(subject, subject_labels, displacement)
    return {
        "fixed": fixed,
        "moving": moving,
        "fixed_labels": fixed_labels,
        "moving_labels": moving_labels,
        "displacement": displacement,
        "label_names": {i + 1: name for i, name in enumerate(BTCV_ORGANS)},
    }


# --------------------------------------------------------------------------------------------------------------
# CT-like images synthesised from real label maps


def _label_profiles(labels: np.ndarray) -> list[np.ndarray]:
    """Per axis a, the voxel count of each label 0..13 in each slice across a: ``(n_a, 14)``."""
    out = []
    for axis in range(3):
        moved = np.moveaxis(labels, axis, 0)
        out.append(np.stack([np.bincount(sl.ravel(), minlength=14)[:14] for sl in moved]))
    return out


def _orientation_flips(labels: np.ndarray) -> tuple[bool, bool, bool]:
    """Which array axes run against (left, anterior, superior), read from the organs; BTCV layout if unsure."""
    profiles = _label_profiles(labels)

    def centre(values, axis):
        profile = profiles[axis][:, list(values)].sum(1).astype(float)
        if profile.sum() == 0:
            return None
        return float((profile * np.arange(len(profile))).sum() / profile.sum())

    def flip(a_values, b_values, axis):
        # True when the centre of a (towards the axis' positive end) is at lower index than b
        ca, cb = centre(a_values, axis), centre(b_values, axis)
        return False if ca is None or cb is None or ca == cb else ca < cb

    return (
        flip([1, 3], [6, 2], 0),  # spleen and left kidney are on the patient's left of liver and right kidney
        flip([4, 7, 11], [2, 3], 1),  # gall bladder, stomach and pancreas are anterior to the kidneys
        flip([5, 1, 6], [2, 3], 2),  # esophagus, spleen and liver are superior to the kidneys
    )


def synthesize_ct_from_labels(
    labels: np.ndarray,
    spacing,
    seed: int = 0,
    noise_sd: float = 12.0,
) -> np.ndarray:
    """A synthetic, label-derived CT-like image ``(I, J, K)`` float32 in HU for a real BTCV label map.

    The image is not a CT acquisition: every intensity is invented from the labels. Organs (BTCV labels 1..13)
    get the :data:`ORGAN_HU` distributions with smooth texture. The label maps contain only organs, so the body is
    synthesised around them: per axial slice (array axis k) a body ellipse is estimated from the organ extent
    (envelope over neighbouring slices, plus a 34 mm lateral, 32 mm anterior and a posterior margin that leaves
    room for the spine and back muscles), with subcutaneous fat, a muscle wall, a spine posterior-midline behind
    the aorta, paraspinal and psoas muscles, ribs, bowel loops and colon with gas, and lungs above the liver and
    spleen domes; air outside. Partial-volume blur and CT noise (``noise_sd`` HU) come last.

    ``labels``: integer ``(I, J, K)`` array with values 0..13 (0 = background); ``spacing``: mm per axis. The
    left/anterior/superior sense of each axis is read from the organs (BTCV arrays run right -> left,
    posterior -> anterior, inferior -> superior; their RAS headers do not say so); axial slices are along axis k.
    """
    lab, shape, spacing = _checked_btcv_labels(labels, spacing)
    flips = _orientation_flips(lab)
    view = lab[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    sp = np.asarray(spacing)
    xs, ys, zs = ((np.arange(n) * s).astype(np.float32) for n, s in zip(shape, spacing))
    organ = view > 0
    x_lo, x_hi, y_lo, y_hi = _organ_envelope(organ, xs, ys, zs, sp)
    sx, sy = _spine_line(view, xs, ys, zs, sp, (x_lo + x_hi) / 2, y_lo + 25.0)
    cx, cy, a, b = _body_ellipses(x_lo, x_hi, y_lo, y_hi, sy)
    dome = _diaphragm(view, zs, sp)
    kidney_count = (view == 2).sum((0, 1)) + (view == 3).sum((0, 1))
    z_kidney = float((kidney_count * zs).sum() / kidney_count.sum()) if kidney_count.any() else float(zs.mean())

    rng = np.random.default_rng(int(seed))
    axes, box = _grid_axes(shape, spacing)
    fields = np.concatenate(
        [_smooth_noise(rng, 1, axes, 18.0, box), _smooth_noise(rng, 1, axes, 9.0, box)], axis=0
    )
    k3 = (1, 1, shape[2])
    classes = _tissue_classes(
        shape,
        xs[:, None, None],
        ys[None, :, None],
        zs[None, None, :],
        tuple(p.reshape(k3).astype(np.float32) for p in (cx, cy, a, b)),
        (sx.reshape(k3).astype(np.float32), sy.reshape(k3).astype(np.float32)),
        dome[:, :, None].astype(np.float32),
        fields,
        (z_kidney + 10.0, z_kidney - 150.0),
    )
    classes[organ] = _ORGAN0 + view[organ]
    image = _render_ct(classes, spacing, rng, noise_sd)
    # back to the caller's axis order
    return np.ascontiguousarray(image[tuple(slice(None, None, -1) if f else slice(None) for f in flips)])


def _checked_btcv_labels(labels: np.ndarray, spacing) -> tuple[np.ndarray, tuple[int, int, int], tuple]:
    """``(labels as int16, shape, spacing)``; InputError unless a 3-D integer map of BTCV labels with an organ."""
    lab = np.asarray(labels)
    if lab.ndim != 3:
        raise InputError(f"labels have shape {lab.shape}; pass a 3-D (I, J, K) BTCV label map")
    if not (np.issubdtype(lab.dtype, np.integer) or np.all(np.mod(lab, 1) == 0)):
        raise InputError("labels are not integers; pass the label map itself, not an image")
    lab = lab.astype(np.int16, copy=False)
    shape, spacing = _check_grid(lab.shape, spacing)
    present = np.unique(lab)
    if present.min() < 0 or present.max() > 13:
        raise InputError(
            f"label values {present[(present < 0) | (present > 13)].tolist()} are not BTCV labels 0..13; "
            "map the label map to the BTCV organ order first"
        )
    if present.max() == 0:
        raise InputError("the label map has no organ (all zeros); pass a BTCV label map with organs")
    return lab, shape, spacing


def _fill_along(zs: np.ndarray, values: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """``values`` per axial slice with the NaN (and not ``valid``) slices filled from their neighbours."""
    ok = np.isfinite(values) if valid is None else valid & np.isfinite(values)
    return np.interp(zs, zs[ok], values[ok])


def _extent(mask_2d: np.ndarray, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last coordinate of ``mask_2d``'s rows along its first axis, per slice (NaN where empty)."""
    any_ = mask_2d.any(0)
    first = np.where(any_, coords[np.argmax(mask_2d, 0)], np.nan)
    last = np.where(any_, coords[len(coords) - 1 - np.argmax(mask_2d[::-1], 0)], np.nan)
    return first, last


def _organ_envelope(organ: np.ndarray, xs, ys, zs, sp) -> tuple[np.ndarray, ...]:
    """``(x_lo, x_hi, y_lo, y_hi)`` mm per axial slice: the organs' extent, filled and enveloped along z."""
    # slices with little organ (the liver dome, the esophagus alone) say little about the body: use the
    # nearest slice with at least 30 % of the largest organ area instead
    area = organ.sum((0, 1))
    core = area >= 0.3 * area.max()
    x_lo, x_hi = (_fill_along(zs, v, core) for v in _extent(organ.any(1), xs))
    y_lo, y_hi = (_fill_along(zs, v, core) for v in _extent(organ.any(0), ys))
    window = max(1, int(round(60.0 / sp[2])))
    sigma_z = 20.0 / sp[2]
    x_lo = ndimage.gaussian_filter1d(ndimage.minimum_filter1d(x_lo, 2 * window + 1), sigma_z, mode="nearest")
    x_hi = ndimage.gaussian_filter1d(ndimage.maximum_filter1d(x_hi, 2 * window + 1), sigma_z, mode="nearest")
    y_lo = ndimage.gaussian_filter1d(ndimage.minimum_filter1d(y_lo, 2 * window + 1), sigma_z, mode="nearest")
    y_hi = ndimage.gaussian_filter1d(ndimage.maximum_filter1d(y_hi, 2 * window + 1), sigma_z, mode="nearest")
    return x_lo, x_hi, y_lo, y_hi


def _spine_line(view: np.ndarray, xs, ys, zs, sp, default_x: np.ndarray, default_y: np.ndarray):
    """``(sx, sy)`` mm per axial slice: the spine behind the aorta (it lies left-anterior of the vertebral body);
    without an aorta, at ``(default_x, default_y)``."""
    aorta = view == 8
    count = aorta.sum((0, 1)).astype(float)
    if count.sum() > 0:
        ok = count > 0
        ax_ = np.where(ok, (aorta.sum(1) * xs[:, None]).sum(0) / np.maximum(count, 1), np.nan)
        ay_ = np.where(ok, (aorta.sum(0) * ys[:, None]).sum(0) / np.maximum(count, 1), np.nan)
        radius = np.where(ok, np.sqrt(count * sp[0] * sp[1] / np.pi), np.nan)
        sx = _fill_along(zs, ax_) - 12.0
        sy = _fill_along(zs, ay_) - _fill_along(zs, radius) - 20.0
    else:
        sx, sy = default_x, default_y
    sx = ndimage.gaussian_filter1d(sx, 25.0 / sp[2], mode="nearest")
    sy = ndimage.gaussian_filter1d(sy, 25.0 / sp[2], mode="nearest")
    return sx, sy


def _body_ellipses(x_lo, x_hi, y_lo, y_hi, sy) -> tuple[np.ndarray, ...]:
    """``(cx, cy, a, b)`` per axial slice: the body ellipse around the organs (34 mm lateral and 32 mm anterior
    margins, room for the spine and back muscles behind), never under 85 % of its largest size."""
    anterior = y_hi + 32.0
    posterior = np.minimum(y_lo - 45.0, sy - 95.0)
    a = (x_hi - x_lo) / 2 + 34.0
    b = (anterior - posterior) / 2
    a = np.maximum(a, 0.85 * a.max())
    b = np.maximum(b, 0.85 * b.max())
    return (x_lo + x_hi) / 2, (anterior + posterior) / 2, a, b


def _diaphragm(view: np.ndarray, zs, sp) -> np.ndarray:
    """``(I, J)`` height (mm) of the diaphragm: the top of liver, spleen and stomach per column, spread to the
    columns without them."""
    dome_mask = np.zeros(14, bool)
    dome_mask[[1, 6, 7]] = True
    dome_mask = dome_mask[view]
    if not dome_mask.any():
        return np.full(view.shape[:2], zs[-1] + 1.0)
    has = dome_mask.any(2)
    top = np.where(has, zs[view.shape[2] - 1 - np.argmax(dome_mask[:, :, ::-1], 2)], np.nan)
    nearest = ndimage.distance_transform_edt(~has, sampling=sp[:2], return_distances=False, return_indices=True)
    top = top[tuple(nearest)]
    return ndimage.gaussian_filter(top, sigma=15.0 / sp[:2], mode="nearest") + 4.0

"""The QC figure: a PNG that lets a person judge a registration at a glance.

:func:`render_qc_figure` draws three orthogonal views (axial, coronal, sagittal) through the fixed image, one per
row, and seven columns: fixed, moving (resampled onto the fixed grid, no registration), warped moving,
checkerboards of fixed vs moving before and after, the Jacobian determinant (folds in lime) and the deformation
grid (a regular grid pushed through the in-plane displacement, drawn over the fixed image).

Orientation: the views are shown in radiological convention the right way up whatever the storage order of the
fixed image (the patient's right on the viewer's left in axial and coronal views, anterior at the top of axial
views, superior at the top of coronal and sagittal views, anterior on the left of sagittal views). Every index axis
of the fixed grid is matched to the closest anatomical axis (as ``sitk.DICOMOrient(image, "LPS")`` does) and each
view is a permuted/flipped 2-D slice of the fixed grid; every other input (moving, warped, Jacobian, displacement,
labels) is sliced on the same planes, by a NumPy view when it lies on the fixed grid and otherwise by resampling
just that plane. Only 2-D slices are ever materialised. Anisotropic spacing is honoured through the axes' aspect.

Matplotlib is used without pyplot (``Figure`` + ``FigureCanvasAgg``), so rendering leaves no global figure state
behind and is safe off the main thread (inside Slicer).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import IO, Any, Mapping, Sequence, Union

import numpy as np
import SimpleITK as sitk

from textscf.errors import InputError, OutputError
from textscf.results import RegistrationResult
from textscf.spatial import body_box_centre, same_grid

__all__ = [
    "VIEWS",
    "ViewPlane",
    "anatomical_axes",
    "view_planes",
    "extract_view",
    "orthogonal_slices",
    "focus_point",
    "render_qc_figure",
]

VIEWS = ("axial", "coronal", "sagittal")

# For each view: the LPS axis held constant, then (LPS axis, direction) that display rows and columns increase
# along (rows top -> bottom, columns left -> right). LPS axes: 0 = x (towards the patient's left),
# 1 = y (towards posterior), 2 = z (towards superior). Radiological convention.
_VIEW_LAYOUT = {
    "axial": (2, (1, +1), (0, +1)),     # rows anterior -> posterior, columns patient right -> left
    "coronal": (1, (2, -1), (0, +1)),   # rows superior -> inferior, columns patient right -> left
    "sagittal": (0, (2, -1), (1, +1)),  # rows superior -> inferior, columns anterior -> posterior
}
# Letters at the (left, right, top, bottom) edges of each view.
_VIEW_EDGES = {
    "axial": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
    "sagittal": ("A", "P", "S", "I"),
}
_INDEX_NAMES = "ijk"

CT_DISPLAY_WINDOW = (-200.0, 300.0)
FOLD_COLOUR = "#00ff00"  # lime: absent from the gray and RdBu colour maps
GRID_COLOUR = "#ffb000"
_LABEL_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c",
                  "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000",
                  "#ffd8b1", "#000075", "#ffe119", "#ffffff")

PathOrFile = Union[str, "os.PathLike[str]", IO[bytes]]


# ------------------------------------------------------------------------------------------------ orientation
def anatomical_axes(direction: Sequence[float]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Match the index axes of an image to the anatomical (LPS) axes.

    Args:
        direction: 9 direction cosines, row-major as SimpleITK's ``GetDirection`` (column ``a`` = LPS direction
            of index axis ``a``).

    Returns:
        ``(axis, sign)``: ``axis[p]`` is the index axis closest to LPS axis ``p`` (0 = L, 1 = P, 2 = S) and
        ``sign[p]`` is +1 when increasing that index moves towards +p (L, P or S), else -1. Oblique directions
        are assigned greedily to the closest axis, largest cosine first, like ``sitk.DICOMOrient``.
    """
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(d)) or abs(np.linalg.det(d)) < 1e-6:
        raise InputError(f"the image direction {tuple(direction)} is not a valid rotation; fix the image header.")
    absd = np.abs(d)
    axis, sign = [-1, -1, -1], [1, 1, 1]
    free_rows, free_cols = {0, 1, 2}, {0, 1, 2}
    for _ in range(3):
        p, a = max(((r, c) for r in free_rows for c in free_cols), key=lambda rc: absd[rc])
        axis[p], sign[p] = a, (1 if d[p, a] >= 0 else -1)
        free_rows.discard(p)
        free_cols.discard(a)
    return tuple(axis), tuple(sign)  # type: ignore[return-value]


@dataclass(frozen=True)
class ViewPlane:
    """A 2-D display plane of a 3-D grid: one index fixed, the other two shown as rows and columns.

    Attributes:
        name: "axial", "coronal" or "sagittal".
        slice_axis: index axis (0 = i, 1 = j, 2 = k) held constant.
        slice_index: its value.
        row_axis, col_axis: index axes along the display rows (top -> bottom) and columns (left -> right).
        row_reversed, col_reversed: True when the display runs from the last index to the first.
        row_spacing, col_spacing: mm per display pixel vertically and horizontally.
        n_rows, n_cols: display shape.
    """

    name: str
    slice_axis: int
    slice_index: int
    row_axis: int
    row_reversed: bool
    col_axis: int
    col_reversed: bool
    row_spacing: float
    col_spacing: float
    n_rows: int
    n_cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_rows, self.n_cols

    def index_signs(self) -> tuple[float, float]:
        """(+1 / -1) for rows and columns: the direction of the display axis in index units."""
        return (-1.0 if self.row_reversed else 1.0), (-1.0 if self.col_reversed else 1.0)


def _continuous_index(image: sitk.Image, point: Sequence[float]) -> np.ndarray:
    return np.array(image.TransformPhysicalPointToContinuousIndex([float(v) for v in point]), dtype=float)


def view_planes(reference: sitk.Image, point: Sequence[float] | None = None) -> dict[str, ViewPlane]:
    """The axial, coronal and sagittal planes of ``reference``'s grid through ``point``.

    Args:
        reference: the 3-D image whose grid the planes cut (the fixed image).
        point: LPS mm point the three planes pass through (nearest voxel); None = the grid centre.

    Returns:
        ``{view name: ViewPlane}`` in :data:`VIEWS` order.
    """
    if reference.GetDimension() != 3:
        raise InputError(f"the QC figure needs a 3-D image, got {reference.GetDimension()}-D.")
    size = np.array(reference.GetSize())
    spacing = np.array(reference.GetSpacing(), dtype=float)
    if point is None:
        centre = (size - 1) / 2.0
    else:
        centre = _continuous_index(reference, point)
    centre = np.clip(np.rint(np.nan_to_num(centre, nan=0.0)), 0, size - 1).astype(int)
    axis, sign = anatomical_axes(reference.GetDirection())
    planes = {}
    for name in VIEWS:
        lps_slice, (lps_row, want_row), (lps_col, want_col) = _VIEW_LAYOUT[name]
        s, r, c = axis[lps_slice], axis[lps_row], axis[lps_col]
        planes[name] = ViewPlane(
            name=name, slice_axis=s, slice_index=int(centre[s]),
            row_axis=r, row_reversed=sign[lps_row] * want_row < 0,
            col_axis=c, col_reversed=sign[lps_col] * want_col < 0,
            row_spacing=float(spacing[r]), col_spacing=float(spacing[c]),
            n_rows=int(size[r]), n_cols=int(size[c]))
    return planes


def _slice_kji(arr_kji: np.ndarray, plane: ViewPlane) -> np.ndarray:
    """The display-oriented 2-D slice (plus trailing component axis) of a SimpleITK-ordered ``[k, j, i, ...]`` array."""
    index: list[Any] = [slice(None)] * 3
    index[2 - plane.slice_axis] = plane.slice_index
    sl = arr_kji[tuple(index)]
    remaining = [a for a in (2, 1, 0) if a != plane.slice_axis]  # index axes in the order of sl's dimensions
    if remaining != [plane.row_axis, plane.col_axis]:
        sl = sl.swapaxes(0, 1)
    if plane.row_reversed:
        sl = sl[::-1]
    if plane.col_reversed:
        sl = sl[:, ::-1]
    return np.array(sl)  # a small copy: the caller never holds a view into the volume


def _plane_reference(reference: sitk.Image, plane: ViewPlane) -> sitk.Image:
    """A one-voxel-thick image on ``reference``'s grid covering ``plane``."""
    size = list(reference.GetSize())
    size[plane.slice_axis] = 1
    start = [0, 0, 0]
    start[plane.slice_axis] = plane.slice_index
    ref = sitk.Image(size, sitk.sitkUInt8)
    ref.SetSpacing(reference.GetSpacing())
    ref.SetDirection(reference.GetDirection())
    ref.SetOrigin(reference.TransformContinuousIndexToPhysicalPoint([float(v) for v in start]))
    return ref


def extract_view(image: sitk.Image, plane: ViewPlane, reference: sitk.Image, interpolator: str = "linear",
                 default_value: float = 0.0) -> np.ndarray:
    """The 2-D display slice of ``image`` on ``plane`` of ``reference``'s grid.

    Args:
        image: scalar or vector 3-D image, on ``reference``'s grid (sliced through a NumPy view, exact) or on any
            other grid (only the plane is resampled, in physical space).
        plane: from :func:`view_planes` of ``reference``.
        interpolator: "linear" or "nearest" (label maps), used only when resampling.
        default_value: value outside ``image`` when resampling.

    Returns:
        ``(n_rows, n_cols)`` array (``(n_rows, n_cols, C)`` for a C-component image), rows top -> bottom.
    """
    if image.GetDimension() != 3:
        raise InputError(f"the QC figure needs 3-D images, got a {image.GetDimension()}-D one.")
    if same_grid(reference, image):
        return _slice_kji(sitk.GetArrayViewFromImage(image), plane)
    interp = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}[interpolator]
    ref = _plane_reference(reference, plane)
    out = sitk.Resample(image, ref, sitk.Transform(), interp, float(default_value), image.GetPixelID())
    return _slice_kji(sitk.GetArrayViewFromImage(out), dataclasses.replace(plane, slice_index=0))


def orthogonal_slices(image: sitk.Image, point: Sequence[float] | None = None, reference: sitk.Image | None = None,
                      interpolator: str = "linear", default_value: float = 0.0) -> dict[str, np.ndarray]:
    """The axial, coronal and sagittal display slices of ``image`` through ``point``.

    Two images holding the same voxels in different storage orders (permuted / flipped index axes with the
    matching direction) give identical slices.

    Args:
        image: scalar or vector 3-D image.
        point: LPS mm point (None = the centre of ``reference``).
        reference: grid whose planes to cut (default ``image`` itself).

    Returns:
        ``{view name: 2-D array}``, radiological convention, rows top -> bottom.
    """
    ref = image if reference is None else reference
    return {name: extract_view(image, plane, ref, interpolator, default_value)
            for name, plane in view_planes(ref, point).items()}


def focus_point(fixed: sitk.Image, fixed_labels: sitk.Image | None = None) -> np.ndarray:
    """LPS mm point the QC views pass through.

    The centroid of the non-zero voxels of ``fixed_labels`` when given and not empty; otherwise the centre of the
    body's bounding box (:func:`textscf.spatial.body_box_centre`, the point the model grid is centred on);
    otherwise the centre of ``fixed``.
    """
    stats = sitk.LabelShapeStatisticsImageFilter()
    if fixed_labels is not None:
        mask = sitk.Cast(sitk.NotEqual(fixed_labels, 0), sitk.sitkUInt8)
        stats.Execute(mask)
        if stats.HasLabel(1):
            return np.array(stats.GetCentroid(1))
    body = body_box_centre(fixed)
    if body is not None:
        return body
    return np.array(fixed.TransformContinuousIndexToPhysicalPoint(((np.array(fixed.GetSize()) - 1) / 2.0).tolist()))


# ------------------------------------------------------------------------------------------------ intensities
def _display_window(slices: Sequence[np.ndarray], modality: str) -> tuple[float, float]:
    values = np.concatenate([np.asarray(s, dtype=np.float32).ravel() for s in slices])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    if modality == "ct":
        lo, hi = float(values.min()), float(values.max())
        if lo < -300.0 or hi > 400.0:  # Hounsfield units: use the soft-tissue window
            return CT_DISPLAY_WINDOW
        # CT already rescaled (no HU): fall back to percentiles like MRI
    fg = values[values != 0]
    if fg.size < max(1, values.size // 100):
        fg = values
    lo, hi = (float(v) for v in np.percentile(fg, [1.0, 99.5]))
    if not hi > lo:
        lo, hi = float(fg.min()), float(fg.max())
        if not hi > lo:
            hi = lo + 1.0
    return lo, hi


def _normalise(arr: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    out = (np.asarray(arr, dtype=np.float32) - lo) / (hi - lo)
    return np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0)


def _checkerboard(a: np.ndarray, b: np.ndarray, plane: ViewPlane, tiles: int = 8) -> np.ndarray:
    """Alternate square (in mm) tiles of ``a`` and ``b``, about ``tiles`` along the longer side."""
    tile_mm = max(plane.n_rows * plane.row_spacing, plane.n_cols * plane.col_spacing) / tiles
    rows = (np.arange(plane.n_rows) * plane.row_spacing // tile_mm).astype(int)
    cols = (np.arange(plane.n_cols) * plane.col_spacing // tile_mm).astype(int)
    mask = (rows[:, None] + cols[None, :]) % 2 == 0
    return np.where(mask, a, b)


# ------------------------------------------------------------------------------------------------ statistics
def _number(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _stats_line(stats: Mapping[str, Any]) -> str:
    parts = []
    v = _number(stats.get("sdlogj"))
    if v is not None:
        parts.append(f"SDlogJ {v:.3f}")
    v = _number(stats.get("folding_percent"))
    if v is not None:
        parts.append(f"J\u22640: {v:.3g} %")
    after, before = _number(stats.get("mean_dice")), _number(stats.get("mean_dice_before"))
    if after is not None:
        parts.append(f"mean Dice {before:.3f} \u2192 {after:.3f}" if before is not None else f"mean Dice {after:.3f}")
    after, before = _number(stats.get("mean_hd95_mm")), _number(stats.get("mean_hd95_mm_before"))
    if after is not None:
        parts.append(f"HD95 {before:.1f} \u2192 {after:.1f} mm" if before is not None else f"HD95 {after:.1f} mm")
    v = _number(stats.get("seconds_total"))
    if v is not None:
        parts.append(f"time {v:.1f} s")
    if stats.get("device"):
        parts.append(f"device {stats['device']}")
    return "   \u00b7   ".join(parts)


# ------------------------------------------------------------------------------------------------ drawing
def _show_gray(ax: Any, img: np.ndarray, plane: ViewPlane, vmax: float = 1.0) -> None:
    ax.imshow(img, cmap="gray", vmin=0.0, vmax=vmax, aspect=plane.row_spacing / plane.col_spacing,
              interpolation="antialiased", origin="upper")


def _contour_lines(mask: np.ndarray) -> list[np.ndarray]:
    """Outlines (level 0.5) of a 2-D boolean mask as ``(N, 2)`` arrays of (column, row) display pixels."""
    import contourpy  # a matplotlib dependency; much lighter than Axes.contour's ContourSet

    if mask.shape[0] < 2 or mask.shape[1] < 2 or not mask.any():
        return []
    gen = contourpy.contour_generator(z=mask.astype(np.float32), line_type="Separate")
    return [line for line in gen.lines(0.5) if len(line) > 1]


def _label_outlines(labels: np.ndarray | None) -> tuple[list[np.ndarray], list[str]]:
    """Outlines of every non-zero label value of a 2-D label slice and one colour per outline."""
    segments: list[np.ndarray] = []
    colours: list[str] = []
    if labels is None:
        return segments, colours
    values = np.unique(labels)
    for value in values[values != 0]:
        lines = _contour_lines(labels == value)
        segments += lines
        colours += [_LABEL_COLOURS[int(value) % len(_LABEL_COLOURS)]] * len(lines)
    return segments, colours


def _draw_lines(ax: Any, segments: list[np.ndarray], colours: Any, linewidth: float) -> None:
    from matplotlib.collections import LineCollection

    if segments:
        ax.add_collection(LineCollection(segments, colors=colours, linewidths=linewidth))


def _draw_grid(ax: Any, disp_rc: np.ndarray | None, plane: ViewPlane, spacing_voxels: int = 8) -> float:
    """Lines of a regular grid moved to ``x + u(x)`` (display pixels), about ``spacing_voxels`` of the finer
    in-plane spacing apart and square in mm; returns the line spacing in mm."""
    from matplotlib.collections import LineCollection

    step_mm = spacing_voxels * min(plane.row_spacing, plane.col_spacing)
    step_r = max(2, int(round(step_mm / plane.row_spacing)))
    step_c = max(2, int(round(step_mm / plane.col_spacing)))
    n_r, n_c = plane.shape
    du_r = np.zeros(plane.shape) if disp_rc is None else disp_rc[..., 0]
    du_c = np.zeros(plane.shape) if disp_rc is None else disp_rc[..., 1]
    cols, rows = np.arange(n_c, dtype=float), np.arange(n_r, dtype=float)
    segments = []
    for r in range(step_r // 2, n_r, step_r):
        segments.append(np.stack([cols + du_c[r, :], r + du_r[r, :]], axis=1))
    for c in range(step_c // 2, n_c, step_c):
        segments.append(np.stack([c + du_c[:, c], rows + du_r[:, c]], axis=1))
    ax.add_collection(LineCollection(segments, colors=GRID_COLOUR, linewidths=0.6))
    ax.set_xlim(-0.5, n_c - 0.5)
    ax.set_ylim(n_r - 0.5, -0.5)
    return step_mm


def _edge_letters(ax: Any, name: str) -> None:
    left, right, top, bottom = _VIEW_EDGES[name]
    style = dict(color="#ffff66", fontsize=8, fontweight="bold", transform=ax.transAxes)
    ax.text(0.015, 0.5, left, ha="left", va="center", **style)
    ax.text(0.985, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.985, top, ha="center", va="top", **style)
    ax.text(0.5, 0.015, bottom, ha="center", va="bottom", **style)


def _in_plane_displacement(disp_lps: np.ndarray, reference: sitk.Image, plane: ViewPlane) -> np.ndarray:
    """``(R, C, 3)`` LPS mm vectors -> ``(R, C, 2)`` displacement in display pixels (rows down, columns right)."""
    m = np.asarray(reference.GetDirection(), float).reshape(3, 3) @ np.diag(reference.GetSpacing())
    u = np.asarray(disp_lps, dtype=np.float64) @ np.linalg.inv(m).T  # index units, (R, C, 3)
    sr, sc = plane.index_signs()
    return np.stack([sr * u[..., plane.row_axis], sc * u[..., plane.col_axis]], axis=-1)


def render_qc_figure(fixed: sitk.Image, moving: sitk.Image, result: RegistrationResult, path_or_file: PathOrFile,
                     fixed_labels: sitk.Image | None = None, title: str | None = None, modality: str = "ct",
                     dpi: int = 110) -> None:
    """Write the QC figure of a registration as a PNG.

    Rows: axial, coronal and sagittal views through the fixed image (through the centroid of ``fixed_labels``
    when given, else the centre of the body), radiological convention, right way up whatever the storage order.
    Columns: fixed; moving resampled onto the fixed grid (identity, no registration); warped moving;
    checkerboard fixed / moving (before); checkerboard fixed / warped (after); Jacobian determinant
    (``RdBu_r`` centred at 1 on [0, 2], folds ``J <= 0`` in lime, colour bar below); deformation grid (lines every
    ~8 voxels moved by the in-plane displacement, over the fixed image). ``fixed_labels`` contours are drawn on
    the fixed, moving and warped panels. The title carries ``result.stats`` (SDlogJ, % J <= 0, mean Dice
    before -> after, HD95, time, device) when present.

    Args:
        fixed, moving: the 3-D input images (any grids).
        result: the :class:`~textscf.results.RegistrationResult` (displacement, warped and Jacobian on the fixed
            grid; others are resampled plane by plane).
        path_or_file: PNG file path, or a binary file object opened for writing.
        fixed_labels: optional label map of the fixed image (any grid; nearest-neighbour).
        title: first title line (default "TextSCF registration QC").
        modality: "ct" (window -200..300 HU when the image is in HU) or "mri" (robust percentiles).
        dpi: resolution of the PNG.

    Raises:
        InputError: bad images or modality. OutputError: the PNG cannot be written.
    """
    modality = _checked_modality(modality)
    _check_inputs(fixed, moving, result)
    planes = view_planes(fixed, focus_point(fixed, fixed_labels))
    moving_outside = float(np.min(sitk.GetArrayViewFromImage(moving))) if moving.GetNumberOfPixels() else 0.0
    slices = {name: _view_slices(fixed, moving, result, fixed_labels, plane, moving_outside)
              for name, plane in planes.items()}
    fixed_window = _display_window([d["fixed"] for d in slices.values()], modality)
    moving_window = _display_window([d["moving"] for d in slices.values()], modality)

    fig, gs, fig_h = _figure_and_grid(list(planes.values()), dpi)
    jac_image, grid_step_mm = None, 8.0
    for row, (name, plane) in enumerate(planes.items()):
        jac_image, grid_step_mm = _draw_view_row(fig, gs, row, name, plane, slices[name], fixed_window,
                                                 moving_window)
    _draw_legend(fig, gs, jac_image, grid_step_mm, fixed_labels is not None,
                 modality == "ct" and fixed_window == CT_DISPLAY_WINDOW, fixed_window)
    stats_line = _stats_line(result.stats or {})
    head = title or "TextSCF registration QC"
    fig.suptitle(head + ("\n" + stats_line if stats_line else ""), fontsize=11, y=1 - 0.12 / fig_h, va="top")

    try:
        fig.savefig(path_or_file, format="png", dpi=dpi, facecolor="white")
    except OSError as exc:
        raise OutputError(f"cannot write the QC figure to {path_or_file!r}: {exc}. "
                          "Choose a writable location.") from exc


_COLUMN_TITLES = ("Fixed", "Moving (no registration)", "Warped moving", "Checkerboard before\nfixed | moving",
                  "Checkerboard after\nfixed | warped", "Jacobian determinant", "Deformation grid\n(in-plane)")


def _checked_modality(modality: str) -> str:
    modality = str(modality).lower()
    if modality == "mr":
        modality = "mri"
    if modality not in ("ct", "mri"):
        raise InputError(f"unknown modality {modality!r}; choose 'ct' or 'mri'.")
    return modality


def _check_inputs(fixed: sitk.Image, moving: sitk.Image, result: RegistrationResult) -> None:
    for name, img in (("fixed", fixed), ("moving", moving), ("warped", result.warped),
                      ("jacobian", result.jacobian), ("displacement", result.displacement)):
        if not isinstance(img, sitk.Image) or img.GetDimension() != 3:
            raise InputError(f"the QC figure needs a 3-D SimpleITK image for {name}.")
    if result.displacement.GetNumberOfComponentsPerPixel() != 3:
        raise InputError("the displacement must be a 3-component vector image (LPS mm).")


def _view_slices(fixed: sitk.Image, moving: sitk.Image, result: RegistrationResult, fixed_labels: sitk.Image | None,
                 plane: ViewPlane, moving_outside: float) -> dict[str, Any]:
    """The 2-D slices (display orientation) of every input through one view plane of the fixed grid
    (``moving_outside``: the moving and warped value outside the moving image)."""
    return {
        "fixed": extract_view(fixed, plane, fixed).astype(np.float32),
        "moving": extract_view(moving, plane, fixed, default_value=moving_outside).astype(np.float32),
        "warped": extract_view(result.warped, plane, fixed, default_value=moving_outside).astype(np.float32),
        "jac": extract_view(result.jacobian, plane, fixed, default_value=1.0).astype(np.float32),
        "disp": _in_plane_displacement(extract_view(result.displacement, plane, fixed), fixed, plane),
        "labels": (None if fixed_labels is None
                   else extract_view(fixed_labels, plane, fixed, interpolator="nearest")),
    }


def _figure_and_grid(planes: Sequence[ViewPlane], dpi: int):
    """The figure and its grid: one row per view, heights following each view's physical aspect, and a legend
    row; returns ``(figure, gridspec, figure height in inches)``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_cols = len(_COLUMN_TITLES)
    panel_w = 2.35
    ratios = []
    for plane in planes:
        r = (plane.n_rows * plane.row_spacing) / max(plane.n_cols * plane.col_spacing, 1e-9)
        ratios.append(float(np.clip(r, 0.25, 4.0)))
    left_in, right_in, top_in, legend_in, gap_in = 0.45, 0.1, 0.95, 0.75, 0.12
    fig_w = left_in + right_in + n_cols * panel_w + (n_cols - 1) * gap_in
    rows_h = [panel_w * r for r in ratios]
    fig_h = top_in + sum(rows_h) + 2 * gap_in + legend_in
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(4, n_cols, height_ratios=rows_h + [legend_in - gap_in],
                          left=left_in / fig_w, right=1 - right_in / fig_w,
                          top=1 - top_in / fig_h, bottom=0.05 / fig_h,
                          wspace=gap_in / panel_w, hspace=gap_in / ((sum(rows_h) + legend_in - gap_in) / 4))
    return fig, gs, fig_h


def _draw_view_row(fig, gs, row: int, name: str, plane: ViewPlane, d: Mapping[str, Any],
                   fixed_window: tuple[float, float], moving_window: tuple[float, float]):
    """One view's row of panels; returns ``(the Jacobian image, for the colour bar; the grid line spacing, mm)``."""
    f_n = _normalise(d["fixed"], fixed_window)
    m_n = _normalise(d["moving"], moving_window)
    w_n = _normalise(d["warped"], moving_window)
    axes = [fig.add_subplot(gs[row, c]) for c in range(len(_COLUMN_TITLES))]
    _show_gray(axes[0], f_n, plane)
    _show_gray(axes[1], m_n, plane)
    _show_gray(axes[2], w_n, plane)
    outlines, outline_colours = _label_outlines(d["labels"])
    for ax in axes[:3]:
        _draw_lines(ax, outlines, outline_colours, 0.8)
    _show_gray(axes[3], _checkerboard(f_n, m_n, plane), plane)
    _show_gray(axes[4], _checkerboard(f_n, w_n, plane), plane)
    jac_image = _draw_jacobian(axes[5], d["jac"], plane)
    _show_gray(axes[6], f_n, plane, vmax=1.6)  # dimmed so that the grid stands out
    grid_step_mm = _draw_grid(axes[6], d["disp"], plane)

    _edge_letters(axes[0], name)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_ylabel(f"{name.capitalize()}\n{_INDEX_NAMES[plane.slice_axis]} = {plane.slice_index}", fontsize=9)
    if row == 0:
        for ax, t in zip(axes, _COLUMN_TITLES):
            ax.set_title(t, fontsize=9)
    return jac_image, grid_step_mm


def _draw_jacobian(ax, jac: np.ndarray, plane: ViewPlane):
    """The Jacobian determinant (``RdBu_r`` centred at 1 on [0, 2]) with its folds in lime, outlined and counted."""
    import matplotlib
    from matplotlib.colors import TwoSlopeNorm

    jac_norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=2.0)
    jac_cmap = matplotlib.colormaps["RdBu_r"].with_extremes(under=FOLD_COLOUR, over="#4d0013")
    folds = ~(jac > 0)  # J <= 0, and NaN (a broken field) as well
    jac_show = np.where(folds, -1.0, jac)
    image = ax.imshow(jac_show, cmap=jac_cmap, norm=jac_norm, aspect=plane.row_spacing / plane.col_spacing,
                      interpolation="nearest", origin="upper")
    n_fold = int(np.count_nonzero(folds))
    # outline the folds too, so that single folded voxels stay visible after downsampling
    _draw_lines(ax, _contour_lines(folds), FOLD_COLOUR, 1.6)
    ax.text(0.02, 0.02, f"J\u22640: {n_fold} px" if n_fold else "no folds", transform=ax.transAxes,
            fontsize=7, ha="left", va="bottom", color="black",
            bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.75))
    return image


def _draw_legend(fig, gs, jac_image, grid_step_mm: float, contours: bool, ct_window: bool,
                 fixed_window: tuple[float, float]) -> None:
    """The legend row: the contours, the intensity window, the Jacobian colour bar and the grid spacing."""
    leg = [fig.add_subplot(gs[3, c]) for c in range(len(_COLUMN_TITLES))]
    for ax in leg:
        ax.set_axis_off()
    if contours:
        leg[0].text(0.0, 0.7, "contours: fixed label map", fontsize=8, transform=leg[0].transAxes, va="center")
    leg[3].text(0.0, 0.7, f"CT window {fixed_window[0]:g}..{fixed_window[1]:g} HU"
                if ct_window else "intensity: robust percentiles", fontsize=8, transform=leg[3].transAxes,
                va="center")
    cax = leg[5].inset_axes([0.06, 0.62, 0.88, 0.2])
    cbar = fig.colorbar(jac_image, cax=cax, orientation="horizontal", extend="both", extendfrac=0.09,
                        ticks=[0.0, 0.5, 1.0, 1.5, 2.0])
    cbar.ax.tick_params(labelsize=7, length=2, pad=1)
    cbar.set_label("det J  (lime \u25c0 = fold, J \u2264 0)", fontsize=8, labelpad=2)
    leg[6].text(0.0, 0.7, f"grid: x \u2192 x + u(x), lines every {grid_step_mm:.3g} mm", fontsize=8,
                transform=leg[6].transAxes, va="center", color="#b07800")

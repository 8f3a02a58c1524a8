"""Mask branch: per-voxel region indices J_f(x) and confidence p(x) for the fixed image.

Two sources:

- :class:`SwinUNETRSegmentor` runs MONAI's SwinUNETR (sliding window) and returns the argmax of the class
  probabilities as regions and their max as confidence.
- :class:`LabelMapSegmentor` maps the user's own label map (label values) onto region indices; confidence is 1.

Region index 0 is the background; indices ``1..N-1`` follow the prompt list. Arrays are in ITK index order
``[i, j, k]`` (see docs/ARCHITECTURE.md); SimpleITK images carry the physical grid.
"""
from __future__ import annotations

import inspect
import operator
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import SimpleITK as sitk

from textscf.spatial import grid_mismatch
from textscf.errors import CheckpointError, InputError
from textscf.files import verify_sha256
from textscf.text import validate_region_names

BACKGROUND = "background"
BTCV_BUNDLE_NAME = "swin_unetr_btcv_segmentation"


def btcv_bundle_region_names() -> list[str]:
    """The foreground classes of MONAI's BTCV SwinUNETR bundle, in channel order: BTCV labels 1..13, named as the
    ``abdomen-ct`` preset names them."""
    from textscf.presets import load_preset

    preset = load_preset("abdomen-ct")
    return [name for _, name in sorted(zip(preset.label_values, preset.region_names))]


_INTEGER_PIXEL_IDS = {
    sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16,
    sitk.sitkUInt32, sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64,
}
_FLOAT_PIXEL_IDS = {sitk.sitkFloat32, sitk.sitkFloat64}
# Above this span of label values a dense lookup table would waste memory; fall back to np.unique.
_MAX_LUT_SPAN = 1 << 22


@dataclass
class Segmentation:
    """Regions and confidence of one image, on that image's grid.

    Attributes:
        regions: sitkUInt16 image of region indices ``0..N-1`` (0 = background; not label values), same grid as the
            input image.
        confidence: sitkFloat32 image in ``[0, 1]`` (max class probability; 1 for a user label map), same grid.
        region_names: the ``N`` region names, ``region_names[0] == "background"``.
        probabilities: ``(N, I, J, K)`` float32 class probabilities in ITK index order, or None (not kept).
    """

    regions: sitk.Image
    confidence: sitk.Image
    region_names: list[str]
    probabilities: np.ndarray | None = None

    @property
    def num_regions(self) -> int:
        """N, the number of regions including the background."""
        return len(self.region_names)

    def regions_array(self) -> np.ndarray:
        """Region indices as an ``(I, J, K)`` int64 array (what the network takes)."""
        return sitk.GetArrayFromImage(self.regions).transpose(2, 1, 0).astype(np.int64)

    def confidence_array(self) -> np.ndarray:
        """Confidence as an ``(I, J, K)`` float32 array."""
        return np.ascontiguousarray(sitk.GetArrayFromImage(self.confidence).transpose(2, 1, 0), dtype=np.float32)


@runtime_checkable
class Segmentor(Protocol):
    """Anything that turns a fixed image into a :class:`Segmentation`."""

    @property
    def region_names(self) -> list[str]:
        """The N region names, index 0 = "background"."""
        ...

    def predict(self, image: sitk.Image) -> Segmentation:
        """Regions and confidence of ``image`` on its own grid."""
        ...


# --------------------------------------------------------------------------------------------------------------
# shared checks


def _check_prompt_names(region_names: Sequence[str]) -> list[str]:
    """Validate the prompt names (regions 1..N-1) and return the full list with "background" first."""
    return [BACKGROUND, *validate_region_names(region_names)]


def _check_image(image: object, what: str) -> sitk.Image:
    if not isinstance(image, sitk.Image):
        raise InputError(
            f"{what} must be a SimpleITK image, got {type(image).__name__}. Fix: read it with SimpleITK.ReadImage."
        )
    if image.GetDimension() != 3:
        raise InputError(f"{what} is {image.GetDimension()}-D; a 3-D volume is required. Fix: pass a 3-D image.")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{what} has {image.GetNumberOfComponentsPerPixel()} components per voxel; a scalar volume is required. "
            "Fix: extract one channel (e.g. SimpleITK.VectorIndexSelectionCast)."
        )
    return image


# --------------------------------------------------------------------------------------------------------------
# label maps


class LabelMapSegmentor:
    """Regions from the user's own label map; confidence is 1 everywhere.

    Args:
        label_map: integer-valued 3-D label map (any integer pixel type, or float holding whole numbers).
        label_values: ``label_values[i]`` is the label value of ``region_names[i]`` (region index ``i + 1``).
        region_names: the foreground region names / prompts (the background is implicit, index 0).
        unmapped: what to do with label values present in the map but not in ``label_values`` (0 is always the
            background): ``"error"`` raises InputError, ``"background"`` maps them to region 0.
    """

    def __init__(
        self,
        label_map: sitk.Image,
        label_values: Sequence[int],
        region_names: Sequence[str],
        unmapped: str = "error",
    ) -> None:
        self._region_names = _check_prompt_names(region_names)
        if unmapped not in ("error", "background"):
            raise InputError(f"unmapped={unmapped!r} is not supported. Fix: use 'error' or 'background'.")
        values = self._check_label_values(label_values, len(self._region_names) - 1)
        label_map = _check_image(label_map, "the label map")
        array = self._integer_array(label_map)  # [k, j, i] int64

        regions_of = {value: region for region, value in enumerate(values, start=1)}
        regions, present, counts = lookup_regions(array, regions_of, np.uint16)
        voxel_ml = float(np.prod(label_map.GetSpacing())) / 1000.0
        check_label_scheme(dict(zip(present.tolist(), (counts * voxel_ml).tolist())), values,
                           self._region_names[1:])
        unknown = sorted(set(present.tolist()) - set(values) - {0})  # 0 is always background
        if unknown and unmapped == "error":
            shown = ", ".join(str(v) for v in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            raise InputError(
                f"the label map contains {len(unknown)} label value(s) with no region/prompt: {shown}. "
                "Fix: add region names (prompts) and label values for them, or treat them as background "
                "(--unmapped-labels background on the command line; unmapped='background' in Python)."
            )
        present_set = set(present.tolist())
        absent = [(v, n) for v, n in zip(values, self._region_names[1:]) if v not in present_set]
        if absent:
            warnings.warn(
                "these regions have no voxels in the label map: "
                + ", ".join(f"{n!r} (label {v})" for v, n in absent)
                + ". They will not guide the registration.",
                UserWarning,
                stacklevel=2,
            )
        self._labels = sitk.GetImageFromArray(regions)
        self._labels.CopyInformation(label_map)
        self.label_values = values

    @property
    def region_names(self) -> list[str]:
        """The N region names, index 0 = "background"."""
        return list(self._region_names)

    @staticmethod
    def _check_label_values(label_values: Sequence[int], n_names: int) -> list[int]:
        try:
            values = [operator.index(v) for v in label_values]
        except TypeError as exc:
            raise InputError(
                f"label_values must be integers, got {list(label_values)!r}. Fix: pass the integer label values."
            ) from exc
        if len(values) != n_names:
            raise InputError(
                f"label_values has {len(values)} entries but region_names has {n_names}. "
                "Fix: give exactly one label value per region name, in the same order."
            )
        if 0 in values:
            raise InputError(
                "label value 0 is listed for a region, but 0 is the background of every label map. "
                "Fix: remove it from label_values (and its name from region_names)."
            )
        seen: set[int] = set()
        duplicates = sorted({v for v in values if v in seen or seen.add(v)})
        if duplicates:
            raise InputError(f"label_values has duplicates: {duplicates}. Fix: give each label value once.")
        return values

    @staticmethod
    def _integer_array(label_map: sitk.Image) -> np.ndarray:
        pixel_id = label_map.GetPixelID()
        if pixel_id in _INTEGER_PIXEL_IDS:
            return sitk.GetArrayFromImage(label_map).astype(np.int64, copy=False)
        if pixel_id in _FLOAT_PIXEL_IDS:
            array = sitk.GetArrayFromImage(label_map)
            bad = ~np.isfinite(array) | (array != np.round(array))
            if bad.any():
                examples = np.unique(array[bad])[:5].tolist()
                raise InputError(
                    f"the label map is not integer-valued ({int(bad.sum())} voxels hold values such as {examples}); "
                    "it looks like an intensity image or a label map resampled with linear interpolation. "
                    "Fix: pass the label map itself, resampled with nearest-neighbour interpolation."
                )
            return array.astype(np.int64)
        raise InputError(
            f"the label map has pixel type {label_map.GetPixelIDTypeAsString()}, which is not an integer type. "
            "Fix: pass a scalar integer label map (e.g. cast it with SimpleITK.Cast(label_map, sitk.sitkUInt16))."
        )

    def predict(self, image: sitk.Image) -> Segmentation:
        """Regions of the label map (on ``image``'s grid) with confidence 1.

        Raises InputError when the label map is not on ``image``'s grid.
        """
        image = _check_image(image, "the image")
        problems = grid_mismatch(image, self._labels)
        if problems:
            raise InputError(
                "the label map is not on the image grid: label map vs image differ in " + "; ".join(problems) + ". "
                "Fix: resample the label map onto the image grid with nearest-neighbour interpolation "
                "(e.g. SimpleITK.Resample(label_map, image, SimpleITK.Transform(), SimpleITK.sitkNearestNeighbor))."
            )
        labels = sitk.Image(self._labels)
        labels.CopyInformation(image)  # exact grid of the image, not just within tolerance
        confidence = sitk.Image(image.GetSize(), sitk.sitkFloat32) + 1.0
        confidence.CopyInformation(image)
        return Segmentation(regions=labels, confidence=confidence, region_names=self.region_names, probabilities=None)


def lookup_regions(array: np.ndarray, regions_of: Mapping[int, int],
                   dtype=np.int64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Region index of every voxel of a label map, by a lookup table (the one label value -> region lookup).

    Args:
        array: int64 label values, any shape.
        regions_of: {label value: region index}; values not in it (0 among them) map to region 0.
        dtype: the regions' dtype.
    Returns:
        (regions: ``dtype`` array of ``array``'s shape, present: sorted label values occurring in ``array``,
        counts: the number of voxels of each present value).
    """
    if array.size == 0:
        return np.zeros(array.shape, dtype), np.zeros(0, np.int64), np.zeros(0, np.int64)
    low, high = int(array.min()), int(array.max())
    if high - low < _MAX_LUT_SPAN:
        shifted = array - low
        histogram = np.bincount(shifted.ravel(), minlength=high - low + 1)
        present = np.flatnonzero(histogram)
        lut = np.zeros(high - low + 1, dtype)
        for value, region in regions_of.items():
            if low <= value <= high:
                lut[value - low] = region
        return lut[shifted], present + low, histogram[present]
    present, inverse, counts = np.unique(array, return_inverse=True, return_counts=True)
    lut = np.array([regions_of.get(int(v), 0) for v in present], dtype)
    return lut[inverse.reshape(array.shape)], present, counts


# Unknown label values needed before another labelling scheme is taken as evidence that the map follows it.
_MIN_UNKNOWN_FOR_SCHEME = 3


def label_volumes_ml(label_map: sitk.Image) -> dict[int, float]:
    """{label value: volume in mL} of the non-zero values of an integer label map."""
    array = sitk.GetArrayViewFromImage(label_map)
    values, counts = np.unique(array, return_counts=True)
    voxel_ml = float(np.prod(label_map.GetSpacing())) / 1000.0
    return {int(v): float(c) * voxel_ml for v, c in zip(values, counts) if v != 0}


def label_scheme_check(volumes_ml: Mapping[int, float], label_values: Sequence[int],
                       region_names: Sequence[str]) -> tuple[list[str], list]:
    """Whether a label map's values mean the regions they are read as: ``(problems, schemes that fit instead)``.

    Two independent checks, both from the presets' data (:mod:`textscf.presets`):

    - anatomy: a region covering more than the largest plausible volume of that organ (``max_volume_ml``: a
      "esophagus" of 1.5 L is a liver) cannot be that region;
    - labelling scheme: when at least three present values have no region and a bundled preset's label table
      (e.g. TotalSegmentator's) explains every present value while giving the regions' values other meanings,
      the map follows that scheme, not the one it is read with. A scheme that agrees with the given regions
      (same meaning for every value, aliases resolved) accepts the map.

    Args:
        volumes_ml: {label value present in the map: its volume in mL} (0 is ignored).
        label_values, region_names: the regions the map is read as (``label_values[i]`` is ``region_names[i]``).
    Returns:
        The problems (empty when the map fits) and the bundled presets (labelling schemes) under which the map is
        plausible instead, best first (a map following one of them can be remapped by region name).
    """
    from textscf import presets

    present = {int(v): float(ml) for v, ml in volumes_ml.items() if int(v) != 0}
    given = dict(zip((int(v) for v in label_values), region_names))
    problems = []
    for value, name in given.items():
        limit = presets.max_volume_ml(name)
        if limit is not None and present.get(value, 0.0) > limit:
            problems.append(f"label {value} read as {name!r} covers {present[value]:.0f} mL, more than any "
                            f"{name} ({limit:.0f} mL at most)")
    unknown = sorted(set(present) - set(given))

    def agrees(scheme) -> bool:
        meanings = {v: n for v, n in zip(scheme.label_values, scheme.region_names)}
        meanings.update({v: n for v, n in scheme.label_names.items() if v not in meanings})
        return all(value in meanings and presets.same_region(name, meanings[value]) for value, name in given.items())

    def plausible(scheme) -> bool:
        for value, ml in present.items():
            if value in scheme.label_values:
                limit = presets.max_volume_ml(scheme.region_names[scheme.label_values.index(value)])
                if limit is not None and ml > limit:
                    return False
        return True

    explaining = presets.schemes_explaining(present)
    wrong_scheme = (len(unknown) >= _MIN_UNKNOWN_FOR_SCHEME and bool(explaining)
                    and not any(agrees(scheme) for scheme in explaining))
    if not problems and not wrong_scheme:
        return [], []
    candidates = [scheme for scheme in explaining if plausible(scheme) and not agrees(scheme)]
    if wrong_scheme:
        shown = ", ".join(candidates[0].describe_label(v) if candidates else str(v) for v in unknown[:8])
        problems.append(f"{len(unknown)} label values have no region ({shown}"
                        + (" ..." if len(unknown) > 8 else "") + ")")
    return problems, candidates


def check_label_scheme(volumes_ml: Mapping[int, float], label_values: Sequence[int],
                       region_names: Sequence[str]) -> None:
    """Refuse a label map whose values do not mean the regions they are read as (:func:`label_scheme_check`);
    silent when they fit.

    Raises:
        InputError naming the implausible regions or the scheme the values follow, and the fix.
    """
    problems, candidates = label_scheme_check(volumes_ml, label_values, region_names)
    if not problems:
        return
    if candidates:
        best = candidates[0]
        examples = ", ".join(best.describe_label(v) for v in sorted({int(v) for v in label_values})
                             if volumes_ml.get(v))
        fix = (f"its values fit the {best.name!r} preset ({best.title}), where they mean {examples}. "
               f"Fix: register with that preset (--preset {best.name}; in 3D Slicer choose it in the Regions "
               "section), which maps the regions by name.")
    else:
        fix = ("Fix: give the label value each region has in this map (--prompts with --label-values, or the "
               "region table in 3D Slicer), or a preset made for the tool that wrote the map.")
    raise InputError("the label map's values do not mean the regions they would be read as: "
                     + "; ".join(problems) + ". The map was probably made with another labelling scheme: " + fix)


# --------------------------------------------------------------------------------------------------------------
# SwinUNETR


def download_btcv_bundle(destination: str | os.PathLike, sha256: str | None = None) -> Path:
    """Download MONAI's public "swin_unetr_btcv_segmentation" bundle (needs internet).

    Args:
        destination: folder that receives the bundle folder.
        sha256: expected hex SHA-256 of ``models/model.pt``; when given, a mismatch removes the file and raises
            CheckpointError.
    Returns:
        The bundle directory (pass it to :class:`SwinUNETRSegmentor` as ``weights``), whose network has
        ``feature_size=48`` and 14 classes (background + the 13 BTCV organs).
    """
    from monai.bundle import download

    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    try:
        download(name=BTCV_BUNDLE_NAME, bundle_dir=str(destination), progress=False)
    except Exception as exc:  # network, hosting and archive errors all mean the same thing to the user
        raise CheckpointError(
            f"could not download the MONAI bundle {BTCV_BUNDLE_NAME!r} into {destination}: {exc}. "
            "Fix: check the internet connection, or download the bundle elsewhere and pass its folder as weights."
        ) from exc
    bundle = destination / BTCV_BUNDLE_NAME
    model = bundle / "models" / "model.pt"
    if not model.is_file():
        raise CheckpointError(
            f"the downloaded bundle has no {model}. Fix: remove {bundle} and download again."
        )
    if sha256:
        verify_sha256(model, sha256)
    return bundle


def _read_state_dict(weights: str | os.PathLike) -> dict:
    """Load a SwinUNETR state dict from a .pt/.pth file or a MONAI bundle directory."""
    import torch

    path = Path(weights)
    if path.is_dir():
        bundle_model = path / "models" / "model.pt"
        if not bundle_model.is_file():
            raise CheckpointError(
                f"{path} is a directory but has no models/model.pt, so it is not a MONAI bundle. "
                "Fix: pass the bundle folder (containing models/model.pt) or the .pt/.pth file itself."
            )
        path = bundle_model
    elif not path.is_file():
        raise CheckpointError(
            f"segmentation weights not found: {path}. Fix: pass an existing .pt/.pth state dict or a MONAI bundle "
            "folder (download_btcv_bundle fetches MONAI's BTCV SwinUNETR)."
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read {path} as a PyTorch state dict: {exc}. It may be truncated, a TorchScript archive or "
            "contain arbitrary Python objects. Fix: download it again, or save model.state_dict() with torch.save."
        ) from exc
    if isinstance(loaded, Mapping):
        for key in ("state_dict", "model", "net"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(
            f"{path} does not hold a state dict (a mapping of parameter names to tensors, optionally under "
            "'state_dict', 'model' or 'net'). Fix: save model.state_dict() with torch.save."
        )
    from textscf.checkpoint import strip_module_prefix

    return strip_module_prefix(loaded)


class SwinUNETRSegmentor:
    """Regions and confidence from MONAI's SwinUNETR with sliding-window inference.

    Preprocessing follows MONAI's BTCV SwinUNETR: the image is resampled (linear) onto an axis-aligned grid of
    ``target_spacing`` in ``orientation`` covering the image, clipped to ``intensity_window`` and scaled to [0, 1].
    Class probabilities are resampled (linear) back onto the input grid and renormalised.

    Args:
        weights: a .pt/.pth state dict (raw, or under "state_dict"/"model"/"net"; a "module." prefix is stripped)
            or a MONAI bundle folder with models/model.pt.
        region_names: the foreground region names (the network's output channels 1..N-1; channel 0 is the
            background), so ``out_channels = len(region_names) + 1``.
        feature_size: 12 / 24 / 48 = tiny / small / base SwinUNETR.
        roi_size: sliding-window patch size (voxels of the resampled grid), each a multiple of 32 and >= 64.
        target_spacing: spacing (mm, i j k) of the grid the network sees.
        intensity_window: (low, high) intensities mapped to 0 and 1 (clipped); CT HU for the BTCV weights.
        overlap: sliding-window overlap fraction in [0, 1).
        sw_batch_size: patches per forward pass.
        device: torch device of the network ("cpu", "cuda", "cuda:1", ...).
        orientation: "RAS" (MONAI's BTCV convention: array axes run towards Right, Anterior, Superior) or None to
            keep the image's own direction.
        keep_probabilities: keep the (N, I, J, K) probabilities in the result (costs N float32 volumes).
    """

    def __init__(
        self,
        weights: str | os.PathLike,
        region_names: Sequence[str],
        feature_size: int = 48,
        roi_size: Sequence[int] = (96, 96, 96),
        target_spacing: Sequence[float] = (1.5, 1.5, 2.0),
        intensity_window: tuple[float, float] = (-175.0, 250.0),
        overlap: float = 0.5,
        sw_batch_size: int = 1,
        device: str = "cpu",
        orientation: str | None = "RAS",
        keep_probabilities: bool = False,
    ) -> None:
        import torch
        from monai.networks.nets import SwinUNETR

        self._region_names = _check_prompt_names(region_names)
        self.roi_size = self._check_roi(roi_size)
        self.target_spacing = tuple(float(s) for s in target_spacing)
        if len(self.target_spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in self.target_spacing):
            raise InputError(f"target_spacing must be 3 positive numbers (mm), got {target_spacing!r}.")
        low, high = (float(v) for v in intensity_window)
        if not high > low:
            raise InputError(f"intensity_window must be (low, high) with high > low, got {intensity_window!r}.")
        self.intensity_window = (low, high)
        if not 0.0 <= overlap < 1.0:
            raise InputError(f"overlap must be in [0, 1), got {overlap}. Fix: use e.g. 0.5.")
        self.overlap = float(overlap)
        if int(sw_batch_size) < 1:
            raise InputError(f"sw_batch_size must be >= 1, got {sw_batch_size}.")
        self.sw_batch_size = int(sw_batch_size)
        if orientation not in ("RAS", None):
            raise InputError(f"orientation={orientation!r} is not supported. Fix: use 'RAS' or None.")
        self.orientation = orientation
        self.keep_probabilities = bool(keep_probabilities)
        if int(feature_size) <= 0 or int(feature_size) % 12:
            raise InputError(
                f"feature_size must be a positive multiple of 12 (12/24/48 = tiny/small/base), got {feature_size}."
            )
        self.feature_size = int(feature_size)
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise InputError(f"unknown device {device!r}: {exc}. Fix: use 'cpu' or 'cuda'.") from exc
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device {device!r} requested but CUDA is not available. Fix: use device='cpu'.")

        kwargs = dict(in_channels=1, out_channels=len(self._region_names), feature_size=self.feature_size,
                      spatial_dims=3)
        if "img_size" in inspect.signature(SwinUNETR).parameters:  # required before MONAI 1.5, removed after
            kwargs["img_size"] = self.roi_size
        net = SwinUNETR(**kwargs)
        self._load_weights(net, _read_state_dict(weights), weights)
        self.network = net.eval().to(self.device)

    @property
    def region_names(self) -> list[str]:
        """The N region names, index 0 = "background" (N = the network's output channels)."""
        return list(self._region_names)

    @staticmethod
    def _check_roi(roi_size: Sequence[int]) -> tuple[int, int, int]:
        roi = tuple(int(r) for r in roi_size)
        # Five 2x downsamplings, and the bottleneck's instance norm needs more than one voxel.
        if len(roi) != 3 or any(r < 64 or r % 32 for r in roi):
            raise InputError(
                "roi_size must be 3 multiples of 32, each at least 64 (SwinUNETR downsamples 5 times), "
                f"got {roi_size!r}. Fix: use e.g. (96, 96, 96)."
            )
        return roi

    def _load_weights(self, net, state: dict, source) -> None:
        from textscf.checkpoint import load_matching_state

        expected = net.state_dict()
        hints = []
        patch, out = "swinViT.patch_embed.proj.weight", "out.conv.conv.weight"
        if patch in state and state[patch].shape[0] != expected[patch].shape[0]:
            hints.append(f"the checkpoint has feature_size={state[patch].shape[0]}, not {self.feature_size}")
        if out in state and state[out].shape[0] != expected[out].shape[0]:
            hints.append(
                f"the checkpoint has {state[out].shape[0]} output classes but {len(self._region_names)} were requested "
                f"(background + {len(self._region_names) - 1} region names)"
            )
        problems = load_matching_state(net, state)
        if problems:
            cause = "; ".join(hints) if hints else (
                "it was probably saved from a different network or a different SwinUNETR configuration"
            )
            raise CheckpointError(
                f"the SwinUNETR weights in {source} do not fit the requested network: parameters "
                + "; ".join(problems) + f". Likely cause: {cause}. "
                "Fix: pass the feature_size and the region names (one per non-background class) the weights were "
                "trained with."
            )

    def _network_grid(self, image: sitk.Image) -> sitk.Image:
        """An empty image defining the axis-aligned grid of ``target_spacing`` that covers ``image``."""
        if self.orientation == "RAS":
            direction = np.diag([-1.0, -1.0, 1.0])  # RAS axes expressed in ITK's LPS
        else:
            direction = np.array(image.GetDirection()).reshape(3, 3)
        size = np.array(image.GetSize(), float)
        src = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
        # The 8 outer corners (voxel edges, not centres) in the target frame.
        edges = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in size], indexing="ij")).reshape(3, -1)
        corners = direction.T @ (np.array(image.GetOrigin())[:, None] + src @ edges)
        low, high = corners.min(axis=1), corners.max(axis=1)
        spacing = np.array(self.target_spacing)
        n = np.maximum(1, np.ceil((high - low) / spacing - 1e-6)).astype(int)
        grid = sitk.Image([int(v) for v in n], sitk.sitkUInt8)
        grid.SetSpacing(tuple(spacing))
        grid.SetDirection(tuple(direction.ravel()))
        grid.SetOrigin(tuple(direction @ (low + spacing / 2)))
        return grid

    def predict(self, image: sitk.Image) -> Segmentation:
        """Segment ``image`` (a CT in HU for the BTCV weights).

        Returns regions (argmax) and confidence (max probability) on ``image``'s grid; probabilities
        ``(N, I, J, K)`` float32 when ``keep_probabilities``.
        """
        import torch
        from monai.inferers import sliding_window_inference
        from monai.transforms import ScaleIntensityRange

        image = _check_image(image, "the image")
        if image.GetPixelID() not in _INTEGER_PIXEL_IDS | _FLOAT_PIXEL_IDS:
            raise InputError(
                f"the image has pixel type {image.GetPixelIDTypeAsString()}; a real-valued scalar image is required."
            )
        low, high = self.intensity_window
        grid = self._network_grid(image)
        # Outside the image counts as the bottom of the window (air for CT).
        resampled = sitk.Resample(
            sitk.Cast(image, sitk.sitkFloat32), grid, sitk.Transform(), sitk.sitkLinear, low, sitk.sitkFloat32
        )
        volume = sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)  # [i, j, k]
        del resampled
        scale = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32)
        scaled = scale(torch.from_numpy(np.ascontiguousarray(volume)))
        del volume
        # MONAI returns a MetaTensor; the network only needs the plain tensor.
        inputs = (scaled.as_tensor() if hasattr(scaled, "as_tensor") else scaled).float()[None, None]
        del scaled
        with torch.no_grad():
            # sliding_window_inference pads inputs smaller than roi_size and crops the output back.
            logits = sliding_window_inference(
                inputs,
                roi_size=self.roi_size,
                sw_batch_size=self.sw_batch_size,
                predictor=self.network,
                overlap=self.overlap,
                sw_device=self.device,
                device=torch.device("cpu"),  # aggregate on the host: the GPU only holds a few patches
            )
            probs = torch.softmax(logits.float(), dim=1)[0].numpy()  # (N, I', J', K')
        del logits, inputs
        return self._back_to_image_grid(probs, grid, image)

    def _back_to_image_grid(self, probs: np.ndarray, grid: sitk.Image, image: sitk.Image) -> Segmentation:
        """Resample ``probs`` (N, I', J', K') from ``grid`` onto ``image``; renormalise; argmax and max."""
        n = probs.shape[0]
        size_kji = image.GetSize()[::-1]
        kept = np.empty((n, *size_kji), np.float32) if self.keep_probabilities else None
        total = np.zeros(size_kji, np.float32)
        best = np.full(size_kji, -1.0, np.float32)
        labels = np.zeros(size_kji, np.uint16)
        for c in range(n):
            channel = sitk.GetImageFromArray(np.ascontiguousarray(probs[c].transpose(2, 1, 0)))
            channel.CopyInformation(grid)
            # Outside the network grid (never inside the image, by construction) is certain background.
            on_image = sitk.GetArrayFromImage(
                sitk.Resample(channel, image, sitk.Transform(), sitk.sitkLinear, 1.0 if c == 0 else 0.0,
                              sitk.sitkFloat32)
            )
            np.maximum(on_image, 0.0, out=on_image)
            total += on_image
            # Renormalisation divides every class by the same total, so argmax and max can be taken before it.
            better = on_image > best
            labels[better] = c
            np.maximum(best, on_image, out=best)
            if kept is not None:
                kept[c] = on_image
        total = np.maximum(total, np.finfo(np.float32).tiny)
        confidence = np.clip(best / total, 0.0, 1.0)
        labels_img = sitk.GetImageFromArray(labels)
        labels_img.CopyInformation(image)
        confidence_img = sitk.GetImageFromArray(confidence)
        confidence_img.CopyInformation(image)
        probabilities = None
        if kept is not None:
            kept /= total[None]
            probabilities = kept.transpose(0, 3, 2, 1)  # (N, I, J, K) view: no second copy
        return Segmentation(
            regions=labels_img, confidence=confidence_img, region_names=self.region_names, probabilities=probabilities
        )

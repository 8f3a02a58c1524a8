"""Loaders for the registration data and a torch dataset of (moving, fixed) training pairs.

Arrays are in ITK index order ``(I, J, K)`` (SimpleITK arrays are transposed on reading); images are float32,
label maps int16 with their raw label values; :func:`label_values_to_regions` turns raw values into the region
indices the network uses (0 = background, ``r`` = the r-th prompt).

Real public data (``../shared/data``, see its README) is read by :func:`brain_subjects`, :func:`oasis_pair` and
:func:`load_btcv_labels`; a user's own data by :func:`load_learn2reg_dataset` and :func:`load_folder_pairs`.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from textscf.errors import InputError
from textscf.spatial import IntensityNormaliser
from textscf.phantom import (
    PHANTOM_DIRECTION,
    affine_in_index_space,
    random_affine,
    random_smooth_displacement,
    synthesize_ct_from_labels,
)
from textscf.presets import totalsegmentator_to_btcv
from textscf.segmentation import lookup_regions

BTCV_SPLIT: dict[str, list[str]] = {
    "train": [f"{i:04d}" for i in (*range(1, 11), *range(21, 31))],
    "val": [f"{i:04d}" for i in range(31, 34)],
    "test": [f"{i:04d}" for i in range(34, 41)],
}
"""The abdomen split of the textSCF paper (20 / 3 / 7 BTCV subjects), as in ``../shared/data/README.md``."""

BTCV_ANATOMICAL_DIRECTION = PHANTOM_DIRECTION
"""The LPS direction matching the BTCV arrays' anatomy (i right -> left, j posterior -> anterior, k inferior ->
superior); their files' headers claim RAS instead, which mirrors left and right."""

_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass
class Subject:
    """One subject: an image and/or a label map on one grid, with the geometry to rebuild SimpleITK images.

    ``image``: ``(I, J, K)`` float32 or None; ``labels``: ``(I, J, K)`` int16 raw label values or None;
    ``spacing`` (mm), ``origin`` (LPS mm) and ``direction`` (9 numbers, row-major) as in ITK.
    """

    name: str
    image: np.ndarray | None
    labels: np.ndarray | None
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = field(default=_IDENTITY)

    def __post_init__(self):
        if self.image is None and self.labels is None:
            raise InputError(f"subject {self.name!r} has neither an image nor a label map; give at least one")
        for what, array in (("image", self.image), ("labels", self.labels)):
            if array is not None and np.ndim(array) != 3:
                raise InputError(f"subject {self.name!r}: {what} has shape {np.shape(array)}; expected (I, J, K)")
        if self.image is not None and self.labels is not None and self.image.shape != self.labels.shape:
            raise InputError(
                f"subject {self.name!r}: image shape {self.image.shape} differs from label shape "
                f"{self.labels.shape}; resample the label map onto the image grid"
            )
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = tuple(float(d) for d in np.asarray(self.direction).ravel())

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(I, J, K)``."""
        return tuple((self.image if self.image is not None else self.labels).shape)

    @property
    def affine(self) -> np.ndarray:
        """``(4, 4)`` index -> LPS mm matrix: ``origin + D diag(spacing) idx``."""
        out = np.eye(4)
        out[:3, :3] = np.asarray(self.direction).reshape(3, 3) @ np.diag(self.spacing)
        out[:3, 3] = self.origin
        return out

    def _to_sitk(self, array: np.ndarray) -> sitk.Image:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def image_sitk(self) -> sitk.Image | None:
        """The image as a SimpleITK image (float32), or None."""
        return None if self.image is None else self._to_sitk(self.image)

    def labels_sitk(self) -> sitk.Image | None:
        """The label map as a SimpleITK image (int16), or None."""
        return None if self.labels is None else self._to_sitk(self.labels)

    @classmethod
    def from_sitk(cls, name: str, image: sitk.Image | None, labels: sitk.Image | None) -> "Subject":
        """A subject from SimpleITK images; the geometry is the image's (else the label map's)."""
        ref = image if image is not None else labels
        if ref is None:
            raise InputError(f"subject {name!r} has neither an image nor a label map; give at least one")
        return cls(
            name=name,
            image=None if image is None else sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32),
            labels=None if labels is None else _as_labels(sitk.GetArrayFromImage(labels).transpose(2, 1, 0), name),
            spacing=ref.GetSpacing(),
            origin=ref.GetOrigin(),
            direction=ref.GetDirection(),
        )


def _as_labels(array: np.ndarray, where: str) -> np.ndarray:
    """An integer label array as int16; float arrays must hold whole numbers."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.mod(array, 1) == 0):
            raise InputError(f"{where}: the label map holds non-integer values; pass a label map, not an image")
    if array.size and (array.min() < np.iinfo(np.int16).min or array.max() > np.iinfo(np.int16).max):
        raise InputError(f"{where}: label values exceed the int16 range; renumber the labels")
    return np.ascontiguousarray(array.astype(np.int16))


def _read(path: Path, what: str) -> sitk.Image:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}; check the path")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"cannot read {what} {path}: {str(exc).strip().splitlines()[-1]}") from None


def _load_subject(name: str, image_path: Path | None, label_path: Path | None) -> Subject:
    """A subject from image and label files; the label map must share the image's voxel grid shape."""
    image = None if image_path is None else _read(image_path, "image")
    labels = None if label_path is None else _read(label_path, "label map")
    if image is not None and image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"image {image_path} has {image.GetNumberOfComponentsPerPixel()} components; pass a scalar")
    if image is not None and labels is not None and image.GetSize() != labels.GetSize():
        raise InputError(
            f"label map {label_path} has size {labels.GetSize()} but image {image_path} has {image.GetSize()}; "
            "resample the label map onto the image grid"
        )
    return Subject.from_sitk(name, image, labels)


# ------------------------------------------------------------------------------------------------------------------
# the shared real data


def load_brain_npz(path, key: str | None = None) -> np.ndarray:
    """The array stored under ``key`` in a brain ``.npz`` file, ``(I, J, K)`` as stored.

    ``key=None`` takes the only array, else ``vol`` or ``vol_data`` (the files of ``brain/`` hold ``vol`` and
    ``seg``, or ``vol_data``).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"brain volume not found: {path}; check the path")
    with np.load(path) as data:
        keys = list(data.keys())
        if key is None:
            key = keys[0] if len(keys) == 1 else next((k for k in ("vol", "vol_data") if k in keys), None)
        if key not in keys:
            raise InputError(f"{path} has no array {key!r} (it has {keys}); pass key= one of those")
        array = data[key]
    if array.ndim != 3:
        raise InputError(f"{path}[{key!r}] has shape {array.shape}; expected a 3-D volume")
    return array


def brain_subjects(shared_data) -> list[Subject]:
    """The two brain MRI subjects of ``brain/`` (160 x 192 x 224, 1 mm, identity direction, origin 0).

    ``vxm`` (``subject_vxm.npz``) and ``l2r`` (``subject_l2r_{vol,seg}.npz``); images in [0, 1], FreeSurfer labels.
    """
    brain = Path(shared_data) / "brain"
    pairs = (
        ("vxm", (brain / "subject_vxm.npz", "vol"), (brain / "subject_vxm.npz", "seg")),
        ("l2r", (brain / "subject_l2r_vol.npz", "vol_data"), (brain / "subject_l2r_seg.npz", "vol_data")),
    )
    return [
        Subject(
            name=name,
            image=load_brain_npz(*vol).astype(np.float32),
            labels=_as_labels(load_brain_npz(*seg), name),
        )
        for name, vol, seg in pairs
    ]


def brain_eval_labels(shared_data) -> list[int]:
    """The 30 FreeSurfer labels conventionally used for brain evaluation (``brain/eval_labels30.npz``)."""
    path = Path(shared_data) / "brain" / "eval_labels30.npz"
    if not path.is_file():
        raise InputError(f"evaluation label list not found: {path}; check the shared data folder")
    with np.load(path) as data:
        if "labels" not in data:
            raise InputError(f"{path} has no array 'labels'")
        return [int(v) for v in np.asarray(data["labels"]).ravel()]


def oasis_pair(shared_data) -> tuple[Subject, Subject]:
    """The two OASIS subjects of ``brain/oasis_pair`` (160 x 192 x 144, 1 mm; labels 1, 2 = tissue classes).

    The label files' headers disagree slightly with their images' (spacing 0.98 mm, shifted origin) although they
    share the voxel grid; the image geometry is used for both.
    """
    folder = Path(shared_data) / "brain" / "oasis_pair"
    out = []
    for name in ("A", "B"):
        image = _read(folder / f"image_{name}_160x192x144.nii.gz", "image")
        labels = _read(folder / f"image_{name}_160x192x144_seg.nii.gz", "label map")
        if image.GetSize() != labels.GetSize():
            raise InputError(f"OASIS subject {name}: label size {labels.GetSize()} != image size {image.GetSize()}")
        labels.CopyInformation(image)
        out.append(Subject.from_sitk(f"oasis_{name}", image, labels))
    return out[0], out[1]


def _btcv_id(value) -> str:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InputError(f"BTCV id {value!r} is not a number; use ids like '0001' or 1") from None
    return f"{number:04d}"


def load_btcv_labels(
    shared_data,
    ids: Iterable,
    synthetic_ct: bool = False,
    seed: int = 0,
    anatomical_orientation: bool = False,
) -> list[Subject]:
    """BTCV label maps ``abdomen/btcv_labels/<id>.nii.gz`` (192 x 160 x 256, 2 mm, labels 0..13) as subjects.

    ``ids``: e.g. ``BTCV_SPLIT["test"]`` or ints. There are no CT images; ``synthetic_ct=True`` fills ``image`` with
    :func:`textscf.phantom.synthesize_ct_from_labels` (synthetic, label-derived HU; seed ``seed * 10000 + id``).
    The files' headers claim RAS, while their anatomy runs right -> left along i; ``anatomical_orientation=True``
    replaces the direction with :data:`BTCV_ANATOMICAL_DIRECTION` (same arrays, correct left/right in Slicer).
    """
    folder = Path(shared_data) / "abdomen" / "btcv_labels"
    out = []
    for raw in ids:
        subject_id = _btcv_id(raw)
        subject = _load_subject(subject_id, None, folder / f"{subject_id}.nii.gz")
        if anatomical_orientation:
            subject.direction = tuple(BTCV_ANATOMICAL_DIRECTION)
        if synthetic_ct:
            subject.image = synthesize_ct_from_labels(
                subject.labels, subject.spacing, seed=seed * 10000 + int(subject_id)
            )
        out.append(subject)
    return out


def ordered_pairs(ids: Sequence) -> list[tuple]:
    """All ordered ``(moving, fixed)`` pairs of distinct ids: ``n (n - 1)`` of them (42 for the 7 test subjects)."""
    return list(itertools.permutations(ids, 2))


# ------------------------------------------------------------------------------------------------------------------
# a user's data


def load_learn2reg_dataset(json_path) -> tuple[list[Subject], list[tuple[int, int]]]:
    """Subjects and validation pairs of a Learn2Reg dataset JSON (e.g. ``AbdomenCTCT_dataset.json``).

    Reads ``"training": [{"image": ..., "label": ...}]`` (label optional) and
    ``"registration_val": [{"fixed": ..., "moving": ...}]``, paths relative to the JSON's folder. Returns
    ``(subjects, pairs)``: one subject per training entry (named after its image file), followed by any validation
    image not among them (without labels); ``pairs`` are ``(moving_index, fixed_index)`` into ``subjects``.
    """
    json_path = Path(json_path)
    if not json_path.is_file():
        raise InputError(f"Learn2Reg dataset JSON not found: {json_path}; check the path")
    try:
        meta = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{json_path} is not valid JSON ({exc}); pass the dataset's *_dataset.json") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("training", []), list):
        raise InputError(f"{json_path} has no 'training' list; pass a Learn2Reg dataset JSON")
    root = json_path.parent

    def resolve(entry, key):
        if not isinstance(entry, dict) or key not in entry:
            raise InputError(f"{json_path}: an entry {entry!r} lacks {key!r}; fix the dataset JSON")
        return (root / entry[key]).resolve()

    subjects: list[Subject] = []
    index: dict[Path, int] = {}
    for entry in meta.get("training", []):
        image_path = resolve(entry, "image")
        label_path = resolve(entry, "label") if "label" in entry else None
        index[image_path] = len(subjects)
        subjects.append(_load_subject(_stem(image_path), image_path, label_path))
    pairs = []
    for entry in meta.get("registration_val", []):
        ids = []
        for key in ("moving", "fixed"):
            path = resolve(entry, key)
            if path not in index:
                index[path] = len(subjects)
                subjects.append(_load_subject(_stem(path), path, None))
            ids.append(index[path])
        pairs.append((ids[0], ids[1]))
    if not subjects:
        raise InputError(f"{json_path} lists no images under 'training' or 'registration_val'")
    return subjects, pairs


def _stem(path: Path) -> str:
    """File name without an image suffix (``case_0001_0000.nii.gz`` -> ``case_0001_0000``)."""
    name = Path(path).name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_folder_pairs(images_dir, labels_dir) -> list[Subject]:
    """Subjects from an image folder and a label folder whose files share names.

    Image ``X.nii.gz`` (or nnU-Net style ``X_0000.nii.gz``) pairs with label ``X.<any image suffix>``; files with
    the suffixes .nii.gz, .nii, .nrrd, .mha, .mhd are read. Every image needs a label map of the same shape.
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    for what, folder in (("image folder", images_dir), ("label folder", labels_dir)):
        if not folder.is_dir():
            raise InputError(f"{what} not found: {folder}; check the path")

    def listing(folder: Path) -> dict[str, Path]:
        return {_stem(p): p for p in sorted(folder.iterdir()) if p.is_file() and _stem(p) != p.name}

    images, labels = listing(images_dir), listing(labels_dir)
    if not images:
        raise InputError(f"no images ({', '.join(_IMAGE_SUFFIXES)}) in {images_dir}")
    subjects, missing = [], []
    for name, image_path in images.items():
        key = name if name in labels else (name[:-5] if name.endswith("_0000") else None)
        if key not in labels:
            missing.append(image_path.name)
            continue
        subjects.append(_load_subject(key, image_path, labels[key]))
    if missing:
        raise InputError(
            f"no label map in {labels_dir} for {len(missing)} image(s): {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; give each image a label file of the same name"
        )
    return subjects


# ------------------------------------------------------------------------------------------------------------------
# regions and training pairs


def label_values_to_regions(
    labels: np.ndarray,
    label_values: Sequence,
    unknown: str = "background",
) -> np.ndarray:
    """Region indices ``(same shape)`` int64 of a raw label map, by a lookup table.

    ``label_values[r - 1]`` is the raw value (or a list of raw values, merged) of region ``r``; raw 0 is
    background (region 0). Raw values without a region become 0 with ``unknown="background"`` or raise
    :class:`InputError` with ``unknown="error"``.
    """
    if unknown not in ("background", "error"):
        raise InputError(f"unknown={unknown!r}; use 'background' or 'error'")
    lab = np.asarray(labels)
    if not np.issubdtype(lab.dtype, np.integer):
        if not np.all(np.mod(lab, 1) == 0):
            raise InputError("the label map holds non-integer values; pass a label map, not an image")
    lab = lab.astype(np.int64, copy=False)
    mapping: dict[int, int] = {}
    for region, entry in enumerate(label_values, start=1):
        for value in np.atleast_1d(np.asarray(entry)).ravel().tolist():
            if value != int(value):
                raise InputError(f"label value {value} of region {region} is not an integer")
            value = int(value)
            if value == 0:
                raise InputError(f"region {region} is given label value 0, which is the background; remove it")
            if value in mapping:
                raise InputError(
                    f"label value {value} is given to regions {mapping[value]} and {region}; give it to one region"
                )
            mapping[value] = region
    regions, present, _ = lookup_regions(lab, mapping)
    bad = present[(present != 0) & ~np.isin(present, list(mapping))]
    if unknown == "error" and bad.size:
        raise InputError(
            f"label values {bad[:10].tolist()}{' ...' if len(bad) > 10 else ''} have no region; add them to the "
            "preset's label values or pass unknown='background'"
        )
    return regions


@dataclass(frozen=True)
class Augmentation:
    """Random training augmentation, applied to each image of a pair independently.

    Spatial (the same map for an image and its labels): rotation up to ``rotation_deg`` about each axis, scales
    in ``[1 - scale, 1 + scale]``, translation up to ``translation_mm``, about the grid centre; plus a smooth
    elastic field of maximum length ``elastic_mm`` and smoothness ``elastic_smoothness_mm``. Intensity (images
    only, on [0, 1]): gamma ``exp(U(-gamma, gamma))``, a factor ``1 + U(-intensity_scale, intensity_scale)``,
    Gaussian noise of sd ``noise_std``, then clipped to [0, 1]. Zero switches a component off.
    """

    rotation_deg: float = 5.0
    scale: float = 0.05
    translation_mm: float = 5.0
    elastic_mm: float = 4.0
    elastic_smoothness_mm: float = 30.0
    gamma: float = 0.2
    intensity_scale: float = 0.1
    noise_std: float = 0.01


class PairDataset(torch.utils.data.Dataset):
    """Inter-subject ``(moving, fixed)`` training pairs with region maps.

    ``subjects``: subjects with image and labels, all of one shape ``(I, J, K)``; ``label_values``: the raw value
    (or values) of each region 1..N-1, as for :func:`label_values_to_regions` (other values become background);
    ``pairs``: ``(moving_index, fixed_index)`` list, default every ordered pair ``i != j``; ``augment``: False,
    True (default :class:`Augmentation`) or an :class:`Augmentation`; ``normalise``: image -> [0, 1] callable
    (the model's :class:`textscf.spatial.IntensityNormaliser`, as inference applies it), default min-max per image.

    Item ``n`` is a dict: ``moving``, ``fixed`` ``(1, I, J, K)`` float32 in [0, 1]; ``moving_regions``,
    ``fixed_regions`` ``(1, I, J, K)`` int64; ``moving_name``, ``fixed_name``. Augmentation is deterministic given
    ``seed``, the epoch (:meth:`set_epoch`) and ``n``.
    """

    def __init__(
        self,
        subjects: Sequence[Subject],
        label_values: Sequence,
        pairs: Sequence[tuple[int, int]] | None = None,
        augment: bool | Augmentation = False,
        seed: int = 0,
        normalise: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        subjects = list(subjects)
        if len(subjects) < 2 and pairs is None:
            raise InputError(f"{len(subjects)} subject(s) give no inter-subject pair; pass at least two")
        for s in subjects:
            if s.image is None or s.labels is None:
                raise InputError(f"subject {s.name!r} lacks an image or a label map; training needs both")
        shapes = {s.shape for s in subjects}
        if len(shapes) > 1:
            raise InputError(f"subjects have different shapes {sorted(shapes)}; resample them onto one grid first")
        if pairs is None:
            pairs = [(i, j) for i in range(len(subjects)) for j in range(len(subjects)) if i != j]
        pairs = [(int(m), int(f)) for m, f in pairs]
        for m, f in pairs:
            if not (0 <= m < len(subjects) and 0 <= f < len(subjects)):
                raise InputError(f"pair ({m}, {f}) is out of range for {len(subjects)} subjects")
        if not pairs:
            raise InputError("no pairs to train on; pass a non-empty pair list")
        self.pairs = pairs
        self.names = [s.name for s in subjects]
        self.spacings = [s.spacing for s in subjects]
        self.num_regions = 1 + len(label_values)
        region_dtype = np.uint8 if self.num_regions <= 256 else np.int16
        self.normalise = normalise or IntensityNormaliser("minmax")
        self._images = [np.clip(np.asarray(self.normalise(s.image), np.float32), 0.0, 1.0) for s in subjects]
        self._regions = [label_values_to_regions(s.labels, label_values).astype(region_dtype) for s in subjects]
        self.augment = Augmentation() if augment is True else (augment or None)
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        """Draw a new augmentation per item for this epoch (call once per epoch, like DistributedSampler's)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"pair index {index} out of range for {len(self)} pairs")
        index = index % len(self)
        moving, fixed = self.pairs[index]
        seeds = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(2)
        out = {}
        for role, subject, sub_seed in (("moving", moving, seeds[0]), ("fixed", fixed, seeds[1])):
            image = torch.from_numpy(self._images[subject])[None]
            regions = torch.from_numpy(self._regions[subject].astype(np.int64))[None]
            if self.augment is not None:
                image, regions = self._augmented(image, regions, self.spacings[subject], int(sub_seed))
            out[role] = image
            out[f"{role}_regions"] = regions
            out[f"{role}_name"] = self.names[subject]
        return out

    def _augmented(self, image: torch.Tensor, regions: torch.Tensor, spacing, seed: int):
        """One random spatial map for image (trilinear) and regions (nearest), then intensity jitter on the image."""
        grid = random_spatial_grid(tuple(image.shape[1:]), spacing, self.augment, seed)
        return jitter_intensity(sample_on_grid(image, grid), self.augment, seed), sample_on_grid(regions, grid)


def random_spatial_grid(shape, spacing, aug: Augmentation, seed: int) -> torch.Tensor:
    """The sampling grid of one random affine + elastic map: ``(1, I, J, K, 3)`` for ``grid_sample``.

    Positions in voxels are ``p -> L p + c`` (an affine about the grid centre) plus a smooth elastic ``u(p)``,
    converted to ``grid_sample``'s [-1, 1] (``align_corners=True``, last dimension ordered k, j, i). The same
    ``seed`` gives the same map, so an image and its label or class maps stay aligned.
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij"))
    if aug.rotation_deg or aug.scale or aug.translation_mm:
        centre = (np.asarray(shape) - 1) / 2 * np.asarray(spacing)
        matrix = random_affine(aug.rotation_deg, aug.translation_mm, aug.scale, int(rng.integers(2**31)), centre)
        lin, off = affine_in_index_space(matrix, spacing)
        grid = np.tensordot(lin.astype(np.float32), grid, axes=([1], [0]))
        grid += off.astype(np.float32)[:, None, None, None]
    if aug.elastic_mm:
        grid += random_smooth_displacement(
            shape, spacing, aug.elastic_mm, aug.elastic_smoothness_mm, int(rng.integers(2**31))
        )
    grid *= (2.0 / (np.asarray(shape, np.float32) - 1.0)).reshape(3, 1, 1, 1)
    grid -= 1.0
    return torch.from_numpy(grid[::-1].transpose(1, 2, 3, 0).copy())[None]


def sample_on_grid(volume: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``(C, I, J, K)`` resampled at ``grid``: float volumes trilinearly, integer (label) volumes nearest."""
    labels = not volume.dtype.is_floating_point
    with torch.no_grad():
        out = F.grid_sample(volume[None].float(), grid, mode="nearest" if labels else "bilinear",
                            padding_mode="zeros", align_corners=True)[0]
    return out.round().long() if labels else out


def jitter_intensity(image: torch.Tensor, aug: Augmentation, seed: int) -> torch.Tensor:
    """Gamma, scale and noise of :class:`Augmentation` on a [0, 1] image; clipped to [0, 1]."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(half_width: float) -> float:
        return float((torch.rand((), generator=generator) * 2 - 1) * half_width)

    if aug.gamma:
        image = image.clamp(0.0, 1.0) ** float(np.exp(uniform(aug.gamma)))
    if aug.intensity_scale:
        image = image * (1.0 + uniform(aug.intensity_scale))
    if aug.noise_std:
        image = image + aug.noise_std * torch.randn(image.shape, generator=generator)
    return image.clamp(0.0, 1.0).contiguous()


# ------------------------------------------------------------------------------------------------------------------
# the real example CT


def _names_to_values(names) -> dict[str, int]:
    """{name: label value} from a label JSON given as {value: name}, {name: value} or a list of names."""
    if isinstance(names, dict):
        items = list(names.items())
        if all(str(k).isdigit() for k, _ in items):
            return {str(v): int(k) for k, v in items}
        return {str(k): int(v) for k, v in items}
    return {str(n): i + 1 for i, n in enumerate(names)}


def load_example_ct(shared_data) -> tuple[sitk.Image, np.ndarray]:
    """The real example CT (HU) and its organ labels relabelled to BTCV values ``(I, J, K)`` (others -> 0)."""
    folder = Path(shared_data) / "abdomen"
    ct = sitk.ReadImage(str(folder / "ct_example.nii.gz"), sitk.sitkFloat32)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "ct_example_labels.nii.gz"))).transpose(2, 1, 0)
    value_of = _names_to_values(json.loads((folder / "ct_example_labels.json").read_text()))
    btcv = np.zeros(labels.shape, np.int64)
    for name, value in totalsegmentator_to_btcv().items():  # TotalSegmentator name -> BTCV value
        if name in value_of:
            btcv[labels == value_of[name]] = value
    return ct, btcv

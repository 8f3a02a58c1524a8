"""``textscf evaluate``: register a list of pairs and report Dice, HD95, SDlogJ, folding and run time.

For every pair :func:`textscf.pipeline.register` runs with both label maps, and the numbers it reports (Dice and
HD95 per region before and after registration, SDlogJ and % |J| <= 0 of the deformable field on the fixed grid,
see :mod:`textscf.metrics`) are collected into

- ``per_region.csv``: one row per pair and region: ``pair, region, dice, hd95_mm, dice_before, hd95_mm_before``
  (Dice as a fraction in [0, 1], HD95 in mm; ``nan`` where a region is missing from a label map);
- ``per_pair.csv``: one row per pair: means over the regions before registration, after the initial alignment
  and after registration, SDlogJ, % |J| <= 0, the minimum Jacobian determinant, the wall time of the registration
  (model loading included) and of the network stage, and the device;
- ``summary.md``: mean ± standard deviation over the pairs (sample standard deviation, ``ddof=1``) of every
  number, and per region;
- ``dice_boxplot.png``: Dice per region, one box per region and method (before registration and the method,
  side by side, like Figure 3 of the textSCF paper).

These files appear together when every pair has been registered (:class:`textscf.io.OutputFolder`, with a
``textscf-manifest.json`` listing them; ``--overwrite`` replaces the previous evaluation as a whole once the new one
has finished). Meanwhile each pair's results are kept as soon as the pair is done, in ``partial/pairs.jsonl`` (one
JSON line per finished pair; the Learn2Reg fields beside it): a pair that fails is reported by name and the others
still run, and an interrupted or failed evaluation continues with ``--resume`` (``resume=True``), which registers
only the pairs not finished yet. ``partial/`` is removed when the evaluation completes.

Learn2Reg submission layout (``learn2reg=True`` / ``--learn2reg``)
--------------------------------------------------------------------
The files ``learn2reg/disp_FFFF_MMMM.npz`` follow the Learn2Reg 2020 / 2021 submission format (the format of the
abdomen CT task the textSCF paper evaluates on; learn2reg.grand-challenge.org "Submission" page and the
challenge's evaluation code):

- one file per pair, named ``disp_<fixed id>_<moving id>.npz``: the **fixed** image's case id first, then the
  moving one, each zero-padded to four digits (``disp_0034_0035.npz`` registers moving 0035 to fixed 0034);
- a single array stored under numpy's default key ``arr_0`` (``np.load(f)["arr_0"]``), dtype **float16**;
- shape ``(3, I/2, J/2, K/2)``: the **displacement only** (the evaluation adds the identity grid), components
  first, at **half resolution** of the fixed image (``3x96x80x128`` for the 192x160x256 abdomen CT task); the
  image sizes must therefore be even;
- component ``a`` is the displacement along voxel axis ``a`` of the image arrays as nibabel reads the NIfTI
  files (``get_fdata()``, axes ``i, j, k``; ITK / SimpleITK index order, the reverse of
  ``sitk.GetArrayFromImage``), in **voxels of the full-resolution grid**;
- the evaluation upsamples each component with ``scipy.ndimage.zoom(disp[a], 2, order=2)`` (corner-aligned: the
  first and last samples map onto the first and last voxels) and warps the moving label map with
  ``map_coordinates(moving, identity + disp, order=0)``: the field maps each voxel ``x`` of the fixed image to
  the voxel ``x + disp(x)`` of the moving image (the resampling convention, as everywhere in this engine).

Here the half-resolution samples are taken from the full displacement (initial alignment included) at exactly the
full-resolution positions ``m (N - 1) / (N/2 - 1)`` that this upsampling maps them to, and the vector is expressed
as moving-image voxel index minus fixed-image voxel index (which is the fixed grid's voxel displacement when both
images share a grid, as in Learn2Reg). The 2022+ Learn2Reg leaderboards (``MDL-UzL/L2R`` evaluation) instead take
full-resolution ``(I, J, K, 3)`` fields in ``disp_*.nii.gz``; this module writes the 2020/2021 kind.
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import SimpleITK as sitk

from textscf.errors import InputError, OutputError, TextSCFError
from textscf.io import (
    MANIFEST_NAME,
    OutputFolder,
    check_input_path,
    check_same_grid,
    read_image,
    read_label_map,
    write_bytes_atomically,
)

ImageSource = Union[str, os.PathLike, sitk.Image, Callable[[], sitk.Image]]

PER_REGION_COLUMNS = ("pair", "region", "dice", "hd95_mm", "dice_before", "hd95_mm_before")
PER_PAIR_COLUMNS = (
    "pair", "fixed", "moving", "mean_dice_before", "mean_dice_initial_alignment", "mean_dice", "mean_dice_before_in_both",
    "mean_dice_in_both", "mean_hd95_mm_before", "mean_hd95_mm", "sdlogj", "folding_percent", "jacobian_min", "seconds", "seconds_network", "device",
)
#: Columns that hold text, not numbers, when a results CSV is read back.
TEXT_COLUMNS = frozenset({"pair", "region", "fixed", "moving", "device", "method"})
OUTPUT_NAMES = ("per_region.csv", "per_pair.csv", "summary.md", "dice_boxplot.png")
LEARN2REG_FOLDER = "learn2reg"
#: Where finished pairs are kept until the whole evaluation is done (see the module notes).
PARTIAL_FOLDER = "partial"
PARTIAL_ROWS = "pairs.jsonl"
BTCV_SYNTHETIC_TEST = "btcv-synthetic-test"
SYNTHETIC_NOTE = (
    "The images are SYNTHETIC: CT-like intensities generated from the BTCV label maps "
    "(textscf.phantom.synthesize_ct_from_labels), not real CT scans. The label maps are the real manual ones; "
    "these numbers are not comparable with results on the real Learn2Reg abdomen CT images."
)
BEFORE_NAME = "before registration"
_L2R_NAME = re.compile(r"_(\d{4})_(\d{4})$")


# ------------------------------------------------------------------------------------------------------------------
# pairs


@dataclass
class PairCase:
    """One pair to register: ``moving`` is registered to ``fixed``.

    Attributes:
        name: unique name of the pair in the reports (e.g. ``"0034<-0035"``, fixed <- moving).
        fixed, moving: an image file path, a ``sitk.Image``, or a zero-argument callable returning one (loaded
            only when the pair is registered).
        fixed_labels, moving_labels: the label maps (same kinds), or None. Dice / HD95 need both; without a fixed
            label map the registration needs segmentor weights in the options.
        fixed_id, moving_id: Learn2Reg case ids for ``disp_<fixed_id>_<moving_id>.npz``; None = taken from the
            file names (the four digits of ``<task>_<id>_<modality>``, else the last number in the name).
        synthetic: the images are synthetic (said in the reports).
    """

    name: str
    fixed: ImageSource
    moving: ImageSource
    fixed_labels: ImageSource | None = None
    moving_labels: ImageSource | None = None
    fixed_id: str | None = None
    moving_id: str | None = None
    synthetic: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise InputError(f"a pair has the name {self.name!r}; give every pair a non-empty name")
        for role in ("fixed", "moving", "fixed_labels", "moving_labels"):
            value = getattr(self, role)
            if value is None and role in ("fixed", "moving"):
                raise InputError(f"pair {self.name!r} has no {role} image; give a file path or a SimpleITK image")
            if isinstance(value, (str, os.PathLike)):
                if str(value).strip():
                    setattr(self, role, Path(value))
                elif "labels" in role:
                    setattr(self, role, None)
                else:
                    raise InputError(f"pair {self.name!r}: the {role} image path is empty; give a file path")
            elif value is not None and not isinstance(value, sitk.Image) and not callable(value):
                raise InputError(f"pair {self.name!r}: {role} is a {type(value).__name__}; give a file path, a "
                                 "SimpleITK image or a function returning one")

    def _sources(self) -> dict[str, Any]:
        return {"fixed": self.fixed, "moving": self.moving, "fixed_labels": self.fixed_labels,
                "moving_labels": self.moving_labels}

    def check_files(self) -> None:
        """InputError naming the pair and the file when an input path does not exist."""
        for role, source in self._sources().items():
            if isinstance(source, Path) and not source.exists():
                raise InputError(f"pair {self.name!r}: {role.replace('_', ' ')} not found: '{source}'. Fix: check "
                                 "the path (paths in a pairs CSV or Learn2Reg JSON are relative to that file)")

    def load(self) -> tuple[sitk.Image, sitk.Image, sitk.Image | None, sitk.Image | None]:
        """``(fixed, moving, fixed_labels, moving_labels)`` as SimpleITK images (images float32)."""
        fixed = _load_image(self.fixed, f"pair {self.name!r}: fixed image")
        moving = _load_image(self.moving, f"pair {self.name!r}: moving image")
        fixed_labels = _load_labels(self.fixed_labels, fixed, f"pair {self.name!r}: fixed label map")
        moving_labels = _load_labels(self.moving_labels, moving, f"pair {self.name!r}: moving label map")
        return fixed, moving, fixed_labels, moving_labels

    def fixed_size(self) -> tuple[int, ...]:
        """The fixed image's size ``(I, J, K)`` (only the header is read for a file)."""
        source = self.fixed
        if isinstance(source, Path):
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(source))
            try:
                reader.ReadImageInformation()
            except RuntimeError:
                return tuple(_load_image(source, f"pair {self.name!r}: fixed image").GetSize())
            return tuple(reader.GetSize())
        if callable(source) and not isinstance(source, sitk.Image):
            source = source()
        return tuple(source.GetSize())

    def learn2reg_ids(self) -> tuple[str, str]:
        """``(fixed_id, moving_id)``, four-digit zero-padded, for the Learn2Reg file name."""
        ids = []
        for role, given, source in (("fixed", self.fixed_id, self.fixed), ("moving", self.moving_id, self.moving)):
            case_id = given if given is not None else _case_id_from_path(source)
            if case_id is None or not str(case_id).strip().isdigit():
                raise InputError(
                    f"pair {self.name!r}: no numeric Learn2Reg case id for the {role} image"
                    f"{'' if given is None else f' (got {given!r})'}. Fix: name the files with a case number "
                    f"(e.g. AbdomenCTCT_0001_0000.nii.gz) or give {role}_id (a '{role}_id' column in the pairs CSV)"
                )
            ids.append(f"{int(str(case_id).strip()):04d}")
        return ids[0], ids[1]


def _image_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".npz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _case_id_from_path(source: Any) -> str | None:
    if not isinstance(source, Path):
        return None
    stem = _image_stem(source)
    match = _L2R_NAME.search(stem)
    if match:
        return match.group(1)
    numbers = re.findall(r"\d+", stem)
    return numbers[-1] if numbers else None


def _check_sitk(image: sitk.Image, role: str) -> None:
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{role} is a {image.GetDimension()}-D image with {image.GetNumberOfComponentsPerPixel()} "
                         "component(s); a 3-D scalar volume is needed")


def _load_image(source: ImageSource, role: str) -> sitk.Image:
    if isinstance(source, Path):
        return read_image(source, role)
    if callable(source) and not isinstance(source, sitk.Image):
        source = source()
    if not isinstance(source, sitk.Image):
        raise InputError(f"{role}: got a {type(source).__name__}; give a file path or a SimpleITK image")
    _check_sitk(source, role)
    return sitk.Cast(source, sitk.sitkFloat32) if source.GetPixelID() != sitk.sitkFloat32 else source


def _load_labels(source: ImageSource | None, reference: sitk.Image, role: str) -> sitk.Image | None:
    if source is None:
        return None
    if isinstance(source, Path):
        return read_label_map(source, reference, role)
    if callable(source) and not isinstance(source, sitk.Image):
        source = source()
    if not isinstance(source, sitk.Image):
        raise InputError(f"{role}: got a {type(source).__name__}; give a file path or a SimpleITK image")
    _check_sitk(source, role)
    check_same_grid(source, reference, role, "its image")
    return source


def pair_name(fixed: str, moving: str) -> str:
    """The report name of a pair: ``"FIXED<-MOVING"``."""
    return f"{fixed}<-{moving}"


def pairs_from_csv(path: str | os.PathLike) -> list[PairCase]:
    """Pairs from a CSV file with the columns ``fixed, moving`` and optionally ``fixed_labels, moving_labels``,
    ``name``, ``fixed_id``, ``moving_id``. Relative paths are relative to the CSV's folder; empty label cells mean
    no label map."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"pairs CSV not found: '{path}'. Fix: check the path")
    check_input_path(path, "pairs CSV", "CSV file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the pairs CSV '{path}' ({exc}). Fix: give a UTF-8 text CSV file") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in ("fixed", "moving") if c not in columns]
    if missing:
        raise InputError(f"the pairs CSV '{path}' lacks the column(s) {', '.join(missing)} (it has "
                         f"{', '.join(columns) or 'no header'}). Fix: start it with the header line "
                         "'fixed,moving,fixed_labels,moving_labels'")
    root = path.parent
    cases = []
    for number, raw in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        if not any(row.values()):
            continue
        for column in ("fixed", "moving"):
            if not row.get(column):
                raise InputError(f"{path}, line {number}: the '{column}' cell is empty. Fix: give an image path")

        def resolve(cell: str | None) -> Path | None:
            return None if not cell else (root / cell if not Path(cell).is_absolute() else Path(cell))

        fixed, moving = resolve(row["fixed"]), resolve(row["moving"])
        name = row.get("name") or pair_name(_image_stem(fixed), _image_stem(moving))
        cases.append(PairCase(
            name=name, fixed=fixed, moving=moving, fixed_labels=resolve(row.get("fixed_labels")),
            moving_labels=resolve(row.get("moving_labels")), fixed_id=row.get("fixed_id") or None,
            moving_id=row.get("moving_id") or None,
        ))
    if not cases:
        raise InputError(f"the pairs CSV '{path}' lists no pairs. Fix: add one line per pair under the header")
    return cases


def _labels_for(image_path: Path) -> Path | None:
    """The Learn2Reg label map of an image: the ``images*`` folder replaced by ``labels*``, when it exists."""
    folder = image_path.parent
    if "images" not in folder.name:
        return None
    candidate = folder.with_name(folder.name.replace("images", "labels")) / image_path.name
    return candidate if candidate.is_file() else None


def pairs_from_learn2reg(json_path: str | os.PathLike, split: str | None = None) -> list[PairCase]:
    """Pairs of a Learn2Reg dataset JSON (e.g. ``AbdomenCTCT_dataset.json``).

    Args:
        json_path: the dataset JSON; its ``registration_val`` / ``registration_test`` entries are
            ``{"fixed": "./imagesTr/X_0001_0000.nii.gz", "moving": ...}``, relative to the JSON's folder.
        split: "val" or "test"; None = "val" when the JSON has validation pairs, else "test".

    Label maps are looked up as Learn2Reg's evaluation does (``imagesTr`` -> ``labelsTr``); pairs whose label
    maps are not there get None.
    """
    json_path = Path(json_path)
    if not json_path.exists():
        raise InputError(f"Learn2Reg dataset JSON not found: '{json_path}'. Fix: check the path")
    check_input_path(json_path, "Learn2Reg dataset JSON", "JSON file")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise InputError(f"'{json_path}' is not a readable JSON file ({exc}). Fix: pass the dataset's "
                         "*_dataset.json") from None
    if not isinstance(meta, dict):
        raise InputError(f"'{json_path}' is not a Learn2Reg dataset JSON (no top-level object)")
    if split not in (None, "val", "test"):
        raise InputError(f"unknown Learn2Reg split {split!r}; choose 'val' or 'test'")
    if split is None:
        split = "val" if meta.get("registration_val") else "test"
    key = f"registration_{split}"
    entries = meta.get(key)
    if not isinstance(entries, list) or not entries:
        present = [k for k in ("registration_val", "registration_test") if meta.get(k)]
        raise InputError(f"'{json_path}' has no '{key}' pairs (it has {', '.join(present) or 'none'}). Fix: choose "
                         "the split it has (--split val / test)")
    root = json_path.parent
    cases = []
    for entry in entries:
        if not isinstance(entry, dict) or not entry.get("fixed") or not entry.get("moving"):
            raise InputError(f"'{json_path}': the {key} entry {entry!r} lacks 'fixed' or 'moving'. Fix: repair the "
                             "dataset JSON")
        fixed, moving = (root / entry["fixed"]).resolve(), (root / entry["moving"]).resolve()
        fixed_id, moving_id = _case_id_from_path(fixed), _case_id_from_path(moving)
        name = pair_name(fixed_id or _image_stem(fixed), moving_id or _image_stem(moving))
        cases.append(PairCase(name=name, fixed=fixed, moving=moving, fixed_labels=_labels_for(fixed),
                              moving_labels=_labels_for(moving), fixed_id=fixed_id, moving_id=moving_id))
    return cases


def btcv_synthetic_test_pairs(shared_data: str | os.PathLike, seed: int = 0) -> list[PairCase]:
    """The 42 ordered test pairs of the textSCF abdomen split (BTCV 0034-0040, ``../shared/data/README.md``).

    The label maps are the real manual BTCV ones; the images are SYNTHETIC CT-like volumes generated from them
    (:func:`textscf.datasets.load_btcv_labels` with ``synthetic_ct=True, anatomical_orientation=True``). Each
    subject is loaded once, when a pair first needs it.
    """
    from textscf.datasets import BTCV_SPLIT, load_btcv_labels, ordered_pairs

    shared_data = Path(shared_data)
    folder = shared_data / "abdomen" / "btcv_labels"
    ids = list(BTCV_SPLIT["test"])
    missing = [i for i in ids if not (folder / f"{i}.nii.gz").is_file()]
    if missing:
        raise InputError(f"the BTCV test label maps {', '.join(missing)} are not in '{folder}'. Fix: give the shared "
                         "data folder (--shared-data PATH, the folder holding abdomen/btcv_labels)")

    @functools.lru_cache(maxsize=None)
    def subject(subject_id: str) -> tuple[sitk.Image, sitk.Image]:
        s = load_btcv_labels(shared_data, [subject_id], synthetic_ct=True, seed=seed, anatomical_orientation=True)[0]
        return s.image_sitk(), s.labels_sitk()

    def image(subject_id: str) -> Callable[[], sitk.Image]:
        return lambda: subject(subject_id)[0]

    def labels(subject_id: str) -> Callable[[], sitk.Image]:
        return lambda: subject(subject_id)[1]

    return [
        PairCase(name=pair_name(f, m), fixed=image(f), moving=image(m), fixed_labels=labels(f),
                 moving_labels=labels(m), fixed_id=f, moving_id=m, synthetic=True)
        for m, f in ordered_pairs(ids)
    ]


# ------------------------------------------------------------------------------------------------------------------
# Learn2Reg displacement


def learn2reg_displacement(displacement: sitk.Image, fixed: sitk.Image, moving: sitk.Image | None = None) -> np.ndarray:
    """A registration's displacement in the Learn2Reg 2020/2021 submission layout (see the module notes).

    Args:
        displacement: 3-vector image on the fixed grid, LPS mm, resampling convention (a
            :class:`~textscf.results.RegistrationResult`'s ``displacement``, initial alignment included).
        fixed: the fixed image (its grid); every size must be even.
        moving: the moving image (its grid gives the voxel indices the field points to); None = the fixed grid.

    Returns:
        ``(3, I/2, J/2, K/2)`` float16: at half-resolution sample ``m`` (full-resolution position
        ``x = m (N - 1) / (N/2 - 1)`` per axis), the moving-image voxel index that ``x`` maps to minus ``x``.
    """
    size = np.array(fixed.GetSize(), dtype=np.int64)
    if fixed.GetDimension() != 3 or np.any(size % 2) or np.any(size < 4):
        raise InputError(f"the Learn2Reg layout stores fields at half resolution and needs even fixed image sizes "
                         f"of at least 4; this fixed image is {'x'.join(str(int(s)) for s in size)}. Fix: pad or "
                         "crop the images to even sizes (Learn2Reg data already is), or drop --learn2reg")
    if displacement.GetNumberOfComponentsPerPixel() != 3:
        raise InputError("the displacement must be a 3-component vector image (LPS mm) on the fixed grid")
    check_same_grid(displacement, fixed, "the displacement field", "the fixed image")
    half = size // 2
    ratio = (size - 1) / (half - 1)
    reference = sitk.Image([int(h) for h in half], sitk.sitkUInt8)
    reference.SetOrigin(fixed.GetOrigin())
    reference.SetDirection(fixed.GetDirection())
    reference.SetSpacing(tuple(float(s) for s in np.array(fixed.GetSpacing()) * ratio))
    field64 = sitk.Cast(displacement, sitk.sitkVectorFloat64)
    field64.CopyInformation(fixed)
    sampled = sitk.Resample(field64, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    d = sitk.GetArrayFromImage(sampled).transpose(3, 2, 1, 0)  # (3, I/2, J/2, K/2), LPS mm
    axes = [np.arange(h, dtype=np.float64) * r for h, r in zip(half, ratio)]
    x = np.stack(np.meshgrid(*axes, indexing="ij"))  # full-resolution fixed voxel positions
    a_fixed = np.array(fixed.GetDirection()).reshape(3, 3) @ np.diag(fixed.GetSpacing())
    target = moving if moving is not None else fixed
    a_moving = np.array(target.GetDirection()).reshape(3, 3) @ np.diag(target.GetSpacing())
    offset = np.array(fixed.GetOrigin()) - np.array(target.GetOrigin())
    inv = np.linalg.inv(a_moving)
    # moving index = A_m^-1 (o_f + A_f x + d - o_m)
    y = np.einsum("ab,bijk->aijk", inv @ a_fixed, x) + np.einsum("ab,bijk->aijk", inv, d)
    y += (inv @ offset)[:, None, None, None]
    u = y - x
    if not np.all(np.isfinite(u)) or np.abs(u).max(initial=0.0) > np.finfo(np.float16).max:
        raise InputError("the displacement has non-finite values or exceeds the float16 range of the Learn2Reg "
                         "format; check the registration output")
    return u.astype(np.float16)


def learn2reg_file_name(fixed_id: str, moving_id: str) -> str:
    """``disp_FFFF_MMMM.npz``: fixed id first, both zero-padded to four digits."""
    return f"disp_{int(fixed_id):04d}_{int(moving_id):04d}.npz"


def _npz_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, array)  # positional: stored as "arr_0", what the evaluation reads
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------------------------
# rows, statistics, tables


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def rows_from_result(name: str, result, seconds: float | None = None, fixed: str = "", moving: str = ""
                     ) -> tuple[list[dict], dict]:
    """Per-region rows and the per-pair row of one :class:`~textscf.results.RegistrationResult`.

    ``result.stats`` must come from a registration with both label maps for the Dice / HD95 numbers (else they
    are NaN and there are no region rows). ``seconds``: the wall time to report (default: the pipeline's total).
    """
    stats = result.stats
    dice, hd = stats.get("dice") or {}, stats.get("hd95_mm") or {}
    dice_before, hd_before = stats.get("dice_before") or {}, stats.get("hd95_mm_before") or {}
    regions = list(dice) or list(dice_before)
    region_rows = [
        {"pair": name, "region": region, "dice": _float(dice.get(region)), "hd95_mm": _float(hd.get(region)),
         "dice_before": _float(dice_before.get(region)), "hd95_mm_before": _float(hd_before.get(region))}
        for region in regions
    ]
    pair_row = {
        "pair": name, "fixed": fixed, "moving": moving,
        "mean_dice_before": _float(stats.get("mean_dice_before")),
        "mean_dice_initial_alignment": _float(stats.get("mean_dice_initial_alignment")),
        "mean_dice": _float(stats.get("mean_dice")),
        "mean_dice_before_in_both": _float(stats.get("mean_dice_before_in_both")),
        "mean_dice_in_both": _float(stats.get("mean_dice_in_both")),
        "mean_hd95_mm_before": _float(stats.get("mean_hd95_mm_before")),
        "mean_hd95_mm": _float(stats.get("mean_hd95_mm")),
        "sdlogj": _float(stats.get("sdlogj")), "folding_percent": _float(stats.get("folding_percent")),
        "jacobian_min": _float(stats.get("jacobian_min")),
        "seconds": _float(seconds if seconds is not None else stats.get("seconds_total")),
        "seconds_network": _float((stats.get("seconds_per_stage") or {}).get("register")),
        "device": str(stats.get("device", "")),
    }
    return region_rows, pair_row


def _stats(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray([_float(v) for v in values], dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    n = int(arr.size)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {
        "mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if n > 1 else math.nan,
        "median": float(np.median(arr)), "min": float(arr.min()), "max": float(arr.max()), "n": n,
    }


def _numeric_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key in columns or key in TEXT_COLUMNS or isinstance(value, (str, bool)) or value is None:
                continue
            if isinstance(value, (int, float, np.floating, np.integer)):
                columns.append(key)
    return columns


def summarise(rows: Iterable[Mapping[str, Any]], by: str | None = None,
              columns: Sequence[str] | None = None) -> dict:
    """Mean, sample standard deviation (``ddof=1``; NaN for one value), median, min, max and count of every
    numeric column, ignoring NaN.

    Args:
        rows: per-pair or per-region rows (dicts), e.g. ``EvaluationResult.per_pair``.
        by: None for one summary over all rows (``{column: stats}``); a column name (``"region"``) for one
            summary per value of that column, in order of first appearance (``{value: {column: stats}}``).
        columns: the columns to summarise; None = every numeric one.
    """
    rows = list(rows)
    cols = list(columns) if columns is not None else _numeric_columns(rows)
    if by is None:
        return {c: _stats([r.get(c, math.nan) for r in rows]) for c in cols}
    groups: dict[str, list] = {}
    for row in rows:
        if by not in row:
            raise InputError(f"a row has no {by!r} column to group by; its columns are {', '.join(row)}")
        groups.setdefault(str(row[by]), []).append(row)
    return {key: {c: _stats([r.get(c, math.nan) for r in group]) for c in cols} for key, group in groups.items()}


def format_mean_std(stats: Mapping[str, float] | None, scale: float = 1.0, digits: int = 2) -> str:
    """``"mean ± std"`` of a :func:`summarise` entry times ``scale``; ``"–"`` when there is no value."""
    if not stats or not stats.get("n") or math.isnan(stats.get("mean", math.nan)):
        return "–"
    mean = stats["mean"] * scale
    std = stats.get("std", math.nan)
    if std is None or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std * scale:.{digits}f}"


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, (float, np.floating)):
        return "–" if math.isnan(value) else f"{float(value):.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 2) -> str:
    """A GitHub Markdown table; float cells get ``digits`` decimals (NaN shows as ``–``), text is escaped."""
    columns = [_cell(c, digits) for c in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] * len(columns)) + "|"]
    for row in rows:
        cells = [_cell(v, digits) for v in row]
        if len(cells) != len(columns):
            raise InputError(f"a table row has {len(cells)} cells for {len(columns)} columns")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


METHOD_TABLE_COLUMNS = (
    ("Dice (%)", "mean_dice", 100.0, 2), ("Dice, regions in both (%)", "mean_dice_in_both", 100.0, 2),
    ("HD95 (mm)", "mean_hd95_mm", 1.0, 2), ("SDlogJ", "sdlogj", 1.0, 3),
    ("|J| ≤ 0 (%)", "folding_percent", 1.0, 3), ("time (s)", "seconds", 1.0, 2),
)


def before_summary(pair_summary: Mapping[str, Mapping[str, float]]) -> dict:
    """The "before registration" entry of a per-pair summary (its ``*_before`` columns under the plain names)."""
    return {"mean_dice": pair_summary.get("mean_dice_before"),
            "mean_dice_in_both": pair_summary.get("mean_dice_before_in_both"),
            "mean_hd95_mm": pair_summary.get("mean_hd95_mm_before")}


def methods_table(summaries: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """Markdown table, one row per method: Dice (%), HD95 (mm), SDlogJ, % |J| <= 0 and time, mean ± std over pairs.

    ``summaries``: method name -> :func:`summarise` of its per-pair rows (add ``before_summary(...)`` under
    ``"before registration"`` for the initial row).
    """
    rows = []
    for method, summary in summaries.items():
        n = max((s.get("n", 0) for s in summary.values() if s), default=0)
        rows.append([method, str(n)] + [format_mean_std(summary.get(key), scale, digits)
                                        for _, key, scale, digits in METHOD_TABLE_COLUMNS])
    return markdown_table(["method", "pairs"] + [title for title, *_ in METHOD_TABLE_COLUMNS], rows)


def regions_table(region_summary: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """Markdown table, one row per region: Dice and HD95 before and after, mean ± std over pairs."""
    rows = []
    for region, s in region_summary.items():
        rows.append([region, str(s.get("dice", {}).get("n", 0)),
                     format_mean_std(s.get("dice_before"), 100.0), format_mean_std(s.get("dice"), 100.0),
                     format_mean_std(s.get("hd95_mm_before")), format_mean_std(s.get("hd95_mm"))])
    return markdown_table(["region", "pairs", "Dice before (%)", "Dice (%)", "HD95 before (mm)", "HD95 (mm)"], rows)


def rows_to_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """CSV text with a header; floats at full precision, NaN as ``nan``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([repr(float(v)) if isinstance(v, (float, np.floating)) else v
                         for v in (row.get(c, "") for c in columns)])
    return buffer.getvalue()


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a ``per_region.csv`` / ``per_pair.csv`` written here, numbers as floats (``nan`` included)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"results CSV not found: '{path}'. Fix: give the per_region.csv or per_pair.csv of an "
                         "evaluation folder")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        out.append({k: (v if k in TEXT_COLUMNS else _float(v) if v != "" else math.nan) for k, v in row.items()})
    return out


# ------------------------------------------------------------------------------------------------------------------
# box plot


def dice_boxplot(results_by_method: Mapping[str, Sequence[Mapping[str, Any]]], path,
                 title: str | None = None, value: str = "dice") -> Path | Any:
    """Box plot of Dice per region, methods side by side (the textSCF paper's Figure 3 kind of plot).

    Args:
        results_by_method: method name -> its per-region rows (``region`` and ``value`` keys), in legend order.
            Regions appear in order of first appearance; NaN values are left out.
        path: PNG path (or a writable binary file object).
        title: figure title.
        value: the row key to plot (``"dice"``; ``"dice_before"`` for the unregistered overlap).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    methods = list(results_by_method)
    regions: list[str] = []
    data: dict[tuple[str, str], list[float]] = {}
    for method in methods:
        for row in results_by_method[method]:
            region = str(row["region"])
            if region not in regions:
                regions.append(region)
            v = _float(row.get(value))
            if not math.isnan(v):
                data.setdefault((method, region), []).append(v)
    n_methods = max(len(methods), 1)
    width = 0.8 / n_methods
    fig = Figure(figsize=(max(6.0, len(regions) * (0.18 * n_methods + 0.25) + 1.5), 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colours = [f"C{i % 10}" for i in range(n_methods)]
    for m, method in enumerate(methods):
        positions, values = [], []
        for r, region in enumerate(regions):
            if (method, region) in data:
                positions.append(r + (m - (n_methods - 1) / 2) * width)
                values.append(data[(method, region)])
        if values:
            boxes = ax.boxplot(values, positions=positions, widths=width * 0.85, patch_artist=True,
                               showfliers=True, flierprops={"markersize": 2})
            for patch in boxes["boxes"]:
                patch.set_facecolor(colours[m])
                patch.set_alpha(0.75)
            for median in boxes["medians"]:
                median.set_color("black")
    if not data:
        ax.text(0.5, 0.5, "no Dice values: the pairs have no label maps", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xticks(range(len(regions)))
    ax.set_xticklabels(regions, rotation=40, ha="right", fontsize=8)
    ax.set_xlim(-0.6, max(len(regions), 1) - 0.4)
    ax.set_ylim(0.0, 1.02)
    ax.set_ylabel("Dice")
    ax.grid(axis="y", alpha=0.3)
    if methods:  # above the axes, so that it never hides a box
        ax.legend(handles=[Patch(facecolor=colours[m], alpha=0.75, label=method) for m, method in enumerate(methods)],
                  loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(n_methods, 4), fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=10, pad=22 if methods else 6)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


# ------------------------------------------------------------------------------------------------------------------
# evaluation


@dataclass
class EvaluationResult:
    """What :func:`evaluate_pairs` measured and wrote.

    Attributes:
        method_name: the name used in the tables and the plot.
        per_region: rows ``pair, region, dice, hd95_mm, dice_before, hd95_mm_before`` (Dice fractions, mm).
        per_pair: rows with the columns of :data:`PER_PAIR_COLUMNS`.
        summary: ``{"pairs": summarise(per_pair), "regions": summarise(per_region, by="region")}``.
        markdown: the text of ``summary.md``.
        files: every file written (final paths).
        notes: remarks printed with the results (e.g. that the images are synthetic).
    """

    method_name: str
    per_region: list[dict]
    per_pair: list[dict]
    summary: dict
    markdown: str
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def summary_markdown(method_name: str, per_pair: Sequence[Mapping], per_region: Sequence[Mapping],
                     notes: Sequence[str] = (), settings: Mapping[str, Any] | None = None) -> str:
    """The text of ``summary.md``: settings, notes, the method table (with the unregistered row) and per region."""
    pair_summary = summarise(per_pair, columns=[c for c in PER_PAIR_COLUMNS if c not in TEXT_COLUMNS])
    region_summary = summarise(per_region, by="region", columns=["dice", "hd95_mm", "dice_before", "hd95_mm_before"])
    lines = [f"# Evaluation: {method_name}", ""]
    lines.append(f"{len(per_pair)} pair(s). Mean ± sample standard deviation (ddof = 1) over the pairs; Dice in %, "
                 "HD95 in mm (per region, then averaged over the regions of a pair), SDlogJ and % |J| ≤ 0 of the "
                 "deformable field on the fixed grid (Learn2Reg's SDlogJ: 2-voxel border dropped), wall time of the "
                 "registration including model loading.")
    lines.append("")
    for note in notes:
        lines += [f"> **Note:** {note}", ""]
    if settings:
        lines += ["Settings: " + ", ".join(f"{k} = {v}" for k, v in settings.items() if v is not None), ""]
    lines += ["## Over pairs", "",
              "Dice averages every region present in either label map (a region in only one map scores 0); "
              "\"regions in both\" averages only the regions present in both scans (the Learn2Reg convention).", ""]
    lines.append(methods_table({BEFORE_NAME: before_summary(pair_summary), method_name: pair_summary}))
    if region_summary:
        lines += ["## Per region", "", regions_table(region_summary)]
    lines += ["## Per pair", ""]
    lines.append(markdown_table(
        ["pair", "Dice before (%)", "Dice (%)", "HD95 (mm)", "SDlogJ", "|J| ≤ 0 (%)", "time (s)", "device"],
        [[r["pair"], 100 * _float(r["mean_dice_before"]), 100 * _float(r["mean_dice"]), _float(r["mean_hd95_mm"]),
          _cell(_float(r["sdlogj"]), 3), _cell(_float(r["folding_percent"]), 3), _float(r["seconds"]),
          r.get("device", "")]
         for r in per_pair],
    ))
    return "\n".join(lines)


def evaluate_pairs(
    cases: Iterable[PairCase],
    options=None,
    output_dir: str | os.PathLike = "evaluation",
    overwrite: bool = False,
    learn2reg: bool = False,
    method_name: str = "textscf",
    progress: bool = True,
    resume: bool = False,
) -> EvaluationResult:
    """Register every pair with :func:`textscf.pipeline.register` and write the reports into ``output_dir``.

    Args:
        cases: the pairs (:class:`PairCase`); names must be unique.
        options: :class:`textscf.pipeline.RegistrationOptions` (None = defaults).
        output_dir: folder for ``per_region.csv``, ``per_pair.csv``, ``summary.md``, ``dice_boxplot.png`` and,
            with ``learn2reg``, ``learn2reg/disp_FFFF_MMMM.npz`` (see the module notes).
        overwrite: replace the previous evaluation in ``output_dir`` (otherwise existing outputs are refused before
            any registration); an unfinished one in ``partial/`` is discarded.
        learn2reg: also write the Learn2Reg 2020/2021 submission fields.
        method_name: the method's name in the tables and the plot.
        progress: a progress bar over the pairs.
        resume: continue the unfinished evaluation in ``output_dir/partial``: its finished pairs are kept, the
            others are registered (the settings must be the same).

    Each finished pair is kept in ``partial/`` at once. A pair whose registration fails with a
    :class:`~textscf.errors.TextSCFError` is reported by name once the other pairs have run (InputError); the
    report files appear only when every pair is done.
    """
    from textscf.pipeline import RegistrationOptions, register

    cases = list(cases)
    if not cases:
        raise InputError("no pairs to evaluate. Fix: give at least one pair (a pairs CSV, a Learn2Reg JSON or "
                         f"'{BTCV_SYNTHETIC_TEST}')")
    for case in cases:
        if not isinstance(case, PairCase):
            raise InputError(f"evaluate_pairs takes PairCase objects, got a {type(case).__name__}")
    names = [c.name for c in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"pair names must be unique; repeated: {', '.join(duplicates)}. Fix: remove the repeated "
                         "pairs or give them distinct names")
    if not isinstance(method_name, str) or not method_name.strip():
        raise InputError("method_name is empty; give the method a name for the tables")
    for case in cases:
        case.check_files()
    options = options or RegistrationOptions()
    npz_names: dict[str, str] = {}
    if learn2reg:
        for case in cases:
            npz_names[case.name] = learn2reg_file_name(*case.learn2reg_ids())
            size = case.fixed_size()
            if any(s % 2 or s < 4 for s in size):
                raise InputError(f"pair {case.name!r}: the fixed image is {'x'.join(map(str, size))}; the Learn2Reg "
                                 "layout stores fields at half resolution and needs even sizes. Fix: pad or crop the "
                                 "images to even sizes, or drop --learn2reg")
        clashes = sorted({n for n in npz_names.values() if list(npz_names.values()).count(n) > 1})
        if clashes:
            raise InputError(f"several pairs would write {', '.join(clashes)}: their Learn2Reg case ids repeat. Fix: "
                             "give distinct fixed_id / moving_id per pair")
    notes = [SYNTHETIC_NOTE] if any(c.synthetic for c in cases) else []
    output_dir = Path(output_dir)
    inputs = {f"pair {c.name!r} {role.replace('_', ' ')}": source
              for c in cases for role, source in c._sources().items() if isinstance(source, Path)}
    settings = {
        "method": method_name, "checkpoint": options.checkpoint or "bundled model", "preset": options.preset,
        "init": options.init, "refine iterations": options.refine_iterations, "device requested": options.device,
    }
    # what must not change between an interrupted evaluation and its --resume
    signature = {**settings, "regions": options.region_names, "label values": options.label_values,
                 "refine learning rate": options.refine_learning_rate, "seed": options.seed,
                 "unmapped labels": options.unmapped_labels, "learn2reg": bool(learn2reg)}
    if options.refine_use_moving_labels:  # the moving labels in the loss (by default they only score the pairs)
        signature["moving labels in the loss, weight"] = options.refine_label_weight

    with ExitStack() as stack:
        out = stack.enter_context(OutputFolder(output_dir, overwrite=overwrite, names=OUTPUT_NAMES, inputs=inputs,
                                               manifest=MANIFEST_NAME, known_names=OUTPUT_NAMES))
        l2r = None
        if learn2reg:
            l2r = stack.enter_context(OutputFolder(output_dir / LEARN2REG_FOLDER, overwrite=overwrite,
                                                   names=list(npz_names.values()), manifest=MANIFEST_NAME))
        elif overwrite and (output_dir / LEARN2REG_FOLDER / MANIFEST_NAME).is_file():
            # the previous evaluation's Learn2Reg fields belong to the run being replaced: removed on success
            stack.enter_context(OutputFolder(output_dir / LEARN2REG_FOLDER, overwrite=True, manifest=MANIFEST_NAME))
        partial = _PartialResults(output_dir / PARTIAL_FOLDER, signature)
        done = partial.open(resume=resume, overwrite=overwrite)
        todo = [c for c in cases if c.name not in done]
        bar = None
        if progress and todo:
            from tqdm.auto import tqdm

            bar = stack.enter_context(tqdm(total=len(todo), unit="pair", desc=f"evaluate {method_name}"))
        failures: list[str] = []
        for case in todo:
            if bar is not None:
                bar.set_postfix_str(case.name)
            try:
                fixed, moving, fixed_labels, moving_labels = case.load()
                start = time.perf_counter()
                result = register(fixed, moving, options, fixed_labels, moving_labels)
                seconds = time.perf_counter() - start
                fixed_id = case.fixed_id or _case_id_from_path(case.fixed) or ""
                moving_id = case.moving_id or _case_id_from_path(case.moving) or ""
                region_rows, pair_row = rows_from_result(case.name, result, seconds, fixed_id, moving_id)
                npz = None
                if learn2reg:
                    npz = _npz_bytes(learn2reg_displacement(result.displacement, fixed, moving))
                del result
            except TextSCFError as exc:
                failures.append(f"pair {case.name!r}: {exc}")
            else:
                done[case.name] = partial.add(case.name, pair_row, region_rows, npz_names.get(case.name), npz)
            if bar is not None:
                bar.update(1)
        if failures:
            finished = sum(c.name in done for c in cases)
            raise InputError(
                f"{len(failures)} of {len(cases)} pair(s) failed; " + "; ".join(failures) + ". "
                f"The {finished} finished pair(s) are kept in '{partial.folder}'. Fix: correct the failed pair(s) "
                "(or leave them out of the pair list) and run the same command again with --resume "
                "(resume=True): only the pairs not finished yet are registered.")

        per_region = [row for c in cases for row in done[c.name]["per_region"]]
        per_pair = [done[c.name]["per_pair"] for c in cases]
        markdown = summary_markdown(method_name, per_pair, per_region, notes, settings)
        out.write_text("per_region.csv", rows_to_csv(per_region, PER_REGION_COLUMNS))
        out.write_text("per_pair.csv", rows_to_csv(per_pair, PER_PAIR_COLUMNS))
        out.write_text("summary.md", markdown)
        before_rows = [{"region": r["region"], "dice": r["dice_before"]} for r in per_region]
        title = f"Dice per region, {len(per_pair)} pair(s)" + (" (synthetic images)" if notes else "")
        dice_boxplot({BEFORE_NAME: before_rows, method_name: per_region}, out.temp_path("dice_boxplot.png"), title)
        if l2r is not None:
            for case in cases:
                l2r.write_bytes(npz_names[case.name], partial.npz_bytes(npz_names[case.name]))
    partial.remove()

    files = [output_dir / n for n in OUTPUT_NAMES]
    files += [output_dir / LEARN2REG_FOLDER / n for n in npz_names.values()]
    summary = {"pairs": summarise(per_pair, columns=[c for c in PER_PAIR_COLUMNS if c not in TEXT_COLUMNS]),
               "regions": summarise(per_region, by="region",
                                    columns=["dice", "hd95_mm", "dice_before", "hd95_mm_before"])}
    return EvaluationResult(method_name, per_region, per_pair, summary, markdown, files, notes)


class _PartialResults:
    """The finished pairs of an evaluation in progress: ``pairs.jsonl`` (a settings line, then one line per pair,
    appended and flushed to disk as each pair finishes) and the pairs' Learn2Reg fields, in one folder."""

    def __init__(self, folder: Path, signature: dict):
        self.folder = folder
        self.rows_path = folder / PARTIAL_ROWS
        self.signature = json.loads(json.dumps(signature, default=str))

    def _read(self) -> tuple[dict | None, dict[str, dict]]:
        header, done = None, {}
        with self.rows_path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:  # a line cut short by a kill: that pair runs again
                    continue
                if "settings" in entry:
                    header = entry["settings"]
                elif "pair" in entry:
                    done[entry["pair"]] = entry
        return header, done

    def open(self, resume: bool, overwrite: bool) -> dict[str, dict]:
        """The finished pairs to keep ({} for a new evaluation); starts ``pairs.jsonl``."""
        done: dict[str, dict] = {}
        if self.rows_path.is_file():
            header, previous = self._read()
            if resume:
                if header != self.signature:
                    changed = sorted(k for k in set(self.signature) | set(header or {})
                                     if (header or {}).get(k) != self.signature.get(k))
                    raise InputError(
                        f"the unfinished evaluation in '{self.folder}' ran with other settings ({', '.join(changed)} "
                        "differ), so its pairs cannot be mixed with new ones. Fix: resume with the same options, or "
                        "pass --overwrite instead of --resume to start over.")
                done = previous
            elif overwrite:
                self.remove()
            else:
                raise OutputError(
                    f"'{self.folder}' holds an unfinished evaluation ({len(previous)} finished pair(s)). Fix: pass "
                    "--resume to continue it (only the missing pairs are registered), or --overwrite to start over.")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not done:
                self._append({"settings": self.signature}, mode="w")
        except OSError as exc:
            raise OutputError(f"cannot write the evaluation's progress file '{self.rows_path}' "
                              f"({exc.strerror or exc}). Fix: choose an output folder you can write to.") from None
        return done

    def _append(self, entry: dict, mode: str = "a") -> None:
        with self.rows_path.open(mode, encoding="utf-8") as f:
            f.write(json.dumps(entry, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def add(self, name: str, pair_row: dict, region_rows: list[dict], npz_name: str | None,
            npz: bytes | None) -> dict:
        """Keep one finished pair (its field first, then its line: a listed pair is complete)."""
        if npz is not None:
            write_bytes_atomically(npz, self.folder / npz_name, "the Learn2Reg field")
        entry = {"pair": name, "per_pair": pair_row, "per_region": region_rows, "npz": npz_name}
        self._append(entry)
        return json.loads(json.dumps(entry, default=_json_default))

    def npz_bytes(self, name: str) -> bytes:
        try:
            return (self.folder / name).read_bytes()
        except OSError as exc:
            raise OutputError(f"the kept Learn2Reg field '{self.folder / name}' cannot be read "
                              f"({exc.strerror or exc}). Fix: run again with --overwrite.") from None

    def remove(self) -> None:
        """Remove the files this class writes, then the folder if that leaves it empty."""
        if self.rows_path.is_file():
            try:
                _, done = self._read()
            except OSError:
                done = {}
            for entry in done.values():
                if entry.get("npz") and Path(entry["npz"]).name == entry["npz"]:
                    (self.folder / entry["npz"]).unlink(missing_ok=True)
            self.rows_path.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


# ------------------------------------------------------------------------------------------------------------------
# command line


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in _comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_evaluate_parser(sub) -> None:
    """Add ``textscf evaluate`` to the ``textscf`` sub-command parsers."""
    from textscf.cli import (
        add_label_guidance_options, int_option, output_folder_option, path_option, refine_iterations_option,
        refine_lr_option, seed_option,
    )
    from textscf.training_cli import DEFAULT_SHARED_DATA

    p = sub.add_parser(
        "evaluate", help="register a list of pairs and report Dice, HD95, SDlogJ, folding and run time",
        description="Register every pair of --pairs with its label maps and write per_region.csv, per_pair.csv, "
        "summary.md (mean ± std over pairs and per region) and dice_boxplot.png to OUTPUT; with --learn2reg also "
        "learn2reg/disp_FIXED_MOVING.npz (Learn2Reg 2020/2021 layout: float16, (3, I/2, J/2, K/2), voxels of the "
        "full-resolution fixed grid, fixed id first).",
    )
    p.add_argument("--pairs", required=True,
                   help="a CSV (columns fixed, moving, fixed_labels, moving_labels; paths relative to the CSV), a "
                   f"Learn2Reg dataset JSON, or '{BTCV_SYNTHETIC_TEST}' (the 42 BTCV test pairs of the paper's split "
                   "with SYNTHETIC label-derived CT images)")
    p.add_argument("--split", choices=["val", "test"], default=None,
                   help="which pairs of a Learn2Reg JSON: registration_val or registration_test (default: val if "
                   "present)")
    p.add_argument("-o", "--output", required=True, type=output_folder_option,
                   help=f"output folder (finished pairs are kept in OUTPUT/{PARTIAL_FOLDER} as they complete)")
    g = p.add_argument_group("model and registration")
    g.add_argument("--checkpoint", type=path_option, help="textscf checkpoint (.pt); default: the bundled model")
    g.add_argument("--preset", help="prompt preset: abdomen-ct or brain-mri")
    g.add_argument("--prompts", type=_comma_list, help='region names, e.g. "liver,spleen" (with --label-values)')
    g.add_argument("--label-values", type=_int_list, help='label value of each prompt, e.g. "6,1"')
    g.add_argument("--unmapped-labels", choices=["error", "background"], default="error",
                   help="label values without a prompt: stop with an error (default) or treat them as background")
    g.add_argument("--init", choices=["none", "center", "affine"], default="center",
                   help="initial alignment (default: center of mass)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--refine", type=refine_iterations_option, default=0, metavar="N",
                   help="instance optimisation iterations per pair")
    g.add_argument("--refine-lr", type=refine_lr_option, default=None,
                   help="refinement learning rate, in (0, 1] (default 1e-3)")
    g.add_argument("--seed", type=seed_option, default=0)
    add_label_guidance_options(g)
    o = p.add_argument_group("outputs")
    o.add_argument("--learn2reg", action="store_true", help="also write the Learn2Reg submission fields")
    o.add_argument("--method", default="textscf", help="method name in the tables and the plot")
    o.add_argument("--overwrite", action="store_true",
                   help="replace the previous evaluation in OUTPUT (once the new one has finished) and discard an "
                   "unfinished one")
    o.add_argument("--resume", action="store_true",
                   help=f"continue the unfinished evaluation in OUTPUT/{PARTIAL_FOLDER} (same options): only the "
                   "pairs not finished yet are registered")
    o.add_argument("--shared-data", type=Path, default=DEFAULT_SHARED_DATA,
                   help=f"the shared data folder for {BTCV_SYNTHETIC_TEST} (default: ../shared/data)")
    o.add_argument("--limit", type=int_option(1, what="a number of pairs"), default=None, metavar="N", help="only the first N pairs")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_evaluate)


def cases_from_argument(pairs: str, shared_data: Path | None = None, split: str | None = None) -> list[PairCase]:
    """The pairs named by ``--pairs``: a CSV, a Learn2Reg JSON or ``btcv-synthetic-test``."""
    if pairs == BTCV_SYNTHETIC_TEST:
        if shared_data is None:
            raise InputError(f"'{BTCV_SYNTHETIC_TEST}' needs the shared data folder; give --shared-data PATH")
        return btcv_synthetic_test_pairs(shared_data)
    path = Path(pairs)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return pairs_from_csv(path)
    if suffix == ".json":
        return pairs_from_learn2reg(path, split)
    raise InputError(f"--pairs {pairs!r} is neither a .csv file, a Learn2Reg .json file nor "
                     f"'{BTCV_SYNTHETIC_TEST}'. Fix: give one of those")


def cmd_evaluate(args) -> int:
    from textscf.cli import label_guidance
    from textscf.pipeline import RegistrationOptions

    cases = cases_from_argument(args.pairs, args.shared_data, args.split)
    if args.limit is not None:
        cases = cases[: args.limit]
    refine_lr = args.refine_lr if args.refine_lr is not None else 1e-3
    options = RegistrationOptions(
        checkpoint=args.checkpoint, preset=args.preset, region_names=args.prompts, label_values=args.label_values,
        init=args.init, device=args.device, refine_iterations=args.refine, refine_learning_rate=refine_lr,
        unmapped_labels=args.unmapped_labels, seed=args.seed, **label_guidance(args),
    )
    for note in [SYNTHETIC_NOTE] if any(c.synthetic for c in cases) else []:
        print(f"textscf: note: {note}")
    result = evaluate_pairs(cases, options, args.output, overwrite=args.overwrite, learn2reg=args.learn2reg,
                            method_name=args.method, progress=not args.quiet, resume=args.resume)
    s = result.summary["pairs"]
    print(f"textscf: evaluated {len(result.per_pair)} pair(s) with {args.method}: "
          f"Dice {format_mean_std(s['mean_dice_before'], 100, 1)} % -> {format_mean_std(s['mean_dice'], 100, 1)} %, "
          f"HD95 {format_mean_std(s['mean_hd95_mm'])} mm, SDlogJ {format_mean_std(s['sdlogj'], 1, 3)}, "
          f"|J|<=0 {format_mean_std(s['folding_percent'], 1, 3)} %, {format_mean_std(s['seconds'])} s per pair")
    print(f"textscf: wrote {Path(args.output) / 'summary.md'} and {len(result.files) - 1} other file(s)")
    return 0

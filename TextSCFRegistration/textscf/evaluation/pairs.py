"""The pairs an evaluation registers: :class:`PairCase`, and the pair lists it reads (a CSV, a Learn2Reg dataset JSON,
the BTCV synthetic test split)."""
from __future__ import annotations

import csv
import functools
import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import SimpleITK as sitk

from textscf.errors import InputError
from textscf.io import check_input_path, check_same_grid, read_image, read_label_map

ImageSource = Union[str, os.PathLike, sitk.Image, Callable[[], sitk.Image]]

BTCV_SYNTHETIC_TEST = "btcv-synthetic-test"

SYNTHETIC_NOTE = (
    "The images are SYNTHETIC: CT-like intensities generated from the BTCV label maps "
    "(textscf.phantom.synthesize_ct_from_labels), not real CT scans. The label maps are the real manual ones; "
    "these numbers are not comparable with results on the real Learn2Reg abdomen CT images."
)

_L2R_NAME = re.compile(r"_(\d{4})_(\d{4})$")


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

    def sources(self) -> dict[str, Any]:
        return {"fixed": self.fixed, "moving": self.moving, "fixed_labels": self.fixed_labels,
                "moving_labels": self.moving_labels}

    def check_files(self) -> None:
        """InputError naming the pair and the file when an input path does not exist."""
        for role, source in self.sources().items():
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
            case_id = given if given is not None else case_id_from_path(source)
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

def case_id_from_path(source: Any) -> str | None:
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
        fixed_id, moving_id = case_id_from_path(fixed), case_id_from_path(moving)
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

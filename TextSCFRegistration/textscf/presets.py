"""Region presets: prompt sets stored as data in ``resources/presets/*.json``.

A preset is also a *labelling scheme*: it says which label value each region has in the label maps of one source
(``abdomen-ct``: Learn2Reg/BTCV values; ``totalsegmentator``: TotalSegmentator v2 values; ``brain-mri``: FreeSurfer
values). Regions may carry the names other tools give them (``totalsegmentator_name``, ``freesurfer_name``): segments
named ``kidney_right`` or ``Left-Hippocampus`` are the regions "right kidney" and "left hippocampus". A preset may list
its source's whole label table (``label_names``); labels of that table without a region are background.

This module also holds what the label-map checks know about anatomy (:func:`max_volume_ml`) and which scheme a set
of label values belongs to (:func:`schemes_explaining`). It imports nothing heavy (no torch): the Slicer module uses
it before the engine's dependencies are installed.
"""
from __future__ import annotations

import json
from types import MappingProxyType
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

from textscf.errors import CheckpointError, PromptError

# Region keys holding the name another tool gives the region.
_ALIAS_KEYS = ("totalsegmentator_name", "freesurfer_name")


@dataclass(frozen=True)
class Preset:
    """A named prompt set.

    Attributes:
        name: identifier, e.g. "abdomen-ct".
        title: human-readable description.
        modality: "ct" or "mri".
        template: prompt template with one "{}".
        region_names: names in region-index order 1..N-1 (index 0, the background, is implicit).
        label_values: the label value of each region in label maps.
        background_labels: label values known to carry no prompt, treated as background (with ``label_names``:
            every label of that table without a region, unless the file lists them).
        aliases: ``aliases[i]`` are the other names of region ``i`` (TotalSegmentator's, FreeSurfer's).
        label_names: the source's whole label table {value: name}, when the preset gives it.
        max_volumes_ml: ``max_volumes_ml[i]``: the largest plausible volume of region ``i`` in mL, or None.
    """

    name: str
    title: str
    modality: str
    template: str
    region_names: tuple[str, ...]
    label_values: tuple[int, ...]
    background_labels: tuple[int, ...] = field(default_factory=tuple)
    aliases: tuple[tuple[str, ...], ...] = field(default_factory=tuple)
    label_names: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    max_volumes_ml: tuple[float | None, ...] = field(default_factory=tuple)

    @property
    def known_labels(self) -> frozenset[int]:
        """Every label value this scheme gives a meaning (regions and background labels)."""
        return frozenset(self.label_values) | frozenset(self.background_labels) | frozenset(self.label_names)

    def describe_label(self, value: int) -> str:
        """``"5 (liver)"``: a label value with its meaning in this scheme."""
        if value in self.label_values:
            return f"{value} ({self.region_names[self.label_values.index(value)]})"
        if value in self.label_names:
            return f"{value} ({self.label_names[value]})"
        return str(value)


def _preset_dir():
    return resources.files("textscf") / "resources" / "presets"


def list_presets() -> list[str]:
    """Names of the bundled presets."""
    return sorted(p.name[: -len(".json")] for p in _preset_dir().iterdir() if p.name.endswith(".json"))


@lru_cache(maxsize=None)
def load_preset(name: str) -> Preset:
    """Load a bundled preset by name; PromptError lists the choices for an unknown name."""
    path = _preset_dir() / f"{name}.json"
    if not path.is_file():
        raise PromptError(f"unknown preset {name!r}; choose one of {', '.join(list_presets())}")
    data = json.loads(path.read_text())
    regions = data["regions"]
    values = tuple(int(r["label"]) for r in regions)
    label_names = {int(v): str(n) for v, n in data.get("label_names", {}).items()}
    if "background_labels" in data:
        background = tuple(int(v) for v in data["background_labels"])
    else:
        background = tuple(v for v in sorted(label_names) if v not in values)
    return Preset(
        name=data["name"],
        title=data["title"],
        modality=data["modality"],
        template=data["template"],
        region_names=tuple(r["name"] for r in regions),
        label_values=values,
        background_labels=background,
        aliases=tuple(tuple(str(r[k]) for k in _ALIAS_KEYS if r.get(k)) for r in regions),
        label_names=MappingProxyType(label_names),
        max_volumes_ml=tuple(float(r["max_volume_ml"]) if r.get("max_volume_ml") else None for r in regions),
    )


def normalized_name(name: str) -> str:
    """A region name compared loosely: case, '_' and '-' and repeated spaces ignored ("Kidney_Right" -> "kidney right")."""
    return " ".join(str(name).lower().replace("_", " ").replace("-", " ").split())


@lru_cache(maxsize=None)
def _canonical_names() -> dict[str, str]:
    """{normalized name or alias: region name} over every bundled preset (first preset wins)."""
    table: dict[str, str] = {}
    for preset_name in list_presets():
        preset = load_preset(preset_name)
        for region, aliases in zip(preset.region_names, preset.aliases or [()] * len(preset.region_names)):
            for name in (region, *aliases):
                table.setdefault(normalized_name(name), region)
    return table


def canonical_region_name(name: str) -> str:
    """The region name a preset uses for ``name`` or one of its aliases ("kidney_right" -> "right kidney",
    "Left-Hippocampus" -> "left hippocampus"); an unknown name comes back stripped."""
    return _canonical_names().get(normalized_name(name), str(name).strip())


def same_region(a: str, b: str) -> bool:
    """True when two names denote the same region (loosely compared, aliases resolved)."""
    return normalized_name(canonical_region_name(a)) == normalized_name(canonical_region_name(b))


def max_volume_ml(name: str) -> float | None:
    """The largest plausible volume (mL) of the region ``name`` (aliases resolved), or None when no preset says."""
    wanted = normalized_name(canonical_region_name(name))
    for preset_name in list_presets():
        preset = load_preset(preset_name)
        for region, limit in zip(preset.region_names, preset.max_volumes_ml):
            if limit is not None and normalized_name(region) == wanted:
                return limit
    return None


def schemes_explaining(values) -> list[Preset]:
    """The bundled presets whose label table gives a meaning to every value in ``values`` (0 excluded)."""
    values = {int(v) for v in values} - {0}
    return [p for p in map(load_preset, list_presets()) if values and values <= p.known_labels]


def totalsegmentator_to_btcv() -> dict[str, int]:
    """TotalSegmentator class name -> BTCV label value of the 13 abdominal organs (from the two presets)."""
    btcv = load_preset("abdomen-ct")
    total = load_preset("totalsegmentator")
    value_of = {normalized_name(n): v for n, v in zip(btcv.region_names, btcv.label_values)}
    return {aliases[0]: value_of[normalized_name(region)]
            for region, aliases in zip(total.region_names, total.aliases)}


def model_rows(model_region_names, region_names) -> tuple[list[int], list[str]]:
    """Rows of a one-hot model's text matrix for ``region_names`` and the names it does not know.

    ``rows[i]`` is the row (1-based: row 0 is the background) of ``region_names[i]`` among the model's regions;
    names are compared loosely and other tools' names resolved ("kidney_right" is the model's "right kidney").
    Unknown names are left out of ``rows`` and listed in the second value.
    """
    row_of = {normalized_name(canonical_region_name(n)): i + 1 for i, n in enumerate(model_region_names)}
    rows, unknown = [], []
    for name in region_names:
        key = normalized_name(canonical_region_name(name))
        if key in row_of:
            rows.append(row_of[key])
        else:
            unknown.append(name)
    return rows, unknown


#: The bundled default model, in resources/models (its model card beside it).
BUNDLED_MODEL = "abdomen-ct-onehot-ns8-8mm.pt"


def bundled_model_path() -> Path:
    """Path of the bundled default model (CheckpointError if this installation has none). No torch import."""
    path = Path(str(resources.files("textscf") / "resources" / "models" / BUNDLED_MODEL))
    if not path.is_file():
        raise CheckpointError(
            f"this installation has no bundled model ({path}); pass a checkpoint with --checkpoint "
            "(train one with `textscf train`)"
        )
    return path

"""Region presets: prompt sets stored as data in ``resources/presets/*.json``."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources

from textscf.errors import PromptError


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
        background_labels: label values known to carry no prompt, treated as background.
    """

    name: str
    title: str
    modality: str
    template: str
    region_names: tuple[str, ...]
    label_values: tuple[int, ...]
    background_labels: tuple[int, ...] = field(default_factory=tuple)


def _preset_dir():
    return resources.files("textscf") / "resources" / "presets"


def list_presets() -> list[str]:
    """Names of the bundled presets."""
    return sorted(p.name[: -len(".json")] for p in _preset_dir().iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> Preset:
    """Load a bundled preset by name; PromptError lists the choices for an unknown name."""
    path = _preset_dir() / f"{name}.json"
    if not path.is_file():
        raise PromptError(f"unknown preset {name!r}; choose one of {', '.join(list_presets())}")
    data = json.loads(path.read_text())
    regions = data["regions"]
    return Preset(
        name=data["name"],
        title=data["title"],
        modality=data["modality"],
        template=data["template"],
        region_names=tuple(r["name"] for r in regions),
        label_values=tuple(int(r["label"]) for r in regions),
        background_labels=tuple(int(v) for v in data.get("background_labels", [])),
    )

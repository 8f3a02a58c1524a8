"""What ``register()`` runs on a pair when the user does not say: the one home of the default schedule.

A schedule is the network (a trained checkpoint on its own grid, or a fresh network on a grid sized to the fixed
image and the device), whether the fixed image's regions drive it (textSCF) or the shared filter ``w_r`` alone does
(the plain LKU-Net, when no label map and no segmentor name the regions), and the refinement steps on the pair.
``textscf register`` without options, ``textscf demo`` and the Slicer module's Apply all run
:func:`default_schedule`; the report records the schedule that ran.

This module does not import torch, so the Slicer widget can describe the schedule before PyTorch is loaded.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, replace

# A trained network's field is where the refinement starts; what finishes the registration is the field optimised on
# the pair, coarse to fine (README benchmark): Adam on the displacement field at 1/4 then 1/2 of the field grid,
# MIND-SSC descriptors as the similarity.
CHECKPOINT_NETWORK_STEPS = 0
CHECKPOINT_FIELD_STEPS = 100
# A fresh network (a modality the bundled model does not cover): a field pyramid, no network steps.
FRESH_NETWORK_STEPS = 0
FRESH_FIELD_STEPS = 100
# The pyramid: the field's grid at each level, as the factor by which it is coarser than the model grid.
FIELD_LEVELS = (4, 2)
# A fresh network's grid is already 2x (or more) coarser than the fixed image, so its pyramid ends on that grid: on the
# real brain pair (30 small structures), local NCC at λ 1 with levels 1/4, 1/2 gave 71.6 % Dice, with 1/4, 1/2, 1
# 76.7 % (ANTs SyN 72.4 %); the last level costs about 4x the two coarser ones together.
FRESH_FIELD_LEVELS = (4, 2, 1)
# The field grid: a network trained on a coarse grid (8 mm) is refined on its grid subdivided to about this spacing
# (the same box, :meth:`textscf.spatial.ModelGrid.subdivided`), the spacing at which the pyramid was tuned (README).
REFINE_SPACING_MM = 4.0
# The similarity by modality ("auto"). CT: MIND-SSC self-similarity descriptors plus the intensity MSE (HU mean the
# same tissue in both scans); measured on 4 abdomen pairs and the real CT with a known field, MIND alone 44.4 % Dice
# and 2.18 mm endpoint error, MSE alone 45.9 % and 3.9 mm, both 46.3 % and 2.16 mm. MRI: MIND alone (intensities
# are not comparable between MRI scans): local NCC, which normalises the intensities in every 9-voxel window; on the
# real brain pair (fresh network, levels 1/4, 1/2, 1) MIND-SSC alone 69.6 % Dice, local NCC 76.7 % (both at their λ).
DEFAULT_SIMILARITY = {"ct": "mind+mse", "mri": "ncc"}
# λ of the ‖∇u‖² term by similarity: the terms differ in scale (an MSE of descriptors or of [0, 1] intensities is
# about 0.01-0.05; local NCC about -0.7), so one λ does not fit all. Local NCC on the brain pair: λ 0.1, 0.3, 1, 1.5,
# 2 gave 77.2, 77.4, 76.7, 76.0, 75.4 % Dice with 2.26, 1.32, 0.58, 0.38, 0.27 % |J|<=0: 1.5 is the smallest λ that
# keeps folding under 0.5 %.
SMOOTH_WEIGHT = {"ncc": 1.5}
DEFAULT_SMOOTH_WEIGHT = 0.1
# A fresh network sees the fixed image at half resolution or coarser, so that its grid stays under this many voxels
# (the brain benchmark's 80 x 96 x 112 grid is 0.86 M voxels: 150 + 50 steps in 258 s on a 2-core CPU).
FRESH_GRID_FACTOR = 2.0
FRESH_MAX_VOXELS = {"cpu": 1_000_000, "cuda": 8_000_000}

# Expected time: seconds per network step and model-grid voxel, measured on a 2-core CPU (about 1.2 s per step on the
# bundled model's 96 x 80 x 128 grid). A field step at half the model grid costs about a twentieth of a network step
# (eight times fewer voxels, no network), FIELD_STEP_COST * (2 / factor)^3 at another level; computing the descriptors
# costs about DESCRIPTOR_COST network steps. A CUDA GPU is assumed 20 times faster (an assumption, not a measurement:
# it only sizes the estimate shown before the run).
SECONDS_PER_STEP_AND_VOXEL_CPU = 1.3e-6
FIELD_STEP_COST = 0.05
DESCRIPTOR_COST = 2.0
GPU_SPEEDUP = 20.0


@dataclass(frozen=True)
class Schedule:
    """What a registration runs.

    Attributes:
        network: "checkpoint" (a trained model, on its own grid) or "fresh" (an untrained network refined on the pair).
        regions: True = textSCF (the fixed image's regions choose the filters); False = the shared filter ``w_r``
            alone (plain LKU-Net: every voxel background, confidence 0).
        network_steps: refinement steps on the network weights (0 = none; the network's forward pass alone when
            there are no field steps either).
        field_steps: steps on the displacement field itself at each level of the pyramid ``field_levels``.
        grid_shape: the model grid the network and the refinement run on.
        device: "cpu" or "cuda" (sizes the estimate and a fresh network's grid).
        estimated_seconds: the refinement's expected time (0 without refinement).
        chosen_by: "defaults" (this module) or "options" (the user set the steps).
        reason: one sentence: why this network.
        field_levels: the pyramid: factors by which each level's field grid is coarser than the field grid.
        similarity: the refinement's image term ("mind", "mse", "ncc"; "" = decided by the pipeline).
        network_start: the field steps start from the network's field (its forward pass after any network steps);
            False: from zero, without running the network.
        field_subdivision: the field steps run on the model grid subdivided this many times per axis (same box).
        smooth_weight: λ of the ‖∇u‖² term of the refinement (:func:`smooth_weight_for` the similarity, or the
            user's).
    """

    network: str
    regions: bool
    network_steps: int
    field_steps: int
    grid_shape: tuple[int, int, int]
    device: str
    estimated_seconds: float
    chosen_by: str = "defaults"
    reason: str = ""
    field_levels: tuple[int, ...] = FIELD_LEVELS
    similarity: str = ""
    network_start: bool = False
    field_subdivision: int = 1
    smooth_weight: float = DEFAULT_SMOOTH_WEIGHT

    @property
    def steps(self) -> int:
        """Every refinement step: network steps and field steps at all levels."""
        return self.network_steps + self.field_steps * len(self.field_levels)

    @property
    def uses_network(self) -> bool:
        """Whether the network runs: its forward pass alone, or refined; a field-only schedule skips it."""
        return self.network_steps > 0 or self.field_steps == 0 or self.network_start

    @property
    def field_grid_shape(self) -> tuple[int, int, int]:
        """The grid the field steps run on: the model grid subdivided ``field_subdivision`` times."""
        return tuple(int(n) * int(self.field_subdivision) for n in self.grid_shape)

    def describe(self) -> str:
        """One line for the user: network, regions, steps, grid, expected time."""
        kind = "the checkpoint's network" if self.network == "checkpoint" else "a fresh network"
        structure = "textSCF with the fixed image's regions" if self.regions else \
            "no regions: the shared filter w_r alone, i.e. plain LKU-Net"
        grid = "x".join(str(n) for n in self.grid_shape)
        field_grid = "x".join(str(n) for n in self.field_grid_shape)
        similarity = f", {SIMILARITY_NAMES.get(self.similarity, self.similarity)}" if self.similarity else ""
        similarity += f", smoothness λ {self.smooth_weight:g}"
        levels = ", ".join(f"1/{v}" if v > 1 else "1" for v in self.field_levels)
        field = (f"{self.field_steps} field steps at each of {levels} of the {field_grid} grid{similarity}"
                 if self.field_steps else "")
        if self.steps and self.network_steps:
            work = (f"{kind} ({structure}) refined on this pair: {self.network_steps} network steps"
                    + (f" on its {grid} grid, then {field}" if field else f" on a {grid} grid{similarity}"))
        elif self.steps and self.network_start:
            work = (f"{kind} ({structure}) on its {grid} grid, then its field optimised on this pair: {field}")
        elif self.steps:
            work = f"the displacement field optimised on this pair (no network): {field}"
        else:
            work = f"{kind} ({structure}), its forward pass alone on a {grid} grid (no refinement)"
        if self.steps:
            work += f"; {describe_duration(self.estimated_seconds)} on the {self.device.upper()}"
        text = f"{work}; schedule from the {self.chosen_by}"
        return f"{text} ({self.reason})" if self.reason else text

    def as_dict(self) -> dict:
        """For report.json."""
        out = asdict(self)
        out["grid_shape"] = list(self.grid_shape)
        out["field_levels"] = list(self.field_levels)
        out["field_grid_shape"] = list(self.field_grid_shape)
        out["estimated_seconds"] = round(self.estimated_seconds, 1)
        return out


def device_kind(device) -> str:
    """ "cuda" for any CUDA device (torch.device or text), else "cpu"."""
    return "cuda" if str(device).startswith("cuda") else "cpu"


SIMILARITY_NAMES = {"mind": "MIND-SSC descriptors", "mse": "intensity MSE", "ncc": "local NCC",
                    "mind+mse": "MIND-SSC descriptors + intensity MSE"}


def field_step_cost(factor: int) -> float:
    """Cost of one field step at pyramid level ``factor``, in network steps on a grid of the field grid's size."""
    return FIELD_STEP_COST * (2.0 / float(factor)) ** 3


def estimate_refine_seconds(grid_shape, network_steps: int, field_steps: int, device="cpu",
                            field_levels=FIELD_LEVELS, field_subdivision: int = 1) -> float:
    """Expected seconds of ``network_steps`` network steps on a model grid of ``grid_shape`` and ``field_steps``
    field steps at each of ``field_levels`` on that grid subdivided ``field_subdivision`` times (the forward pass
    that starts the field steps is not counted: a fraction of one network step)."""
    voxels = float(math.prod(int(n) for n in grid_shape))
    field_voxels = voxels * int(field_subdivision) ** 3
    field = int(field_steps) * sum(field_step_cost(v) for v in field_levels)
    cost = voxels * int(network_steps) + field_voxels * field
    if int(network_steps) + int(field_steps) > 0:
        cost += DESCRIPTOR_COST * (field_voxels if int(field_steps) > 0 else voxels)
    seconds = cost * SECONDS_PER_STEP_AND_VOXEL_CPU
    return seconds / GPU_SPEEDUP if device_kind(device) == "cuda" else seconds


def field_subdivision_for(spacing) -> int:
    """How many times the model grid is subdivided for the field steps: to about :data:`REFINE_SPACING_MM`."""
    if spacing is None:
        return 1
    return max(1, int(round(max(float(v) for v in spacing) / REFINE_SPACING_MM)))


def describe_duration(seconds: float) -> str:
    if seconds < 90:
        return f"about {int(round(max(seconds, 1.0)))} s"
    return f"about {int(round(seconds / 60.0))} min"


def fresh_grid_factor(fixed_size, device="cpu") -> float:
    """How much coarser than the fixed image a fresh network's grid is: 2, or more for large images."""
    voxels = float(math.prod(int(n) for n in fixed_size))
    budget = FRESH_MAX_VOXELS[device_kind(device)]
    return max(FRESH_GRID_FACTOR, (voxels / budget) ** (1.0 / 3.0))


def fresh_grid_shape(fixed_size, factor: float) -> tuple[int, int, int]:
    """A fresh network's grid for a fixed image of ``fixed_size`` voxels seen ``factor`` times coarser (multiples of 16)."""
    return tuple(int(16 * math.ceil(int(n) / factor / 16)) for n in fixed_size)


def fresh_grid_for(fixed_size, device="cpu") -> tuple[int, int, int]:
    """The grid of a fresh network for a fixed image of ``fixed_size`` voxels on ``device``."""
    return fresh_grid_shape(fixed_size, fresh_grid_factor(fixed_size, device))


def similarity_for(modality: str, choice: str = "auto") -> str:
    """The refinement's image term: ``choice``, or for "auto" the default for ``modality`` ("ct" or "mri")."""
    if choice != "auto":
        return choice
    return DEFAULT_SIMILARITY.get(modality, "mind")


def smooth_weight_for(similarity: str, choice: float | None = None) -> float:
    """λ of the refinement's ‖∇u‖² term: ``choice``, or for None the default for ``similarity`` (its scale)."""
    if choice is not None:
        return float(choice)
    return SMOOTH_WEIGHT.get(similarity, DEFAULT_SMOOTH_WEIGHT)


def default_schedule(network: str, grid_shape, device="cpu", has_regions: bool = True, reason: str = "",
                     similarity: str = "", grid_spacing=None, smooth_weight: float | None = None) -> Schedule:
    """The schedule that gives the best result the model in use can give.

    Args:
        network: "checkpoint" (a trained model) or "fresh" (an untrained network, refined from scratch).
        grid_shape: the model grid: the checkpoint's, or for a fresh network :func:`fresh_grid_for` the fixed image.
        device: where it runs ("cpu", "cuda", a torch.device).
        has_regions: whether a label map or a segmentor names the fixed image's regions.
        reason: why this network (recorded with the schedule).
        similarity: the image term the refinement uses (recorded and printed; see :func:`similarity_for`).
        grid_spacing: the model grid's spacing (mm): a trained network's coarse grid is subdivided for the field
            steps (:func:`field_subdivision_for`); None keeps the model grid.
        smooth_weight: the user's λ; None = :func:`smooth_weight_for` the similarity.
    """
    if network not in ("checkpoint", "fresh"):
        raise ValueError(f"network must be 'checkpoint' or 'fresh', not {network!r}")
    device = device_kind(device)
    grid = tuple(int(n) for n in grid_shape)
    trained = network == "checkpoint"
    steps, field_steps = ((CHECKPOINT_NETWORK_STEPS, CHECKPOINT_FIELD_STEPS) if trained
                          else (FRESH_NETWORK_STEPS, FRESH_FIELD_STEPS))
    # a trained network's field starts the field steps; a fresh network's would be about zero
    subdivision = field_subdivision_for(grid_spacing) if trained else 1
    levels = FIELD_LEVELS if trained else FRESH_FIELD_LEVELS
    return Schedule(network, bool(has_regions), steps, field_steps, grid, device,
                    estimate_refine_seconds(grid, steps, field_steps, device, levels, subdivision), "defaults",
                    reason, levels, similarity, network_start=trained, field_subdivision=subdivision,
                    smooth_weight=smooth_weight_for(similarity, smooth_weight))


def with_steps(schedule: Schedule, network_steps: int | None, field_steps: int | None) -> Schedule:
    """``schedule`` with the steps the user set (None keeps the default); records who chose.

    ``--refine 0`` alone (network steps 0, field steps not given) is the network's forward pass alone; network steps
    without field steps keep the schedule's field steps after them.
    """
    if network_steps is None and field_steps is None:
        return schedule
    steps = schedule.network_steps if network_steps is None else int(network_steps)
    if field_steps is None:
        field_steps = 0 if network_steps == 0 else schedule.field_steps
    fields = int(field_steps)
    seconds = estimate_refine_seconds(schedule.grid_shape, steps, fields, schedule.device, schedule.field_levels,
                                      schedule.field_subdivision)
    return replace(schedule, network_steps=steps, field_steps=fields, estimated_seconds=seconds, chosen_by="options")


def takes_seconds_left(callback) -> bool:
    """Whether a progress callback takes the third argument (seconds left); older ones take (stage, fraction).
    (The progress contract: docs/ARCHITECTURE.md, "Progress".)"""
    try:
        inspect.signature(callback).bind("stage", 0.0, None)
    except (TypeError, ValueError):  # ValueError: no signature to inspect (some builtins)
        return False
    return True

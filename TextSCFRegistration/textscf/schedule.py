"""What ``register()`` runs on a pair when the user does not say: the one home of the default schedule.

A schedule is the network (a trained checkpoint on its own grid, or a fresh network on a grid sized to the fixed
image and the device), whether the fixed image's regions drive it (textSCF) or the shared filter ``w_r`` alone does
(the plain LKU-Net, when no label map and no segmentor name the regions), and the refinement steps on the pair.
``textscf register`` without options, ``textscf demo`` and the Slicer module's Apply all run
:func:`default_schedule`; the report records the schedule that ran.

This module does not import torch, so the Slicer widget can describe the schedule before PyTorch is loaded.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# The bundled network is only weakly trained (its model card): alone it barely moves the images. Refining it on the
# pair is what registers (README: 12 network + 30 field steps), until a better network ships.
CHECKPOINT_NETWORK_STEPS = 12
CHECKPOINT_FIELD_STEPS = 30
# A fresh network refined from scratch: the settings that registered the real brain MRI pair in the README benchmark.
FRESH_NETWORK_STEPS = 150
FRESH_FIELD_STEPS = 50
# A fresh network sees the fixed image at half resolution or coarser, so that its grid stays under this many voxels
# (the brain benchmark's 80 x 96 x 112 grid is 0.86 M voxels: 150 + 50 steps in 258 s on a 2-core CPU).
FRESH_GRID_FACTOR = 2.0
FRESH_MAX_VOXELS = {"cpu": 1_000_000, "cuda": 8_000_000}

# Expected time: seconds per network step and model-grid voxel, measured on a 2-core CPU (about 1.2 s per step on the
# bundled model's 96 x 80 x 128 grid). A field step costs about a fifth of a network step. A CUDA GPU is assumed 20 times
# faster (an assumption, not a measurement: it only sizes the estimate shown before the run).
SECONDS_PER_STEP_AND_VOXEL_CPU = 1.3e-6
FIELD_STEP_COST = 0.2
GPU_SPEEDUP = 20.0


@dataclass(frozen=True)
class Schedule:
    """What a registration runs.

    Attributes:
        network: "checkpoint" (a trained model, on its own grid) or "fresh" (an untrained network refined on the pair).
        regions: True = textSCF (the fixed image's regions choose the filters); False = the shared filter ``w_r``
            alone (plain LKU-Net: every voxel background, confidence 0).
        network_steps: refinement steps on the network weights (0 = the network's forward pass alone).
        field_steps: refinement steps on the half-resolution displacement field afterwards.
        grid_shape: the model grid the network and the refinement run on.
        device: "cpu" or "cuda" (sizes the estimate and a fresh network's grid).
        estimated_seconds: the refinement's expected time (0 without refinement).
        chosen_by: "defaults" (this module) or "options" (the user set the steps).
        reason: one sentence: why this network.
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

    @property
    def steps(self) -> int:
        return self.network_steps + self.field_steps

    def describe(self) -> str:
        """One line for the user: network, regions, steps, grid, expected time."""
        kind = "the checkpoint's network" if self.network == "checkpoint" else "a fresh network"
        structure = "textSCF with the fixed image's regions" if self.regions else \
            "no regions: the shared filter w_r alone, i.e. plain LKU-Net"
        grid = "x".join(str(n) for n in self.grid_shape)
        if self.steps:
            work = (f"refined on this pair: {self.network_steps} network + {self.field_steps} field steps on a {grid} "
                    f"grid, {describe_duration(self.estimated_seconds)} on the {self.device.upper()}")
        else:
            work = f"its forward pass alone on a {grid} grid (no refinement)"
        text = f"{kind} ({structure}), {work}; schedule from the {self.chosen_by}"
        return f"{text} ({self.reason})" if self.reason else text

    def as_dict(self) -> dict:
        """For report.json."""
        out = asdict(self)
        out["grid_shape"] = list(self.grid_shape)
        out["estimated_seconds"] = round(self.estimated_seconds, 1)
        return out


def device_kind(device) -> str:
    """ "cuda" for any CUDA device (torch.device or text), else "cpu"."""
    return "cuda" if str(device).startswith("cuda") else "cpu"


def estimate_refine_seconds(grid_shape, network_steps: int, field_steps: int, device="cpu") -> float:
    """Expected seconds of ``network_steps`` + ``field_steps`` refinement steps on a model grid of ``grid_shape``."""
    voxels = float(math.prod(int(n) for n in grid_shape))
    seconds = voxels * SECONDS_PER_STEP_AND_VOXEL_CPU * (int(network_steps) + FIELD_STEP_COST * int(field_steps))
    return seconds / GPU_SPEEDUP if device_kind(device) == "cuda" else seconds


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


def default_schedule(network: str, grid_shape, device="cpu", has_regions: bool = True, reason: str = "") -> Schedule:
    """The schedule that gives the best result the model in use can give.

    Args:
        network: "checkpoint" (a trained model) or "fresh" (an untrained network, refined from scratch).
        grid_shape: the model grid: the checkpoint's, or for a fresh network :func:`fresh_grid_for` the fixed image.
        device: where it runs ("cpu", "cuda", a torch.device).
        has_regions: whether a label map or a segmentor names the fixed image's regions.
        reason: why this network (recorded with the schedule).
    """
    if network not in ("checkpoint", "fresh"):
        raise ValueError(f"network must be 'checkpoint' or 'fresh', not {network!r}")
    device = device_kind(device)
    grid = tuple(int(n) for n in grid_shape)
    steps, field_steps = ((FRESH_NETWORK_STEPS, FRESH_FIELD_STEPS) if network == "fresh"
                          else (CHECKPOINT_NETWORK_STEPS, CHECKPOINT_FIELD_STEPS))
    return Schedule(network, bool(has_regions), steps, field_steps, grid, device,
                    estimate_refine_seconds(grid, steps, field_steps, device), "defaults", reason)


def with_steps(schedule: Schedule, network_steps: int | None, field_steps: int | None) -> Schedule:
    """``schedule`` with the steps the user set (None keeps the default); records who chose.

    Network steps 0 without field steps means the network's forward pass alone (``--refine 0``).
    """
    if network_steps is None and field_steps is None:
        return schedule
    steps = schedule.network_steps if network_steps is None else int(network_steps)
    if field_steps is None:
        field_steps = 0 if steps == 0 else schedule.field_steps
    fields = int(field_steps)
    return Schedule(schedule.network, schedule.regions, steps, fields, schedule.grid_shape, schedule.device,
                    estimate_refine_seconds(schedule.grid_shape, steps, fields, schedule.device), "options",
                    schedule.reason)

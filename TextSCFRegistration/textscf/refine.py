"""Instance optimisation: refine a textSCF network on the pair at hand.

The network's weights (all of them, or only the head and the last decoder layers) are optimised on the paper's
loss for this one pair, starting from a checkpoint or from a fresh initialisation. The output keeps the textSCF
structure: filters still follow the fixed image's regions, so the field may stay discontinuous at organ
boundaries. Optionally a last few iterations act on the half-resolution displacement field itself.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from textscf.errors import InputError
from textscf.losses import RegistrationLoss, one_hot_regions
from textscf.networks.textscf_net import TextSCFNet
from textscf.schedule import FIELD_STEP_COST
from textscf.warp import SpatialTransformer, resize_field

PARAMETER_GROUPS = ("all", "head")
# "head" also adapts the decoder layers that feed it.
_HEAD_GROUP_PREFIXES = ("head.", "backbone.dc5.", "backbone.dc6.", "backbone.up3.")


@dataclass
class RefineSettings:
    """Settings of :func:`refine_on_pair`.

    Attributes:
        iterations: maximum optimisation steps on the network weights.
        learning_rate: Adam learning rate for the weights.
        smooth_weight: λ of the ‖∇u‖² term.
        dice_weight: weight of the Dice term (used only when the moving regions are given).
        similarity: "mse" (same modality and scanner) or "ncc" (local NCC, window ``ncc_window``).
        parameters: "all" weights or only the "head" and the last decoder layers.
        field_iterations: extra steps on the half-resolution displacement field itself (0 = none).
        field_learning_rate: Adam learning rate for those steps (voxels).
        patience: stop when the smoothed loss has not improved by ``min_improvement`` (relative) for this many steps.
        min_improvement: relative improvement that counts as progress.
        seed: seeds torch, so the same inputs give the same field on the CPU.
        show_progress: draw a tqdm bar.
    """

    iterations: int = 100
    learning_rate: float = 1e-4
    smooth_weight: float = 0.1
    dice_weight: float = 1.0
    similarity: str = "mse"
    ncc_window: int = 9
    parameters: str = "all"
    field_iterations: int = 0
    field_learning_rate: float = 0.05
    patience: int = 25
    min_improvement: float = 1e-3
    seed: int = 0
    show_progress: bool = False


@dataclass
class RefineResult:
    """What refinement gives: the field on the model grid and how the optimisation went."""

    displacement: np.ndarray  # (3, I, J, K) voxels of the model grid
    losses: list[float] = field(default_factory=list)
    iterations_run: int = 0
    field_iterations_run: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    network: TextSCFNet | None = None

    def summary(self) -> dict:
        return {
            "iterations": self.iterations_run,
            "field_iterations": self.field_iterations_run,
            "stopped_early": self.stopped_early,
            "loss_first": self.losses[0] if self.losses else None,
            "loss_last": self.losses[-1] if self.losses else None,
            "seconds": round(self.seconds, 3),
            "seconds_per_iteration": round(self.seconds / max(1, self.iterations_run + self.field_iterations_run), 4),
        }


class _Plateau:
    """Early stopping on an exponentially smoothed loss."""

    def __init__(self, patience: int, min_improvement: float):
        self.patience, self.min_improvement = patience, min_improvement
        self.smoothed = None
        self.best = math.inf
        self.since_best = 0

    def update(self, loss: float) -> bool:
        self.smoothed = loss if self.smoothed is None else 0.8 * self.smoothed + 0.2 * loss
        if self.smoothed < self.best - self.min_improvement * abs(self.best if math.isfinite(self.best) else loss):
            self.best, self.since_best = self.smoothed, 0
        else:
            self.since_best += 1
        return self.patience > 0 and self.since_best >= self.patience


class _Pace:
    """Steps done and seconds left across the two phases (network steps, then field steps)."""

    def __init__(self, network_steps: int, field_steps: int):
        self.planned = {"network": network_steps, "field": field_steps}
        self.counted = {"network": 0, "field": 0}  # steps run, or skipped by an early stop
        self.timed = {"network": [0, 0.0], "field": [0, 0.0]}  # steps run and their seconds

    @property
    def done(self) -> int:
        return sum(self.counted.values())

    def step_done(self, phase: str, seconds: float) -> None:
        self.counted[phase] += 1
        self.timed[phase][0] += 1
        self.timed[phase][1] += seconds

    def skip_rest(self, phase: str) -> None:
        self.counted[phase] = self.planned[phase]

    def _seconds_per_step(self, phase: str) -> float | None:
        steps, seconds = self.timed[phase]
        if steps:
            return seconds / steps
        network = self._seconds_per_step("network") if phase == "field" else None
        return None if network is None else FIELD_STEP_COST * network

    def seconds_left(self) -> float | None:
        total = 0.0
        for phase in ("network", "field"):
            remaining = self.planned[phase] - self.counted[phase]
            if remaining > 0:
                per_step = self._seconds_per_step(phase)
                if per_step is None:
                    return None
                total += remaining * per_step
        return total


def reset_weights(net: TextSCFNet, seed: int) -> None:
    """A fresh initialisation (the authors' scheme: default layers, near-zero output layer)."""
    net.initialise("reference", seed)


def _trainable(net: TextSCFNet, group: str) -> list[torch.nn.Parameter]:
    if group not in PARAMETER_GROUPS:
        raise InputError(f"unknown parameter group {group!r}; choose one of {PARAMETER_GROUPS}")
    params = []
    for name, p in net.named_parameters():
        use = group == "all" or name.startswith(_HEAD_GROUP_PREFIXES)
        p.requires_grad_(use)
        if use:
            params.append(p)
    return params


def refine_on_pair(
    net: TextSCFNet,
    moving: np.ndarray,
    fixed: np.ndarray,
    fixed_regions: np.ndarray,
    confidence: np.ndarray | None = None,
    moving_regions: np.ndarray | None = None,
    settings: RefineSettings | None = None,
    device: torch.device | str = "cpu",
    cancel: Callable[[], None] | None = None,
    progress: Callable[[int, int, float | None], None] | None = None,
    fresh: bool = False,
) -> RefineResult:
    """Optimise a copy of ``net`` on one pair; ``net`` itself is left unchanged.

    Args:
        net: the starting model (its weights are copied).
        moving, fixed: ``(I, J, K)`` float32 in [0, 1] on the model grid.
        fixed_regions: ``(I, J, K)`` int rows of the text matrix (the fixed image's regions).
        confidence: ``(I, J, K)`` in [0, 1] or None (1).
        moving_regions: ``(I, J, K)`` int, the moving image's regions on the same grid; adds the Dice term.
        settings: :class:`RefineSettings`.
        cancel: called before every step; it raises to stop (e.g. :class:`textscf.errors.CancelledError`).
        progress: called after every step as ``progress(steps_done, total_steps, seconds_left)``: steps of both
            phases, those skipped by an early stop counted as done (so it only grows); seconds left from the pace
            measured so far (None before the first step).
        fresh: start from a fresh initialisation instead of ``net``'s weights.

    Returns:
        :class:`RefineResult` with the refined displacement ``(3, I, J, K)`` in model-grid voxels.
    """
    settings = settings or RefineSettings()
    if settings.iterations < 0 or settings.field_iterations < 0:
        raise InputError("refinement iterations must be >= 0")
    device = torch.device(device)
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    model = copy.deepcopy(net).to(device).train()
    if fresh:
        reset_weights(model, settings.seed)

    def t(a, dtype=torch.float32):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)[None, None]

    m, f = t(moving), t(fixed)
    regions = t(fixed_regions, torch.long)
    p = None if confidence is None else t(confidence)
    n = model.num_regions
    use_dice = moving_regions is not None and settings.dice_weight > 0
    fixed_onehot = moving_onehot = None
    if use_dice:
        fixed_onehot = one_hot_regions(regions, n)
        moving_onehot = one_hot_regions(t(moving_regions, torch.long), n)
        present = (fixed_onehot.sum((0, 2, 3, 4)) > 0) | (moving_onehot.sum((0, 2, 3, 4)) > 0)
        present[0] = True  # keep the background channel where soft_dice_loss expects it
        fixed_onehot, moving_onehot = fixed_onehot[:, present], moving_onehot[:, present]
    criterion = RegistrationLoss(settings.similarity, settings.dice_weight if use_dice else 0.0,
                                 settings.smooth_weight, ncc_window=settings.ncc_window)
    label_warp = SpatialTransformer()

    def loss_of(displacement, warped, regularised):
        warped_onehot = label_warp(moving_onehot, displacement) if use_dice else None
        total, _ = criterion(warped, f, regularised, warped_onehot, fixed_onehot if use_dice else None)
        return total

    result = RefineResult(displacement=np.zeros((3,) + tuple(fixed.shape), np.float32))
    total_steps = settings.iterations + settings.field_iterations
    bar = None
    if settings.show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc="refine", unit="it", leave=False)

    pace = _Pace(settings.iterations, settings.field_iterations)

    def optimise(parameters, learning_rate, iterations, loss_fn, phase: str) -> tuple[int, bool]:
        """Adam steps on ``loss_fn()`` until ``iterations`` or a plateau; returns (steps run, stopped early)."""
        optimiser = torch.optim.Adam(parameters, lr=learning_rate)
        plateau = _Plateau(settings.patience, settings.min_improvement)
        for step in range(iterations):
            if cancel is not None:
                cancel()
            started = time.perf_counter()
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            optimiser.step()
            value = float(loss.detach())
            result.losses.append(value)
            pace.step_done(phase, time.perf_counter() - started)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4g}")
            stop = plateau.update(value)
            if stop:
                pace.skip_rest(phase)
            if progress is not None:
                progress(pace.done, total_steps, pace.seconds_left())
            if stop:
                return step + 1, True
        return iterations, False

    def network_loss():
        out = model(m, f, regions, p)
        return loss_of(out.displacement, out.warped, out.regularised_field)

    try:
        result.iterations_run, result.stopped_early = optimise(
            _trainable(model, settings.parameters), settings.learning_rate, settings.iterations, network_loss,
            "network")
        model.eval()
        with torch.no_grad():
            displacement = model(m, f, regions, p).displacement.detach()

        if settings.field_iterations > 0:
            size = tuple(fixed.shape)
            half = torch.nn.Parameter(resize_field(displacement, tuple(s // 2 for s in size)))
            transformer = SpatialTransformer()

            def field_loss():
                full = resize_field(half, size)
                return loss_of(full, transformer(m, full), full)

            result.field_iterations_run, _ = optimise([half], settings.field_learning_rate,
                                                      settings.field_iterations, field_loss, "field")
            displacement = resize_field(half.detach(), size)
    finally:
        if bar is not None:
            bar.close()

    result.displacement = displacement[0].cpu().numpy().astype(np.float32)
    result.seconds = time.perf_counter() - start
    for prm in model.parameters():
        prm.requires_grad_(True)
    result.network = model.eval()
    return result

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
import torch.nn.functional as F

from textscf.errors import InputError
from textscf.losses import RegistrationLoss, one_hot_regions
from textscf.networks.textscf_net import TextSCFNet
from textscf.schedule import field_step_cost
from textscf.warp import SpatialTransformer, resize_field

PARAMETER_GROUPS = ("all", "head")
SIMILARITIES = ("mse", "ncc", "mind", "mind+mse")
# "head" also adapts the decoder layers that feed it.
_HEAD_GROUP_PREFIXES = ("head.", "backbone.dc5.", "backbone.dc6.", "backbone.up3.")


@dataclass
class RefineSettings:
    """Settings of :func:`refine_on_pair`.

    Two phases, each optional: network steps (Adam on the network's weights, the textSCF structure kept), then field
    steps (Adam on the displacement field itself, coarse to fine over ``field_levels``, starting from the network's
    field when there were network steps, else from zero).

    Attributes:
        iterations: maximum optimisation steps on the network weights (0 = none).
        learning_rate: Adam learning rate for the weights.
        smooth_weight: λ of the ‖∇u‖² term (voxels of the grid the field lives on).
        dice_weight: weight of the Dice term (used only when the moving regions are given).
        similarity: the image term: "mind" (MSE of MIND-SSC descriptors, :mod:`textscf.mind`), "mse" (same modality
            and scanner), "mind+mse" (both, the intensity term weighted ``intensity_weight``) or "ncc" (local NCC,
            window ``ncc_window``).
        parameters: "all" weights or only the "head" and the last decoder layers.
        field_iterations: maximum steps on the displacement field at each pyramid level (0 = none).
        field_learning_rate: Adam learning rate for those steps (voxels of the level's grid).
        field_levels: the pyramid, coarse to fine: each level's field grid is the model grid coarsened by this
            factor (images or descriptors average-pooled to it).
        field_smooth_weight: λ for the field steps; None = ``smooth_weight``.
        field_smoothing: passes of a 3x3x3 box mean over the field inside the loss (the optimised field is the
            smoothed parameter, as ConvexAdam does: fewer folds than a larger λ for the same alignment).
        field_similarity: image term of the field steps; None = ``similarity``.
        field_sample_fraction: share of a level's voxels (drawn anew every step) at which the MIND or MSE term is
            evaluated (1 = all); NCC always uses every voxel.
        boundary_weight: weight of ‖∇u‖² across a boundary between two of the fixed image's regions (1 = a plain
            diffusion regulariser; < 1 lets the field slide there, as textSCF's region filters do).
        network_start: without network steps, still start the field steps from the network's forward pass
            (False: from the zero field, without running the network).
        mind_radius, mind_dilation: MIND-SSC patch radius and neighbour distance (model-grid voxels).
        mind_factor: compute the descriptors on the images pooled by this factor (1 = the model grid).
        intensity_weight: with "mind+mse", the intensity MSE's weight relative to the descriptors' MSE.
        patience: stop a phase (or a pyramid level) when the smoothed loss has not improved by ``min_improvement``
            (relative) for this many steps; 0 = never.
        min_improvement: relative improvement that counts as progress.
        seed: seeds torch (and the voxel sampling), so the same inputs give the same field on the CPU.
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
    field_learning_rate: float = 0.1
    field_levels: tuple[int, ...] = (4, 2)
    field_smooth_weight: float | None = None
    field_smoothing: int = 1
    field_similarity: str | None = None
    field_sample_fraction: float = 0.25
    field_samples: int = 0
    boundary_weight: float = 1.0
    network_start: bool = False
    mind_radius: int = 1
    mind_dilation: int = 2
    mind_factor: int = 1
    intensity_weight: float = 1.0
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
    """Steps done and seconds left across the phases (network steps, then field steps at each pyramid level).

    ``phases`` maps a phase name to ``(planned steps, relative cost of one step)``; the seconds left are the remaining
    steps' cost at the rate measured over the steps run so far (None before the first step).
    """

    def __init__(self, phases: dict[str, tuple[int, float]]):
        self.planned = {name: int(steps) for name, (steps, _) in phases.items()}
        self.cost = {name: float(cost) for name, (_, cost) in phases.items()}
        self.counted = dict.fromkeys(self.planned, 0)  # steps run, or skipped by an early stop
        self.seconds = 0.0
        self.cost_done = 0.0

    @property
    def total(self) -> int:
        return sum(self.planned.values())

    @property
    def done(self) -> int:
        return sum(self.counted.values())

    def step_done(self, phase: str, seconds: float) -> None:
        self.counted[phase] += 1
        self.seconds += seconds
        self.cost_done += self.cost[phase]

    def skip_rest(self, phase: str) -> None:
        self.counted[phase] = self.planned[phase]

    def seconds_left(self) -> float | None:
        if self.cost_done <= 0:
            return None
        rate = self.seconds / self.cost_done
        return sum(max(self.planned[p] - self.counted[p], 0) * self.cost[p] * rate for p in self.planned)


def _warper(shape, device, padding_mode="border"):
    """``warp(x, u, at=None) = x(p + u(p))`` on a grid of ``shape`` (u in voxels of that grid, grid_sample with
    align_corners); with ``at`` (flat voxel indices) only at those voxels, as ``(B, C, N)``."""
    axes = [torch.linspace(-1.0, 1.0, n, device=device) if n > 1 else torch.zeros(1, device=device) for n in shape]
    base = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)[None]  # (1, I, J, K, 3) along axes i, j, k
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in shape], device=device)

    def warp(x, u, at=None):
        if at is None:
            grid = (base + u.permute(0, 2, 3, 4, 1) * scale).flip(-1)  # grid_sample wants (k, j, i)
            return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)
        points = base.reshape(1, -1, 3)[:, at] + u.flatten(2)[:, :, at].transpose(1, 2) * scale
        grid = points.flip(-1).reshape(1, 1, 1, -1, 3)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)
        return out.reshape(x.shape[0], x.shape[1], -1)

    return warp


def _pool(x, factor):
    return x if factor == 1 else F.avg_pool3d(x, factor, stride=factor, ceil_mode=True)


def _smooth(u, passes):
    """``passes`` times the mean over a 3x3x3 box (replicate padding)."""
    from textscf.mind import box_mean

    for _ in range(passes):
        u = box_mean(u, 1)
    return u


def _boundary_weights(regions, shape, weight):
    """Per-axis weights of the forward differences: 1 inside a region, ``weight`` across a region boundary."""
    r = F.interpolate(regions.float(), size=tuple(shape), mode="nearest")
    out = []
    for axis in range(3):
        a = r.narrow(2 + axis, 1, r.shape[2 + axis] - 1)
        b = r.narrow(2 + axis, 0, r.shape[2 + axis] - 1)
        out.append(torch.where(a == b, 1.0, float(weight)).float())
    return out


def _weighted_gradient_loss(u, weights):
    total = 0.0
    for axis in range(3):
        d = u.narrow(2 + axis, 1, u.shape[2 + axis] - 1) - u.narrow(2 + axis, 0, u.shape[2 + axis] - 1)
        d2 = d.pow(2)
        total = total + (d2 if weights is None else d2 * weights[axis]).mean()
    return total / 3.0


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
    start: np.ndarray | None = None,
    weight: np.ndarray | None = None,
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
        start: ``(3, I, J, K)`` voxels of this grid: the field steps start from it (a network's field brought from
            its own grid); needs ``settings.iterations == 0``, as the network does not run on this grid.
        weight: ``(I, J, K)`` in [0, 1] or None (1): how much each voxel counts in the field steps' MSE-type
            similarity (MSE, MIND); 0 where either image has no data (``pipeline.overlap_weight``). Local NCC and
            the network steps count every voxel.

    Returns:
        :class:`RefineResult` with the refined displacement ``(3, I, J, K)`` in model-grid voxels.
    """
    settings = settings or RefineSettings()
    _check_settings(settings)
    if weight is not None and tuple(weight.shape) != tuple(fixed.shape):
        raise InputError(f"the similarity weight must have the grid's shape {tuple(fixed.shape)}, got "
                         f"{tuple(weight.shape)}")
    if start is not None and (settings.iterations > 0 or tuple(start.shape) != (3,) + tuple(fixed.shape)):
        raise InputError(f"a start field needs 0 network steps and the shape (3,) + {tuple(fixed.shape)}; got "
                         f"{settings.iterations} steps and {tuple(start.shape)}")
    device = torch.device(device)
    began = time.perf_counter()
    torch.manual_seed(settings.seed)
    model = copy.deepcopy(net).to(device).train()
    if fresh:
        reset_weights(model, settings.seed)
    pair = _Pair(model, moving, fixed, fixed_regions, confidence, moving_regions, settings, device, weight)
    result = RefineResult(displacement=np.zeros((3,) + tuple(fixed.shape), np.float32))
    loop = _Loop(settings, result, cancel, progress)
    try:
        if start is not None:
            displacement = torch.from_numpy(np.ascontiguousarray(start, np.float32))[None].to(device)
        elif settings.iterations > 0 or settings.network_start or settings.field_iterations == 0:
            displacement = _network_phase(model, pair, settings, loop)
        else:
            displacement = torch.zeros((1, 3) + tuple(fixed.shape), device=device)
        if settings.field_iterations > 0:
            displacement = _field_pyramid(displacement, pair, settings, loop)
    finally:
        loop.close()
    result.displacement = displacement[0].cpu().numpy().astype(np.float32)
    result.seconds = time.perf_counter() - began
    for prm in model.parameters():
        prm.requires_grad_(True)
    result.network = model.eval()
    return result


def _check_settings(settings: RefineSettings) -> None:
    if settings.iterations < 0 or settings.field_iterations < 0:
        raise InputError("refinement iterations must be >= 0")
    if settings.field_iterations > 0 and (not settings.field_levels or any(
            isinstance(v, bool) or int(v) != v or int(v) < 1 for v in settings.field_levels)):
        raise InputError(f"the field pyramid's levels must be whole factors >= 1 (e.g. (4, 2)), got "
                         f"{settings.field_levels!r}")
    if not 0.0 < settings.field_sample_fraction <= 1.0 or settings.field_samples < 0:
        raise InputError("the field steps' voxel sample must be a fraction in (0, 1] and a count >= 0 (0 = all)")
    if not settings.boundary_weight >= 0.0:
        raise InputError(f"the boundary weight must be >= 0, got {settings.boundary_weight!r}")
    for name, similarity in (("similarity", settings.similarity),
                             ("field similarity", settings.field_similarity or settings.similarity)):
        if similarity not in SIMILARITIES:
            raise InputError(f"unknown {name} {similarity!r}; choose one of {SIMILARITIES}")


class _Pair:
    """The pair as tensors on the device ``(1, 1, I, J, K)``, the one-hot label maps of the Dice term (only the
    regions present in either), and what the similarity compares, computed once per (similarity, pooling)."""

    def __init__(self, model, moving, fixed, fixed_regions, confidence, moving_regions, settings, device,
                 weight=None):
        def t(a, dtype=torch.float32):
            return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)[None, None]

        self.settings, self.device, self.shape = settings, device, tuple(fixed.shape)
        self.m, self.f = t(moving), t(fixed)
        self.regions = t(fixed_regions, torch.long)
        self.p = None if confidence is None else t(confidence)
        self.weight = None if weight is None else t(weight)
        self.use_dice = moving_regions is not None and settings.dice_weight > 0
        self.fixed_onehot = self.moving_onehot = None
        if self.use_dice:
            n = model.num_regions
            fixed_onehot = one_hot_regions(self.regions, n)
            moving_onehot = one_hot_regions(t(moving_regions, torch.long), n)
            present = (fixed_onehot.sum((0, 2, 3, 4)) > 0) | (moving_onehot.sum((0, 2, 3, 4)) > 0)
            present[0] = True  # keep the background channel where soft_dice_loss expects it
            self.fixed_onehot, self.moving_onehot = fixed_onehot[:, present], moving_onehot[:, present]
        self.field_similarity = settings.field_similarity or settings.similarity
        self._features = {}

    def features(self, similarity: str, factor: int = 1):
        """What the MSE-type terms compare, (moving, fixed), computed once: the images ("mse"), their MIND-SSC
        descriptors ("mind", images pooled by ``factor`` first), or both ("mind+mse": the image as extra channels
        weighing ``intensity_weight`` times as much as the 12 descriptor channels together)."""
        key = (similarity, factor)
        if key not in self._features:
            if similarity == "mse":
                self._features[key] = (self.m, self.f)
            else:
                from textscf.mind import mind_ssc

                s = self.settings
                with torch.no_grad():
                    pair = tuple(mind_ssc(_pool(x, factor), s.mind_radius, s.mind_dilation) for x in (self.m, self.f))
                    if similarity == "mind+mse":
                        w = math.sqrt(float(s.intensity_weight) * pair[0].shape[1])
                        pair = tuple(torch.cat([d, w * x], 1) for d, x in zip(pair, (self.m, self.f)))
                self._features[key] = pair
        return self._features[key]


class _Loop:
    """Adam steps with early stopping, shared by the network and the field phases: the pace of the whole run, the
    progress callback, cancel, the optional tqdm bar and the loss record."""

    def __init__(self, settings: RefineSettings, result: RefineResult, cancel, progress):
        self.settings, self.result, self.cancel, self.progress = settings, result, cancel, progress
        levels = tuple(int(v) for v in settings.field_levels) if settings.field_iterations > 0 else ()
        phases = {"network": (settings.iterations, 1.0)}
        for factor in levels:
            phases[f"field@{factor}"] = (settings.field_iterations, field_step_cost(factor))
        self.levels = levels
        self.pace = _Pace(phases)
        self.bar = None
        if settings.show_progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.pace.total, desc="refine", unit="it", leave=False)

    def optimise(self, parameters, learning_rate, iterations, loss_fn, phase: str) -> tuple[int, bool]:
        """Adam steps on ``loss_fn()`` until ``iterations`` or a plateau; returns (steps run, stopped early)."""
        optimiser = torch.optim.Adam(parameters, lr=learning_rate)
        plateau = _Plateau(self.settings.patience, self.settings.min_improvement)
        for step in range(iterations):
            if self.cancel is not None:
                self.cancel()
            started = time.perf_counter()
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            optimiser.step()
            value = float(loss.detach())
            self.result.losses.append(value)
            self.pace.step_done(phase, time.perf_counter() - started)
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix(loss=f"{value:.4g}")
            stop = plateau.update(value)
            if stop:
                self.pace.skip_rest(phase)
            if self.progress is not None:
                self.progress(self.pace.done, self.pace.total, self.pace.seconds_left())
            if stop:
                return step + 1, True
        return iterations, False

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _network_phase(model, pair: _Pair, settings: RefineSettings, loop: _Loop) -> torch.Tensor:
    """Adam on the network's weights (the groups of ``settings.parameters``); returns its field ``(1, 3, I, J, K)``.
    With MIND the network's warp moves the moving image's descriptors, compared by MSE with the fixed ones."""
    descriptor_based = settings.similarity in ("mind", "mind+mse")
    criterion = RegistrationLoss("mse" if descriptor_based else settings.similarity,
                                 settings.dice_weight if pair.use_dice else 0.0, settings.smooth_weight,
                                 ncc_window=settings.ncc_window)
    label_warp = SpatialTransformer()

    def network_loss():
        out = model(pair.m, pair.f, pair.regions, pair.p)
        warped_onehot = label_warp(pair.moving_onehot, out.displacement) if pair.use_dice else None
        warped, target = out.warped, pair.f
        if descriptor_based:
            moving_features, target = pair.features(settings.similarity)
            warped = label_warp(moving_features, out.displacement)
        total, _ = criterion(warped, target, out.regularised_field, warped_onehot, pair.fixed_onehot)
        return total

    loop.result.iterations_run, loop.result.stopped_early = loop.optimise(
        _trainable(model, settings.parameters), settings.learning_rate, settings.iterations, network_loss, "network")
    model.eval()
    with torch.no_grad():
        return model(pair.m, pair.f, pair.regions, pair.p).displacement.detach()


def _field_pyramid(displacement: torch.Tensor, pair: _Pair, settings: RefineSettings, loop: _Loop) -> torch.Tensor:
    """Adam on the displacement field itself, coarse to fine (``settings.field_levels``, factors of the grid),
    starting from ``displacement``; returns the model-grid field ``(1, 3, I, J, K)``."""
    mf = settings.mind_factor if pair.field_similarity == "mind" else 1
    feat_m, feat_f = pair.features("mse" if pair.field_similarity == "ncc" else pair.field_similarity, mf)
    u = None
    iterations_run = 0
    for factor in loop.levels:
        pooled = max(factor // mf, 1)
        start = displacement if u is None else u
        half, level_loss = _field_level(start, _pool(feat_m, pooled), _pool(feat_f, pooled), factor, pair, settings)
        steps, _ = loop.optimise([half], settings.field_learning_rate, settings.field_iterations, level_loss,
                                 f"field@{factor}")
        iterations_run += steps
        u = _smooth(half.detach(), settings.field_smoothing)
    loop.result.field_iterations_run = iterations_run
    return resize_field(u, pair.shape, rescale=True)


def _field_level(start: torch.Tensor, fm: torch.Tensor, ff: torch.Tensor, factor: int, pair: _Pair,
                 settings: RefineSettings):
    """One pyramid level: the field parameter (``start`` resized to the level's grid) and its loss — the
    similarity on a random voxel sample each step (or all voxels / local NCC), the (boundary-weighted) diffusion
    regulariser and, with moving labels, the Dice term."""
    device = pair.device
    shape = tuple(ff.shape[2:])
    half = torch.nn.Parameter(resize_field(start, shape, rescale=True).detach().clone())
    warp = _warper(shape, device)
    weights = _boundary_weights(pair.regions, shape, settings.boundary_weight) if settings.boundary_weight != 1.0 \
        else None
    mo = mo_f = None
    if pair.use_dice:
        mo, mo_f = _pool(pair.moving_onehot, factor), _pool(pair.fixed_onehot, factor)
    ncc = None
    if pair.field_similarity == "ncc":
        from textscf.losses import LocalNCC
        ncc = LocalNCC(ff, settings.ncc_window)  # the fixed image's window statistics, once per level
    # the share of each level voxel that counts (both images have data there); None: all of them
    w = None if pair.weight is None or ncc is not None else _pool(pair.weight, factor)
    w_flat = None if w is None else w.flatten()
    counted = None if w is None else torch.nonzero(w_flat > 0).flatten()  # the voxels samples are drawn from
    if counted is not None and counted.numel() == 0:
        raise InputError("the fixed and the moving image share no field of view after the initial alignment: "
                         "check that they show the same anatomy, or try another --init")
    voxels = math.prod(shape)
    # the mean over every voxel, those left out counting as matched: the similarity keeps its scale against the
    # regulariser (a mean over the counted voxels alone would weigh it up where the overlap is small)
    share = 1.0 if counted is None else counted.numel() / voxels
    samples = int(round(settings.field_sample_fraction * voxels))
    if settings.field_samples > 0:
        samples = min(voxels, int(settings.field_samples))
    sampling = ncc is None and 0 < samples < voxels
    generator = torch.Generator(device=device).manual_seed(settings.seed + factor)
    ff_flat = ff.flatten(2)
    field_smooth = settings.smooth_weight if settings.field_smooth_weight is None else settings.field_smooth_weight

    def level_loss():
        v = _smooth(half, settings.field_smoothing)
        if sampling:  # a new random subset of voxels every step (stochastic gradient, as elastix samples)
            if counted is None:
                at = torch.randint(0, voxels, (samples,), device=device, generator=generator)
                sim = (warp(fm, v, at) - ff_flat[:, :, at]).pow(2).mean()
            else:
                at = counted[torch.randint(0, counted.numel(), (samples,), device=device, generator=generator)]
                error = (warp(fm, v, at) - ff_flat[:, :, at]).pow(2).mean(1)[0]
                sim = (error * w_flat[at]).mean() * share
        elif ncc is not None:
            sim = ncc(warp(fm, v))
        elif w is None:
            sim = (warp(fm, v) - ff).pow(2).mean()
        else:
            sim = ((warp(fm, v) - ff).pow(2).mean(1, keepdim=True) * w).mean()
        total = sim + field_smooth * _weighted_gradient_loss(v, weights)
        if pair.use_dice:
            from textscf.losses import soft_dice_loss
            total = total + settings.dice_weight * soft_dice_loss(warp(mo, v), mo_f)
        return total

    return half, level_loss

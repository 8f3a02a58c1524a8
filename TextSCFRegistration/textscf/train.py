"""Training: weakly supervised textSCF (MSE + Dice on warped labels + λ‖∇u‖²), Adam with polynomial decay.

Runs on one CPU/GPU or several processes with PyTorch's DistributedDataParallel (``torchrun``). Writes the best
and last checkpoints in the engine's format, a CSV log, and a resumable training state.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from textscf import metrics
from textscf.checkpoint import read_checkpoint_file, save_checkpoint
from textscf.errors import CheckpointError, InputError
from textscf.files import replace_atomically
from textscf.losses import RegistrationLoss, endpoint_error_loss, multiscale_dice_loss, one_hot_regions
from textscf.networks.textscf_net import TextSCFConfig, TextSCFNet
from textscf.text import EmbeddingCache, canonical_encoder_name, make_text_encoder, resolve_template
from textscf.warp import SpatialTransformer

TRAIN_STATE = "training_state.pt"


@dataclass
class TrainSettings:
    """Optimisation settings (the paper's defaults).

    Attributes:
        epochs: passes over ``steps_per_epoch`` pairs (the length the learning-rate schedule plans for).
        stop_after: end the run after this epoch (None = ``epochs``) while the schedule still decays over
            ``epochs``: a stage stopped early, reproducibly (its last.pt is that epoch's weights).
        steps_per_epoch: pairs per epoch (None = the dataset's length).
        learning_rate: Adam's initial rate (1e-4); decays as ``(1 - epoch / epochs) ** power``.
        power: polynomial decay power (0.9).
        smooth_weight: λ (0.1). dice_weight: weight of the Dice term (1).
        dice_sigmas: Gaussian blurs (voxels) of the label maps the Dice term averages over; (0,) = sharp labels
            only (the paper). Blurred copies pass a gradient across larger misalignments.
        field_weight: weight of the endpoint error against a known field, for items that carry one
            (``field_known``, e.g. :class:`textscf.synthesis.SynthPairDataset`'s intra-subject pairs).
        threads: CPU threads for torch (None = torch's default).
        similarity: "mse" or "ncc".
        simulate_segmentor: probability of replacing p = 1 by a simulated segmentor confidence (lower near region
            boundaries), so the shared filter w_r is trained too.
        validate_every: epochs between validations.
        seed: seeds Python, numpy and torch.
        bf16: autocast to bfloat16 (GPUs). compile: ``torch.compile`` the model.
        device: "auto", "cpu" or "cuda".
        num_workers: DataLoader workers.
    """

    epochs: int = 100
    stop_after: int | None = None
    steps_per_epoch: int | None = None
    learning_rate: float = 1e-4
    power: float = 0.9
    smooth_weight: float = 0.1
    dice_weight: float = 1.0
    dice_sigmas: tuple[float, ...] = (0.0,)
    field_weight: float = 0.0
    threads: int | None = None
    similarity: str = "mse"
    simulate_segmentor: float = 0.5
    validate_every: int = 1
    seed: int = 0
    bf16: bool = False
    compile: bool = False
    device: str = "auto"
    num_workers: int = 0
    show_progress: bool = True


@dataclass
class TrainResult:
    best_checkpoint: Path | None
    last_checkpoint: Path
    best_val_dice: float
    history: list[dict] = field(default_factory=list)


def build_model(
    region_names: list[str],
    label_values: list[int],
    text_encoder: str = "onehot",
    template: str = "ct-abdomen",
    start_channels: int = 8,
    hidden_channels: int = 256,
    head: str = "textscf",
    integrate: bool = False,
    modality: str = "ct",
    spacing=(4.0, 4.0, 4.0),
    input_shape=(96, 80, 128),
    direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    seed: int = 0,
    init: str = "reference",
) -> TextSCFNet:
    """A fresh TextSCFNet for a prompt set; the text matrix comes from the (cached) text encoder.

    ``init``: the weight initialisation (:meth:`TextSCFNet.initialise`); ``"kaiming"`` is the one that trains.
    """
    template = resolve_template(template)
    if any(s % 16 for s in input_shape):
        raise InputError(f"input shape {tuple(input_shape)} must be divisible by 16 along every axis")
    if text_encoder == "onehot":
        text_matrix = torch.eye(len(region_names) + 1)
    else:
        name = canonical_encoder_name(text_encoder)
        text_matrix = EmbeddingCache().get_or_build(region_names, template, name, lambda: make_text_encoder(text_encoder))
    intensity = {"kind": "ct_window", "window": [-500.0, 800.0]} if modality == "ct" else {
        "kind": "percentile", "percentiles": [0.5, 99.5]}
    config = TextSCFConfig(
        num_regions=text_matrix.shape[0], text_dim=text_matrix.shape[1], start_channels=start_channels,
        hidden_channels=hidden_channels, head=head, integrate=integrate, region_names=list(region_names),
        label_values=[int(v) for v in label_values], text_encoder=text_encoder, template=template,
        modality=modality, intensity=intensity, spacing=tuple(spacing), input_shape=tuple(input_shape),
        direction=tuple(direction),
    )
    net = TextSCFNet(config, text_matrix)
    net.initialise(init, seed)
    return net


def simulated_confidence(regions: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A segmentor-like confidence for ground-truth regions: lower near boundaries, with a random depth.

    Args:
        regions: ``(B, 1, I, J, K)`` long.

    Returns:
        confidence ``(B, 1, I, J, K)`` in [0, 1].
    """
    r = regions.float()
    boundary = (F.max_pool3d(r, 3, 1, 1) != -F.max_pool3d(-r, 3, 1, 1)).float()
    near = F.avg_pool3d(boundary, 5, 1, 2)  # in [0, 1], 1 on thick boundaries
    depth = 0.2 + 0.6 * torch.rand((), generator=generator).item()
    noise = 0.05 * torch.randn(regions.shape, generator=generator)
    return (1.0 - depth * near + noise).clamp(0.0, 1.0)


def poly_learning_rate(initial: float, epoch: int, epochs: int, power: float) -> float:
    """``initial * (1 - epoch / epochs) ** power`` (the authors' schedule, per epoch)."""
    return initial * max(0.0, 1.0 - epoch / max(1, epochs)) ** power


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env() -> bool:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPU, nccl on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def _device(requested: str) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError("CUDA was requested but torch sees no GPU; use --device cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


@torch.no_grad()
def validate(net: TextSCFNet, pairs: Dataset, device: torch.device) -> float:
    """Mean Dice (regions present in either image, background excluded) over validation pairs, nearest warping."""
    net.eval()
    warp_nearest = SpatialTransformer(mode="nearest")
    scores = []
    for i in range(len(pairs)):
        item = pairs[i]
        m, f = item["moving"][None].to(device), item["fixed"][None].to(device)
        mr, fr = item["moving_regions"][None].to(device), item["fixed_regions"][None].to(device)
        out = net(m, f, fr)
        warped = warp_nearest(mr.float(), out.displacement).round().long()
        labels = sorted((set(torch.unique(fr).tolist()) | set(torch.unique(mr).tolist())) - {0})
        dice = metrics.dice_per_label(warped[0, 0].cpu().numpy(), fr[0, 0].cpu().numpy(), labels)
        scores.append(metrics.mean_ignoring_nan(dice))
    net.train()
    return float(np.nanmean(scores)) if scores else float("nan")


def _last_epoch(settings: TrainSettings) -> int:
    """The number of epochs this run trains: ``epochs``, or fewer with ``stop_after``."""
    if settings.stop_after is None:
        return settings.epochs
    if not 1 <= settings.stop_after <= settings.epochs:
        raise ValueError(f"stop_after={settings.stop_after} is outside 1..epochs ({settings.epochs}); give an epoch "
                         f"of the planned schedule")
    return settings.stop_after


def _save_state(path: Path, optimiser, epoch: int, best: float, history: list[dict], settings: TrainSettings):
    state = {"optimizer": optimiser.state_dict(), "epoch": epoch, "best_val_dice": best, "history": history,
             "settings": asdict(settings)}
    replace_atomically(path, lambda temp: torch.save(state, temp))


def train(
    net: TextSCFNet,
    train_pairs: Dataset,
    output_dir: str | os.PathLike,
    settings: TrainSettings | None = None,
    val_pairs: Dataset | None = None,
    resume: bool = False,
    metadata: dict | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train ``net`` on (moving, fixed) pairs; checkpoints and logs go to ``output_dir``.

    Args:
        net: the model to train (its configuration is saved with every checkpoint).
        train_pairs: items ``{"moving", "fixed": (1, I, J, K) float, "moving_regions", "fixed_regions":
            (1, I, J, K) long}`` on the model's grid.
        val_pairs: the same kind of items, for the validation Dice each epoch (best checkpoint by it).
        resume: continue from ``output_dir/last.pt`` and its training state (optimizer, epoch, schedule).
        metadata: stored in every checkpoint (data, settings) for the model card.

    Returns:
        :class:`TrainResult`.
    """
    settings = settings or TrainSettings()
    last_epoch = _last_epoch(settings)
    out = Path(output_dir)
    rank, world = _distributed()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    device = _device(settings.device)
    if settings.threads:
        torch.set_num_threads(int(settings.threads))
    torch.manual_seed(settings.seed + rank)
    np.random.seed(settings.seed + rank)
    start_epoch, best, history, optimiser_state = _resumed(out, net) if resume else (0, -math.inf, [], None)
    model, optimiser = _model_and_optimiser(net, device, world, settings, optimiser_state)
    run = _Run(net, model, optimiser, settings, device, rank, *_loader(train_pairs, settings, rank, world))
    best_path, last_path = out / "best.pt", out / "last.pt"
    meta = {**(metadata or {}), "train_settings": asdict(settings)}

    for epoch in range(start_epoch, last_epoch):
        lr = _start_epoch(run, train_pairs, epoch)
        t0 = time.perf_counter()
        sums = _train_epoch(run, epoch)
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "lr": lr, **{k: v / run.steps for k, v in sums.items()},
               "seconds": round(seconds, 2), "steps_per_s": round(run.steps / max(seconds, 1e-9), 4)}
        if val_pairs is not None and rank == 0 and ((epoch + 1) % settings.validate_every == 0 or epoch + 1 == settings.epochs):
            row["val_dice"] = validate(net, val_pairs, device)
        history.append(row)
        if rank == 0:
            best = _save_epoch(run, out, epoch, best, history, meta)
            if on_epoch_end is not None:
                on_epoch_end(row)
    if world > 1:
        dist.barrier()
    return TrainResult(best_path if best_path.is_file() else None, last_path, best, history)


@dataclass
class _Run:
    """What every step of one training run uses."""

    net: TextSCFNet
    model: torch.nn.Module  # the net, or its DDP / compiled wrapper
    optimiser: torch.optim.Optimizer
    settings: TrainSettings
    device: torch.device
    rank: int
    loader: DataLoader
    sampler: torch.utils.data.DistributedSampler | None
    generator: torch.Generator  # the loader's

    def __post_init__(self):
        self.criterion = RegistrationLoss(self.settings.similarity, self.settings.dice_weight,
                                          self.settings.smooth_weight)
        self.label_warp = SpatialTransformer()
        self.confidence_rng = torch.Generator()
        self.steps = self.settings.steps_per_epoch or len(self.loader)


def _resumed(out: Path, net: TextSCFNet) -> tuple[int, float, list[dict], dict]:
    """``net`` loaded from ``out/last.pt``; the epoch to start from, the best validation Dice, the history and the
    optimiser state saved beside it."""
    last, state_path = out / "last.pt", out / TRAIN_STATE
    if not last.is_file() or not state_path.is_file():
        raise CheckpointError(f"nothing to resume in {out}: last.pt or {TRAIN_STATE} is missing")
    payload = read_checkpoint_file(last)
    net.load_state_dict(payload["state_dict"])
    state = read_checkpoint_file(state_path)
    return int(state["epoch"]) + 1, float(state["best_val_dice"]), list(state["history"]), state["optimizer"]


def _model_and_optimiser(net: TextSCFNet, device: torch.device, world: int, settings: TrainSettings,
                         optimiser_state: dict | None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The net on ``device`` in training mode (wrapped in DDP across processes, compiled if asked) and its Adam."""
    net.to(device).train()
    model: torch.nn.Module = net
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if settings.compile:
        model = torch.compile(model)
    optimiser = torch.optim.Adam(net.parameters(), lr=settings.learning_rate)
    if optimiser_state is not None:
        optimiser.load_state_dict(optimiser_state)
    return model, optimiser


def _loader(train_pairs: Dataset, settings: TrainSettings, rank: int, world: int
            ) -> tuple[DataLoader, torch.utils.data.DistributedSampler | None, torch.Generator]:
    """``(DataLoader, DistributedSampler or None, the loader's generator)``: one pair a step, shuffled."""
    sampler = torch.utils.data.DistributedSampler(train_pairs, world, rank, shuffle=True, seed=settings.seed) if world > 1 else None
    generator = torch.Generator().manual_seed(settings.seed + rank)
    loader = DataLoader(train_pairs, batch_size=1, shuffle=sampler is None, sampler=sampler,
                        num_workers=settings.num_workers, generator=generator)
    return loader, sampler, generator


def _start_epoch(run: _Run, train_pairs: Dataset, epoch: int) -> float:
    """Set the epoch's data, learning rate (returned) and random streams."""
    settings = run.settings
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
    if hasattr(train_pairs, "set_epoch"):
        train_pairs.set_epoch(epoch)  # new augmentation (and synthesised pairs) every epoch
    lr = poly_learning_rate(settings.learning_rate, epoch, settings.epochs, settings.power)
    for group in run.optimiser.param_groups:
        group["lr"] = lr
    # Every random stream restarts from (seed, epoch, rank), so a resumed run replays the same epochs.
    epoch_seed = settings.seed * 100003 + epoch * 101 + run.rank
    run.generator.manual_seed(epoch_seed)
    run.confidence_rng.manual_seed(epoch_seed + 7)
    torch.manual_seed(epoch_seed + 13)
    return lr


def _train_epoch(run: _Run, epoch: int) -> dict[str, float]:
    """``run.steps`` optimisation steps (the loader restarts when it runs out); the sums of the loss parts."""
    sums: dict[str, float] = {}
    iterator = iter(run.loader)
    bar = None
    if run.settings.show_progress and run.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=run.steps, desc=f"epoch {epoch + 1}/{run.settings.epochs}", unit="pair", leave=False)
    for _ in range(run.steps):
        try:
            item = next(iterator)
        except StopIteration:
            iterator = iter(run.loader)
            item = next(iterator)
        parts = _train_step(run, item)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{parts['loss']:.4f}")
    if bar is not None:
        bar.close()
    return sums


def _train_step(run: _Run, item: dict) -> dict[str, float]:
    """One optimisation step on one pair; returns the loss and its parts."""
    settings, device = run.settings, run.device
    m, f = item["moving"].to(device), item["fixed"].to(device)
    mr, fr = item["moving_regions"].to(device), item["fixed_regions"].to(device)
    # An explicit p = 1 keeps w_r in the graph (zero gradient), as DDP needs every step.
    confidence = torch.ones_like(f)
    if settings.simulate_segmentor > 0 and torch.rand((), generator=run.confidence_rng) < settings.simulate_segmentor:
        confidence = simulated_confidence(fr.cpu(), run.confidence_rng)
        confidence = confidence.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16):
        result = run.model(m, f, fr, confidence)
    loss, parts = _step_loss(run.net, run.criterion, run.label_warp, result, item, f, mr, fr, settings, device)
    run.optimiser.zero_grad(set_to_none=True)
    loss.backward()
    run.optimiser.step()
    parts["loss"] = float(loss.detach())
    return parts


def _save_epoch(run: _Run, out: Path, epoch: int, best: float, history: list[dict], meta: dict) -> float:
    """``last.pt``, ``best.pt`` when the validation Dice improved, the training state and ``log.csv``; returns the
    best validation Dice so far."""
    row = history[-1]
    meta.update(epoch=epoch + 1, history_tail=history[-3:])
    save_checkpoint(run.net, out / "last.pt", meta)
    if "val_dice" in row and row["val_dice"] > best:
        best = row["val_dice"]
        save_checkpoint(run.net, out / "best.pt", {**meta, "val_dice": best})
    _save_state(out / TRAIN_STATE, run.optimiser, epoch, best, history, run.settings)
    _write_log(out / "log.csv", history)
    return best


def _step_loss(net, criterion, label_warp, result, item, fixed, moving_regions, fixed_regions, settings, device):
    """The training objective of one step: similarity + smoothness (``criterion``), the (multi-scale) Dice on the
    warped moving labels, and the endpoint error where the item carries a known field."""
    displacement = result.displacement.float()
    loss, parts = criterion(result.warped.float(), fixed, result.regularised_field.float())
    n = net.num_regions
    if settings.dice_weight > 0:
        dice = settings.dice_weight * multiscale_dice_loss(
            one_hot_regions(moving_regions, n), one_hot_regions(fixed_regions, n), displacement, label_warp,
            settings.dice_sigmas)
        loss = loss + dice
        parts["dice"] = float(dice.detach())
    known = item.get("field_known")
    if settings.field_weight > 0 and known is not None and bool(known.any()):
        known = known.to(device).bool()
        epe = endpoint_error_loss(displacement[known], item["true_displacement"].to(device)[known])
        loss = loss + settings.field_weight * epe
        parts["endpoint_error"] = float(epe.detach())
    return loss, parts


def _write_log(path: Path, history: list[dict]) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]

    def write(temp: Path) -> None:
        with open(temp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)

    replace_atomically(path, write)


def describe(result: TrainResult) -> str:
    return json.dumps({"best": str(result.best_checkpoint), "last": str(result.last_checkpoint),
                       "best_val_dice": result.best_val_dice, "epochs": len(result.history)})

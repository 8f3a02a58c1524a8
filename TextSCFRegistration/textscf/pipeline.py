"""register(): the one registration code path, used by ``textscf register``, ``textscf demo`` and the Slicer logic.

Stages: load the model and prompts -> fixed regions (label map, segmentor, or none) -> initial alignment -> resample
both images onto the model grid -> network (refined on the pair as the schedule says) -> field to physical space on
the fixed grid, composed with the initial alignment -> warped images, Jacobian, statistics.

The moving label map only scores the run (Dice/HD95, warped labels) unless ``refine_use_moving_labels`` puts it into
the refinement loss: scoring never changes the field.
"""
from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from textscf import deformation, metrics
from textscf import warp as warp_fields
from textscf.alignment import describe_transform, initial_alignment
from textscf.checkpoint import load_checkpoint
from textscf.errors import CancelledError, CheckpointError, InputError, PromptError
from textscf.networks.inference import for_inference
from textscf.networks.textscf_net import TextSCFConfig, TextSCFNet
from textscf.presets import bundled_model_path, load_preset, model_rows  # noqa: F401 (bundled_model_path: public here too)
from textscf.results import RegistrationResult
from textscf.schedule import (
    Schedule, default_schedule, fresh_grid_factor, fresh_grid_shape, similarity_for, takes_seconds_left,
    with_steps,
)
from textscf.segmentation import LabelMapSegmentor, Segmentation, SwinUNETRSegmentor
from textscf.spatial import (
    IntensityNormaliser,
    ModelGrid,
    compose_with_initial,
    field_of_view_weight,
    fit_box_centre,
    image_to_array,
    model_grid_for,
    physical_displacement_to_voxel,
    resample_displacement,
    resample_to_grid,
    same_grid,
    voxel_displacement_to_physical,
    warp_image,
)
from textscf.text import EmbeddingCache, canonical_encoder_name, make_text_encoder, resolve_template, validate_region_names


# progress(stage name, overall fraction in [0, 1], estimated seconds left or None); see :class:`_Progress`.
ProgressCallback = Callable[[str, float, "float | None"], None]
CancelCallback = Callable[[], bool]
LogCallback = Callable[[str], None]

# Stage names and their share of the progress bar for a run without refinement (refinement enlarges "register").
STAGES = (
    ("load model", 0.05),
    ("segment fixed image", 0.10),
    ("initial alignment", 0.10),
    ("resample to model grid", 0.10),
    ("register", 0.40),
    ("resample field", 0.15),
    ("evaluate", 0.10),
)


@dataclass
class RegistrationOptions:
    """How to register. Prompts come from ``region_names``/``label_values``, else ``preset``, else the model.

    Attributes:
        checkpoint: a textscf checkpoint path; None = the bundled default model.
        preset: a bundled prompt preset ("abdomen-ct", "brain-mri").
        region_names: prompts, in the order of ``label_values``.
        label_values: the label value of each region in the user's label maps.
        template: prompt template with one "{}"; must match the model's for one-hot models.
        text_encoder: if given, must match the encoder the model was trained with (a check, not a switch).
        init: initial alignment: "none", "center" or "affine".
        device: "auto", "cpu" or "cuda".
        integrate: diffeomorphic integration on/off; None = the model's setting.
        refine_iterations: instance optimisation steps on this pair (0 = off); None = the default schedule
            (:func:`textscf.schedule.default_schedule`, what ``textscf register``, ``textscf demo`` and the Slicer
            module run), which may also pick a fresh network when ``checkpoint`` is None and the bundled model was
            trained on another modality.
        refine_learning_rate: Adam learning rate of the network steps.
        refine_smooth_weight: λ of the diffusion regulariser ‖∇u‖², network and field steps; None = the schedule's
            for its similarity (:func:`textscf.schedule.smooth_weight_for`: 0.1, 1.5 with local NCC).
        refine_similarity: the refinement's image term: "auto" (:func:`textscf.schedule.similarity_for`: MIND-SSC
            descriptors + intensity MSE for CT, local NCC for MRI), "mind", "mind+mse", "mse" or "ncc" (local NCC).
        refine_field_iterations: steps on the displacement field itself at each level of the schedule's pyramid
            (1/4 then 1/2 of the model grid), after the network steps; None = the schedule's.
        refine_use_moving_labels: put the moving label map into the refinement loss (its Dice term, weight
            ``refine_label_weight``). Off by default: the moving label map then only scores the run, and giving it
            never changes the field (on a real CT with a known field the Dice term raised Dice 88 -> 90 % while the
            endpoint error grew 2.8 -> 4.1 mm).
        refine_label_weight: weight of that Dice term.
        fresh_grid_factor: for a fresh network, the model grid's spacing relative to the fixed image's; None = 2,
            or coarser for large images (:func:`textscf.schedule.fresh_grid_factor`).
        segmentor_weights: SwinUNETR weights (state dict or MONAI bundle) used when no fixed label map is given.
        segmentor_feature_size: 12, 24 or 48 (tiny/small/base).
        unmapped_labels: label values without a prompt: "error" or "background".
        seed: seeds torch for deterministic refinement.
        debias: run the network a second time on the null pair (the fixed image as fixed and moving, whose true
            field is zero) and remove that response from the field (:func:`remove_null_response`): an image
            registered to itself gets a zero field. Costs a second forward pass; False = one pass.
    """

    checkpoint: str | None = None
    preset: str | None = None
    region_names: list[str] | None = None
    label_values: list[int] | None = None
    template: str | None = None
    text_encoder: str | None = None
    init: str = "center"
    device: str = "auto"
    integrate: bool | None = None
    refine_iterations: int | None = 0
    refine_learning_rate: float = 1e-3
    refine_smooth_weight: float | None = None
    refine_similarity: str = "auto"
    refine_field_iterations: int | None = 0
    refine_use_moving_labels: bool = False
    refine_label_weight: float = 1.0
    fresh_grid_factor: float | None = None
    segmentor_weights: str | None = None
    segmentor_feature_size: int = 48
    unmapped_labels: str = "error"
    seed: int = 0
    debias: bool = True


@dataclass
class Prompts:
    """The regions a registration uses: names (index order 1..N-1), label values, template."""

    region_names: list[str]
    label_values: list[int]
    template: str
    background_labels: list[int] = field(default_factory=list)


class _Progress:
    """One progress report for the whole run: (stage, overall fraction, seconds left), monotonic; checks cancel.

    The fraction moves at each stage start and, during refinement, after every step. The stages' shares are those
    of :data:`STAGES` until refinement is planned: then the remaining stages share what is left of the bar in
    proportion to their expected seconds (the finished stages' pace, the schedule's refinement estimate), so the bar
    moves about evenly in time. Seconds left: the refinement's measured pace plus the later stages' expected time
    during refinement, else the elapsed time extrapolated by the fraction (plus, before it, the schedule's estimate of
    the refinement ahead). A callback that takes only
    ``(stage, fraction)`` gets the stage starts, as before.
    """

    def __init__(self, progress: ProgressCallback | None, cancel: CancelCallback | None):
        self.progress, self.cancel = progress, cancel
        self.with_steps = progress is not None and takes_seconds_left(progress)
        self.seconds: dict[str, float] = {}
        self.shares = dict(STAGES)
        self.started = time.perf_counter()
        self._done = 0.0  # shares of the finished stages
        self._shown = 0.0
        self._stage = ""
        self._tail_seconds = 0.0  # expected seconds of the stages after "register"
        self._refinement_ahead = 0.0  # expected seconds of a refinement not started yet

    def check_cancel(self):
        if self.cancel is not None and self.cancel():
            raise CancelledError("registration cancelled by the user; nothing was written")

    def _emit(self, stage: str, fraction: float, seconds_left: float | None, step: bool = False) -> None:
        self._shown = max(self._shown, min(1.0, fraction))
        if self.progress is None or (step and not self.with_steps):
            return
        if self.with_steps:
            self.progress(stage, self._shown, None if seconds_left is None else max(0.0, seconds_left))
        else:
            self.progress(stage, self._shown)

    def _extrapolated_seconds_left(self) -> float | None:
        elapsed = time.perf_counter() - self.started
        if self._shown <= 0:
            return None
        return elapsed * (1.0 - self._shown) / self._shown + self._refinement_ahead

    @contextmanager
    def stage(self, name: str):
        self.check_cancel()
        self._stage = name
        self._emit(name, self._done, self._extrapolated_seconds_left())
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        self._done += self.shares[name]
        self.check_cancel()

    def expect_refinement(self, expected_seconds: float) -> None:
        """Once the schedule is known: the time left includes the refinement ahead."""
        self._refinement_ahead = max(expected_seconds, 0.0)

    def plan_refinement(self, expected_seconds: float) -> None:
        """At the start of "register": give it and the later stages the rest of the bar by their expected time."""
        self._refinement_ahead = 0.0
        names = [name for name, _ in STAGES]
        later = names[names.index(self._stage):]
        elapsed = time.perf_counter() - self.started
        pace = elapsed / self._done if self._done > 0 else 0.0  # seconds per share of a run without refinement
        expected = {name: self.shares[name] * pace for name in later}
        expected[self._stage] += max(expected_seconds, 0.0)
        total = sum(expected.values())
        if total > 0:
            for name in later:
                self.shares[name] = (1.0 - self._done) * expected[name] / total
        self._tail_seconds = sum(expected[name] for name in later[1:])
        self._emit(self._stage, self._done, max(expected_seconds, 0.0) + self._tail_seconds, step=True)

    def refinement_step(self, done: int, total: int, seconds_left: float | None) -> None:
        """After each refinement step (of ``total``): the bar moves within the "register" stage."""
        fraction = self._done + self.shares[self._stage] * (done / total if total else 1.0)
        left = None if seconds_left is None else seconds_left + self._tail_seconds
        self._emit(self._stage, fraction, left, step=True)

    def finish(self):
        self._emit("done", 1.0, 0.0)


def select_device(requested: str) -> tuple[torch.device, str | None]:
    """The torch device for ``requested`` ("auto", "cpu", "cuda"), and a note when falling back to the CPU."""
    requested = (requested or "auto").lower()
    if requested not in ("auto", "cpu", "cuda") and not requested.startswith("cuda:"):
        raise InputError(f"unknown device {requested!r}; choose auto, cpu or cuda")
    if requested == "cpu":
        return torch.device("cpu"), None
    if torch.cuda.is_available():
        return torch.device("cuda" if requested == "auto" else requested), None
    if requested == "auto":
        return torch.device("cpu"), None
    return torch.device("cpu"), "CUDA was requested but torch sees no GPU; running on the CPU instead"


def resolve_prompts(net: TextSCFNet | None, options: RegistrationOptions) -> Prompts:
    """Prompts from the options, the preset or the model, checked against what the model can use."""
    cfg = net.config if net is not None else None
    preset = load_preset(options.preset) if options.preset else None
    if options.region_names is not None:
        names = validate_region_names(options.region_names) if options.region_names else []
        if not names:
            raise PromptError("the prompt list is empty; give at least one region name (or use a preset)")
        if options.label_values is None:
            raise PromptError("region names were given without label values; give one label value per region")
        values = [int(v) for v in options.label_values]
        background = []
    elif preset is not None:
        names, values, background = list(preset.region_names), list(preset.label_values), list(preset.background_labels)
    elif cfg is not None:
        names, values, background = list(cfg.region_names), list(cfg.label_values), []
    else:
        raise PromptError("a fresh network needs prompts: give --preset or --prompts with --label-values")
    if len(values) != len(names):
        raise PromptError(f"{len(names)} region names but {len(values)} label values; give one label value per region")
    if len(set(values)) != len(values):
        raise PromptError(f"duplicate label values in {values}; each region needs its own label value")
    template = options.template or (preset.template if preset else cfg.template if cfg else "photo")
    if cfg is None:
        return Prompts(names, values, resolve_template(template), background)
    if options.text_encoder and canonical_encoder_name(options.text_encoder) != canonical_encoder_name(cfg.text_encoder):
        raise CheckpointError(
            f"the model was trained with the text encoder {cfg.text_encoder!r}, not {options.text_encoder!r}; "
            "use a checkpoint trained with that encoder or drop the encoder option"
        )
    return Prompts(names, values, template, background)


def text_matrix_for(net: TextSCFNet, prompts: Prompts) -> tuple[torch.Tensor, list[int]]:
    """The text matrix for ``prompts`` and, per prompt, its row in that matrix.

    One-hot models only know the regions they were trained on: their rows are reused (any subset, any order).
    CLIP models take any region names: a new prompt set is encoded once and cached on disk.
    """
    cfg = net.config
    if cfg.text_encoder == "onehot":
        rows, unknown = model_rows(cfg.region_names, prompts.region_names)
        if unknown:
            raise PromptError(
                f"this model uses one-hot prompts and knows only {len(cfg.region_names)} regions "
                f"({', '.join(cfg.region_names)}); it cannot use {unknown}. Fix: register with a fresh network "
                "refined on this pair (--checkpoint fresh --refine 150 --refine-field 50; minutes on a CPU), use a "
                "model trained with a CLIP text encoder, or keep to prompts from the model's list"
            )
        if prompts.template != cfg.template:
            warnings.warn("one-hot prompts ignore the template; the model's own regions are used", stacklevel=3)
        return net.text_matrix, rows
    if list(prompts.region_names) == list(cfg.region_names) and prompts.template == cfg.template:
        return net.text_matrix, list(range(1, len(prompts.region_names) + 1))
    encoder_name = canonical_encoder_name(cfg.text_encoder)
    matrix = EmbeddingCache().get_or_build(
        prompts.region_names, prompts.template, encoder_name, lambda: make_text_encoder(cfg.text_encoder)
    )
    if matrix.shape[1] != cfg.text_dim:
        raise CheckpointError(
            f"the text encoder gives {matrix.shape[1]}-wide embeddings but the model expects {cfg.text_dim}"
        )
    return matrix, list(range(1, len(prompts.region_names) + 1))


def pair_modality(fixed: sitk.Image, options: RegistrationOptions) -> str:
    """"ct" or "mri": the preset's, else guessed from the fixed image (CT has air at about -1000 HU)."""
    if options.preset:
        return load_preset(options.preset).modality
    return "ct" if _background(fixed) < -500 else "mri"


def fresh_model(fixed: sitk.Image, prompts: Prompts | None, options: RegistrationOptions,
                device: torch.device) -> TextSCFNet:
    """An untrained one-hot network on a grid sized to the fixed image (for refinement from scratch).

    With ``prompts`` it is a textSCF network for those regions; without (no regions), the shared filter alone
    (the ``no_scf`` head: the plain LKU-Net).
    """
    from textscf.train import build_model

    # The network sees the image at 1/factor resolution (features at half of that); the field is upsampled to the
    # full grid. The schedule's factor (2, coarser for large images) keeps CPU refinement at seconds per step.
    factor = fresh_grid_factor(fixed.GetSize(), device) if options.fresh_grid_factor is None \
        else float(options.fresh_grid_factor)
    if factor < 1:
        raise InputError(f"fresh_grid_factor must be >= 1, got {factor}")
    spacing = tuple(s * factor for s in fixed.GetSpacing())
    shape = fresh_grid_shape(fixed.GetSize(), factor)
    names, values, template = (prompts.region_names, prompts.label_values, prompts.template) if prompts else \
        ([], [], "photo")
    return build_model(
        names, values, "onehot", template, start_channels=8, hidden_channels=64,
        head="textscf" if prompts else "no_scf", modality=pair_modality(fixed, options), spacing=spacing,
        input_shape=shape, direction=fixed.GetDirection(), seed=options.seed,
    )


def segment_fixed(fixed: sitk.Image, fixed_labels: sitk.Image | None, prompts: Prompts,
                  options: RegistrationOptions, device: torch.device) -> Segmentation | None:
    """Regions and confidence of the fixed image from the user's label map, else from SwinUNETR, else None (no
    regions: the network's shared filter alone registers the pair)."""
    if fixed_labels is not None:
        segmentor = LabelMapSegmentor(_clear_background_labels(fixed_labels, prompts), prompts.label_values,
                                      prompts.region_names, options.unmapped_labels)
        return segmentor.predict(fixed)
    if not options.segmentor_weights:
        return None
    segmentor = SwinUNETRSegmentor(
        options.segmentor_weights, prompts.region_names, feature_size=options.segmentor_feature_size, device=str(device)
    )
    return segmentor.predict(fixed)


def field_grid(grid: ModelGrid, subdivision: int, fixed: sitk.Image) -> ModelGrid:
    """The grid of the field steps: the model grid subdivided ``subdivision`` times, moved as little as needed to
    cover the fixed image on the axes where it is long enough (:func:`textscf.spatial.fit_box_centre`), so that no band
    of the image is left where the field would drop to zero and fold against the inside. The network keeps its
    body-centred grid, the placement it was trained with."""
    sub = grid.subdivided(subdivision)
    return sub.centred_at(fit_box_centre(fixed, sub.centre(), sub.direction_matrix, sub.half_extent))


def model_grid(cfg: TextSCFConfig, fixed: sitk.Image, body_mask: sitk.Image | None) -> ModelGrid:
    """The model's input grid: the checkpoint's spacing, shape and orientation, centred on the fixed body."""
    centred = model_grid_for(fixed, cfg.spacing, cfg.input_shape, body_mask=body_mask)
    return ModelGrid(cfg.input_shape, cfg.spacing, (0.0, 0.0, 0.0), cfg.direction).centred_at(centred.centre())


def normalise_for_model(image: sitk.Image, net: TextSCFNet) -> np.ndarray:
    """``(I, J, K)`` float32 in [0, 1] as the model was trained (its :class:`IntensityNormaliser`)."""
    try:
        normaliser = IntensityNormaliser.from_config(net.config)
    except InputError as exc:
        raise CheckpointError(str(exc)) from None
    return normaliser(image_to_array(image))


def _tensor(arr: np.ndarray, device, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr)).to(device=device, dtype=dtype)[None, None]


def run_network(net: TextSCFNet, pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
                device: torch.device) -> tuple[list[np.ndarray], str | None]:
    """Network forwards on ``device``, one per ``(moving, fixed, regions, confidence)`` in ``pairs``, by one inference
    copy (:func:`for_inference`: folded blocks, no autograd, no warp); on CUDA out-of-memory, all are run on the CPU.
    Returns (one u (3, I, J, K) per pair, note)."""
    def forward(dev):
        inference = for_inference(net.to(dev))
        fields = []
        for moving, fixed, regions, confidence in pairs:
            displacement, _ = inference.displacement(_tensor(moving, dev), _tensor(fixed, dev),
                                                     _tensor(regions, dev, torch.long), _tensor(confidence, dev))
            fields.append(displacement[0].float().cpu().numpy())
        return fields

    try:
        return forward(device), None
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return forward(torch.device("cpu")), "the GPU ran out of memory; the network ran on the CPU instead"


def network_field(run: "_Run", inputs: "ModelInputs", debias: bool, stats: dict) -> tuple[np.ndarray, str | None]:
    """The network's voxel field ``(3, I, J, K)`` on ``inputs``' grid: its forward pass on the pair, with ``debias``
    corrected by its response to the null pair (:func:`remove_null_response`; ``stats["null_pair_correction"]``
    records the response's largest length and the inversion's residual, in voxels). Returns (u, device note)."""
    pair = (inputs.moving, inputs.fixed, inputs.regions, inputs.confidence)
    if not debias:
        fields, note = run_network(run.net, [pair], run.device)
        return fields[0], note
    null_pair = (inputs.fixed, inputs.fixed, inputs.regions, inputs.confidence)
    (forward, null), note = run_network(run.net, [pair, null_pair], run.device)
    field, residual = remove_null_response(forward, null)
    applied = residual <= NULL_INVERSE_TOLERANCE
    stats["null_pair_correction"] = {"applied": applied,
                                     "response_max_voxels": round(float(np.sqrt((null ** 2).sum(0)).max()), 4),
                                     "inverse_residual_voxels": round(residual, 4)}
    if not applied:
        warnings.warn(f"the network's response to the fixed image paired with itself folds (its inverse is off by "
                      f"{residual:.2f} voxels), so it was not removed from the field: the network's single pass is "
                      "used. A trained checkpoint gives a smooth response; check the model (--checkpoint), or use "
                      "--no-debias to skip the second pass.", stacklevel=3)
        return forward, note
    return field, note


def remove_null_response(forward: np.ndarray, null: np.ndarray) -> tuple[np.ndarray, float]:
    """The network's field ``forward`` for a pair with its response ``null`` to the null pair removed, and how far the
    inverse of ``null`` misses (largest ``|b(x) + v(x + b(x))|``, voxels; :data:`NULL_INVERSE_TOLERANCE`).

    The null pair is the fixed image registered to itself (same regions and confidence): its true field is zero, so
    what the network returns for it, ``b``, depends on the fixed image alone and is an error of the network. The
    forward field ``u`` carries a fixed point through that error first, ``x -> x + b(x)``, then on to the moving
    image; composing the inverse of the error before ``u`` removes it: ``x -> x + v(x) + u(x + v(x))`` with
    ``v = inverse(b)`` (:func:`textscf.warp.invert`, :func:`textscf.warp.compose`). The same image as fixed and
    moving then gets a zero field (up to the inversion's error); other pairs keep what depends on the moving image.
    A folding ``b`` has no inverse: ``v`` then solves its own equation but does not bring ``x + b(x)`` back to ``x``,
    and the residual stays large. Fields ``(3, I, J, K)`` in voxels.
    """
    error = torch.from_numpy(null)[None]
    undo_bias = warp_fields.invert(error)
    # x -> x + b(x) -> back to x? (the length as a sum of squares: torch's norm over the 3 channels is ~30x slower)
    residual = float(warp_fields.compose(error, undo_bias).square().sum(1).max().sqrt())
    return warp_fields.compose(undo_bias, torch.from_numpy(forward)[None])[0].numpy(), residual


#: Largest residual (voxels) of the null response's inverse for :func:`network_field` to apply the correction.
NULL_INVERSE_TOLERANCE = 0.25


def region_metrics(fixed_labels: sitk.Image, warped_labels: sitk.Image, prompts: Prompts,
                   hd95: bool = True, fixed_boxes: dict | None = None,
                   warped_boxes: dict | None = None) -> tuple[dict, dict | None]:
    """Dice and HD95 (mm; None with ``hd95=False``) per region name between two label maps on the same grid;
    ``fixed_boxes``, ``warped_boxes``: their :func:`label_boxes`, when already found."""
    spacing = fixed_labels.GetSpacing()
    dice, hd = metrics.overlap_per_label(_ijk_view(warped_labels), _ijk_view(fixed_labels), prompts.label_values,
                                         spacing if hd95 else None, pred_boxes=warped_boxes, target_boxes=fixed_boxes)
    by_name = dict(zip(prompts.label_values, prompts.region_names))
    return ({by_name[v]: float(d) for v, d in dice.items()},
            None if hd is None else {by_name[v]: float(h) for v, h in hd.items()})


def _ijk_view(labels: sitk.Image) -> np.ndarray:
    """The label map's voxels as an ``(I, J, K)`` view (no full-size copy)."""
    return sitk.GetArrayViewFromImage(labels).transpose(2, 1, 0)


def label_boxes(labels: sitk.Image, prompts: Prompts) -> dict:
    """:func:`textscf.metrics.label_boxes` of a label map for the prompts' label values, in ``(I, J, K)`` indices."""
    return metrics.label_boxes(_ijk_view(labels), prompts.label_values)


def regions_in_both(fixed_boxes: dict, moving_boxes: dict, prompts: Prompts) -> list[str]:
    """Names of the regions whose label value occurs in both label maps, from their :func:`label_boxes`."""
    return [name for value, name in zip(prompts.label_values, prompts.region_names)
            if fixed_boxes[value] is not None and moving_boxes[value] is not None]


def check_input_images(fixed: sitk.Image, moving: sitk.Image) -> None:
    """Physical grids for both images (InputError otherwise); a warning when they are one and the same image."""
    from textscf.io import check_geometry

    check_geometry(fixed, "the fixed image")
    check_geometry(moving, "the moving image")
    if (fixed.GetSize() == moving.GetSize() and fixed.GetSpacing() == moving.GetSpacing()
            and fixed.GetOrigin() == moving.GetOrigin() and fixed.GetDirection() == moving.GetDirection()
            and np.array_equal(sitk.GetArrayViewFromImage(fixed), sitk.GetArrayViewFromImage(moving))):
        warnings.warn("the fixed and moving images are identical (same grid, same voxels): the registration can "
                      "only return the identity; give two different scans to measure anything", stacklevel=3)


#: Points per axis of the fixed grid sampled by :func:`check_overlap`.
_OVERLAP_SAMPLES = 16


def overlap_fraction(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> float:
    """Fraction of the fixed image's field of view that ``transform`` (fixed -> moving) maps inside the moving
    image's (sampled on a regular grid of about 16³ points)."""
    size_f = np.array(fixed.GetSize(), dtype=float)
    axes = [np.linspace(0.0, n - 1.0, min(int(n), _OVERLAP_SAMPLES)) for n in size_f]
    idx = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    matrix_f = np.array(fixed.GetDirection()).reshape(3, 3) @ np.diag(fixed.GetSpacing())
    points = np.array(fixed.GetOrigin()) + idx @ matrix_f.T
    if transform is not None:
        points = np.array([transform.TransformPoint(tuple(map(float, p))) for p in points])
    matrix_m = np.array(moving.GetDirection()).reshape(3, 3) @ np.diag(moving.GetSpacing())
    cidx = np.linalg.solve(matrix_m, (points - np.array(moving.GetOrigin())).T).T
    inside = np.all((cidx >= -0.5) & (cidx <= np.array(moving.GetSize()) - 0.5), axis=1)
    return float(inside.mean())


def check_overlap(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, how: str) -> float:
    """InputError when, after the initial alignment ``how``, no point of the fixed image maps into the moving one."""
    fraction = overlap_fraction(fixed, moving, transform)
    if fraction == 0.0:
        centre_f = np.array(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()]))
        centre_m = np.array(moving.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in moving.GetSize()]))
        raise InputError(
            f"after the initial alignment ({how}) the moving image does not overlap the fixed image at all (their "
            f"centres are {np.linalg.norm(centre_f - centre_m):.0f} mm apart in physical space), so the warped image "
            "would be empty. Fix: align them first: use --init center or --init affine instead of none, give "
            "--initial-transform, or correct the origin in the image headers.")
    return fraction


def _fresh_prompts(options: RegistrationOptions, has_regions: bool) -> Prompts | None:
    """The prompts of a fresh network: needed to map the fixed regions; None without regions (shared filter)."""
    try:
        return resolve_prompts(None, options)
    except PromptError:
        if has_regions:
            raise
        return None


def load_network(fixed: sitk.Image, options: RegistrationOptions, device: torch.device,
                 has_regions: bool) -> tuple[TextSCFNet, str, Prompts, Schedule]:
    """The network, where it came from, the prompts and the schedule it runs (defaults, or the options' steps).

    A checkpoint named in the options is used as it is. Without one, the bundled model is used when it was trained
    on this pair's modality; otherwise (e.g. an MRI pair and the bundled CT model) a fresh network is refined on the
    pair, as the default schedule for it says. ``checkpoint="fresh"`` asks for a fresh network explicitly and then
    needs the refinement steps too.
    """
    requested = options.checkpoint
    wants_refinement = options.refine_iterations is None or options.refine_iterations > 0
    reason = ""
    if (requested or "").lower() == "fresh":
        if not (options.refine_iterations or 0) > 0 and not (options.refine_field_iterations or 0) > 0:
            raise InputError("a fresh (untrained) network needs instance optimisation: give --refine N (e.g. 150) "
                             "or --refine-field M (e.g. 100)")
        net, source, reason = None, "fresh", "a fresh network was asked for"
    else:
        path = Path(requested) if requested else bundled_model_path()
        net, _ = load_checkpoint(path)
        source = str(path)
        modality = pair_modality(fixed, options)
        if requested is None and wants_refinement and net.config.modality != modality:
            reason = (f"the bundled model was trained on {net.config.modality.upper()} and this pair is "
                      f"{modality.upper()}: it is not used; a fresh network's grid, sized to the image, is refined "
                      "on instead")
            net, source = None, "fresh"
        elif requested is None:
            reason = "the bundled model"
    if net is None:
        prompts = _fresh_prompts(options, has_regions)
        net = fresh_model(fixed, prompts, options, device)
        if prompts is None:
            prompts = Prompts([], [], net.config.template)
    else:
        prompts = resolve_prompts(net, options)
    if options.integrate is not None and options.integrate != net.config.integrate:
        from textscf.warp import ScalingAndSquaring
        net.config.integrate = bool(options.integrate)
        net.integrator = ScalingAndSquaring(net.config.integration_steps) if options.integrate else None
    if not has_regions:
        reason = "; ".join(filter(None, [reason, "no fixed label map and no segmentor: no regions"]))
    schedule = with_steps(default_schedule(source if source == "fresh" else "checkpoint", net.config.input_shape,
                                           device, has_regions, reason,
                                           similarity_for(net.config.modality, options.refine_similarity),
                                           grid_spacing=net.config.spacing,
                                           smooth_weight=options.refine_smooth_weight),
                          options.refine_iterations, options.refine_field_iterations)
    return net, source, prompts, schedule


def register(
    fixed: sitk.Image,
    moving: sitk.Image,
    options: RegistrationOptions | None = None,
    fixed_labels: sitk.Image | None = None,
    moving_labels: sitk.Image | None = None,
    initial_transform: sitk.Transform | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
    log: LogCallback | None = None,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed``; every output lies on the fixed image's grid.

    Args:
        fixed, moving: 3-D scalar images (any grids, physical LPS space).
        options: :class:`RegistrationOptions` (defaults: bundled model, its prompts, centre alignment).
        fixed_labels: the fixed image's label map (stands in for the segmentor; confidence 1). Without it and
            without segmentor weights the pair is registered without regions (the shared filter alone).
        moving_labels: the moving image's label map, for Dice/HD95 before and after and the warped labels; it
            enters the refinement loss only with ``options.refine_use_moving_labels``.
        initial_transform: a resampling-convention transform (fixed -> moving) to start from; replaces ``init``.
        progress: ``progress(stage, fraction, seconds_left)``: at each stage start and after every refinement
            step; the fraction of the whole run never decreases, ``seconds_left`` is an estimate or None. A callback
            taking ``(stage, fraction)`` only is called at the stage starts.
        cancel: polled between stages and before every refinement step; when it returns True, CancelledError is
            raised.
        log: receives lines for the user as the run goes (the schedule chosen).

    Returns:
        :class:`textscf.results.RegistrationResult`.
    """
    options = options or RegistrationOptions()
    check_input_images(fixed, moving)
    steps = _Progress(progress, cancel)
    torch.manual_seed(options.seed)
    stats: dict = {}
    with steps.stage("load model"):
        run = _load_stage(fixed, options, fixed_labels, moving_labels, stats, log)
        steps.expect_refinement(run.schedule.estimated_seconds)
    with steps.stage("segment fixed image"):
        seg, moving_seg = _segment_stage(fixed, moving, fixed_labels, moving_labels, run, options)
    with steps.stage("initial alignment"):
        init = _initial_stage(fixed, moving, options, initial_transform, stats)
    with steps.stage("resample to model grid"):
        inputs = model_inputs(run.net, fixed, moving, seg, init, run.rows)
        field_inputs = inputs
        if run.schedule.field_steps > 0:
            grid = field_grid(inputs.grid, run.schedule.field_subdivision, fixed)
            if not same_grid(grid, inputs.grid):
                field_inputs = model_inputs(run.net, fixed, moving, seg, init, run.rows, grid)
            field_inputs.weight = overlap_weight(field_inputs.grid, fixed, moving, init)  # the field steps' own
    with steps.stage("register"):
        u_model, u_grid = _register_stage(run, inputs, field_inputs, moving_seg, init, options, steps, stats)
        del field_inputs
    with steps.stage("resample field"):
        del seg, moving_seg  # full-size regions and confidence, done with once the field is found
        field = field_outputs(u_model, u_grid, fixed, init, moving, moving_labels)
    with steps.stage("evaluate"):
        stats.update(field_statistics(field))
        jacobian = sitk.GetImageFromArray(field.jacobian.transpose(2, 1, 0))
        jacobian.CopyInformation(fixed)
        field.jacobian = None  # the image holds it now: one full-size copy, not two
        if moving_labels is not None and fixed_labels is not None:
            stats.update(overlap_statistics(fixed_labels, moving_labels, field.warped_labels, init, run.prompts))

    stats["seconds_per_stage"] = dict(steps.seconds)
    stats["seconds_total"] = round(sum(steps.seconds.values()), 3)
    stats["model_grid"] = {"shape": list(inputs.grid.shape), "spacing": list(inputs.grid.spacing)}
    stats["field_grid"] = {"shape": list(u_grid.shape), "spacing": list(u_grid.spacing)}
    stats["checkpoint"] = str(run.checkpoint)
    steps.finish()
    return RegistrationResult(displacement=field.total, warped=field.warped, jacobian=jacobian,
                              warped_labels=field.warped_labels, stats=stats,
                              region_names=["background"] + list(run.prompts.region_names), initial_transform=init)


@dataclass
class _Run:
    """What the "load model" stage decides: the device, the network with its text matrix set, the prompts, the rows
    of the text matrix they use, the schedule and whether the moving labels enter the refinement loss."""

    device: torch.device
    net: TextSCFNet
    checkpoint: str
    prompts: Prompts
    rows: list[int]
    schedule: Schedule
    guide: bool


def _load_stage(fixed, options: RegistrationOptions, fixed_labels, moving_labels, stats: dict, log) -> _Run:
    device, note = select_device(options.device)
    has_regions = fixed_labels is not None or bool(options.segmentor_weights)
    net, checkpoint, prompts, schedule = load_network(fixed, options, device, has_regions)
    text_matrix, rows = text_matrix_for(net, prompts)
    net.set_text_matrix(text_matrix)
    guide = _check_label_guidance(options, schedule, moving_labels, has_regions)
    if note:
        warnings.warn(note, stacklevel=3)
        stats["device_note"] = note
    stats["schedule"] = schedule.as_dict()
    stats["moving_labels"] = ("scoring and the refinement loss (Dice weight "
                              f"{options.refine_label_weight:g})" if guide else
                              "scoring only" if moving_labels is not None else "none")
    if log is not None:
        log(f"schedule: {schedule.describe()}")
        if moving_labels is not None and fixed_labels is None:
            log("the moving label map is warped, but Dice/HD95 need the fixed label map too (--fixed-labels)")
    return _Run(device, net, checkpoint, prompts, rows, schedule, guide)


def _segment_stage(fixed, moving, fixed_labels, moving_labels, run: _Run, options: RegistrationOptions):
    """The fixed image's regions (label map or segmentor; None without either) and, with a moving label map, the
    moving image's (validated like the fixed map; used when guiding the refinement)."""
    seg = segment_fixed(fixed, fixed_labels, run.prompts, options, run.device)
    moving_seg = None
    if moving_labels is not None and run.prompts.region_names:
        # its "region absent" warnings would repeat the fixed map's
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            moving_seg = LabelMapSegmentor(_clear_background_labels(moving_labels, run.prompts),
                                           run.prompts.label_values, run.prompts.region_names,
                                           options.unmapped_labels).predict(moving)
    return seg, moving_seg


def _initial_stage(fixed, moving, options: RegistrationOptions, initial_transform, stats: dict):
    if initial_transform is not None:
        init = initial_transform
        stats["initial_alignment"] = "given: " + describe_transform(init)
    else:
        init = initial_alignment(fixed, moving, options.init, seed=options.seed)
        stats["initial_alignment"] = f"{options.init}: {describe_transform(init)}"
    how = "--initial-transform" if initial_transform is not None else f"--init {options.init}"
    stats["overlap_after_initial_alignment"] = round(check_overlap(fixed, moving, init, how), 4)
    return init


@dataclass
class ModelInputs:
    """The pair on the model grid: normalised images ``(I, J, K)``, region rows of the text matrix and confidence
    (zeros without regions: every voxel is background with confidence 0, so only w_r acts), and ``lut`` (region index
    -> text-matrix row; None without regions)."""

    grid: ModelGrid
    fixed: np.ndarray
    moving: np.ndarray
    regions: np.ndarray
    confidence: np.ndarray
    lut: np.ndarray | None
    #: 1 where both images have data (:func:`overlap_weight`), for the field steps' similarity; None = everywhere
    #: (set by register() on the grid the field steps run on)
    weight: np.ndarray | None = None


def model_inputs(net: TextSCFNet, fixed, moving, seg: Segmentation | None, init, rows: list[int],
                 grid: ModelGrid | None = None) -> ModelInputs:
    """The pair on ``grid`` (None: the model grid, :func:`model_grid`), normalised as ``net`` was trained."""
    if grid is None:
        body = sitk.Cast(seg.regions > 0, sitk.sitkUInt8) if seg is not None and _has_foreground(seg.regions) \
            else None
        grid = model_grid(net.config, fixed, body)
    fixed_m = normalise_for_model(resample_to_grid(fixed, grid, None, "linear", _background(fixed)), net)
    moving_m = normalise_for_model(resample_to_grid(moving, grid, init, "linear", _background(moving)), net)
    if seg is None:
        return ModelInputs(grid, fixed_m, moving_m, np.zeros(grid.shape, np.int64), np.zeros(grid.shape, np.float32),
                           None)
    lut = np.array([0] + rows, dtype=np.int64)
    regions = lut[image_to_array(resample_to_grid(seg.regions, grid, None, "nearest", 0)).astype(np.int64)]
    confidence = image_to_array(resample_to_grid(seg.confidence, grid, None, "linear", 1.0)).astype(np.float32)
    return ModelInputs(grid, fixed_m, moving_m, regions, confidence, lut)


#: How far inside both images' fields of view the refinement's similarity counts a voxel, in voxels of the grid it
#: runs on (:func:`overlap_weight`): about the reach of a MIND-SSC descriptor there (offsets of 2 voxels, a 3-voxel
#: box), whose values near a field-of-view edge see the fill beyond it.
FIELD_OF_VIEW_MARGIN_VOXELS = 4.0


def overlap_weight(grid: ModelGrid, fixed: sitk.Image, moving: sitk.Image, init,
                   margin_mm: float | None = None) -> np.ndarray | None:
    """``(I, J, K)`` float32 on ``grid``: 1 where the fixed image and the moving image mapped by ``init`` both have
    data at least ``margin_mm`` inside their fields of view (default :data:`FIELD_OF_VIEW_MARGIN_VOXELS` of the
    grid's coarsest spacing), else 0; None when that is every voxel. Beyond either
    field of view a resampled image holds only its fill value, and an edge that is not anatomy (a scan's end, the
    rim of a rotated volume) would pull the tissue next to it: the refinement's similarity leaves those voxels out
    (ITK and elastix likewise count only samples inside both images)."""
    margin = FIELD_OF_VIEW_MARGIN_VOXELS * float(max(grid.spacing)) if margin_mm is None else margin_mm
    weight = field_of_view_weight(grid, fixed, None, margin) * field_of_view_weight(grid, moving, init, margin)
    return None if weight.all() else weight


def _register_stage(run: _Run, inputs: ModelInputs, field_inputs: ModelInputs, moving_seg, init,
                    options: RegistrationOptions, steps: "_Progress", stats: dict) -> tuple[np.ndarray, ModelGrid]:
    """The voxel field and the grid it lives on: the network's forward pass alone (model grid), or the schedule's
    refinement on this pair: network steps on the model grid, then field steps on ``field_inputs``' grid, starting
    from the network's field when the schedule says so."""
    schedule = run.schedule
    if schedule.steps == 0:
        u_model, run_note = network_field(run, inputs, options.debias, stats)
        _record_device(run, run_note, stats)
        _check_finite_field(u_model, refined=False)
        return u_model, inputs.grid
    from textscf.refine import RefineSettings, refine_on_pair

    settings = RefineSettings(
        iterations=schedule.network_steps, learning_rate=options.refine_learning_rate,
        smooth_weight=schedule.smooth_weight, dice_weight=options.refine_label_weight,
        similarity=schedule.similarity, seed=options.seed, network_start=schedule.network_start,
        field_iterations=schedule.field_steps, field_levels=schedule.field_levels,
    )
    steps.plan_refinement(schedule.estimated_seconds)

    def refine(on: ModelInputs, settings: RefineSettings, start=None, steps_before: int = 0):
        def progress(done, total, seconds_left):
            steps.refinement_step(steps_before + done, schedule.steps, seconds_left)

        moving_regions = _moving_regions(moving_seg, on, init) if run.guide else None
        return refine_on_pair(run.net, on.moving, on.fixed, on.regions, on.confidence, moving_regions,
                              settings=settings, device=run.device, cancel=steps.check_cancel, progress=progress,
                              start=start, weight=on.weight)

    run_note = None
    if field_inputs is inputs:
        refined = refine(inputs, settings)
    else:  # the network on its grid, the field steps on the field grid from its field
        if schedule.network_steps > 0:
            first = refine(inputs, replace(settings, field_iterations=0))
            start, network_summary = first.displacement, first.summary()
        elif schedule.network_start:
            start, run_note = network_field(run, inputs, options.debias, stats)
            network_summary = None
        else:
            start, network_summary = np.zeros((3,) + inputs.grid.shape, np.float32), None
        start = deformation.resample_voxel_field(start, inputs.grid, field_inputs.grid)
        refined = refine(field_inputs, replace(settings, iterations=0), start, schedule.network_steps)
        if network_summary is not None:
            stats["refine_network"] = network_summary
    stats["refine"] = refined.summary()
    _record_device(run, run_note, stats)
    _check_finite_field(refined.displacement, refined=True)
    return refined.displacement, field_inputs.grid


def _moving_regions(moving_seg, on: ModelInputs, init) -> np.ndarray:
    """The moving image's regions on ``on``'s grid as rows of the text matrix (for the Dice term)."""
    return on.lut[image_to_array(resample_to_grid(moving_seg.regions, on.grid, init, "nearest", 0)).astype(np.int64)]


def _record_device(run: _Run, run_note: str | None, stats: dict) -> None:
    if run_note:
        warnings.warn(run_note, stacklevel=4)
        stats["device_note"] = run_note
    stats["device"] = "cpu" if run_note else str(run.device)


def _check_finite_field(u_model: np.ndarray, refined: bool) -> None:
    """InputError naming the cause and the fix when the field holds NaN/Inf (nothing is written then)."""
    bad = int(np.size(u_model) - np.count_nonzero(np.isfinite(u_model)))
    if not bad:
        return
    if refined:
        raise InputError(f"the refinement diverged: {bad} displacement components are NaN or infinite. Fix: lower "
                         "the learning rate (--refine-lr, default 1e-3) or raise the smoothness weight "
                         "(--refine-smooth, default 0.1), or leave both at their defaults")
    raise CheckpointError(f"the network produced {bad} NaN or infinite displacement components. Fix: check the "
                          "checkpoint (retrain or re-download it) and the input intensities")


def field_statistics(field: "FieldOutputs", region_mask=None) -> dict:
    """Regularity of the deformable part: SDlogJ, % |J| <= 0, the Jacobian's range and the largest displacement."""
    jac = field.jacobian
    return dict(sdlogj=metrics.sdlogj(jac, region_mask), folding_percent=metrics.folding_percent(jac),
                jacobian_min=float(jac.min()), jacobian_max=float(jac.max()),
                max_displacement_mm=field.max_displacement_mm)


def overlap_statistics(fixed_labels, moving_labels, warped_labels, init, prompts: Prompts) -> dict:
    """Dice and HD95 per region before, after and (with an initial alignment) after the initial alignment alone;
    means over all regions and over those present in both label maps (Learn2Reg's: an organ missing from one scan
    cannot be aligned). The fixed map's label boxes are found once for the three comparisons."""
    fixed_boxes, moving_boxes = label_boxes(fixed_labels, prompts), label_boxes(moving_labels, prompts)
    in_both = regions_in_both(fixed_boxes, moving_boxes, prompts)
    # each resampled label map is freed once scored: one full-size copy at a time; on the fixed grid already, the
    # moving map is its own resampling (and its boxes are known)
    if same_grid(fixed_labels, moving_labels):
        dice_before, hd_before = region_metrics(fixed_labels, moving_labels, prompts, fixed_boxes=fixed_boxes,
                                                warped_boxes=moving_boxes)
    else:
        dice_before, hd_before = region_metrics(fixed_labels, resample_to_grid(moving_labels, fixed_labels, None,
                                                                               "nearest", 0), prompts,
                                                fixed_boxes=fixed_boxes)
    dice, hd = region_metrics(fixed_labels, warped_labels, prompts, fixed_boxes=fixed_boxes)
    out = dict(
        dice=dice, hd95_mm=hd, dice_before=dice_before, hd95_mm_before=hd_before,
        mean_dice=metrics.mean_ignoring_nan(dice), mean_dice_before=metrics.mean_ignoring_nan(dice_before),
        mean_hd95_mm=metrics.mean_ignoring_nan(hd), mean_hd95_mm_before=metrics.mean_ignoring_nan(hd_before),
        regions_in_both=in_both,
        mean_dice_in_both=metrics.mean_ignoring_nan({r: dice[r] for r in in_both}),
        mean_dice_before_in_both=metrics.mean_ignoring_nan({r: dice_before[r] for r in in_both}),
    )
    if init is not None:
        dice_init, _ = region_metrics(fixed_labels, resample_to_grid(moving_labels, fixed_labels, init, "nearest", 0),
                                      prompts, hd95=False, fixed_boxes=fixed_boxes)  # only its mean Dice is reported
        out["mean_dice_initial_alignment"] = metrics.mean_ignoring_nan(dice_init)
    return out


@dataclass
class FieldOutputs:
    """The network's field brought to the fixed grid: ``total`` (float32 3-vector image, LPS mm, initial alignment
    folded in), the Jacobian determinant of the deformable part ``(I, J, K)`` float32, its largest length in mm, and the
    warped moving image and label map (None without one)."""

    total: sitk.Image
    jacobian: np.ndarray
    max_displacement_mm: float
    warped: sitk.Image
    warped_labels: sitk.Image | None


def field_outputs(u_model: np.ndarray, grid: ModelGrid, fixed: sitk.Image, init: sitk.Transform | None,
                  moving: sitk.Image, moving_labels: sitk.Image | None) -> FieldOutputs:
    """The model-grid voxel field ``u_model`` -> :class:`FieldOutputs` on the fixed grid.

    The torch path (:class:`textscf.deformation.Deformation`, slab by slab, float32) serves matrix-offset initial
    transforms, i.e. every alignment the engine computes; ITK's resampler (:mod:`textscf.spatial`) serves the others
    (e.g. a B-spline ``--initial-transform``). The two agree to float32 rounding (Testing/test_deformation.py).
    """
    if deformation.supports(init):
        with torch.inference_mode():
            d = deformation.Deformation(u_model, grid, fixed, init)
            jacobian, longest = d.jacobian(), d.max_length_mm()
            warped = d.warp(moving, "linear", _background(moving))
            labels = d.warp(moving_labels, "nearest", 0) if moving_labels is not None else None
            return FieldOutputs(d.total_image(release=True), jacobian, longest, warped, labels)
    deformable = resample_displacement(voxel_displacement_to_physical(u_model, grid), fixed)
    jac = metrics.jacobian_determinant(physical_displacement_to_voxel(deformable, fixed)).astype(np.float32)
    total = compose_with_initial(deformable, init)
    labels = warp_image(moving_labels, total, fixed, "nearest", 0) if moving_labels is not None else None
    return FieldOutputs(sitk.Cast(total, sitk.sitkVectorFloat32), jac,
                        float(np.sqrt((image_to_array(deformable) ** 2).sum(0)).max()),
                        warp_image(moving, total, fixed, "linear", _background(moving)), labels)


def _check_label_guidance(options: RegistrationOptions, schedule: Schedule, moving_labels: sitk.Image | None,
                          has_regions: bool) -> bool:
    """Whether the moving label map enters the refinement loss; InputError when that was asked but cannot be."""
    if not options.refine_use_moving_labels:
        return False
    if moving_labels is None:
        raise InputError("guiding the refinement with labels needs the moving label map: give --moving-labels with "
                         "--guide-with-labels, or leave out --guide-with-labels")
    if not has_regions:
        raise InputError("guiding the refinement with labels compares the warped moving label map with the fixed "
                         "image's regions: give --fixed-labels (or --segmentor-weights), or leave out "
                         "--guide-with-labels")
    if schedule.steps <= 0:
        raise InputError("guiding with labels acts through the refinement, and this run has none: give --refine N "
                         "(e.g. 12), or leave out --guide-with-labels")
    if options.refine_label_weight <= 0:
        raise InputError(f"the label loss weight must be > 0 when guiding with labels, got "
                         f"{options.refine_label_weight:g}")
    return True


def _clear_background_labels(labels: sitk.Image, prompts: Prompts) -> sitk.Image:
    if not prompts.background_labels:
        return labels
    arr = sitk.GetArrayFromImage(labels)
    out = sitk.GetImageFromArray(np.where(np.isin(arr, prompts.background_labels), 0, arr))
    out.CopyInformation(labels)
    return out


def _has_foreground(labels: sitk.Image) -> bool:
    return bool(sitk.GetArrayViewFromImage(labels).any())


def _background(image: sitk.Image) -> float:
    """Value outside the image: its minimum (air in CT, zero in most MRI)."""
    return float(sitk.GetArrayViewFromImage(image).min())



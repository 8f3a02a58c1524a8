"""register(): the one registration code path, used by ``textscf register``, ``textscf demo`` and the Slicer logic.

Stages: load the model and prompts -> fixed regions (label map or segmentor) -> initial alignment -> resample
both images onto the model grid -> network (optionally refined on the pair) -> field to physical space on the
fixed grid, composed with the initial alignment -> warped images, Jacobian, statistics.
"""
from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from textscf import metrics
from textscf.alignment import describe_transform, initial_alignment
from textscf.checkpoint import load_checkpoint
from textscf.errors import CancelledError, CheckpointError, InputError, PromptError
from textscf.networks.textscf_net import TextSCFConfig, TextSCFNet
from textscf.presets import load_preset, model_rows
from textscf.results import RegistrationResult
from textscf.segmentation import LabelMapSegmentor, Segmentation, SwinUNETRSegmentor
from textscf.spatial import (
    IntensityNormaliser,
    ModelGrid,
    compose_with_initial,
    image_to_array,
    model_grid_for,
    physical_displacement_to_voxel,
    resample_displacement,
    resample_to_grid,
    voxel_displacement_to_physical,
    warp_image,
)
from textscf.text import EmbeddingCache, canonical_encoder_name, make_text_encoder, resolve_template, validate_region_names

BUNDLED_MODEL = "abdomen-ct-onehot-ns8.pt"

ProgressCallback = Callable[[str, float], None]
CancelCallback = Callable[[], bool]

# Stage names and their share of the progress bar.
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
        refine_iterations: instance optimisation steps on this pair (0 = off).
        refine_learning_rate, refine_smooth_weight, refine_similarity: refinement settings
            (similarity "auto" = MSE for CT, local NCC for MRI).
        refine_field_iterations: last refinement steps on the half-resolution field itself.
        refine_use_moving_labels: add the Dice term of the moving label map to the refinement (when given).
        fresh_grid_factor: for ``checkpoint="fresh"``, the model grid's spacing relative to the fixed image's.
        segmentor_weights: SwinUNETR weights (state dict or MONAI bundle) used when no fixed label map is given.
        segmentor_feature_size: 12, 24 or 48 (tiny/small/base).
        unmapped_labels: label values without a prompt: "error" or "background".
        seed: seeds torch for deterministic refinement.
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
    refine_iterations: int = 0
    refine_learning_rate: float = 1e-3
    refine_smooth_weight: float = 0.1
    refine_similarity: str = "auto"
    refine_field_iterations: int = 0
    refine_use_moving_labels: bool = True
    fresh_grid_factor: float = 2.0
    segmentor_weights: str | None = None
    segmentor_feature_size: int = 48
    unmapped_labels: str = "error"
    seed: int = 0


@dataclass
class Prompts:
    """The regions a registration uses: names (index order 1..N-1), label values, template."""

    region_names: list[str]
    label_values: list[int]
    template: str
    background_labels: list[int] = field(default_factory=list)


class _Progress:
    """Turns stage starts into (stage name, overall fraction) callbacks, checks cancel, and times stages."""

    def __init__(self, progress: ProgressCallback | None, cancel: CancelCallback | None):
        self.progress, self.cancel = progress, cancel
        self.seconds: dict[str, float] = {}
        self._done = 0.0

    def check_cancel(self):
        if self.cancel is not None and self.cancel():
            raise CancelledError("registration cancelled by the user; nothing was written")

    @contextmanager
    def stage(self, name: str):
        self.check_cancel()
        if self.progress is not None:
            self.progress(name, self._done)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        self._done += dict(STAGES)[name]
        self.check_cancel()

    def finish(self):
        if self.progress is not None:
            self.progress("done", 1.0)


def bundled_model_path() -> Path:
    """Path of the bundled default model (CheckpointError if this installation has none)."""
    path = Path(str(resources.files("textscf") / "resources" / "models" / BUNDLED_MODEL))
    if not path.is_file():
        raise CheckpointError(
            f"this installation has no bundled model ({path}); pass a checkpoint with --checkpoint "
            "(train one with `textscf train`)"
        )
    return path


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


def fresh_model(fixed: sitk.Image, prompts: Prompts, options: RegistrationOptions) -> TextSCFNet:
    """An untrained one-hot textSCF network on the fixed image's own grid (for refinement from scratch)."""
    from textscf.train import build_model

    preset = load_preset(options.preset) if options.preset else None
    modality = preset.modality if preset else ("ct" if _background(fixed) < -500 else "mri")
    # The network sees the image at 1/grid_factor resolution (features at half of that); the field is
    # upsampled to the full grid. grid_factor 2 keeps CPU refinement at ~seconds per iteration.
    factor = float(options.fresh_grid_factor)
    if factor < 1:
        raise InputError(f"fresh_grid_factor must be >= 1, got {factor}")
    spacing = tuple(s * factor for s in fixed.GetSpacing())
    shape = tuple(int(16 * np.ceil(n / factor / 16)) for n in fixed.GetSize())
    return build_model(
        prompts.region_names, prompts.label_values, "onehot", prompts.template, start_channels=8, hidden_channels=64,
        modality=modality, spacing=spacing, input_shape=shape, direction=fixed.GetDirection(), seed=options.seed,
    )


def segment_fixed(fixed: sitk.Image, fixed_labels: sitk.Image | None, prompts: Prompts,
                  options: RegistrationOptions, device: torch.device) -> Segmentation:
    """Regions and confidence of the fixed image from the user's label map, else from SwinUNETR."""
    if fixed_labels is not None:
        segmentor = LabelMapSegmentor(_clear_background_labels(fixed_labels, prompts), prompts.label_values,
                                      prompts.region_names, options.unmapped_labels)
        return segmentor.predict(fixed)
    if not options.segmentor_weights:
        raise InputError(
            "no fixed label map and no segmentor weights: give the fixed image's label map (--fixed-labels) or "
            "SwinUNETR weights (--segmentor-weights, a state dict or MONAI bundle folder)"
        )
    segmentor = SwinUNETRSegmentor(
        options.segmentor_weights, prompts.region_names, feature_size=options.segmentor_feature_size, device=str(device)
    )
    return segmentor.predict(fixed)


def model_grid(cfg: TextSCFConfig, fixed: sitk.Image, body_mask: sitk.Image | None) -> ModelGrid:
    """The model's input grid: the checkpoint's spacing, shape and orientation, centred on the fixed body."""
    centred = model_grid_for(fixed, cfg.spacing, cfg.input_shape, body_mask=body_mask)
    direction = np.array(cfg.direction).reshape(3, 3)
    half_extent = np.array(cfg.spacing) * (np.array(cfg.input_shape) - 1) / 2.0
    origin = centred.centre() - direction @ half_extent
    return ModelGrid(cfg.input_shape, cfg.spacing, tuple(origin), cfg.direction)


def normalise_for_model(image: sitk.Image, net: TextSCFNet) -> np.ndarray:
    """``(I, J, K)`` float32 in [0, 1] as the model was trained (its :class:`IntensityNormaliser`)."""
    try:
        normaliser = IntensityNormaliser.from_config(net.config)
    except InputError as exc:
        raise CheckpointError(str(exc)) from None
    return normaliser(image_to_array(image))


def _tensor(arr: np.ndarray, device, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr)).to(device=device, dtype=dtype)[None, None]


def run_network(net: TextSCFNet, moving: np.ndarray, fixed: np.ndarray, regions: np.ndarray,
                confidence: np.ndarray, device: torch.device) -> tuple[np.ndarray, str | None]:
    """Network forward on ``device``; on CUDA out-of-memory, retried on the CPU. Returns (u (3,I,J,K), note)."""
    def forward(dev):
        net.to(dev)
        with torch.no_grad():
            out = net(_tensor(moving, dev), _tensor(fixed, dev), _tensor(regions, dev, torch.long),
                      _tensor(confidence, dev))
        return out.displacement[0].float().cpu().numpy()

    try:
        return forward(device), None
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return forward(torch.device("cpu")), "the GPU ran out of memory; the network ran on the CPU instead"


def region_metrics(fixed_labels: sitk.Image, warped_labels: sitk.Image, prompts: Prompts) -> tuple[dict, dict]:
    """Dice and HD95 (mm) per region name between two label maps on the same grid."""
    fixed_arr = image_to_array(fixed_labels)
    moving_arr = image_to_array(warped_labels)
    spacing = fixed_labels.GetSpacing()
    dice = metrics.dice_per_label(moving_arr, fixed_arr, prompts.label_values)
    hd = metrics.hd95_per_label(moving_arr, fixed_arr, prompts.label_values, spacing)
    by_name = dict(zip(prompts.label_values, prompts.region_names))
    return ({by_name[v]: float(d) for v, d in dice.items()}, {by_name[v]: float(h) for v, h in hd.items()})


def regions_in_both(fixed_labels: sitk.Image, moving_labels: sitk.Image, prompts: Prompts) -> list[str]:
    """Names of the regions whose label value occurs in both label maps (each on its own grid)."""
    present = set(np.unique(image_to_array(fixed_labels)).tolist()) & set(np.unique(image_to_array(moving_labels)).tolist())
    return [name for value, name in zip(prompts.label_values, prompts.region_names) if value in present]


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


def register(
    fixed: sitk.Image,
    moving: sitk.Image,
    options: RegistrationOptions | None = None,
    fixed_labels: sitk.Image | None = None,
    moving_labels: sitk.Image | None = None,
    initial_transform: sitk.Transform | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed``; every output lies on the fixed image's grid.

    Args:
        fixed, moving: 3-D scalar images (any grids, physical LPS space).
        options: :class:`RegistrationOptions` (defaults: bundled model, its prompts, centre alignment).
        fixed_labels: the fixed image's label map (stands in for the segmentor; confidence 1).
        moving_labels: the moving image's label map, for Dice/HD95 before and after.
        initial_transform: a resampling-convention transform (fixed -> moving) to start from; replaces ``init``.
        progress: called with (stage name, overall fraction in [0, 1]) at each stage start.
        cancel: polled between stages; when it returns True, CancelledError is raised.

    Returns:
        :class:`textscf.results.RegistrationResult`.
    """
    options = options or RegistrationOptions()
    check_input_images(fixed, moving)
    steps = _Progress(progress, cancel)
    torch.manual_seed(options.seed)
    stats: dict = {}

    with steps.stage("load model"):
        device, note = select_device(options.device)
        if (options.checkpoint or "").lower() == "fresh":
            if options.refine_iterations <= 0:
                raise InputError("a fresh (untrained) network needs instance optimisation: give --refine N (e.g. 200)")
            checkpoint = "fresh"
            net = fresh_model(fixed, resolve_prompts(None, options), options)
        else:
            checkpoint = Path(options.checkpoint) if options.checkpoint else bundled_model_path()
            net, _ = load_checkpoint(checkpoint)
        if options.integrate is not None and options.integrate != net.config.integrate:
            from textscf.warp import ScalingAndSquaring
            net.config.integrate = bool(options.integrate)
            net.integrator = ScalingAndSquaring(net.config.integration_steps) if options.integrate else None
        prompts = resolve_prompts(net, options)
        text_matrix, rows = text_matrix_for(net, prompts)
        net.set_text_matrix(text_matrix)
        if note:
            warnings.warn(note, stacklevel=2)
            stats["device_note"] = note

    with steps.stage("segment fixed image"):
        seg = segment_fixed(fixed, fixed_labels, prompts, options, device)
        moving_seg = None
        if moving_labels is not None:
            # Same validation as the fixed map (integer, prompts for every value, same grid as its image);
            # its "region absent" warnings would repeat the fixed map's. Refinement reuses the regions.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                moving_seg = LabelMapSegmentor(_clear_background_labels(moving_labels, prompts), prompts.label_values,
                                               prompts.region_names, options.unmapped_labels).predict(moving)

    with steps.stage("initial alignment"):
        if initial_transform is not None:
            init = initial_transform
            stats["initial_alignment"] = "given: " + describe_transform(init)
        else:
            init = initial_alignment(fixed, moving, options.init, seed=options.seed)
            stats["initial_alignment"] = f"{options.init}: {describe_transform(init)}"
        how = "--initial-transform" if initial_transform is not None else f"--init {options.init}"
        stats["overlap_after_initial_alignment"] = round(check_overlap(fixed, moving, init, how), 4)

    with steps.stage("resample to model grid"):
        body = sitk.Cast(seg.labels > 0, sitk.sitkUInt8) if _has_foreground(seg.labels) else None
        grid = model_grid(net.config, fixed, body)
        fixed_m = normalise_for_model(resample_to_grid(fixed, grid, None, "linear", _background(fixed)), net)
        moving_m = normalise_for_model(resample_to_grid(moving, grid, init, "linear", _background(moving)), net)
        # Region indices -> rows of the text matrix the prompts use.
        lut = np.array([0] + rows, dtype=np.int64)
        regions_m = lut[image_to_array(resample_to_grid(seg.labels, grid, None, "nearest", 0)).astype(np.int64)]
        confidence_m = image_to_array(resample_to_grid(seg.confidence, grid, None, "linear", 1.0)).astype(np.float32)

    with steps.stage("register"):
        if options.refine_iterations > 0:
            from textscf.refine import RefineSettings, refine_on_pair

            moving_regions_m = None
            if moving_seg is not None and options.refine_use_moving_labels:
                moving_regions_m = lut[image_to_array(
                    resample_to_grid(moving_seg.labels, grid, init, "nearest", 0)).astype(np.int64)]
            settings = RefineSettings(
                iterations=options.refine_iterations, learning_rate=options.refine_learning_rate,
                smooth_weight=options.refine_smooth_weight,
                similarity=_similarity_for(net, options.refine_similarity), seed=options.seed,
                field_iterations=options.refine_field_iterations,
            )
            refined = refine_on_pair(net, moving_m, fixed_m, regions_m, confidence_m, moving_regions_m,
                                     settings=settings, device=device, cancel=steps.check_cancel)
            u_model, run_note = refined.displacement, None
            stats["refine"] = refined.summary()
        else:
            u_model, run_note = run_network(net, moving_m, fixed_m, regions_m, confidence_m, device)
        if run_note:
            warnings.warn(run_note, stacklevel=2)
            stats["device_note"] = run_note
        stats["device"] = "cpu" if run_note else str(device)

    with steps.stage("resample field"):
        field_model = voxel_displacement_to_physical(u_model, grid)
        deformable = resample_displacement(field_model, fixed)
        fixed_voxels = physical_displacement_to_voxel(deformable, fixed)
        jac = metrics.jacobian_determinant(fixed_voxels).astype(np.float32)
        jacobian = sitk.GetImageFromArray(jac.transpose(2, 1, 0))
        jacobian.CopyInformation(fixed)
        total = compose_with_initial(deformable, init)
        warped = warp_image(moving, total, fixed, "linear", _background(moving))
        warped_labels = None
        if moving_labels is not None:
            warped_labels = warp_image(moving_labels, total, fixed, "nearest", 0)

    with steps.stage("evaluate"):
        region_mask = None
        stats.update(
            sdlogj=metrics.sdlogj(jac, region_mask),
            folding_percent=metrics.folding_percent(jac),
            jacobian_min=float(jac.min()),
            jacobian_max=float(jac.max()),
            max_displacement_mm=float(np.sqrt((image_to_array(deformable) ** 2).sum(0)).max()),
        )
        if moving_labels is not None and fixed_labels is not None:
            before = resample_to_grid(moving_labels, fixed, None, "nearest", 0)
            dice_before, hd_before = region_metrics(fixed_labels, before, prompts)
            dice, hd = region_metrics(fixed_labels, warped_labels, prompts)
            # Learn2Reg averages only the regions present in both scans; an organ missing from one cannot be aligned.
            in_both = regions_in_both(fixed_labels, moving_labels, prompts)
            stats.update(
                dice=dice, hd95_mm=hd, dice_before=dice_before, hd95_mm_before=hd_before,
                mean_dice=metrics.mean_ignoring_nan(dice), mean_dice_before=metrics.mean_ignoring_nan(dice_before),
                mean_hd95_mm=metrics.mean_ignoring_nan(hd), mean_hd95_mm_before=metrics.mean_ignoring_nan(hd_before),
                regions_in_both=in_both,
                mean_dice_in_both=metrics.mean_ignoring_nan({r: dice[r] for r in in_both}),
                mean_dice_before_in_both=metrics.mean_ignoring_nan({r: dice_before[r] for r in in_both}),
            )
            if init is not None:
                aligned = resample_to_grid(moving_labels, fixed, init, "nearest", 0)
                dice_init, _ = region_metrics(fixed_labels, aligned, prompts)
                stats["mean_dice_initial_alignment"] = metrics.mean_ignoring_nan(dice_init)

    stats["seconds_per_stage"] = dict(steps.seconds)
    stats["seconds_total"] = round(sum(steps.seconds.values()), 3)
    stats["model_grid"] = {"shape": list(grid.shape), "spacing": list(grid.spacing)}
    stats["checkpoint"] = str(checkpoint)
    steps.finish()
    return RegistrationResult(
        displacement=total,
        warped=warped,
        jacobian=jacobian,
        warped_labels=warped_labels,
        stats=stats,
        region_names=["background"] + list(prompts.region_names),
        initial_transform=init,
    )


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


def _similarity_for(net: TextSCFNet, choice: str) -> str:
    if choice != "auto":
        return choice
    return "mse" if net.config.modality == "ct" else "ncc"

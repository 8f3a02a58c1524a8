"""Training pairs synthesised on every step from label maps (SynthMorph-style).

Each training subject (an image and its organ label map on the model grid) becomes a tissue class map
(:func:`tissue_classes`: the organs, and the rest of the body split into intensity bands such as air, fat, soft
tissue and bone). Every item of :class:`SynthPairDataset` is a new pair:

- **inter-subject** (moving and fixed from two subjects), or **intra-subject with a known field**: one subject and
  its copy warped by a random smooth displacement ``v``; the field that registers them is then ``v`` itself
  (resampling convention, ``fixed(x) = moving(x + v(x))``), a dense target that measures correspondence;
- each image gets its own random affine and elastic map (the same for its labels);
- with probability ``random_contrast`` both images are rendered with **one random intensity per tissue class**
  (one draw per pair, as both images of a pair share a modality), then each image gets its own smooth bias field,
  blur, gamma and noise (Hoffmann et al., SynthMorph, IEEE TMI 2022). Otherwise the subject's own image is used.

Geometry conventions are those of ``docs/ARCHITECTURE.md``: arrays ``(I, J, K)``, displacements in voxels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from monai.networks.layers import GaussianFilter

from textscf.datasets import Augmentation, PairDataset, Subject, jitter_intensity, random_spatial_grid, sample_on_grid
from textscf.errors import InputError
from textscf.phantom import random_smooth_displacement
from textscf.warp import SpatialTransformer


def tissue_classes(image: np.ndarray, regions: np.ndarray, bands: int = 10, smooth_voxels: float = 0.7) -> np.ndarray:
    """Tissue classes ``(I, J, K)`` uint8 of a subject: the intensity band of each non-organ voxel, the organs apart.

    Args:
        image: ``(I, J, K)`` in [0, 1] (the model's intensity normalisation applied).
        regions: ``(I, J, K)`` region indices (0 = background, 1..N-1 the organs).
        bands: equal-width intensity bands of [0, 1] for the background voxels (classes ``0..bands-1``);
            region ``r`` becomes class ``bands + r - 1``.
        smooth_voxels: Gaussian smoothing before banding, so noise does not speckle the bands.
    """
    from scipy import ndimage

    if image.shape != regions.shape:
        raise InputError(f"image {image.shape} and regions {regions.shape} must share one grid")
    if not 1 <= bands <= 128:
        raise InputError(f"bands must lie in [1, 128], got {bands}")
    smooth = ndimage.gaussian_filter(np.asarray(image, np.float32), smooth_voxels) if smooth_voxels else image
    classes = np.clip((np.asarray(smooth) * bands).astype(np.int64), 0, bands - 1)
    organ = regions > 0
    classes[organ] = bands + regions[organ].astype(np.int64) - 1
    if classes.max() > 255:
        raise InputError(f"{bands} bands and {int(regions.max())} regions exceed 256 classes; use fewer bands")
    return classes.astype(np.uint8)


@dataclass(frozen=True)
class ContrastSynthesis:
    """Random-contrast rendering of tissue class maps.

    Attributes:
        bias_strength: sd of the log of the smooth multiplicative bias field.
        bias_smoothness_mm: control spacing of the bias field.
        blur_sigma: largest Gaussian blur (voxels), drawn uniformly from [0, blur_sigma] per image.
        gamma: images are raised to ``exp(U(-gamma, gamma))``.
        noise_std: largest noise sd (fraction of the [0, 1] range), drawn per image.
        texture_std: sd of a per-class smooth texture (fraction of the range).
    """

    bias_strength: float = 0.2
    bias_smoothness_mm: float = 80.0
    blur_sigma: float = 1.0
    gamma: float = 0.25
    noise_std: float = 0.04
    texture_std: float = 0.03

    def lookup_table(self, num_classes: int, generator: torch.Generator) -> torch.Tensor:
        """One random intensity in [0, 1] per tissue class: ``(num_classes,)``."""
        return torch.rand(num_classes, generator=generator)

    def render(self, classes: torch.Tensor, lut: torch.Tensor, spacing, generator: torch.Generator) -> torch.Tensor:
        """``(1, I, J, K)`` long classes -> ``(1, I, J, K)`` float image in [0, 1]."""
        image = lut[classes]
        shape = tuple(classes.shape[1:])
        seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))
        if self.texture_std:
            texture = torch.randn((1, *shape), generator=generator)
            image = image + self.texture_std * GaussianFilter(3, 1.0)(texture[None])[0]
        sigma = float(torch.rand((), generator=generator)) * self.blur_sigma
        if sigma > 0.1:
            image = GaussianFilter(3, sigma)(image[None])[0]
        if self.bias_strength:
            log_bias = random_smooth_displacement(shape, spacing, 1.0, self.bias_smoothness_mm, seed)[0]
            scale = self.bias_strength * float(torch.rand((), generator=generator)) / max(
                float(np.abs(log_bias).max()), 1e-6)
            image = image * torch.from_numpy(np.exp(scale * log_bias))[None]
        lo, hi = image.min(), image.max()
        image = (image - lo) / (hi - lo).clamp_min(1e-6)
        image = image.clamp(0.0, 1.0) ** float(np.exp((float(torch.rand((), generator=generator)) * 2 - 1) * self.gamma))
        if self.noise_std:
            image = image + float(torch.rand((), generator=generator)) * self.noise_std * torch.randn(
                image.shape, generator=generator)
        return image.clamp(0.0, 1.0).float()


class SynthPairDataset(PairDataset):
    """Pairs drawn anew on every call from tissue class maps (see the module docstring).

    Args:
        subjects: subjects on the model grid with image (any range: ``normalise`` maps it to [0, 1]) and organ
            labels.
        label_values: raw label value(s) of regions 1..N-1 (as for :class:`PairDataset`).
        pairs: the ``(moving, fixed)`` subject pairs inter-subject items are drawn from (default: all ordered
            pairs).
        pairs_per_epoch: the dataset's length (items are drawn, not enumerated).
        intra_fraction: probability of an intra-subject pair with a known field.
        known_field_mm: largest length of the known field (drawn uniformly up to it), mm.
        known_field_smoothness_mm: its control spacing.
        random_contrast: probability of random-contrast images (else the CT-like image).
        augment: spatial and intensity augmentation of each image (:class:`Augmentation`).
        contrast: the :class:`ContrastSynthesis`.
        bands: intensity bands of the background tissue (:func:`tissue_classes`).

    Item: as :class:`PairDataset`'s, plus ``true_displacement (3, I, J, K)`` (zeros when unknown) and
    ``field_known`` (a bool tensor).
    """

    def __init__(
        self,
        subjects: Sequence[Subject],
        label_values: Sequence,
        pairs: Sequence[tuple[int, int]] | None = None,
        pairs_per_epoch: int = 1000,
        intra_fraction: float = 0.3,
        known_field_mm: float = 24.0,
        known_field_smoothness_mm: float = 60.0,
        random_contrast: float = 0.6,
        augment: Augmentation | None = None,
        contrast: ContrastSynthesis | None = None,
        seed: int = 0,
        normalise=None,
        bands: int = 10,
    ):
        super().__init__(subjects, label_values, pairs=pairs, augment=augment or Augmentation(), seed=seed,
                         normalise=normalise)
        for name, p in (("intra_fraction", intra_fraction), ("random_contrast", random_contrast)):
            if not 0.0 <= p <= 1.0:
                raise InputError(f"{name} must lie in [0, 1], got {p}")
        self._classes = [tissue_classes(i, r, bands) for i, r in zip(self._images, self._regions)]
        self.num_classes = bands + self.num_regions - 1
        self.pairs_per_epoch = int(pairs_per_epoch)
        self.intra_fraction = float(intra_fraction)
        self.known_field_mm = float(known_field_mm)
        self.known_field_smoothness_mm = float(known_field_smoothness_mm)
        self.random_contrast = float(random_contrast)
        self.contrast = contrast or ContrastSynthesis()

    def __len__(self) -> int:
        return self.pairs_per_epoch

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"pair index {index} out of range for {len(self)} pairs")
        seeds = np.random.SeedSequence([self.seed, self.epoch, index, 1]).generate_state(4)
        generator = torch.Generator().manual_seed(int(seeds[0]))
        rng = np.random.default_rng(int(seeds[1]))
        intra = bool(rng.random() < self.intra_fraction)
        if intra:
            s = int(rng.integers(len(self.names)))
            moving = self._augmented_subject(s, int(seeds[2]))
            field = self._known_field(s, rng)
            fixed = {key: _warp(value, field) for key, value in moving.items()}
            names = (self.names[s], self.names[s])
        else:
            m, f = self.pairs[int(rng.integers(len(self.pairs)))]
            moving = self._augmented_subject(m, int(seeds[2]))
            fixed = self._augmented_subject(f, int(seeds[3]))
            field = torch.zeros((3, *moving["image"].shape[1:]))
            names = (self.names[m], self.names[f])
        if rng.random() < self.random_contrast:
            lut = self.contrast.lookup_table(self.num_classes, generator)
            spacing = self.spacings[0]
            for item in (moving, fixed):
                item["image"] = self.contrast.render(item["classes"], lut, spacing, generator)
        return {
            "moving": moving["image"].contiguous(), "fixed": fixed["image"].contiguous(),
            "moving_regions": moving["regions"].contiguous(), "fixed_regions": fixed["regions"].contiguous(),
            "moving_name": names[0], "fixed_name": names[1],
            "true_displacement": field.float().contiguous(), "field_known": torch.tensor(intra),
        }

    def _augmented_subject(self, subject: int, seed: int) -> dict:
        """Image (normalised, intensity-jittered), regions and classes under one random spatial map."""
        grid = random_spatial_grid(self._images[subject].shape, self.spacings[subject], self.augment, seed)
        image = torch.from_numpy(self._images[subject])[None]
        return {
            "image": jitter_intensity(sample_on_grid(image, grid), self.augment, seed),
            "regions": sample_on_grid(torch.from_numpy(self._regions[subject].astype(np.int64))[None], grid),
            "classes": sample_on_grid(torch.from_numpy(self._classes[subject].astype(np.int64))[None], grid),
        }

    def _known_field(self, subject: int, rng: np.random.Generator) -> torch.Tensor:
        shape, spacing = self._images[subject].shape, self.spacings[subject]
        if rng.random() < IDENTICAL_SHARE:
            return torch.zeros((3, *shape))
        length = float(rng.uniform(0.0, self.known_field_mm))
        field = random_smooth_displacement(shape, spacing, length, self.known_field_smoothness_mm,
                                           int(rng.integers(2**31)))
        return torch.from_numpy(field)


#: Share of the intra-subject pairs whose known field is zero: the moving image itself as the fixed image. Without
#: such pairs a network trained on inter-subject pairs learns a deformation prior from the fixed image's appearance
#: and moves an identical pair by centimetres (measured: up to 40 mm on the real example CT; see the 12 mm model card).
IDENTICAL_SHARE = 0.25


def _warp(volume: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """``volume(x + u(x))`` for ``(C, I, J, K)`` and a voxel displacement ``(3, I, J, K)``: float volumes
    trilinearly, integer (label) volumes nearest."""
    labels = not volume.dtype.is_floating_point
    with torch.no_grad():
        out = SpatialTransformer(mode="nearest" if labels else "bilinear")(volume[None].float(), displacement[None])[0]
    return out.round().long() if labels else out

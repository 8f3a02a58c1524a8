"""Training pairs synthesised per step: new intensities every draw, labels aligned with images, known fields exact."""
import numpy as np
import pytest
import torch

from textscf.datasets import Augmentation, Subject
from textscf.errors import InputError
from textscf.phantom import make_abdomen_phantom
from textscf.spatial import IntensityNormaliser
from textscf.synthesis import ContrastSynthesis, SynthPairDataset, tissue_classes
from textscf.warp import SpatialTransformer

SMALL = dict(shape=(48, 40, 64), spacing=(8.0, 8.0, 8.0))
CT = IntensityNormaliser("ct_window", (-500, 800))
FLAT = ContrastSynthesis(bias_strength=0.0, blur_sigma=0.0, gamma=0.0, noise_std=0.0, texture_std=0.0)
STILL = Augmentation(rotation_deg=0, scale=0, translation_mm=0, elastic_mm=0, gamma=0, intensity_scale=0, noise_std=0)


@pytest.fixture(scope="module")
def subjects():
    out = []
    for seed in range(3):
        ct, labels = make_abdomen_phantom(seed=seed, variation=0.5, **SMALL)
        out.append(Subject.from_sitk(f"p{seed}", ct, labels))
    return out


def dataset(subjects, **kw):
    base = dict(pairs_per_epoch=8, normalise=CT, seed=0)
    base.update(kw)
    return SynthPairDataset(subjects, list(range(1, 14)), **base)


def test_tissue_classes_band_the_body_and_keep_the_organs():
    image = np.linspace(0, 1, 4 * 4 * 4, dtype=np.float32).reshape(4, 4, 4)
    regions = np.zeros((4, 4, 4), np.int64)
    regions[0, 0, 0], regions[3, 3, 3] = 1, 2
    classes = tissue_classes(image, regions, bands=4, smooth_voxels=0)
    assert classes.dtype == np.uint8
    assert classes[0, 0, 1] == 0 and classes[3, 3, 2] == 3  # intensity bands
    assert classes[0, 0, 0] == 4 and classes[3, 3, 3] == 5  # organs after the bands
    with pytest.raises(InputError, match="share one grid"):
        tissue_classes(image, regions[:2])
    with pytest.raises(InputError, match="bands"):
        tissue_classes(image, regions, bands=0)


def test_random_contrast_draws_new_intensities_per_pair_and_epoch(subjects):
    ds = dataset(subjects, random_contrast=1.0, intra_fraction=0.0, contrast=FLAT, augment=STILL)
    first = ds[0]
    assert torch.equal(first["moving"], ds[0]["moving"])  # deterministic given (seed, epoch, index)
    ds.set_epoch(1)
    later = ds[0]
    assert not torch.equal(first["moving"], later["moving"])
    # within one pair both images share one lookup table: an organ has the same intensity in both
    item = dataset(subjects, random_contrast=1.0, intra_fraction=0.0, contrast=FLAT, augment=STILL)[3]
    values = []
    for role in ("moving", "fixed"):
        liver = item[f"{role}_regions"][0] == 6
        v = item[role][0][liver]
        assert float(v.max() - v.min()) < 1e-5  # one value per tissue class: labels and image aligned
        values.append(float(v.mean()))
    assert values[0] == pytest.approx(values[1], abs=0.05)  # min-max rescaling may shift it slightly


def test_labels_stay_aligned_with_random_contrast_images_under_augmentation(subjects):
    ds = dataset(subjects, random_contrast=1.0, intra_fraction=0.0, contrast=FLAT, augment=Augmentation(
        rotation_deg=8, scale=0.05, translation_mm=8, elastic_mm=6, gamma=0, intensity_scale=0, noise_std=0))
    for n in range(3):
        item = ds[n]
        for role in ("moving", "fixed"):
            image, regions = item[role][0], item[f"{role}_regions"][0]
            for region in (1, 6):
                inside = image[regions == region]
                # nearest-sampled classes and labels share the map: one intensity per organ
                assert inside.numel() > 0 and float(inside.std()) < 1e-4


def test_intra_subject_pairs_carry_their_exact_field(subjects):
    ds = dataset(subjects, intra_fraction=1.0, random_contrast=0.0, known_field_mm=24.0)
    nearest = SpatialTransformer(mode="nearest")
    for n in range(3):
        item = ds[n]
        assert bool(item["field_known"]) and item["moving_name"] == item["fixed_name"]
        u = item["true_displacement"]
        assert u.shape == (3, 48, 40, 64)
        assert float((u * 8.0).pow(2).sum(0).sqrt().max()) <= 24.0 + 1e-3  # mm
        warped = nearest(item["moving_regions"][None].float(), u[None])[0].round().long()
        assert torch.equal(warped, item["fixed_regions"])  # fixed(x) = moving(x + u(x))
    inter = dataset(subjects, intra_fraction=0.0)[0]
    assert not bool(inter["field_known"]) and float(inter["true_displacement"].abs().max()) == 0.0


def test_a_share_of_intra_subject_pairs_is_the_identical_pair(subjects):
    from textscf.synthesis import IDENTICAL_SHARE

    for contrast in (0.0, 1.0):
        ds = dataset(subjects, intra_fraction=1.0, random_contrast=contrast, known_field_mm=24.0, pairs_per_epoch=40)
        identical = 0
        for n in range(len(ds)):
            item = ds[n]
            if float(item["true_displacement"].abs().max()) > 0.0:
                continue
            identical += 1
            assert torch.equal(item["fixed_regions"], item["moving_regions"])
            if contrast == 0.0:
                assert torch.allclose(item["fixed"], item["moving"], atol=1e-6)
            else:  # one contrast for both; the noise of each rendering is its own, like two acquisitions
                r = np.corrcoef(item["fixed"].ravel().numpy(), item["moving"].ravel().numpy())[0, 1]
                assert r > 0.5  # measured 0.71 on these small phantoms
        assert 0 < identical < len(ds) and abs(identical / len(ds) - IDENTICAL_SHARE) < 0.2

"""The synthetic abdomen phantom, random fields/affines, warping, the example pair and label-derived CT."""
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from textscf.errors import InputError
from textscf.phantom import (
    BTCV_ORGANS,
    ORGAN_HU,
    PHANTOM_DIRECTION,
    affine_to_displacement,
    deform_pair,
    make_abdomen_phantom,
    make_example_pair,
    random_affine,
    random_smooth_displacement,
    synthesize_ct_from_labels,
)


def arr(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def centroid_lps(labels: sitk.Image, value: int) -> np.ndarray:
    idx = np.array(ndimage.center_of_mass(arr(labels) == value))
    return np.array(labels.TransformContinuousIndexToPhysicalPoint(idx.tolist()))


def jacobian_det(u: np.ndarray) -> np.ndarray:
    """det(I + grad u) of a voxel displacement (3, I, J, K)."""
    grad = np.stack([np.stack(np.gradient(u[a]), 0) for a in range(3)], 0)  # [a, b] = d u_a / d x_b
    jac = grad + np.eye(3)[:, :, None, None, None]
    return np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))


def dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    x, y = a == value, b == value
    return 2.0 * (x & y).sum() / (x.sum() + y.sum())


@pytest.fixture(scope="module")
def phantom():
    return make_abdomen_phantom()


def test_btcv_organ_order():
    assert len(BTCV_ORGANS) == 13
    assert BTCV_ORGANS[0] == "spleen" and BTCV_ORGANS[5] == "liver" and BTCV_ORGANS[12] == "left adrenal gland"
    assert BTCV_ORGANS[9] == "portal and splenic vein"
    assert sorted(ORGAN_HU) == list(range(1, 14))


def test_phantom_grid_and_types(phantom):
    ct, labels = phantom
    assert ct.GetSize() == (96, 80, 128) and labels.GetSize() == (96, 80, 128)
    assert ct.GetPixelID() == sitk.sitkFloat32 and labels.GetPixelID() == sitk.sitkUInt8
    assert ct.GetSpacing() == (4.0, 4.0, 4.0)
    assert ct.GetDirection() == PHANTOM_DIRECTION and labels.GetDirection() == PHANTOM_DIRECTION
    # centred on the origin
    centre = ct.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in ct.GetSize()])
    np.testing.assert_allclose(centre, 0.0, atol=1e-9)
    assert set(np.unique(arr(labels))) == set(range(14))


def test_phantom_organ_volumes_and_shapes(phantom):
    _, labels = phantom
    lab = arr(labels)
    volume_ml = np.bincount(lab.ravel(), minlength=14)[1:] * 64 / 1000.0
    assert volume_ml.argmax() == 5  # liver is the largest organ
    plausible = {  # ml, around the BTCV averages
        "spleen": (150, 500), "right kidney": (100, 250), "left kidney": (100, 250), "gall bladder": (10, 60),
        "esophagus": (8, 40), "liver": (1200, 2600), "stomach": (250, 800), "aorta": (50, 160),
        "inferior vena cava": (50, 160), "portal and splenic vein": (15, 70), "pancreas": (50, 140),
        "right adrenal gland": (2, 15), "left adrenal gland": (2, 15),
    }
    for label, name in enumerate(BTCV_ORGANS, start=1):
        lo, hi = plausible[name]
        assert lo <= volume_ml[label - 1] <= hi, (name, volume_ml[label - 1])
        components, n = ndimage.label(lab == label)
        assert np.bincount(components.ravel())[1:].max() >= 0.97 * (lab == label).sum(), name


def test_phantom_anatomy_is_in_place(phantom):
    _, labels = phantom
    c = {v: centroid_lps(labels, v) for v in range(1, 14)}  # LPS: x to the left, y posterior, z superior
    assert c[6][0] < 0 < c[1][0]  # liver on the right, spleen on the left
    assert c[2][0] < c[8][0] < c[3][0]  # kidneys either side of the aorta
    assert c[9][0] < c[8][0]  # IVC to the right of the aorta
    assert c[2][1] > c[8][1] and c[3][1] > c[8][1]  # kidneys posterior to the aorta
    assert c[7][1] < c[2][1] and c[4][1] < c[2][1]  # stomach and gall bladder anterior
    assert c[12][2] > c[2][2] and c[13][2] > c[3][2]  # adrenals above the kidneys
    assert c[5][2] > c[7][2]  # esophagus above the stomach
    assert c[4][2] < c[6][2]  # gall bladder below the liver centre


def test_phantom_intensities_follow_the_table(phantom):
    ct, labels = phantom
    img, lab = arr(ct), arr(labels)
    for label in range(1, 14):
        core = ndimage.binary_erosion(lab == label)
        if core.sum() >= 30:  # the adrenals are too thin at 4 mm for a partial-volume-free core
            assert abs(img[core].mean() - ORGAN_HU[label][0]) < 10, BTCV_ORGANS[label - 1]
    assert img[lab > 0].min() > -400  # organs stay inside the body, away from air and lung
    assert abs(img[:4, :4, :].mean() + 1000) < 10  # air in the corners
    body = (img > -500) & (lab == 0)
    assert ((img[body] > -150) & (img[body] < -60)).mean() > 0.15  # fat
    assert ((img[body] > 20) & (img[body] < 80)).mean() > 0.15  # muscle and bowel
    assert (img > 300).sum() > 1000  # bone


def test_phantom_is_deterministic_and_varies(phantom):
    ct, labels = phantom
    ct2, labels2 = make_abdomen_phantom()
    np.testing.assert_array_equal(arr(ct), arr(ct2))
    np.testing.assert_array_equal(arr(labels), arr(labels2))
    # no variation: same anatomy, other noise
    ct3, labels3 = make_abdomen_phantom(seed=5)
    np.testing.assert_array_equal(arr(labels), arr(labels3))
    assert not np.array_equal(arr(ct), arr(ct3))
    # variation: another subject, every organ still there
    _, labels4 = make_abdomen_phantom(seed=5, variation=0.8)
    lab, lab4 = arr(labels), arr(labels4)
    assert set(np.unique(lab4)) == set(range(14))
    assert 0.5 < dice(lab, lab4, 6) < 0.97


def test_phantom_smaller_grid_keeps_the_anatomy(phantom):
    _, labels = phantom
    ct, small = make_abdomen_phantom(shape=(48, 40, 64), spacing=(8.0, 8.0, 8.0))
    assert small.GetSize() == (48, 40, 64)
    liver_full = (arr(labels) == 6).sum() * 64
    liver_small = (arr(small) == 6).sum() * 512
    assert abs(liver_small / liver_full - 1) < 0.1
    # a smaller field of view gets a smaller body, still with organs
    _, tiny = make_abdomen_phantom(shape=(40, 32, 48), spacing=(4.0, 4.0, 4.0))
    assert (arr(tiny) == 6).sum() > 100


def test_phantom_rejects_bad_arguments():
    with pytest.raises(InputError, match="variation"):
        make_abdomen_phantom(variation=1.5)
    with pytest.raises(InputError, match="spacing"):
        make_abdomen_phantom(spacing=(4.0, 0.0, 4.0))
    with pytest.raises(InputError, match="three"):
        make_abdomen_phantom(shape=(96, 80))


@pytest.mark.parametrize("spacing", [(4.0, 4.0, 4.0), (2.0, 3.0, 5.0)])
def test_random_smooth_displacement(spacing):
    shape = (48, 40, 32)
    u = random_smooth_displacement(shape, spacing, max_displacement_mm=8.0, smoothness_mm=25.0, seed=3)
    assert u.shape == (3, *shape) and u.dtype == np.float32
    length_mm = np.sqrt(((u * np.asarray(spacing)[:, None, None, None]) ** 2).sum(0))
    assert length_mm.max() == pytest.approx(8.0, rel=1e-5)
    assert np.abs(u.mean(axis=(1, 2, 3)) * np.asarray(spacing)).max() < 0.05  # zero mean, in mm
    assert length_mm.mean() > 2.0  # not a single bump
    assert jacobian_det(u.astype(np.float64)).min() > 0.2
    np.testing.assert_array_equal(u, random_smooth_displacement(shape, spacing, 8.0, 25.0, seed=3))
    assert not np.array_equal(u, random_smooth_displacement(shape, spacing, 8.0, 25.0, seed=4))


def test_random_smooth_displacement_rejects_bad_arguments():
    with pytest.raises(InputError, match="smoothness_mm"):
        random_smooth_displacement((8, 8, 8), (1, 1, 1), 5.0, smoothness_mm=0.0)
    with pytest.raises(InputError, match="max_displacement_mm"):
        random_smooth_displacement((8, 8, 8), (1, 1, 1), -1.0)


def test_random_affine_bounds_and_centre():
    centre = np.array([10.0, -20.0, 30.0])
    for seed in range(5):
        m = random_affine(10.0, 0.0, 0.1, seed=seed, center=centre)
        assert m.shape == (4, 4)
        np.testing.assert_allclose(m[3], [0, 0, 0, 1])
        np.testing.assert_allclose(m[:3, :3] @ centre + m[:3, 3], centre, atol=1e-9)  # no translation: centre fixed
        singular = np.linalg.svd(m[:3, :3], compute_uv=False)
        assert singular.min() >= 0.9 - 1e-9 and singular.max() <= 1.1 + 1e-9
    m = random_affine(0.0, 5.0, 0.0, seed=1)
    np.testing.assert_allclose(m[:3, :3], np.eye(3))
    assert np.abs(m[:3, 3]).max() <= 5.0 and np.abs(m[:3, 3]).max() > 0
    np.testing.assert_array_equal(random_affine(5, 5, 0.05, seed=2), random_affine(5, 5, 0.05, seed=2))
    with pytest.raises(InputError, match="max_scale"):
        random_affine(5, 5, 1.5)


def test_affine_to_displacement_units_and_direction():
    shift = np.eye(4)
    shift[:3, 3] = [8.0, 8.0, 0.0]  # LPS mm
    u = affine_to_displacement(shift, (6, 5, 4), (4.0, 2.0, 1.0))
    np.testing.assert_allclose(u[:, 2, 3, 1], [2.0, 4.0, 0.0], atol=1e-6)
    # j runs anterior: a posterior (+y LPS) shift is a negative j displacement
    u = affine_to_displacement(shift, (6, 5, 4), (4.0, 2.0, 1.0), direction=PHANTOM_DIRECTION)
    np.testing.assert_allclose(u[:, 0, 0, 0], [2.0, -4.0, 0.0], atol=1e-6)


def test_deform_pair_zero_field_and_integer_shift():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(12, 10, 14)).astype(np.float32)
    labels = np.zeros((12, 10, 14), np.uint8)
    labels[3:7, 2:6, 5:9] = 4
    warped, warped_labels = deform_pair(image, labels, np.zeros((3, 12, 10, 14), np.float32))
    np.testing.assert_allclose(warped, image, atol=1e-6)
    np.testing.assert_array_equal(warped_labels, labels)
    assert warped_labels.dtype == np.uint8
    shift = np.zeros((3, 12, 10, 14), np.float32)
    shift[2] = 3.0  # warped(x) = moving(x + 3): content moves by -3 along k
    warped, warped_labels = deform_pair(image, labels, shift)
    np.testing.assert_array_equal(warped_labels[:, :, :-3], labels[:, :, 3:])
    np.testing.assert_allclose(warped[:, :, :-3], image[:, :, 3:], atol=1e-6)
    assert np.argwhere(warped_labels == 4)[:, 2].min() == 2


def test_deform_pair_sitk_and_errors(phantom):
    ct, labels = phantom
    u = random_smooth_displacement(ct.GetSize(), ct.GetSpacing(), 6.0, 30.0, seed=1)
    warped, warped_labels = deform_pair(ct, labels, u)
    assert isinstance(warped, sitk.Image) and isinstance(warped_labels, sitk.Image)
    assert warped.GetOrigin() == ct.GetOrigin() and warped_labels.GetDirection() == labels.GetDirection()
    assert warped_labels.GetPixelID() == sitk.sitkUInt8
    assert 0.7 < dice(arr(labels), arr(warped_labels), 6) < 0.99
    with pytest.raises(InputError, match="displacement"):
        deform_pair(arr(ct), arr(labels), u[:, :-1])
    with pytest.raises(InputError, match="labels shape"):
        deform_pair(arr(ct), arr(labels)[:-1], u)
    with pytest.raises(InputError, match="both"):
        deform_pair(ct, arr(labels), u)


def test_example_pair():
    pair = make_example_pair(seed=0, shape=(48, 40, 64), spacing=(8.0, 8.0, 8.0))
    assert {"fixed", "moving", "fixed_labels", "moving_labels", "displacement", "label_names"} <= set(pair)
    assert pair["label_names"][6] == "liver"
    assert pair["fixed"].GetSize() == pair["moving"].GetSize() == (48, 40, 64)
    assert pair["displacement"].shape == (3, 48, 40, 64)
    assert np.sqrt(((pair["displacement"] * 8.0) ** 2).sum(0)).max() == pytest.approx(8.0, rel=1e-5)
    fixed, moving = arr(pair["fixed_labels"]), arr(pair["moving_labels"])
    scores = [dice(fixed, moving, v) for v in range(1, 14) if (fixed == v).any() and (moving == v).any()]
    assert len(scores) >= 12
    assert 0.2 < np.mean(scores) < 0.85  # a real registration task: overlapping but far from aligned
    assert dice(fixed, moving, 6) > 0.6  # the liver overlaps


@pytest.fixture(scope="module")
def btcv_synthetic(shared_data):
    image = sitk.ReadImage(str(shared_data / "abdomen" / "btcv_labels" / "0034.nii.gz"))
    labels = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    return labels, synthesize_ct_from_labels(labels, image.GetSpacing(), seed=0)


def test_synthesized_ct_organs_follow_the_table(btcv_synthetic):
    labels, ct = btcv_synthetic
    assert ct.shape == labels.shape == (192, 160, 256) and ct.dtype == np.float32
    for label in range(1, 14):
        core = ndimage.binary_erosion(labels == label)
        assert core.sum() > 0
        # thin organs (the adrenals) keep some partial volume with the fat around them even in their core
        tolerance = 10 if core.sum() >= 200 else 25
        assert abs(ct[core].mean() - ORGAN_HU[label][0]) < tolerance, BTCV_ORGANS[label - 1]
    # organs distinguishable as in contrast CT
    means = {v: ct[ndimage.binary_erosion(labels == v)].mean() for v in (1, 2, 6)}
    assert means[6] + 10 < means[1] < means[2] - 20  # liver < spleen < kidney


def test_synthesized_ct_body_and_air(btcv_synthetic):
    labels, ct = btcv_synthetic
    body = (ct > -500) & (labels == 0)
    assert body.sum() > 5 * (labels > 0).sum()  # a body around the organs
    values = ct[body]
    assert -150 < np.median(values) < 80
    assert ((values > -150) & (values < -60)).mean() > 0.15  # fat
    assert ((values > 0) & (values < 100)).mean() > 0.15  # soft tissue
    assert ct[:5, :5, :].max() < -900 and ct[-5:, -5:, :].max() < -900  # air outside the body
    # every axial slice has a body, even those without organs
    assert ((ct > -500).sum((0, 1)) > 1000).all()


def test_synthesized_ct_finds_the_orientation(shared_data):
    image = sitk.ReadImage(str(shared_data / "abdomen" / "btcv_labels" / "0035.nii.gz"))
    labels = sitk.GetArrayFromImage(image).transpose(2, 1, 0)[::2, ::2, ::2]  # 4 mm keeps it fast
    spacing = (4.0, 4.0, 4.0)

    def spine_behind_aorta(lab, ct, posterior_sign):
        bone_j = np.argwhere(ct > 400)[:, 1].mean()
        aorta_j = np.argwhere(lab == 8)[:, 1].mean()
        return posterior_sign * (bone_j - aorta_j) > 5

    ct = synthesize_ct_from_labels(labels, spacing, seed=1)
    assert spine_behind_aorta(labels, ct, -1)  # BTCV arrays: j runs posterior -> anterior
    flipped = np.ascontiguousarray(labels[:, ::-1, ::-1])
    ct_flipped = synthesize_ct_from_labels(flipped, spacing, seed=1)
    assert spine_behind_aorta(flipped, ct_flipped, +1)
    assert (ct_flipped[:, :, -1] > -500).sum() > 200  # the body continues at the (now inferior) last slice


def test_synthesize_rejects_bad_labels():
    labels = np.zeros((16, 16, 16), np.int16)
    with pytest.raises(InputError, match="no organ"):
        synthesize_ct_from_labels(labels, (2, 2, 2))
    labels[4:8, 4:8, 4:8] = 20
    with pytest.raises(InputError, match="BTCV labels"):
        synthesize_ct_from_labels(labels, (2, 2, 2))
    with pytest.raises(InputError, match="3-D"):
        synthesize_ct_from_labels(labels[0], (2, 2, 2))


def test_synthesize_from_phantom_labels(phantom):
    _, labels = phantom
    lab = arr(labels)
    ct = synthesize_ct_from_labels(lab, labels.GetSpacing(), seed=2)
    liver = ndimage.binary_erosion(lab == 6)
    assert abs(ct[liver].mean() - ORGAN_HU[6][0]) < 10
    np.testing.assert_array_equal(ct, synthesize_ct_from_labels(lab, labels.GetSpacing(), seed=2))

"""Tests of the benchmark peers (benchmarks/peers.py): ANTs SyN, Elastix B-spline and identity.

A small analytic phantom (48 x 40 x 32 voxels at 2 mm) is deformed by a known translation plus a smooth sinusoidal
field. For each peer the returned displacement, applied by an independent warp written here (scipy map_coordinates in
the resampling convention warped(x) = moving(x + u(x))), must reproduce the peer's own warped image and labels; the
displacement must match the known one; Dice must improve.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import peers  # noqa: E402

SHAPE = (48, 40, 32)
SPACING = (2.0, 2.0, 2.0)
SHIFT_VOX = np.array([2.0, -1.5, 1.0])  # 4, -3, 2 mm along the array axes
WAVE_AMPLITUDE = 0.8  # voxels
TEXTURE = 0.15  # intensity texture inside the body: without it the flat body interior leaves the motion unidentifiable

# (centre, radii, intensity) in voxels of SHAPE; index 0 is the body, 1..4 are the labelled structures
STRUCTURES = [
    ((24.0, 20.0, 16.0), (19.0, 15.0, 12.0), 0.30),
    ((16.0, 14.0, 12.0), (6.0, 5.0, 4.5), 0.90),
    ((31.0, 25.0, 18.0), (7.0, 5.0, 5.0), 0.60),
    ((22.0, 27.0, 10.0), (5.0, 4.0, 4.0), 1.00),
    ((29.0, 13.0, 21.0), (5.0, 5.0, 4.0), 0.45),
]


def _phantom(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intensity and labels at continuous voxel positions ``points`` (3, ...)."""
    image = np.zeros(points.shape[1:], dtype=np.float64)
    labels = np.zeros(points.shape[1:], dtype=np.int16)
    for index, (centre, radii, value) in enumerate(STRUCTURES):
        r = np.sqrt(sum(((points[a] - centre[a]) / radii[a]) ** 2 for a in range(3)))
        inside = 1.0 / (1.0 + np.exp(6.0 * (r - 1.0)))  # soft edge about one voxel wide
        image = image * (1.0 - inside) + value * inside
        if index > 0:
            labels[r < 1.0] = index
    # gentle texture so the intensity is not piecewise flat
    texture = TEXTURE * np.sin(points[0] / 3.0) * np.cos(points[1] / 4.0) * np.sin(points[2] / 2.5 + 0.3)
    return (image + texture * (image > 0.1)).astype(np.float32), labels


def _wave(points: np.ndarray) -> np.ndarray:
    """The smooth part of the deformation, in voxels, at positions ``points`` (3, ...)."""
    i, j, k = points
    return WAVE_AMPLITUDE * np.stack(
        [
            np.sin(2 * np.pi * j / SHAPE[1]) * np.cos(2 * np.pi * k / SHAPE[2]),
            np.sin(2 * np.pi * k / SHAPE[2] + 0.5) * np.cos(2 * np.pi * i / SHAPE[0]),
            np.sin(2 * np.pi * i / SHAPE[0] + 1.0) * np.cos(2 * np.pi * j / SHAPE[1]),
        ]
    )


def _grid() -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij"))


def _warp(volume: np.ndarray, displacement: np.ndarray, order: int) -> np.ndarray:
    """Independent warp: warped(x) = volume(x + u(x)), zero outside, u in voxels along the array axes."""
    coords = _grid() + displacement.astype(np.float64)
    return ndimage.map_coordinates(volume.astype(np.float64), coords, order=order, mode="constant", cval=0.0)


def _dice(a: np.ndarray, b: np.ndarray, labels=(1, 2, 3, 4)) -> float:
    scores = []
    for lab in labels:
        x, y = a == lab, b == lab
        scores.append(2.0 * np.logical_and(x, y).sum() / max(x.sum() + y.sum(), 1))
    return float(np.mean(scores))


def _make_pair() -> dict:
    grid = _grid()
    fixed, fixed_labels = _phantom(grid)
    # moving(y) = F(y - t - s(y)), so warped(x) = moving(x + u(x)) = F(x) when u = t + s(x + u)
    moving, moving_labels = _phantom(grid - SHIFT_VOX[:, None, None, None] - _wave(grid))
    u_true = np.broadcast_to(SHIFT_VOX[:, None, None, None], grid.shape).copy()
    for _ in range(30):  # fixed-point iteration for the exact true field
        u_true = SHIFT_VOX[:, None, None, None] + _wave(grid + u_true)
    body = _phantom(grid)[0] > 0.2
    interior = np.zeros(SHAPE, dtype=bool)
    interior[4:-4, 4:-4, 4:-4] = True
    return {
        "fixed": fixed,
        "moving": moving,
        "fixed_labels": fixed_labels,
        "moving_labels": moving_labels,
        "u_true": u_true,
        "body": body,
        "interior": interior,
    }


@pytest.fixture(scope="module")
def pair() -> dict:
    return _make_pair()


def test_phantom_is_consistent(pair):
    """Sanity of the test data: the true field reproduces the fixed image from the moving one."""
    warped = _warp(pair["moving"], pair["u_true"], order=3)
    err = np.abs(warped - pair["fixed"])[pair["interior"]]
    assert err.mean() < 0.01
    assert _dice(pair["fixed_labels"], pair["moving_labels"]) < 0.75  # the pair really is misaligned
    assert _dice(pair["fixed_labels"], _warp(pair["moving_labels"], pair["u_true"], order=0)) > 0.9


def test_physical_to_voxel_displacement_axes_and_spacing():
    field = np.zeros((4, 5, 6, 3))
    field[..., 0], field[..., 1], field[..., 2] = 4.0, -3.0, 8.0
    u = peers.physical_to_voxel_displacement(field, (2.0, 3.0, 4.0))
    assert u.shape == (3, 4, 5, 6) and u.dtype == np.float32
    np.testing.assert_allclose(u[:, 0, 0, 0], [2.0, -1.0, 2.0])
    # a direction that flips x and swaps y/z: physical = D @ diag(s) @ u
    direction = np.array([[-1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])
    u = peers.physical_to_voxel_displacement(field, (2.0, 3.0, 4.0), direction)
    np.testing.assert_allclose(direction @ np.diag([2.0, 3.0, 4.0]) @ u[:, 1, 2, 3], [4.0, -3.0, 8.0], rtol=1e-6)


def test_identity(pair):
    res = peers.identity(pair["fixed"], pair["moving"], SPACING, pair["moving_labels"])
    assert res.name == "identity"
    assert res.displacement_voxels.shape == (3,) + SHAPE and not res.displacement_voxels.any()
    np.testing.assert_array_equal(res.warped_image, pair["moving"])
    np.testing.assert_array_equal(res.warped_labels, pair["moving_labels"])
    assert res.seconds >= 0.0


def test_inputs_are_checked(pair):
    with pytest.raises(ValueError, match="same grid"):
        peers.identity(pair["fixed"], pair["moving"][:-1], SPACING)
    with pytest.raises(ValueError, match="spacing"):
        peers.identity(pair["fixed"], pair["moving"], (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="moving_labels"):
        peers.identity(pair["fixed"], pair["moving"], SPACING, pair["moving_labels"][..., :-1])


def test_set_threads_sets_itk_environment():
    previous = os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
    try:
        assert peers.set_threads(3) == 3
        assert os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] == "3"
        with pytest.raises(ValueError):
            peers.set_threads(0)
    finally:
        peers.set_threads(int(previous) if previous else 2)


def _check_peer(res, pair, image_order: int, min_label_agreement: float):
    fixed, moving = pair["fixed"], pair["moving"]
    u = res.displacement_voxels
    assert u.shape == (3,) + SHAPE and u.dtype == np.float32
    assert res.warped_image.shape == SHAPE
    assert res.warped_labels.shape == SHAPE and res.warped_labels.dtype == pair["moving_labels"].dtype
    assert res.seconds > 0 and res.settings["threads"] == 2

    # 1. the convention: our independent warp with the returned field reproduces the peer's own warped image
    interior = pair["interior"]
    scale = float(moving.max() - moving.min())
    ours = _warp(moving, u, order=image_order)
    err = np.abs(ours - res.warped_image)[interior] / scale
    assert err.mean() < 0.005, err.mean()
    assert np.percentile(err, 99) < 0.03, np.percentile(err, 99)
    # ... and a wrong convention (opposite sign, or the ITK (z, y, x) channel order) does not
    for wrong in (-u, u[::-1].copy()):
        wrong_err = np.abs(_warp(moving, wrong, order=image_order) - res.warped_image)[interior] / scale
        assert wrong_err.mean() > 5 * err.mean() + 0.01

    # the labels warped by the peer agree with our nearest-neighbour warp of the moving labels
    ours_labels = _warp(pair["moving_labels"], u, order=0).astype(np.int16)
    agreement = np.mean(ours_labels[interior] == res.warped_labels[interior])
    assert agreement > min_label_agreement, agreement

    # 2. the known motion is recovered: translation (mean over the body) and the full field (endpoint error)
    body = pair["body"]
    mean_u = u[:, body].mean(axis=1)
    np.testing.assert_allclose(mean_u, pair["u_true"][:, body].mean(axis=1), atol=0.35)
    epe = np.linalg.norm(u - pair["u_true"], axis=0)[body].mean()
    shift = float(np.linalg.norm(SHIFT_VOX))
    assert epe < 0.2 * shift, (epe, shift)

    # 3. Dice improves, and clearly
    before = _dice(pair["fixed_labels"], pair["moving_labels"])
    after = _dice(pair["fixed_labels"], res.warped_labels)
    assert after > before + 0.1, (before, after)
    print(f"\n{res.name}: err {err.mean():.4f} agreement {agreement:.4f} epe {epe:.3f} dice {before:.3f}->{after:.3f} {res.seconds:.1f}s")


def _in_empty_folder(folder: Path, run):
    """Run ``run()`` with ``folder`` as the current directory and check that it leaves no files behind."""
    previous = Path.cwd()
    os.chdir(folder)
    try:
        result = run()
    finally:
        os.chdir(previous)
    assert sorted(p.name for p in folder.iterdir()) == [], "the peer wrote files into the current directory"
    return result


@pytest.fixture(scope="module")
def ants_result(pair, tmp_path_factory):
    pytest.importorskip("ants", reason="antspyx is not installed (optional [peers] extra)")
    return _in_empty_folder(tmp_path_factory.mktemp("ants_cwd"), lambda: peers.register_ants_syn(
        pair["fixed"],
        pair["moving"],
        SPACING,
        pair["moving_labels"],
        reg_iterations=(30, 20, 0),
        aff_iterations=(200, 100, 50, 0),
    ))


@pytest.fixture(scope="module")
def elastix_result(pair, tmp_path_factory):
    pytest.importorskip("itk", reason="itk-elastix is not installed (optional [peers] extra)")
    return _in_empty_folder(tmp_path_factory.mktemp("elastix_cwd"), lambda: peers.register_elastix_bspline(
        pair["fixed"],
        pair["moving"],
        SPACING,
        pair["moving_labels"],
        # 16 mm control points for this 96 x 80 x 64 mm phantom (the 10 mm default over-fits its flat regions:
        # measured mean endpoint error 0.70 voxel at 10 mm vs 0.29 at 16 mm, with the conversion check passing in both)
        grid_spacing_mm=16.0,
        iterations=100,
        affine_iterations=60,
        resolutions=2,
    ))


def test_ants_syn(ants_result, pair):
    res = ants_result
    assert res.name == "ants_syn"
    assert res.settings["type_of_transform"] == "SyN"
    assert res.settings["label_interpolator"] == "nearestNeighbor"
    _check_peer(res, pair, image_order=1, min_label_agreement=0.995)


def test_ants_threads_are_fixed_per_process(ants_result, pair):
    """antspyx reads the thread count once per process: a different request warns and reports the effective one."""
    with pytest.warns(RuntimeWarning, match="already runs with 2 thread"):
        res = peers.register_ants_syn(
            pair["fixed"], pair["moving"], SPACING, threads=1, type_of_transform="Translation",
            aff_iterations=(20, 10, 0, 0),
        )
    assert res.settings["threads"] == 2 and res.warped_labels is None
    assert res.name == "ants_translation"


def test_elastix_bspline(elastix_result, pair):
    res = elastix_result
    assert res.name == "elastix_bspline"
    assert res.settings["stages"] == ["AffineTransform", "BSplineTransform"]
    bspline = res.settings["parameter_maps"][1]
    assert float(bspline["FinalGridSpacingInPhysicalUnits"][0]) == pytest.approx(16.0)
    assert bspline["MaximumNumberOfIterations"] == ("100",)
    # elastix resamples the image with cubic B-splines and the labels with order 0 (nearest neighbour)
    _check_peer(res, pair, image_order=3, min_label_agreement=0.995)


def test_elastix_parameter_overrides():
    pytest.importorskip("itk", reason="itk-elastix is not installed (optional [peers] extra)")
    obj = peers.elastix_parameter_maps(
        grid_spacing_mm=8.0, iterations=12, affine_iterations=None, resolutions=3, bspline_parameters={"Metric1Weight": 0.5}
    )
    assert obj.GetNumberOfParameterMaps() == 1
    pmap = obj.GetParameterMap(0)
    assert tuple(pmap["Transform"]) == ("BSplineTransform",)
    assert tuple(pmap["MaximumNumberOfIterations"]) == ("12",)
    assert tuple(pmap["Metric1Weight"]) == ("0.5",)
    assert tuple(pmap["NumberOfResolutions"]) == ("3",)
    assert float(pmap["FinalGridSpacingInPhysicalUnits"][0]) == pytest.approx(8.0)

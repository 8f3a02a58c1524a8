"""Instance optimisation on tiny volumes: it lowers the loss, can be cancelled, and is deterministic."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from textscf.errors import CancelledError, InputError
from textscf.pipeline import RegistrationOptions, register
from textscf.refine import RefineSettings, refine_on_pair
from textscf.train import build_model


def blobs(shift):
    shape = (32, 32, 32)
    idx = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    c = np.array([16.0 + shift, 15.0, 16.0], np.float32)[:, None, None, None]
    r = np.sqrt((((idx - c) / np.array([8.0, 6.0, 7.0], np.float32)[:, None, None, None]) ** 2).sum(0))
    regions = np.where(r <= 1, np.where(idx[0] < c[0, 0, 0, 0], 1, 2), 0).astype(np.int64)
    image = np.where(regions == 1, 0.9, np.where(regions == 2, 0.55, 0.1)).astype(np.float32)
    return image, regions


def tiny_net():
    return build_model(["left", "right"], [1, 2], start_channels=4, hidden_channels=16, spacing=(1, 1, 1),
                       input_shape=(32, 32, 32), seed=0)


def test_refinement_lowers_the_loss_and_leaves_the_input_network_alone():
    fixed, fixed_regions = blobs(0)
    moving, moving_regions = blobs(3)
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = refine_on_pair(net, moving, fixed, fixed_regions, None, moving_regions,
                            RefineSettings(iterations=25, learning_rate=3e-3, patience=0, field_iterations=5))
    assert result.iterations_run == 25 and result.field_iterations_run == 5 * 2  # two pyramid levels
    assert np.mean(result.losses[-3:]) < 0.6 * np.mean(result.losses[:3])
    assert np.abs(result.displacement).max() > 0.5  # it moved something
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, before[key])  # refinement works on a copy


def test_head_only_refinement_keeps_the_backbone():
    fixed, fixed_regions = blobs(0)
    moving, _ = blobs(2)
    net = tiny_net()
    result = refine_on_pair(net, moving, fixed, fixed_regions, settings=RefineSettings(
        iterations=4, learning_rate=1e-3, parameters="head", patience=0))
    refined = result.network.state_dict()
    for key, value in net.state_dict().items():
        if key.startswith("backbone.ec"):
            torch.testing.assert_close(refined[key], value)
    assert any(not torch.equal(refined[k], net.state_dict()[k]) for k in refined if k.startswith("head."))


def test_refinement_is_deterministic_on_cpu():
    fixed, fixed_regions = blobs(0)
    moving, moving_regions = blobs(2)
    settings = RefineSettings(iterations=6, learning_rate=2e-3, patience=0, seed=7)
    a = refine_on_pair(tiny_net(), moving, fixed, fixed_regions, None, moving_regions, settings)
    b = refine_on_pair(tiny_net(), moving, fixed, fixed_regions, None, moving_regions, settings)
    np.testing.assert_array_equal(a.displacement, b.displacement)
    assert a.losses == b.losses


def test_refinement_stops_early_on_a_plateau():
    fixed, fixed_regions = blobs(0)
    result = refine_on_pair(tiny_net(), fixed, fixed, fixed_regions, settings=RefineSettings(
        iterations=200, learning_rate=1e-5, patience=5, min_improvement=0.05))
    assert result.stopped_early and result.iterations_run < 200


def test_refinement_respects_cancellation():
    fixed, fixed_regions = blobs(0)
    moving, _ = blobs(2)
    calls = []

    def cancel():
        calls.append(1)
        if len(calls) > 3:
            raise CancelledError("cancelled")

    with pytest.raises(CancelledError):
        refine_on_pair(tiny_net(), moving, fixed, fixed_regions, settings=RefineSettings(iterations=50), cancel=cancel)
    assert len(calls) == 4


def _image(arr, pixel=sitk.sitkFloat32):
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    img.SetSpacing((1.0, 1.0, 1.0))
    return sitk.Cast(img, pixel)


def test_pipeline_refinement_from_a_fresh_network_improves_dice_and_is_cancellable():
    fixed, fixed_regions = blobs(0)
    moving, moving_regions = blobs(3)
    args = (_image(fixed), _image(moving))
    labels = dict(fixed_labels=_image(fixed_regions, sitk.sitkUInt8), moving_labels=_image(moving_regions, sitk.sitkUInt8))
    options = RegistrationOptions(checkpoint="fresh", region_names=["left", "right"], label_values=[1, 2], init="none",
                                  refine_iterations=30, refine_learning_rate=1e-3, refine_similarity="mse",
                                  fresh_grid_factor=1.0, seed=0)
    result = register(*args, options, **labels)
    assert result.stats["mean_dice"] > result.stats["mean_dice_before"] + 0.1
    assert result.stats["refine"]["iterations"] >= 1
    assert result.stats["folding_percent"] < 1.0

    steps = []
    with pytest.raises(CancelledError):
        register(*args, options, **labels, progress=lambda stage, f: steps.append(stage),
                 cancel=lambda: "register" in steps)
    with pytest.raises(InputError, match="--refine"):
        register(*args, RegistrationOptions(checkpoint="fresh", region_names=["left", "right"], label_values=[1, 2]))


def test_refinement_progress_only_grows_and_reaches_the_total_even_after_an_early_stop():
    fixed, fixed_regions = blobs(0)
    updates = []
    result = refine_on_pair(tiny_net(), fixed, fixed, fixed_regions, settings=RefineSettings(
        iterations=200, field_iterations=4, learning_rate=1e-5, patience=5, min_improvement=0.05),
        progress=lambda done, total, left: updates.append((done, total, left)))
    assert result.stopped_early and result.iterations_run < 200
    done = [d for d, _, _ in updates]
    assert done == sorted(done) and len(set(done)) == len(done)  # every step moves it forward
    assert updates[-1][:2] == (208, 208)  # the steps the early stop skipped count as done (4 at each of 2 levels)
    assert len(updates) == result.iterations_run + result.field_iterations_run
    lefts = [left for _, _, left in updates]
    assert all(left is not None and left >= 0 for left in lefts) and lefts[-1] == 0.0


class _NoForward(torch.nn.Module):
    """A network stand-in that fails if it runs: field-only refinement must not need it."""

    num_regions = 3

    def forward(self, *args, **kwargs):
        raise AssertionError("the network ran")


@pytest.mark.parametrize("similarity", ["mind", "mse", "mind+mse"])
def test_field_only_refinement_recovers_a_shift_without_running_the_network(similarity):
    fixed, fixed_regions = blobs(0)
    moving, _ = blobs(3)  # moving is fixed shifted by +3 voxels along i: u should be about +3 there
    updates = []
    result = refine_on_pair(_NoForward(), moving, fixed, fixed_regions, settings=RefineSettings(
        iterations=0, field_iterations=60, similarity=similarity, patience=0),
        progress=lambda done, total, left: updates.append((done, total, left)))
    assert (result.iterations_run, result.field_iterations_run) == (0, 120)
    inside = fixed_regions > 0
    shift = result.displacement[0][inside].mean()
    assert 1.5 < shift < 4.5, shift
    assert np.abs(result.displacement[1:, inside]).mean() < 0.5
    assert result.losses[-1] < result.losses[0]
    assert [d for d, _, _ in updates] == list(range(1, 121)) and updates[-1][1] == 120
    assert updates[-1][2] == 0.0 and all(left is not None for _, _, left in updates)


def test_field_only_refinement_is_deterministic_and_cancellable_within_one_step():
    fixed, fixed_regions = blobs(0)
    moving, _ = blobs(2)
    settings = RefineSettings(iterations=0, field_iterations=10, similarity="mind", patience=0, seed=3)
    a = refine_on_pair(_NoForward(), moving, fixed, fixed_regions, settings=settings)
    b = refine_on_pair(_NoForward(), moving, fixed, fixed_regions, settings=settings)
    np.testing.assert_array_equal(a.displacement, b.displacement)
    steps = []

    def cancel():
        if len(steps) >= 13:  # during the second level
            raise CancelledError("cancelled")

    with pytest.raises(CancelledError):
        refine_on_pair(_NoForward(), moving, fixed, fixed_regions, settings=settings, cancel=cancel,
                       progress=lambda done, total, left: steps.append(done))
    assert len(steps) == 13


def test_sliding_regulariser_and_label_guidance_change_the_field_and_bad_settings_are_refused():
    fixed, fixed_regions = blobs(0)
    moving, moving_regions = blobs(2)
    base = RefineSettings(iterations=0, field_iterations=15, similarity="mse", patience=0)
    plain = refine_on_pair(_NoForward(), moving, fixed, fixed_regions, settings=base)
    import dataclasses

    sliding = refine_on_pair(_NoForward(), moving, fixed, fixed_regions,
                             settings=dataclasses.replace(base, boundary_weight=0.1))
    guided = refine_on_pair(_NoForward(), moving, fixed, fixed_regions, None, moving_regions, settings=base)
    assert not np.array_equal(plain.displacement, sliding.displacement)
    assert not np.array_equal(plain.displacement, guided.displacement)
    with pytest.raises(InputError, match="similarity"):
        refine_on_pair(_NoForward(), moving, fixed, fixed_regions,
                       settings=dataclasses.replace(base, similarity="mi"))
    with pytest.raises(InputError, match="level"):
        refine_on_pair(_NoForward(), moving, fixed, fixed_regions,
                       settings=dataclasses.replace(base, field_levels=(0,)))


def test_field_steps_start_from_a_given_field():
    """The pipeline brings a network's field from its coarse grid and hands it over as ``start``: the field steps
    begin there (their first loss is that of the given field), and without field steps it is returned unchanged."""
    fixed, fixed_regions = blobs(0)
    moving, _ = blobs(3)  # fixed(x) = moving(x + 3 along i): the right field is +3 voxels along i
    right = np.zeros((3,) + fixed.shape, np.float32)
    right[0] = 3.0
    settings = RefineSettings(iterations=0, field_iterations=8, similarity="mse", patience=0)
    from_right = refine_on_pair(tiny_net(), moving, fixed, fixed_regions, settings=settings, start=right)
    from_zero = refine_on_pair(tiny_net(), moving, fixed, fixed_regions, settings=settings)
    assert from_right.losses[0] < 0.5 * from_zero.losses[0]
    inside = fixed_regions > 0
    assert abs(float(np.median(from_right.displacement[0][inside])) - 3.0) < 0.5
    unchanged = refine_on_pair(tiny_net(), moving, fixed, fixed_regions, start=right,
                               settings=RefineSettings(iterations=0, field_iterations=0))
    np.testing.assert_array_equal(unchanged.displacement, right)
    with pytest.raises(InputError, match="0 network steps"):
        refine_on_pair(tiny_net(), moving, fixed, fixed_regions, start=right, settings=RefineSettings(iterations=2))
    with pytest.raises(InputError, match="shape"):
        refine_on_pair(tiny_net(), moving, fixed, fixed_regions, start=right[:, :16],
                       settings=RefineSettings(iterations=0, field_iterations=2))


@pytest.mark.parametrize("similarity", ["mind+mse", "mse"])
def test_a_field_of_view_edge_left_out_of_the_similarity_does_not_pull_the_field(similarity):
    """The fixed image ends at a plane through an organ (its scan's edge: fill beyond), the moving image does not;
    where both have data they are the same, so the true field is zero. Counted everywhere, the fill pulls the
    organ towards the edge; with the weight of ``pipeline.overlap_weight`` (0 near and beyond the edge) it stays."""
    moving, regions = blobs(0)
    fixed = moving.copy()
    fixed[:, :, 20:] = 0.0  # the organ spans k = 9..23: cut at 20
    weight = np.ones(fixed.shape, np.float32)
    weight[:, :, 17:] = 0.0  # 3 voxels of margin, as the pipeline leaves
    settings = RefineSettings(iterations=0, field_iterations=60, field_levels=(2, 1), similarity=similarity,
                              patience=0)
    counted = refine_on_pair(_NoForward(), moving, fixed, regions, settings=settings).displacement
    weighted = refine_on_pair(_NoForward(), moving, fixed, regions, settings=settings, weight=weight).displacement
    organ = regions > 0
    organ[:, :, 20:] = False  # where the fixed image shows it
    moved = np.sqrt((counted ** 2).sum(0))[organ]
    kept = np.sqrt((weighted ** 2).sum(0))[organ]
    assert moved.max() > 1.0, moved.max()
    assert kept.max() < 0.25 * moved.max() and kept.mean() < 0.25 * moved.mean(), (kept.max(), moved.max())
    with pytest.raises(InputError, match="share no field of view"):
        refine_on_pair(_NoForward(), moving, fixed, regions, settings=settings, weight=np.zeros_like(weight))
    with pytest.raises(InputError, match="grid's shape"):
        refine_on_pair(_NoForward(), moving, fixed, regions, settings=settings, weight=weight[:-1])


def test_register_leaves_what_lies_outside_either_field_of_view_out_of_the_refinement(monkeypatch):
    """register() hands the refinement the overlap weight of its grid: 1 exactly at the grid points that lie at least
    FIELD_OF_VIEW_MARGIN_VOXELS grid voxels inside the fixed image and inside the moving image (here shifted by 6 mm,
    no initial alignment), 0 elsewhere."""
    import textscf.refine
    from textscf import pipeline
    from textscf.spatial import ModelGrid

    fixed, fixed_regions = blobs(0)
    moving, _ = blobs(3)
    fixed_img, moving_img = _image(fixed), _image(moving)
    moving_img.SetOrigin((6.0, 0.0, 0.0))  # its field of view starts 6 mm further along x
    seen = {}
    real_weight, real_refine = pipeline.overlap_weight, textscf.refine.refine_on_pair

    def weight_spy(grid, *args, **kwargs):
        seen["grid"] = grid
        return real_weight(grid, *args, **kwargs)

    def refine_spy(*args, **kwargs):
        seen["weight"] = kwargs["weight"]
        return real_refine(*args, **kwargs)

    monkeypatch.setattr(pipeline, "overlap_weight", weight_spy)
    monkeypatch.setattr(textscf.refine, "refine_on_pair", refine_spy)
    options = RegistrationOptions(checkpoint="fresh", region_names=["left", "right"], label_values=[1, 2], init="none",
                                  refine_iterations=0, refine_field_iterations=2, refine_similarity="mse",
                                  fresh_grid_factor=1.0, seed=0)
    result = register(fixed_img, moving_img, options, fixed_labels=_image(fixed_regions, sitk.sitkUInt8))
    assert result.stats["refine"]["field_iterations"] >= 1  # the field steps, which the weight is for
    grid, weight = seen["grid"], seen["weight"]
    margin = pipeline.FIELD_OF_VIEW_MARGIN_VOXELS * max(grid.spacing)  # 4 mm on this 1 mm grid
    # the grid points in mm (identity directions here), against both images' extents (their voxels' outer faces)
    points = [grid.origin[a] + grid.spacing[a] * np.arange(grid.shape[a]) for a in range(3)]
    inside = np.ones(grid.shape, bool)
    for origin in ((0.0, 0.0, 0.0), (6.0, 0.0, 0.0)):
        for a in range(3):
            ok = (points[a] >= origin[a] - 0.5 + margin) & (points[a] <= origin[a] + 31.5 - margin)
            inside &= ok.reshape([-1 if b == a else 1 for b in range(3)])
    np.testing.assert_array_equal(weight, inside.astype(np.float32))
    assert 0 < weight.mean() < 1
    # the fixed image on its own grid, with no margin: every voxel counts, and no weight is made
    assert real_weight(ModelGrid.from_image(fixed_img), fixed_img, fixed_img, None, margin_mm=0.0) is None

"""The defaults of register(): the schedule that runs (and that the report records), any pair registering with or
without regions, scoring labels that never change the field, and progress that moves through the refinement.

Small inputs: the abdominal phantom pair at 8 mm (48 x 40 x 64 voxels) and the tiny random-init checkpoint of
conftest (a 48 x 48 x 64 grid), so the default schedule's 12 + 30 steps take seconds.
"""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk

from textscf import metrics
from textscf.cli import EXIT_OK, build_parser, main
from textscf.errors import CancelledError, InputError
from textscf.phantom import make_example_pair
from textscf.pipeline import STAGES, RegistrationOptions, register
from textscf.schedule import (
    CHECKPOINT_FIELD_STEPS, CHECKPOINT_NETWORK_STEPS, FIELD_LEVELS, FRESH_FIELD_LEVELS, FRESH_FIELD_STEPS,
    default_schedule, estimate_refine_seconds, similarity_for, smooth_weight_for, with_steps,
)
from textscf.spatial import image_to_array

SHAPE, SPACING = (48, 40, 64), (8.0, 8.0, 8.0)
DEFAULTS = dict(refine_iterations=None, refine_field_iterations=None)  # what `textscf register` passes


@pytest.fixture(scope="module")
def pair():
    return make_example_pair(seed=0, shape=SHAPE, spacing=SPACING)


@pytest.fixture()
def pair_files(pair, tmp_path):
    paths = {}
    for name in ("fixed", "moving", "fixed_labels", "moving_labels"):
        paths[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(pair[name], str(paths[name]))
    return paths


def _options(checkpoint, **extra) -> RegistrationOptions:
    return RegistrationOptions(checkpoint=str(checkpoint), preset="abdomen-ct", device="cpu",
                               unmapped_labels="background", **extra)


def _field(result) -> np.ndarray:
    return sitk.GetArrayFromImage(result.displacement)


def _mean_dice(labels_a: sitk.Image, labels_b: sitk.Image) -> float:
    a, b = image_to_array(labels_a), image_to_array(labels_b)
    values = sorted(set(np.unique(a).tolist()) - {0})
    return float(np.mean(list(metrics.dice_per_label(a, b, values).values())))


# ------------------------------------------------------------------------------------------------ the schedule

def test_schedule_defaults_options_and_estimates():
    bundled = default_schedule("checkpoint", (96, 80, 128), "cpu", similarity="mind")
    assert (bundled.network_steps, bundled.field_steps) == (CHECKPOINT_NETWORK_STEPS, CHECKPOINT_FIELD_STEPS)
    assert bundled.field_levels == FIELD_LEVELS and bundled.steps == CHECKPOINT_FIELD_STEPS * len(FIELD_LEVELS)
    # a trained network's field starts the field steps, on its own (4 mm) grid
    assert bundled.chosen_by == "defaults" and bundled.regions and bundled.network_start and bundled.uses_network
    assert bundled.field_subdivision == 1 and bundled.field_grid_shape == (96, 80, 128)
    assert bundled.estimated_seconds == pytest.approx(estimate_refine_seconds(
        (96, 80, 128), CHECKPOINT_NETWORK_STEPS, CHECKPOINT_FIELD_STEPS, "cpu", FIELD_LEVELS))
    assert default_schedule("checkpoint", (96, 80, 128), "cuda").estimated_seconds < bundled.estimated_seconds
    assert "MIND-SSC" in bundled.describe() and "1/4, 1/2 of the 96x80x128 grid" in bundled.describe()
    assert similarity_for("ct") == "mind+mse" and similarity_for("mri") == "ncc" and similarity_for("ct", "ncc") == "ncc"
    fresh = default_schedule("fresh", (80, 96, 112), "cpu", has_regions=False, grid_spacing=(2, 2, 2),
                             similarity="ncc")
    assert fresh.steps > 0 and not fresh.regions and not fresh.network_start and not fresh.uses_network
    assert "no network" in fresh.describe()
    # A fresh network's grid is already coarser than the image: its pyramid ends on that grid.
    assert fresh.field_levels == FRESH_FIELD_LEVELS and FRESH_FIELD_LEVELS[-1] == 1
    assert fresh.steps == FRESH_FIELD_STEPS * len(FRESH_FIELD_LEVELS)
    assert fresh.estimated_seconds == pytest.approx(estimate_refine_seconds(
        (80, 96, 112), 0, FRESH_FIELD_STEPS, "cpu", FRESH_FIELD_LEVELS))
    assert "1/4, 1/2, 1 of the 80x96x112 grid, local NCC, smoothness λ 1.5" in fresh.describe()
    # λ follows the similarity's scale unless the user sets it, and the user's steps keep it
    assert (fresh.smooth_weight, bundled.smooth_weight) == (smooth_weight_for("ncc"), smooth_weight_for("mind"))
    assert smooth_weight_for("ncc") > smooth_weight_for("mind+mse") == smooth_weight_for("mse")
    assert default_schedule("fresh", (80, 96, 112), similarity="ncc", smooth_weight=0.2).smooth_weight == 0.2
    assert with_steps(fresh, 3, 4).smooth_weight == fresh.smooth_weight
    # A network trained on an 8 mm grid: the field steps run on its grid subdivided to 4 mm (the same box), which
    # costs about the field steps of the bigger grid.
    coarse = default_schedule("checkpoint", (48, 48, 64), "cpu", similarity="mind+mse", grid_spacing=(8, 8, 8))
    assert coarse.field_subdivision == 2 and coarse.field_grid_shape == (96, 96, 128)
    assert "on its 48x48x64 grid, then its field optimised on this pair" in coarse.describe()
    assert "1/4, 1/2 of the 96x96x128 grid" in coarse.describe()
    assert coarse.estimated_seconds == pytest.approx(estimate_refine_seconds(
        (96, 96, 128), 0, CHECKPOINT_FIELD_STEPS, "cpu", FIELD_LEVELS))
    assert with_steps(coarse, 12, None).field_subdivision == 2
    # The user's steps replace the defaults and say so; --refine 0 alone is the network's forward pass alone.
    assert with_steps(bundled, None, None) is bundled
    mine = with_steps(bundled, 50, None)
    assert (mine.network_steps, mine.field_steps, mine.chosen_by) == (50, CHECKPOINT_FIELD_STEPS, "options")
    assert mine.uses_network and "50 network steps" in mine.describe()
    assert with_steps(bundled, 0, None).steps == 0 and with_steps(bundled, 0, None).uses_network
    assert "plain LKU-Net" in with_steps(fresh, 0, None).describe()
    assert with_steps(bundled, 0, 7).steps == 7 * len(FIELD_LEVELS)


def test_cli_demo_and_register_take_the_default_schedule():
    parser = build_parser()
    register_args = parser.parse_args(["register", "f.nii.gz", "m.nii.gz", "-o", "out"])
    assert (register_args.refine, register_args.refine_field, register_args.guide_with_labels) == (None, None, False)
    assert parser.parse_args(["demo"]).refine is None


def test_register_without_options_runs_the_default_schedule_and_reports_it(pair_files, tmp_path,
                                                                           tiny_abdomen_checkpoint, capsys):
    out = tmp_path / "out"
    argv = ["register", str(pair_files["fixed"]), str(pair_files["moving"]), "-o", str(out),
            "--checkpoint", str(tiny_abdomen_checkpoint), "--fixed-labels", str(pair_files["fixed_labels"]),
            "--moving-labels", str(pair_files["moving_labels"]), "--preset", "abdomen-ct",
            "--unmapped-labels", "background", "--device", "cpu", "--quiet", "--no-qc"]
    assert main(argv) == EXIT_OK
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    expected = default_schedule("checkpoint", (48, 48, 64), "cpu", has_regions=True, similarity="mind+mse").as_dict()
    assert {k: v for k, v in report["schedule"].items() if k != "reason"} == \
        {k: v for k, v in expected.items() if k != "reason"}
    # What ran is what the schedule says (the plateau stop may end a pyramid level early).
    assert report["refine"]["iterations"] == CHECKPOINT_NETWORK_STEPS
    assert len(FIELD_LEVELS) <= report["refine"]["field_iterations"] <= CHECKPOINT_FIELD_STEPS * len(FIELD_LEVELS)
    assert report["schedule"]["similarity"] == "mind+mse" and report["schedule"]["field_levels"] == list(FIELD_LEVELS)
    assert report["moving_labels"] == "scoring only"
    printed = capsys.readouterr().out
    assert ("schedule: the checkpoint's network (textSCF with the fixed image's regions) on its 48x48x64 grid, then "
            f"its field optimised on this pair: {CHECKPOINT_FIELD_STEPS} field steps at each of 1/4, 1/2 of the "
            "48x48x64 grid, MIND-SSC descriptors + intensity MSE") in printed


@pytest.fixture(scope="module")
def coarse_checkpoint(tmp_path_factory):
    """A random-init one-hot abdomen checkpoint on an 8 mm grid, as the bundled network is trained."""
    from conftest import save_abdomen_checkpoint

    return save_abdomen_checkpoint(tmp_path_factory.mktemp("models") / "coarse.pt", (8.0, 8.0, 8.0), (32, 32, 32))


def test_a_coarse_network_starts_the_field_steps_on_its_grid_subdivided(pair, coarse_checkpoint):
    """An 8 mm network runs on its grid; its field, brought to the same box at 4 mm, starts the field steps there;
    the outputs lie on the fixed grid and the report says which grid each part ran on. Network steps, when asked
    for, run on the network's grid first, and the bar moves through both parts."""
    labels = dict(fixed_labels=pair["fixed_labels"], moving_labels=pair["moving_labels"])
    result = register(pair["fixed"], pair["moving"], _options(coarse_checkpoint, **DEFAULTS), **labels)
    stats = result.stats
    assert stats["schedule"]["network_start"] and stats["schedule"]["field_subdivision"] == 2
    assert stats["model_grid"] == {"shape": [32, 32, 32], "spacing": [8.0, 8.0, 8.0]}
    assert stats["field_grid"] == {"shape": [64, 64, 64], "spacing": [4.0, 4.0, 4.0]}
    assert stats["refine"]["iterations"] == 0 and stats["refine"]["field_iterations"] >= len(FIELD_LEVELS)
    assert result.displacement.GetSize() == pair["fixed"].GetSize()
    assert stats["mean_dice"] > stats["mean_dice_before"] + 0.05, (stats["mean_dice_before"], stats["mean_dice"])

    updates = []
    both = register(pair["fixed"], pair["moving"], _options(coarse_checkpoint, refine_iterations=2,
                                                            refine_field_iterations=3, refine_use_moving_labels=True),
                    progress=lambda *update: updates.append(update), **labels)
    assert both.stats["refine_network"]["iterations"] == 2 and both.stats["refine"]["iterations"] == 0
    assert both.stats["field_grid"]["shape"] == [64, 64, 64]
    during = [fraction for stage, fraction, _ in updates if stage == "register"]
    assert during == sorted(during) and len(set(during)) >= 2 + 3 * len(FIELD_LEVELS)


# ------------------------------------------------------------------------------------------------ labels

def test_scoring_labels_never_change_the_field(pair, tiny_abdomen_checkpoint):
    labels = dict(fixed_labels=pair["fixed_labels"])
    options = _options(tiny_abdomen_checkpoint, **DEFAULTS)
    scored = register(pair["fixed"], pair["moving"], options, moving_labels=pair["moving_labels"], **labels)
    unscored = register(pair["fixed"], pair["moving"], options, **labels)
    np.testing.assert_array_equal(_field(scored), _field(unscored))  # bit for bit on the CPU
    assert "mean_dice" in scored.stats and "mean_dice" not in unscored.stats
    assert scored.stats["moving_labels"] == "scoring only"

    guided = register(pair["fixed"], pair["moving"], _options(tiny_abdomen_checkpoint, refine_use_moving_labels=True,
                                                               **DEFAULTS),
                      moving_labels=pair["moving_labels"], **labels)
    assert not np.array_equal(_field(guided), _field(scored))  # only the guidance option puts them in the loss
    assert guided.stats["moving_labels"].startswith("scoring and the refinement loss")


def test_guidance_without_what_it_needs_is_refused(pair, tiny_abdomen_checkpoint):
    guided = _options(tiny_abdomen_checkpoint, refine_use_moving_labels=True, **DEFAULTS)
    with pytest.raises(InputError, match="--moving-labels"):
        register(pair["fixed"], pair["moving"], guided, fixed_labels=pair["fixed_labels"])
    with pytest.raises(InputError, match="--fixed-labels"):
        register(pair["fixed"], pair["moving"], guided, moving_labels=pair["moving_labels"])
    with pytest.raises(InputError, match="--refine"):
        register(pair["fixed"], pair["moving"], _options(tiny_abdomen_checkpoint, refine_use_moving_labels=True),
                 fixed_labels=pair["fixed_labels"], moving_labels=pair["moving_labels"])


def test_label_loss_weight_needs_guidance(pair_files, tmp_path, tiny_abdomen_checkpoint, capsys):
    code = main(["register", str(pair_files["fixed"]), str(pair_files["moving"]), "-o", str(tmp_path / "out"),
                 "--checkpoint", str(tiny_abdomen_checkpoint), "--label-loss-weight", "0.5", "--quiet"])
    assert code == 2 and "--guide-with-labels" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ any pair

def test_a_pair_without_regions_registers_and_beats_unregistered_dice(pair, pair_files, tmp_path,
                                                                       tiny_abdomen_checkpoint, capsys):
    """No label map, no segmentor: the shared filter alone (plain LKU-Net), refined by the default schedule; the
    warped moving labels, scored afterwards against the fixed labels, overlap more than before registration."""
    out = tmp_path / "out"
    assert main(["register", str(pair_files["fixed"]), str(pair_files["moving"]), "-o", str(out),
                 "--checkpoint", str(tiny_abdomen_checkpoint), "--moving-labels", str(pair_files["moving_labels"]),
                 "--unmapped-labels", "background", "--device", "cpu", "--quiet", "--no-qc"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "no fixed label map and no segmentor: no regions" in printed
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["schedule"]["regions"] is False and report["schedule"]["network_steps"] == CHECKPOINT_NETWORK_STEPS
    warped = sitk.ReadImage(str(out / "warped_labels.nii.gz"))
    unregistered = _mean_dice(pair["moving_labels"], pair["fixed_labels"])  # same grid: the identity
    registered = _mean_dice(warped, pair["fixed_labels"])
    assert registered > unregistered + 0.05, (unregistered, registered)


def test_an_mri_pair_without_a_model_gets_a_fresh_network(pair):
    """The bundled model is a CT model: for an MRI-like pair (background 0) and no checkpoint named, the schedule
    refines a fresh network without regions on it instead, and says why."""
    def as_mri(image):
        return sitk.Cast(sitk.Clamp(image + 1000.0, lowerBound=0.0), sitk.sitkFloat32)

    options = RegistrationOptions(device="cpu", refine_iterations=3, refine_field_iterations=2)
    result = register(as_mri(pair["fixed"]), as_mri(pair["moving"]), options)
    schedule = result.stats["schedule"]
    assert schedule["network"] == "fresh" and schedule["regions"] is False
    assert "trained on CT and this pair is MRI" in schedule["reason"]
    assert (schedule["network_steps"], schedule["field_steps"], schedule["chosen_by"]) == (3, 2, "options")
    assert result.stats["checkpoint"] == "fresh" and result.stats["refine"]["iterations"] == 3
    # MRI: local NCC at its λ, the pyramid ending on the fresh grid; the user's λ replaces the schedule's
    assert (schedule["similarity"], schedule["smooth_weight"]) == ("ncc", smooth_weight_for("ncc"))
    assert schedule["field_levels"] == list(FRESH_FIELD_LEVELS)
    assert result.stats["refine"]["field_iterations"] == 2 * len(FRESH_FIELD_LEVELS)
    mine = register(as_mri(pair["fixed"]), as_mri(pair["moving"]),
                    replace(options, refine_smooth_weight=0.4))
    assert mine.stats["schedule"]["smooth_weight"] == 0.4 and mine.stats["schedule"]["similarity"] == "ncc"


# ------------------------------------------------------------------------------------------------ progress

def test_progress_advances_monotonically_through_the_refinement(pair, tiny_abdomen_checkpoint):
    updates = []
    register(pair["fixed"], pair["moving"], _options(tiny_abdomen_checkpoint, **DEFAULTS),
             fixed_labels=pair["fixed_labels"], progress=lambda *update: updates.append(update))
    fractions = [fraction for _, fraction, _ in updates]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    during = [(fraction, left) for stage, fraction, left in updates if stage == "register"]
    steps = CHECKPOINT_NETWORK_STEPS + len(FIELD_LEVELS)  # at least one step per phase (the plateau stop may end one)
    assert len(during) >= steps  # one update per refinement step (and the stage start)
    assert len({fraction for fraction, _ in during}) >= steps  # each step moves the bar
    assert during[-1][0] - during[0][0] > 0.5  # refinement is most of the run, and most of the bar
    lefts = [left for _, left in during[2:]]
    assert all(left is not None and left >= 0 for left in lefts) and lefts[-1] < lefts[0]
    assert [stage for stage, _, _ in updates if stage != "register"] == \
        [name for name, _ in STAGES if name != "register"] + ["done"]

    # A callback that takes (stage, fraction) gets the stage starts, as before.
    starts = []
    register(pair["fixed"], pair["moving"], _options(tiny_abdomen_checkpoint, refine_iterations=2),
             fixed_labels=pair["fixed_labels"], progress=lambda stage, fraction: starts.append(stage))
    assert starts == [name for name, _ in STAGES] + ["done"]


def test_cancel_during_refinement_stops_within_one_step(pair, tiny_abdomen_checkpoint):
    steps_seen, requested_at = [], []

    def progress(stage, fraction, seconds_left):
        if stage == "register":
            steps_seen.append(fraction)
            if len(steps_seen) == 4 and not requested_at:  # the stage start, the plan, then two steps
                requested_at.append(len(steps_seen))

    with pytest.raises(CancelledError):
        register(pair["fixed"], pair["moving"], _options(tiny_abdomen_checkpoint, **DEFAULTS),
                 fixed_labels=pair["fixed_labels"], progress=progress, cancel=lambda: bool(requested_at))
    assert len(steps_seen) - requested_at[0] <= 1


def test_time_left_before_the_refinement_counts_the_refinement_ahead(pair, tiny_abdomen_checkpoint):
    updates = []
    result = register(pair["fixed"], pair["moving"], _options(tiny_abdomen_checkpoint, **DEFAULTS),
                      fixed_labels=pair["fixed_labels"], progress=lambda *update: updates.append(update))
    expected = result.stats["schedule"]["estimated_seconds"]
    before = [left for stage, _, left in updates if stage in ("initial alignment", "resample to model grid")]
    assert before and all(left >= expected for left in before)


def test_a_non_finite_field_is_refused_with_its_cause_and_fix():
    import numpy as np

    from textscf.errors import CheckpointError, InputError
    from textscf.pipeline import _check_finite_field

    u = np.zeros((3, 4, 4, 4), np.float32)
    _check_finite_field(u, refined=True)  # finite: nothing to say
    u[0, 1, 2, 3], u[2, 0, 0, 0] = np.nan, np.inf
    with pytest.raises(InputError, match=r"refinement diverged: 2 .*--refine-lr"):
        _check_finite_field(u, refined=True)
    with pytest.raises(CheckpointError, match=r"network produced 2 .*check the checkpoint"):
        _check_finite_field(u, refined=False)


def test_the_field_grid_covers_the_image_while_the_network_keeps_its_body_centred_grid():
    """A body near one end of the image: the network's grid stays on the body (its training placement), the field
    steps' grid (the same size) moves to cover the image, so the field never drops to zero inside the image."""
    from textscf.pipeline import field_grid, model_grid
    from textscf.train import build_model

    arr = np.full((60, 40, 64), -1000.0, np.float32)
    arr[10:50, 8:32, 2:20] = 40.0  # the body in the first slices along k
    fixed = sitk.GetImageFromArray(arr.transpose(2, 1, 0))
    fixed.SetSpacing((4.0, 4.0, 4.0))
    net = build_model(["a"], [1], start_channels=2, hidden_channels=8, spacing=(8.0, 8.0, 8.0),
                      input_shape=(32, 32, 32), direction=tuple(np.eye(3).ravel()))
    grid = model_grid(net.config, fixed, None)
    fields = field_grid(grid, 2, fixed)
    assert fields.shape == (64, 64, 64) and fields.spacing == (4.0, 4.0, 4.0)
    image_low, image_high = np.zeros(3), (np.array(arr.shape) - 1) * 4.0
    low, high = np.array(fields.origin), np.array(fields.index_to_physical(np.array(fields.shape) - 1.0))
    assert np.all(low <= image_low + 1e-6) and np.all(high >= image_high - 1e-6)  # 256 mm covers 236/156/252 mm
    assert grid.centre()[2] < fields.centre()[2] - 20  # the network's grid stays on the body
    assert field_grid(grid, 1, fixed).shape == grid.shape

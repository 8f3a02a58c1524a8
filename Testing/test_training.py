"""Training on a tiny synthetic pair: the loss falls, Dice rises, resume continues, DDP replicas agree."""
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from textscf.checkpoint import load_checkpoint
from textscf.train import TrainSettings, build_model, poly_learning_rate, simulated_confidence, train, validate

SHAPE = (32, 32, 32)


def ellipsoid_pair(shift=(3.0, -2.0, 2.0), radii=(9.0, 7.0, 6.0)):
    """Fixed: two touching ellipsoids (regions 1 and 2) in a body; moving: the same scene shifted and squeezed."""
    idx = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in SHAPE], indexing="ij"))
    c = np.array(SHAPE, np.float32)[:, None, None, None] / 2

    def scene(offset, squeeze):
        p = idx - c - np.array(offset, np.float32)[:, None, None, None]
        r = np.array(radii, np.float32)[:, None, None, None] * np.array(squeeze, np.float32)[:, None, None, None]
        inside = ((p / r) ** 2).sum(0) <= 1
        regions = np.where(inside, np.where(p[0] < 0, 1, 2), 0).astype(np.int64)
        image = np.where(regions == 1, 0.8, np.where(regions == 2, 0.5, 0.1)).astype(np.float32)
        return image, regions

    fixed, fixed_regions = scene((0, 0, 0), (1, 1, 1))
    moving, moving_regions = scene(shift, (1.1, 0.9, 1.0))
    return {
        "moving": torch.from_numpy(moving)[None], "fixed": torch.from_numpy(fixed)[None],
        "moving_regions": torch.from_numpy(moving_regions)[None], "fixed_regions": torch.from_numpy(fixed_regions)[None],
    }


class OnePair(Dataset):
    def __init__(self, n=4):
        self.item, self.n = ellipsoid_pair(), n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.item


def tiny_model(seed=0):
    return build_model(["left blob", "right blob"], [1, 2], text_encoder="onehot", start_channels=4,
                       hidden_channels=16, spacing=(1, 1, 1), input_shape=SHAPE, seed=seed)


def fast_settings(**kw):
    base = dict(epochs=6, steps_per_epoch=8, learning_rate=3e-3, power=0.9, seed=0, show_progress=False,
                simulate_segmentor=0.5)
    base.update(kw)
    return TrainSettings(**base)


def test_training_lowers_loss_and_raises_dice(tmp_path):
    net = tiny_model()
    data = OnePair()
    dice_before = validate(net, data, torch.device("cpu"))
    result = train(net, data, tmp_path, fast_settings(), val_pairs=OnePair(1))
    losses = [row["loss"] for row in result.history]
    assert min(losses[-2:]) < 0.75 * losses[0]
    assert result.best_val_dice > dice_before + 0.1
    assert (tmp_path / "best.pt").is_file() and (tmp_path / "last.pt").is_file()
    log = (tmp_path / "log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,lr,") and len(log) == 7
    best, meta = load_checkpoint(tmp_path / "best.pt")
    assert meta["val_dice"] == pytest.approx(result.best_val_dice)
    assert validate(best, OnePair(1), torch.device("cpu")) == pytest.approx(result.best_val_dice, abs=1e-6)


def test_resume_continues_the_schedule(tmp_path):
    settings = fast_settings(epochs=4, steps_per_epoch=3)
    full = train(tiny_model(), OnePair(), tmp_path / "full", settings)

    def crash_after_second_epoch(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(), OnePair(), tmp_path / "split", settings, on_epoch_end=crash_after_second_epoch)
    resumed = train(tiny_model(seed=5), OnePair(), tmp_path / "split", fast_settings(epochs=4, steps_per_epoch=3),
                    resume=True)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    assert [r["lr"] for r in resumed.history] == pytest.approx([r["lr"] for r in full.history])
    assert resumed.history[2]["lr"] == pytest.approx(poly_learning_rate(3e-3, 2, 4, 0.9))
    a, _ = load_checkpoint(tmp_path / "full" / "last.pt")
    b, _ = load_checkpoint(tmp_path / "split" / "last.pt")
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6, msg=name)


def test_stop_after_ends_a_stage_early_on_the_planned_schedule(tmp_path):
    """A stage stopped after epoch 2 of 4 trains exactly the first two epochs of the 4-epoch run, and resuming it
    with the full schedule finishes that run."""
    settings = fast_settings(epochs=4, steps_per_epoch=3)
    full = train(tiny_model(), OnePair(), tmp_path / "full", settings)
    stopped = train(tiny_model(), OnePair(), tmp_path / "stopped", fast_settings(epochs=4, steps_per_epoch=3, stop_after=2))
    assert [r["epoch"] for r in stopped.history] == [1, 2]
    assert [r["lr"] for r in stopped.history] == pytest.approx([r["lr"] for r in full.history[:2]])
    assert [r["loss"] for r in stopped.history] == pytest.approx([r["loss"] for r in full.history[:2]], rel=1e-4)
    finished = train(tiny_model(seed=5), OnePair(), tmp_path / "stopped", settings, resume=True)
    assert [r["epoch"] for r in finished.history] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="outside 1..epochs"):
        train(tiny_model(), OnePair(), tmp_path / "bad", fast_settings(epochs=4, stop_after=5))
    assert not (tmp_path / "bad").exists()


def test_resume_without_state_is_a_clear_error(tmp_path):
    from textscf.errors import CheckpointError

    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(tiny_model(), OnePair(), tmp_path, fast_settings(), resume=True)


def test_simulated_segmentor_lowers_confidence_at_boundaries_only():
    regions = ellipsoid_pair()["fixed_regions"][None]
    p = simulated_confidence(regions, torch.Generator().manual_seed(0))
    assert p.shape == regions.shape and float(p.min()) >= 0 and float(p.max()) <= 1
    assert float(p[0, 0, 0, 0, 0]) > 0.85  # far from any boundary
    centre = tuple(s // 2 for s in SHAPE)
    assert float(p[0, 0, centre[0], centre[1], centre[2]]) < 0.9  # on the boundary between the two regions


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        net = tiny_model(seed=rank)  # different starting weights: DDP broadcasts rank 0's
        train(net, OnePair(4), out_dir, fast_settings(epochs=1, steps_per_epoch=2, simulate_segmentor=0.0))
        torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_gloo_processes_keep_identical_weights(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    start = tiny_model(seed=0).state_dict()
    moved = False
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
        moved |= not torch.equal(a[key], start[key])
    assert moved  # the replicas trained, and stayed in sync
    assert (tmp_path / "last.pt").is_file()  # rank 0 wrote the checkpoint


def test_training_on_synthesised_pairs_raises_dice_and_logs_the_endpoint_error(tmp_path):
    """The bundled model's recipe (Kaiming init, pairs synthesised per step with random tissue intensities,
    blurred-label Dice, endpoint error on known-field pairs) on a tiny set: validation Dice rises."""
    from textscf.datasets import Augmentation, PairDataset, Subject
    from textscf.synthesis import SynthPairDataset

    item = ellipsoid_pair()
    subjects = [Subject(role, item[role][0].numpy(), item[f"{role}_regions"][0].numpy().astype(np.int16))
                for role in ("moving", "fixed")]
    still = Augmentation(rotation_deg=0, scale=0, translation_mm=0, elastic_mm=0, gamma=0, intensity_scale=0,
                         noise_std=0)
    train_pairs = SynthPairDataset(subjects, [1, 2], pairs=[(0, 1)], pairs_per_epoch=8, intra_fraction=0.25,
                                   known_field_mm=2.0, random_contrast=0.5, augment=still, seed=0)
    val_pairs = PairDataset(subjects, [1, 2], pairs=[(0, 1)])
    net = build_model(["left blob", "right blob"], [1, 2], start_channels=4, hidden_channels=16, spacing=(1, 1, 1),
                      input_shape=SHAPE, seed=0, init="kaiming")
    before = validate(net, val_pairs, torch.device("cpu"))
    settings = fast_settings(dice_sigmas=(0.0, 1.5), field_weight=0.5)
    result = train(net, train_pairs, tmp_path, settings, val_pairs=val_pairs)
    assert result.best_val_dice > before + 0.05
    assert any("endpoint_error" in row for row in result.history)
    assert all(row["steps_per_s"] > 0 for row in result.history)


def test_pairs_prepared_by_worker_processes_train_exactly_like_in_process(tmp_path):
    """``textscf train --workers N``: synthesised pairs made in DataLoader workers are the pairs made in the training
    process (each is seeded by its epoch and index), so the run is the same: same losses, same weights."""
    from textscf.cli import build_parser
    from textscf.datasets import Augmentation, Subject
    from textscf.synthesis import SynthPairDataset

    item = ellipsoid_pair()
    subjects = [Subject(role, item[role][0].numpy(), item[f"{role}_regions"][0].numpy().astype(np.int16))
                for role in ("moving", "fixed")]
    still = Augmentation(rotation_deg=0, scale=0, translation_mm=0, elastic_mm=0, gamma=0, intensity_scale=0,
                         noise_std=0)
    runs = {}
    for workers in (0, 2):
        pairs = SynthPairDataset(subjects, [1, 2], pairs=[(0, 1)], pairs_per_epoch=4, intra_fraction=0.5,
                                 known_field_mm=2.0, random_contrast=0.5, augment=still, seed=0)
        settings = fast_settings(epochs=2, steps_per_epoch=4, field_weight=0.5, num_workers=workers)
        runs[workers] = train(tiny_model(), pairs, tmp_path / str(workers), settings)
    assert [r["loss"] for r in runs[2].history] == pytest.approx([r["loss"] for r in runs[0].history], rel=1e-5)
    a, _ = load_checkpoint(tmp_path / "0" / "last.pt")
    b, _ = load_checkpoint(tmp_path / "2" / "last.pt")
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6, msg=name)
    assert build_parser().parse_args(["train", "--data", "phantom", "-o", "out", "--workers", "3"]).workers == 3


@pytest.mark.parametrize("modality", ["ct", "mri"])
def test_training_and_inference_share_one_normaliser(modality):
    """The MRI mismatch (min-max in training, percentiles at inference) cannot come back: ``textscf train``'s
    datasets hold the normaliser built from the model's configuration, and ``register`` builds the same one."""
    import SimpleITK as sitk

    from textscf.cli import build_parser
    from textscf.datasets import Subject
    from textscf.pipeline import normalise_for_model
    from textscf.spatial import IntensityNormaliser
    from textscf.training_cli import training_pairs

    net = build_model(["a", "b"], [1, 2], start_channels=4, hidden_channels=8, input_shape=SHAPE, modality=modality)
    rng = np.random.default_rng(0)
    subjects = [Subject(f"s{i}", (rng.random(SHAPE) * 3000 - 1000).astype(np.float32),
                        rng.integers(0, 3, SHAPE).astype(np.int16)) for i in range(2)]
    for extra in ([], ["--synth"]):
        args = build_parser().parse_args(["train", "--data", "phantom", "-o", "out", *extra])
        train_pairs, val_pairs = training_pairs(args, net, subjects, subjects, [1, 2])
        expected = IntensityNormaliser.from_config(net.config)
        assert train_pairs.normalise == expected and val_pairs.normalise == expected
        assert expected.kind == ("ct_window" if modality == "ct" else "percentile")
    image = sitk.GetImageFromArray(subjects[0].image.transpose(2, 1, 0))
    np.testing.assert_allclose(val_pairs[0]["moving"][0].numpy(), normalise_for_model(image, net), atol=1e-6)


def test_train_options_are_range_checked(capsys):
    from textscf.cli import build_parser

    parser = build_parser()
    for bad in (["--lr", "nan"], ["--lr", "0"], ["--epochs", "0"], ["--intra-fraction", "1.5"], ["--seed", "-1"],
                ["--dice-sigmas", "-1"], ["--threads", "0"], ["-o", ""], ["--workers", "-1"]):
        argv = ["train", "--data", "phantom", "-o", "out", *bad]
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(argv)
        assert exc.value.code == 2
        assert "Fix" in capsys.readouterr().err


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "shared" / "data" / "abdomen").is_dir(),
                    reason="needs ../shared/data (the BTCV label maps)")
@pytest.mark.parametrize("name, spacing, identity_mm", [
    # measured: validation Dice 22.5 -> 34.6 %, identity 0.99-1.03 mm mean (8.6-9.1 mm for the stage-1 weights,
    # trained without identical and known-field pairs)
    ("abdomen-ct-onehot-ns8-12mm.pt", 12.0, 3.0),
    # measured: validation Dice 22.5 -> 40.1 %, identity 0.15-0.17 mm mean
    ("abdomen-ct-onehot-ns8-8mm.pt", 8.0, 0.5),
])
def test_the_shipped_networks_register_validation_pairs_on_their_own(name, spacing, identity_mm):
    """The networks trained by their model cards' commands raise Dice on held-out (validation) pairs without any
    per-pair optimisation, and leave an image registered to itself nearly in place."""
    from textscf.checkpoint import load_checkpoint
    from textscf.datasets import PairDataset
    from textscf.presets import bundled_model_path
    from textscf.spatial import IntensityNormaliser
    from textscf.training_cli import load_source, prepare_subject

    path = bundled_model_path().with_name(name)
    net, meta = load_checkpoint(path)
    assert net.config.spacing == (spacing,) * 3 and meta["init"] == "kaiming" and meta["synth"] is True
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    subjects = [prepare_subject(s, net.config) for s in load_source("btcv-synthetic", shared, "val", 0, 0)]
    pairs = PairDataset(subjects, list(net.config.label_values), normalise=IntensityNormaliser.from_config(net.config))
    before = validate(build_model(list(net.config.region_names), list(net.config.label_values),
                                  spacing=net.config.spacing, input_shape=net.config.input_shape, hidden_channels=64),
                      pairs, torch.device("cpu"))
    after = validate(net, pairs, torch.device("cpu"))
    assert after > before + 0.08
    # the same image as fixed and moving: the network compares the images instead of imposing a prior deformation
    with torch.no_grad():
        net.eval()
        for i in range(len(pairs)):
            item = pairs[i]
            u = net(item["fixed"][None], item["fixed"][None], item["fixed_regions"][None]).displacement
            mean_mm = float((u[0] * spacing).pow(2).sum(0).sqrt().mean())
            print(f"identity, fixed image of validation pair {i}: mean displacement {mean_mm:.2f} mm")
            assert mean_mm < identity_mm, f"the fixed image of validation pair {i} registered to itself moves {mean_mm:.1f} mm"

"""``textscf train``: data sources, their preparation on the model grid, and the command itself.

Every training subject is resampled onto the model grid exactly as ``register`` resamples a fixed image (the
checkpoint's spacing, shape and orientation, centred on the body), so training and inference see the same thing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from textscf.errors import InputError

if TYPE_CHECKING:  # the data and network modules import torch: `textscf --help` must not wait for it
    from textscf.datasets import Subject
    from textscf.networks.textscf_net import TextSCFConfig

DEFAULT_SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def prepare_subject(subject: Subject, config: TextSCFConfig) -> Subject:
    """``subject`` resampled onto the model grid of ``config`` (linear image, nearest labels)."""
    import numpy as np
    import SimpleITK as sitk

    from textscf.datasets import Subject
    from textscf.pipeline import model_grid
    from textscf.spatial import image_to_array, resample_to_grid

    image, labels = subject.image_sitk(), subject.labels_sitk()
    body = sitk.Cast(labels > 0, sitk.sitkUInt8)
    grid = model_grid(config, image, body)
    background = float(np.min(subject.image))
    image_m = image_to_array(resample_to_grid(image, grid, None, "linear", background)).astype(np.float32)
    labels_m = image_to_array(resample_to_grid(labels, grid, None, "nearest", 0)).astype(np.int16)
    return Subject(name=subject.name, image=image_m, labels=labels_m, spacing=grid.spacing, origin=grid.origin,
                   direction=grid.direction)


def phantom_subjects(count: int, seed: int = 0, variation: float = 0.6) -> list[Subject]:
    """``count`` phantom subjects with subject-like anatomical variation."""
    from textscf.datasets import Subject
    from textscf.phantom import make_abdomen_phantom

    out = []
    for i in range(count):
        ct, labels = make_abdomen_phantom(seed=seed * 1000 + i, variation=variation)
        out.append(Subject.from_sitk(f"phantom{i:03d}", ct, labels))
    return out


def load_source(source: str, shared_data: Path, split: str, phantoms: int, seed: int) -> list[Subject]:
    """Subjects of one ``--data`` source (see ``textscf train --help``)."""
    from textscf.datasets import BTCV_SPLIT, load_btcv_labels, load_folder_pairs, load_learn2reg_dataset

    if source == "btcv-synthetic":
        if not (shared_data / "abdomen" / "btcv_labels").is_dir():
            raise InputError(f"btcv-synthetic needs the BTCV label maps under {shared_data}/abdomen/btcv_labels; "
                             "give --shared-data PATH")
        return load_btcv_labels(shared_data, BTCV_SPLIT[split], synthetic_ct=True, seed=seed, anatomical_orientation=True)
    if source == "phantom":
        if split != "train":
            return phantom_subjects(2, seed=seed + 777)
        return phantom_subjects(phantoms, seed=seed)
    if source.startswith("folder:"):
        parts = source.split(":")
        if len(parts) != 3:
            raise InputError(f"folder sources are folder:IMAGES_DIR:LABELS_DIR, got {source!r}")
        return load_folder_pairs(parts[1], parts[2])
    path = Path(source)
    if path.suffix == ".json":
        subjects, _ = load_learn2reg_dataset(path)
        return [s for s in subjects if s.image is not None and s.labels is not None]
    raise InputError(f"unknown data source {source!r}; use btcv-synthetic, phantom, a Learn2Reg dataset JSON, "
                     "or folder:IMAGES_DIR:LABELS_DIR")


def add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a textSCF model",
        description="Train a textSCF network with weak supervision (MSE + Dice on warped labels + λ‖∇u‖²; Adam with "
        "polynomial decay). Runs on several processes with torchrun. Sources for --data: 'btcv-synthetic' (CT "
        "synthesised from the Learn2Reg/BTCV label maps in ../shared/data, paper split), 'phantom' (generated "
        "abdominal phantoms), a Learn2Reg dataset JSON, or folder:IMAGES_DIR:LABELS_DIR.",
    )
    from textscf.cli import float_option, int_option, output_folder_option, seed_option

    count = int_option(1)
    fraction = float_option(0.0, 1.0, what="a fraction")
    weight = float_option(0.0, 1e4, what="a weight")
    p.add_argument("--data", action="append", required=True, help="training source (repeatable)")
    p.add_argument("--val", action="append", help="validation source (default: the val split of btcv-synthetic, "
                   "else two held-out phantoms)")
    p.add_argument("-o", "--output", required=True, type=output_folder_option, help="folder for best.pt, last.pt, log.csv")
    p.add_argument("--preset", default="abdomen-ct", help="prompt preset (region names, label values, template)")
    p.add_argument("--encoder", default="onehot", help="text encoder: onehot or open_clip:MODEL:PRETRAINED")
    p.add_argument("--start-channels", type=count, default=8, help="N_s (8, 16, 32, 64)")
    p.add_argument("--hidden-channels", type=count, default=64, help="CΦ of the filter MLP")
    p.add_argument("--head", choices=["textscf", "no_scf"], default="textscf", help="no_scf = LKU-Net baseline")
    p.add_argument("--integrate", action="store_true", help="diffeomorphic integration")
    p.add_argument("--spacing", type=float_option(0.01, 100.0, False, "a spacing in mm"), nargs=3, default=[4.0, 4.0, 4.0], help="model grid spacing (mm)")
    p.add_argument("--shape", type=int_option(16, 1024), nargs=3, default=[96, 80, 128], help="model grid shape (multiples of 16)")
    p.add_argument("--epochs", type=count, default=100)
    p.add_argument("--stop-after", type=count, default=None, metavar="EPOCH",
                   help="end after this epoch; the learning rate still decays over --epochs (a stage stopped early)")
    p.add_argument("--steps-per-epoch", type=count, default=None, help="pairs per epoch (default: all pairs)")
    p.add_argument("--lr", type=float_option(0.0, 1.0, False, "a learning rate"), default=1e-4)
    p.add_argument("--smooth-weight", type=weight, default=0.1)
    p.add_argument("--dice-weight", type=weight, default=1.0)
    p.add_argument("--similarity", choices=["mse", "ncc"], default="mse")
    p.add_argument("--augment", action="store_true", help="random affine, elastic and intensity augmentation")
    p.add_argument("--synth", action="store_true",
                   help="draw a new pair on every step (textscf.synthesis): random intensity per tissue class, "
                   "random affine and elastic maps, and intra-subject pairs with a known field (implies --augment)")
    p.add_argument("--intra-fraction", type=fraction, default=0.0,
                   help="with --synth: share of intra-subject pairs with a known field (default 0: in 3,400 CPU steps "
                   "at 12 mm, a share of 0.5 held the network at the zero field; inter-subject pairs alone learned)")
    p.add_argument("--random-contrast", type=fraction, default=0.0,
                   help="with --synth: share of pairs rendered with random tissue intensities")
    p.add_argument("--known-field-mm", type=float_option(0.0, 500.0, what="a length in mm"), default=32.0, help="with --synth: largest known-field length")
    p.add_argument("--dice-sigmas", type=float_option(0.0, 50.0, what="a blur in voxels"), nargs="+", default=[0.0],
                   help="Gaussian blurs (voxels) of the labels the Dice term averages over (0 = sharp)")
    p.add_argument("--field-weight", type=weight, default=0.0,
                   help="weight of the endpoint error on known-field pairs (with --synth)")
    p.add_argument("--init", choices=["kaiming", "reference"], default="kaiming",
                   help="weight initialisation of a fresh network: kaiming (trains) or reference (the authors')")
    p.add_argument("--threads", type=count, default=None, help="CPU threads for torch")
    p.add_argument("--workers", type=int_option(0, 64, "a number of processes"), default=0,
                   help="DataLoader worker processes that prepare (synthesise, augment) the next pairs while the "
                        "network trains; 0 = in the training process. The pairs are the same either way (each is "
                        "seeded by its epoch and index). Use a few on a GPU, where preparing a pair outlasts a step")
    p.add_argument("--phantoms", type=int_option(2), default=12, help="phantom subjects for --data phantom")
    p.add_argument("--shared-data", type=Path, default=DEFAULT_SHARED_DATA, help="the shared data folder")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pt")
    p.add_argument("--init-weights", type=Path, help="start from the weights of another checkpoint with the same "
                   "architecture (e.g. one trained on a coarser grid: a multi-resolution curriculum)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=seed_option, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=cmd_train)


def training_pairs(args, net, train_subjects, val_subjects, label_values):
    """The training and validation pair datasets of ``textscf train``, both normalised by the model's own
    :class:`textscf.spatial.IntensityNormaliser` (the object ``register`` builds from the same configuration)."""
    from textscf.datasets import PairDataset
    from textscf.spatial import IntensityNormaliser

    normalise = IntensityNormaliser.from_config(net.config)
    if args.synth:
        from textscf.synthesis import SynthPairDataset

        train_pairs = SynthPairDataset(
            train_subjects, label_values, pairs_per_epoch=args.steps_per_epoch or 100,
            intra_fraction=args.intra_fraction, known_field_mm=args.known_field_mm,
            random_contrast=args.random_contrast, seed=args.seed, normalise=normalise)
    else:
        train_pairs = PairDataset(train_subjects, label_values, augment=args.augment, seed=args.seed,
                                  normalise=normalise)
    return train_pairs, PairDataset(val_subjects, label_values, seed=args.seed, normalise=normalise)


def cmd_train(args) -> int:
    from textscf.phantom import PHANTOM_DIRECTION
    from textscf.presets import load_preset
    from textscf.train import TrainSettings, build_model, describe, init_distributed_from_env, train

    init_distributed_from_env()
    preset = load_preset(args.preset)
    direction = PHANTOM_DIRECTION if preset.modality == "ct" else (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    net = build_model(list(preset.region_names), list(preset.label_values), args.encoder, preset.template,
                      args.start_channels, args.hidden_channels, args.head, args.integrate, preset.modality,
                      args.spacing, args.shape, direction, args.seed, args.init)
    if args.init_weights:
        from textscf.checkpoint import load_checkpoint, load_state_dict_checked

        source, _ = load_checkpoint(args.init_weights)
        load_state_dict_checked(net, source.state_dict(), source=str(args.init_weights))
    train_subjects = [s for src in args.data for s in load_source(src, args.shared_data, "train", args.phantoms, args.seed)]
    val_sources = args.val or (["btcv-synthetic"] if "btcv-synthetic" in args.data else ["phantom"])
    val_subjects = [s for src in val_sources for s in load_source(src, args.shared_data, "val", args.phantoms, args.seed)]
    train_subjects = [prepare_subject(s, net.config) for s in train_subjects]
    val_subjects = [prepare_subject(s, net.config) for s in val_subjects]
    train_pairs, val_pairs = training_pairs(args, net, train_subjects, val_subjects, list(preset.label_values))
    settings = TrainSettings(
        epochs=args.epochs, stop_after=args.stop_after, steps_per_epoch=args.steps_per_epoch, learning_rate=args.lr,
        smooth_weight=args.smooth_weight, dice_weight=args.dice_weight, dice_sigmas=tuple(args.dice_sigmas),
        field_weight=args.field_weight, threads=args.threads, similarity=args.similarity, seed=args.seed,
        bf16=args.bf16, compile=args.compile, device=args.device, num_workers=args.workers,
        show_progress=not args.quiet,
    )
    metadata = {
        "data": args.data, "val": val_sources, "train_subjects": [s.name for s in train_subjects],
        "val_subjects": [s.name for s in val_subjects], "augment": args.augment or args.synth, "preset": args.preset,
        "synth": args.synth, "init": args.init,
        "init_weights": str(args.init_weights) if args.init_weights else None,
    }

    def report(row):
        if not args.quiet:
            print(json.dumps(row))

    result = train(net, train_pairs, args.output, settings, val_pairs=val_pairs, resume=args.resume,
                   metadata=metadata, on_epoch_end=report)
    print(f"textscf: training finished: {describe(result)}")
    return 0

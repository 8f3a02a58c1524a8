"""Shared pytest fixtures."""
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder `../shared/data`; tests needing it skip when it is absent."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA} (a fresh checkout has no ../shared/data)")
    return SHARED_DATA


def save_abdomen_checkpoint(path: Path, spacing, input_shape) -> Path:
    """A random-init one-hot textSCF checkpoint for the 13 abdomen organs (N_s 2, CΦ 8) on the given grid."""
    import torch

    from textscf.checkpoint import save_checkpoint
    from textscf.phantom import PHANTOM_DIRECTION
    from textscf.presets import load_preset
    from textscf.train import build_model

    preset = load_preset("abdomen-ct")
    net = build_model(list(preset.region_names), list(preset.label_values), "onehot", preset.template,
                      start_channels=2, hidden_channels=8, spacing=spacing, input_shape=input_shape,
                      direction=PHANTOM_DIRECTION, seed=0)
    torch.manual_seed(0)
    return save_checkpoint(net, path)


@pytest.fixture(scope="session")
def tiny_abdomen_checkpoint(tmp_path_factory):
    """A random-init one-hot textSCF checkpoint for the 13 abdomen organs on a small 4 mm grid.

    Its initial field is near zero, so registrations with it are close to identity after the initial alignment.
    """
    return save_abdomen_checkpoint(tmp_path_factory.mktemp("models") / "tiny.pt", (4.0, 4.0, 4.0), (48, 48, 64))

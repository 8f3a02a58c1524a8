"""Checkpoints: our self-describing format, and the authors' released state dicts.

Our format is one ``torch.save`` file holding plain types and tensors only, so it loads with
``torch.load(weights_only=True)``::

    {"format": "textscf-checkpoint", "format_version": 1, "config": {...}, "state_dict": {...},
     "metadata": {...}}

The text matrix B the model was trained with is the ``text_matrix`` buffer inside the state dict.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from textscf.errors import CheckpointError
from textscf.files import replace_atomically
from textscf.networks.textscf_net import TextSCFConfig, TextSCFNet

FORMAT = "textscf-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(net: TextSCFNet, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``net`` with its configuration; the file appears atomically (temp file, then rename)."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": net.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "metadata": dict(metadata or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    return replace_atomically(path, lambda temp: torch.save(payload, temp))


def read_checkpoint_file(path: str | os.PathLike, map_location="cpu") -> dict:
    """``torch.load(weights_only=True)`` with clear errors for missing, truncated or foreign files."""
    from textscf.io import check_input_path

    path = check_input_path(path, "checkpoint", what="file (a .pt written by textscf train)",
                            error=CheckpointError)
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); the download or copy did not finish")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load on foreign bytes raises anything (KeyError for text)
        if "weights only" in str(exc).lower() or "weights_only" in str(exc):
            # torch's message advises weights_only=False, which would run any code the file carries: never quote it
            raise CheckpointError(
                f"checkpoint {path} cannot be read safely: it is corrupted, truncated, or it holds Python objects "
                "other than tensors and plain values (possibly code), which textscf never loads. Fix: give a "
                "checkpoint written by textscf train (or the bundled model), or copy/download the file again"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "it is corrupted, truncated, or not a PyTorch file: copy or download it again"
        ) from exc


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> tuple[TextSCFNet, dict]:
    """Rebuild a :class:`TextSCFNet` from a checkpoint; returns ``(net, metadata)``, the net in eval mode."""
    payload = read_checkpoint_file(path, map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        keys = list(payload)[:3] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path} is not a textscf checkpoint (found {keys}); a plain state dict of the authors' brain "
            "model loads with textscf.reference.load_reference_model"
        )
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {payload['format_version']}, newer than this textscf "
            f"understands ({FORMAT_VERSION}); upgrade textscf"
        )
    try:
        config = TextSCFConfig.from_dict(dict(payload["config"]))
        state = payload["state_dict"]
        net = TextSCFNet(config, state["text_matrix"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} has an invalid configuration: {exc}") from exc
    load_state_dict_checked(net, state, source=str(path))
    net.eval()
    return net, dict(payload.get("metadata", {}))


def strip_module_prefix(state: Mapping) -> dict:
    """``state`` without the ``module.`` key prefix that DataParallel / DistributedDataParallel add (when every key
    has it; otherwise unchanged)."""
    prefix = "module."
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def _few(names: Sequence[str], n: int = 4) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def load_matching_state(net: torch.nn.Module, state: Mapping) -> list[str]:
    """Load the parameters of ``state`` that fit ``net``; returns what did not fit ([] = all of it, strictly).

    Each entry reads ``"2 missing (a, b)"``, ``"1 unexpected (c)"`` or ``"1 mis-shaped (d: file (3,) vs model (4,))"``.
    The keys go through the network's own load hooks (``load_state_dict(strict=False)``), so a network that renames
    keys of older files (MONAI's SwinUNETR) is judged after renaming.
    """
    own = net.state_dict()
    misshaped = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in misshaped]
    try:
        result = net.load_state_dict({k: v for k, v in state.items() if k not in misshaped}, strict=False)
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    except RuntimeError as exc:  # a load hook renamed keys onto mis-shaped parameters
        missing, unexpected = [], []
        shapes.append(str(exc).splitlines()[-1].strip())
    return [f"{len(items)} {label} ({_few(items)})"
            for label, items in (("mis-shaped", shapes), ("missing", missing), ("unexpected", unexpected)) if items]


def load_state_dict_checked(net: torch.nn.Module, state: Mapping, source: str) -> None:
    """``load_state_dict`` whose error names the missing, unexpected and mis-shaped keys (:func:`load_matching_state`)."""
    problems = load_matching_state(net, state)
    if problems:
        raise CheckpointError(
            f"weights in {source} do not fit the model: {'; '.join(problems)}. "
            "The file was saved for a different architecture (start channels, head kind, region count or text encoder)"
        )

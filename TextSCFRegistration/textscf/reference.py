"""Compatibility with the authors' released textSCF brain model (``brainTextSCFComplex``).

Their checkpoints are plain state dicts. Their text matrix is not saved in them: it is recomputed from CLIP
at start-up (row 0 a background vector, rows 1..35 raw ``encode_text`` outputs of the 35 brain prompts), so it
must be given when loading; :func:`reference_text_matrix` reproduces their computation from the embeddings.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from textscf.checkpoint import load_state_dict_checked, read_checkpoint_file, strip_module_prefix
from textscf.errors import CheckpointError
from textscf.networks.textscf_net import TextSCFConfig, TextSCFNet

# The authors' 35 FreeSurfer structures, in their label order 1..35.
REFERENCE_BRAIN_STRUCTURES = (
    "Left-Cerebral-White-Matter", "Left-Cerebral-Cortex", "Left-Lateral-Ventricle", "Left-Inf-Lat-Ventricle",
    "Left-Cerebellum-White-Matter", "Left-Cerebellum-Cortex", "Left-Thalamus", "Left-Caudate", "Left-Putamen",
    "Left-Pallidum", "3rd-Ventricle", "4th-Ventricle", "Brain-Stem", "Left-Hippocampus", "Left-Amygdala",
    "Left-Accumbens", "Left-Ventral-DC", "Left-Vessel", "Left-Choroid-Plexus", "Right-Cerebral-White-Matter",
    "Right-Cerebral-Cortex", "Right-Lateral-Ventricle", "Right-Inf-Lat-Ventricle", "Right-Cerebellum-White-Matter",
    "Right-Cerebellum-Cortex", "Right-Thalamus", "Right-Caudate", "Right-Putamen", "Right-Pallidum",
    "Right-Hippocampus", "Right-Amygdala", "Right-Accumbens", "Right-Ventral-DC", "Right-Vessel",
    "Right-Choroid-Plexus",
)
REFERENCE_TEMPLATE = "A magnetic resonance imaging of a {} in human brain."
REFERENCE_ENCODER = "open_clip:ViT-L-14-336:openai"


def reference_region_names() -> list[str]:
    """The prompts' region names as the authors form them: '-' replaced by ' ', lower-cased."""
    return [s.replace("-", " ").lower() for s in REFERENCE_BRAIN_STRUCTURES]


def reference_text_matrix(region_embeddings: torch.Tensor) -> torch.Tensor:
    """The authors' text matrix from raw region embeddings ``(35, C1)`` -> ``(36, C1)``.

    Their background row is column -1 of the ``Vh`` that ``torch.linalg.svd`` returns (their code names it V),
    which is not the orthogonal complement direction our own :func:`textscf.text.background_vector` computes.
    Reproduced here as is, since their weights were trained with it.
    """
    e = region_embeddings.float()
    _, _, vh = torch.linalg.svd(e)
    return torch.cat([vh[:, -1].unsqueeze(0), e], dim=0)


def convert_reference_state_dict(state: dict) -> tuple[dict, dict]:
    """Map the authors' keys onto :class:`TextSCFNet` keys; returns ``(state_dict, inferred sizes)``.

    Dropped: the identity-grid buffers (``transformer.grid``, ``integrate.transformer.grid``) and ``up4``, which
    their forward pass never uses.
    """
    state = strip_module_prefix(state)
    required = ("eninput.layer.0.weight", "ec3.large.weight", "flow.generate_flow_x.mlp.0.weight", "flow.flow.weight")
    absent = [k for k in required if k not in state]
    if absent:
        raise CheckpointError(
            f"not a textSCF reference state dict: keys {absent} are absent (found e.g. {list(state)[:4]})"
        )
    converted = {}
    for key, value in state.items():
        if key.endswith("transformer.grid") or key.startswith("up4."):
            continue
        if key.startswith("flow."):
            converted["head." + key[len("flow."):]] = value
        else:
            converted["backbone." + key] = value
    mlp0 = state["flow.generate_flow_x.mlp.0.weight"]
    sizes = {
        "start_channels": int(state["eninput.layer.0.weight"].shape[0]),
        "large_kernel": int(state["ec3.large.weight"].shape[-1]),
        "hidden_channels": int(mlp0.shape[0]),
        "text_dim": int(mlp0.shape[1]),
    }
    return converted, sizes


def load_reference_model(
    source: str | os.PathLike | dict,
    text_matrix: torch.Tensor,
    region_names: list[str] | None = None,
    integrate: bool = False,
    input_shape: tuple[int, int, int] = (160, 192, 224),
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    label_values: list[int] | None = None,
) -> TextSCFNet:
    """Load the authors' brain model (a path or an already-loaded state dict) as a ``reference``-head TextSCFNet.

    Args:
        text_matrix: ``(N, C1)`` as the authors compute it (see :func:`reference_text_matrix`).
        integrate: their ``diff_int`` flag (not stored in the state dict).
    """
    state = read_checkpoint_file(Path(source)) if not isinstance(source, dict) else source
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    converted, sizes = convert_reference_state_dict(state)
    text_matrix = torch.as_tensor(text_matrix, dtype=torch.float32)
    if text_matrix.ndim != 2 or text_matrix.shape[1] != sizes["text_dim"]:
        raise CheckpointError(
            f"the reference weights expect text embeddings of width {sizes['text_dim']} "
            f"(CLIP ViT-L/14@336px gives 768, RN50x64 gives 1024), got a text matrix of shape {tuple(text_matrix.shape)}"
        )
    names = list(region_names) if region_names is not None else reference_region_names()
    if len(names) != text_matrix.shape[0] - 1:
        raise CheckpointError(f"{len(names)} region names for a text matrix of {text_matrix.shape[0]} rows (background included)")
    config = TextSCFConfig(
        num_regions=text_matrix.shape[0],
        head="reference",
        integrate=integrate,
        region_names=names,
        label_values=list(label_values or []),
        text_encoder=REFERENCE_ENCODER,
        template=REFERENCE_TEMPLATE,
        modality="mri",
        intensity={"kind": "minmax"},
        spacing=spacing,
        input_shape=input_shape,
        **sizes,
    )
    net = TextSCFNet(config, text_matrix)
    converted["text_matrix"] = net.text_matrix
    load_state_dict_checked(net, converted, source="the reference state dict")
    return net.eval()

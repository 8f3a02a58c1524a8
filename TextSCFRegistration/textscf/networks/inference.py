"""The inference path of :class:`TextSCFNet`: a folded, fused copy run without autograd.

:func:`for_inference` returns an :class:`InferenceNet`, a copy of a trained network that computes the same outputs
(to float32 rounding) with fewer and cheaper operations:

- every :class:`~textscf.networks.blocks.LargeKernelBlock` ``PReLU(conv3(x) + convK(x) + conv1(x) + x)`` is folded
  into one ``K``-cubed convolution (:meth:`LargeKernelBlock.fold`, structural re-parameterisation);
- every convolution (transposed ones too) + PReLU runs as one oneDNN call on the CPU
  (:class:`~textscf.networks.blocks.InferenceConvPReLU`);
- on the CPU the backbone runs in the ``channels_last_3d`` memory format, which oneDNN convolves without reordering
  each input and output (on other devices it keeps torch's default format, not measured there);
- the forward runs under ``torch.inference_mode`` (no autograd records, no version counters), and
  :meth:`InferenceNet.displacement` skips the warp of the moving image when only the field is wanted.

The training modules, their state-dict keys and the checkpoints are untouched: the copy is for one run and is never
saved (its folded blocks have other keys).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from textscf.networks.blocks import ConvPReLU, InferenceConvPReLU, LargeKernelBlock, UpConvPReLU
from textscf.networks.textscf_net import RegistrationOutput, TextSCFNet


class InferenceNet(nn.Module):
    """A :class:`TextSCFNet` prepared for inference; build it with :func:`for_inference`.

    Calls take the inputs of :meth:`TextSCFNet.forward`: ``moving, fixed (B, 1, I, J, K)`` in [0, 1],
    ``fixed_regions (B, 1, I, J, K)`` long, optional ``confidence (B, 1, I, J, K)``.

    Attributes:
        net: the folded copy (a :class:`TextSCFNet` whose backbone blocks are replaced by their inference forms).
        memory_format: the memory format of the backbone's weights, hence of its activations.
    """

    def __init__(self, net: TextSCFNet, memory_format: torch.memory_format | None = None):
        super().__init__()
        if memory_format is None:
            on_cpu = net.text_matrix.device.type == "cpu"
            memory_format = torch.channels_last_3d if on_cpu else torch.contiguous_format
        self.net = net
        self.memory_format = memory_format
        self.net.backbone.to(memory_format=memory_format)

    @torch.inference_mode()
    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, fixed_regions: torch.Tensor,
                confidence: torch.Tensor | None = None) -> RegistrationOutput:
        """:class:`RegistrationOutput` as :meth:`TextSCFNet.forward` returns it (inference tensors)."""
        displacement, regularised = self.displacement(moving, fixed, fixed_regions, confidence)
        return RegistrationOutput(displacement, self.net.transformer(moving, displacement), regularised)

    @torch.inference_mode()
    def displacement(self, moving: torch.Tensor, fixed: torch.Tensor, fixed_regions: torch.Tensor,
                     confidence: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(displacement (B, 3, I, J, K), regularised field)`` without warping the moving image: what a
        registration needs."""
        return self.net.displacement(moving, fixed, fixed_regions, confidence)


def fold_network(net: TextSCFNet) -> TextSCFNet:
    """A copy of ``net`` whose backbone has every large-kernel block folded into one convolution and every
    (transposed) convolution + PReLU as :class:`InferenceConvPReLU`; ``net`` itself is not changed. Same forward, to
    rounding."""
    folded = copy.deepcopy(net).eval()
    for name, module in list(folded.backbone.named_children()):
        if isinstance(module, LargeKernelBlock):
            setattr(folded.backbone, name, module.fold())
        elif isinstance(module, (ConvPReLU, UpConvPReLU)):
            conv, prelu = module.layer
            setattr(folded.backbone, name, InferenceConvPReLU(conv, prelu))
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded


def for_inference(net: TextSCFNet, memory_format: torch.memory_format | None = None) -> InferenceNet:
    """The inference path for ``net`` on the device ``net`` is on (see the module docstring); ``net`` keeps its modules
    and weights. ``memory_format``: None = ``channels_last_3d`` on the CPU, torch's default elsewhere."""
    return InferenceNet(fold_network(net), memory_format)

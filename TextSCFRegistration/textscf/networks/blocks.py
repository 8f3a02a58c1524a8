"""Convolution blocks of the LKU-Net feature branch.

Attribute names (``layer``, ``regular``/``large``/``one``/``prelu``) follow the published LKU-Net/textSCF code so
that the authors' state dicts map onto these modules key for key.
"""
from __future__ import annotations

import torch
from torch import nn


class ConvPReLU(nn.Module):
    """3-D convolution followed by a PReLU.

    Args:
        in_channels, out_channels: channel counts.
        kernel_size, stride, padding: as in ``nn.Conv3d``.

    Shapes: ``(B, in_channels, I, J, K) -> (B, out_channels, I', J', K')`` with ``I' = I // stride`` for the
    default padding.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.layer = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, kernel_size, stride, padding),
            nn.PReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class UpConvPReLU(nn.Module):
    """2x2x2 stride-2 transposed convolution followed by a PReLU: doubles each spatial size."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.layer = nn.Sequential(
            nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2),
            nn.PReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class LargeKernelBlock(nn.Module):
    """LKU-Net's large-kernel block: PReLU(conv3(x) + convK(x) + conv1(x) + x).

    The parallel 3x3x3, KxKxK and 1x1x1 branches plus identity give a large receptive field at the cost of one
    large convolution. Channels and spatial size are preserved: ``(B, C, I, J, K) -> (B, C, I, J, K)``.
    """

    def __init__(self, channels: int, kernel_size: int = 5):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"large kernel size must be odd to keep the spatial size, got {kernel_size}")
        self.regular = nn.Conv3d(channels, channels, 3, 1, 1)
        self.large = nn.Conv3d(channels, channels, kernel_size, 1, kernel_size // 2)
        self.one = nn.Conv3d(channels, channels, 1, 1, 0)
        self.prelu = nn.PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prelu(self.regular(x) + self.large(x) + self.one(x) + x)

    @torch.no_grad()
    def fold(self) -> InferenceConvPReLU:
        """The same block as one convolution (structural re-parameterisation), for inference.

        The sum of the branches is linear in ``x``, so it is one convolution whose kernel is the sum of the branch
        kernels, each zero-padded to ``max(K, 3)`` and centred, plus a centred delta per channel for the identity; its
        bias is the sum of the branch biases. The kernels are summed in float64 and rounded once. The result owns
        new tensors (its PReLU is a copy): changing it leaves this block unchanged.

        Shapes: the folded block maps ``(B, C, I, J, K) -> (B, C, I, J, K)`` like this one.
        """
        size = max(self.large.kernel_size[0], 3)
        channels = self.large.out_channels
        weight = torch.zeros(channels, channels, size, size, size, dtype=torch.float64, device=self.large.weight.device)
        for conv in (self.large, self.regular, self.one):
            k = conv.kernel_size[0]
            o = (size - k) // 2
            weight[:, :, o:o + k, o:o + k, o:o + k] += conv.weight.double()
        centre = size // 2
        index = torch.arange(channels, device=weight.device)
        weight[index, index, centre, centre, centre] += 1.0
        conv = nn.Conv3d(channels, channels, size, 1, size // 2).to(self.large.weight)
        conv.weight.copy_(weight)
        conv.bias.copy_(self.large.bias.double() + self.regular.bias.double() + self.one.bias.double())
        prelu = nn.PReLU(self.prelu.num_parameters).to(self.prelu.weight)
        prelu.weight.copy_(self.prelu.weight)
        return InferenceConvPReLU(conv, prelu)


def _fused_conv_prelu_available(transposed: bool) -> bool:
    name = "_convolution_transpose_pointwise" if transposed else "_convolution_pointwise"
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, name)


class InferenceConvPReLU(nn.Module):
    """``PReLU(conv(x))`` for inference, one oneDNN call on the CPU; ``conv`` may be transposed.

    A PReLU with one slope ``a`` is ``leaky_relu(., a)``, which oneDNN applies as a post-op of the convolution
    (``torch.ops.mkldnn._convolution_pointwise`` / ``_convolution_transpose_pointwise``, the kernels ``torch.compile``
    uses for this pattern on the CPU): the output is written once, in the input's memory format, instead of being
    written by the convolution and rewritten by the PReLU (PyTorch's own 3-D transposed convolution is not oneDNN's
    and returns the contiguous format). Elsewhere (CUDA, oneDNN disabled, a per-channel PReLU, autograd enabled, or
    under ``torch.compile``, which fuses the pair itself) it runs ``conv`` then ``prelu``. Same output either way.

    Args:
        conv: the ``nn.Conv3d`` or ``nn.ConvTranspose3d``.
        prelu: the ``nn.PReLU`` after it.

    Shapes: as ``conv``: ``(B, C_in, I, J, K) -> (B, C_out, I', J', K')``.
    """

    def __init__(self, conv: nn.Conv3d | nn.ConvTranspose3d, prelu: nn.PReLU):
        super().__init__()
        self.conv = conv
        self.prelu = prelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        transposed = isinstance(conv, nn.ConvTranspose3d)
        if (x.device.type == "cpu" and x.dtype == torch.float32 and self.prelu.weight.numel() == 1
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and torch.backends.mkldnn.enabled and _fused_conv_prelu_available(transposed)
                and isinstance(conv.padding, tuple) and conv.padding_mode == "zeros"):
            post_op = ("leaky_relu", [float(self.prelu.weight)], "")
            if transposed:
                return torch.ops.mkldnn._convolution_transpose_pointwise(
                    x, conv.weight, conv.bias, list(conv.padding), list(conv.output_padding), list(conv.stride),
                    list(conv.dilation), conv.groups, *post_op)
            return torch.ops.mkldnn._convolution_pointwise(
                x, conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
                *post_op)
        return self.prelu(conv(x))

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

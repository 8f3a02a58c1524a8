"""The feature branch: an LKU-Net encoder-decoder that stops at half resolution."""
from __future__ import annotations

import torch
from torch import nn

from textscf.networks.blocks import ConvPReLU, LargeKernelBlock, UpConvPReLU


class LKUNet(nn.Module):
    """LKU-Net encoder-decoder (Jia et al. 2022) as used by textSCF.

    Four stride-2 levels with a large-kernel block after each, three decoder levels with skip connections; the
    output F(x) has ``2 * start_channels`` channels at half the input resolution.

    Args:
        in_channels: 2 for ``cat(moving, fixed)``.
        start_channels: N_s (8, 16, 32, 64 in the paper).
        large_kernel: kernel size of the large-kernel blocks (5 in the paper).

    Shapes: ``(B, in_channels, I, J, K) -> (B, 2 * N_s, I / 2, J / 2, K / 2)``; I, J, K divisible by 16.
    """

    def __init__(self, in_channels: int = 2, start_channels: int = 8, large_kernel: int = 5):
        super().__init__()
        n = start_channels
        self.out_channels = 2 * n
        self.eninput = ConvPReLU(in_channels, n)
        self.ec1 = ConvPReLU(n, n)
        self.ec2 = ConvPReLU(n, 2 * n, stride=2)
        self.ec3 = LargeKernelBlock(2 * n, large_kernel)
        self.ec4 = ConvPReLU(2 * n, 4 * n, stride=2)
        self.ec5 = LargeKernelBlock(4 * n, large_kernel)
        self.ec6 = ConvPReLU(4 * n, 8 * n, stride=2)
        self.ec7 = LargeKernelBlock(8 * n, large_kernel)
        self.ec8 = ConvPReLU(8 * n, 8 * n, stride=2)
        self.ec9 = LargeKernelBlock(8 * n, large_kernel)

        self.up1 = UpConvPReLU(8 * n, 8 * n)
        self.dc1 = ConvPReLU(16 * n, 8 * n)
        self.dc2 = ConvPReLU(8 * n, 4 * n)
        self.up2 = UpConvPReLU(4 * n, 4 * n)
        self.dc3 = ConvPReLU(8 * n, 4 * n)
        self.dc4 = ConvPReLU(4 * n, 2 * n)
        self.up3 = UpConvPReLU(2 * n, 2 * n)
        self.dc5 = ConvPReLU(4 * n, 4 * n)
        self.dc6 = ConvPReLU(4 * n, 2 * n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % 16 for s in x.shape[2:]):
            raise ValueError(f"LKUNet needs spatial sizes divisible by 16, got {tuple(x.shape[2:])}")
        e0 = self.ec1(self.eninput(x))
        e1 = self.ec3(self.ec2(e0))  # 1/2
        e2 = self.ec5(self.ec4(e1))  # 1/4
        e3 = self.ec7(self.ec6(e2))  # 1/8
        e4 = self.ec9(self.ec8(e3))  # 1/16
        d = self.dc2(self.dc1(torch.cat((self.up1(e4), e3), 1)))
        d = self.dc4(self.dc3(torch.cat((self.up2(d), e2), 1)))
        return self.dc6(self.dc5(torch.cat((self.up3(d), e1), 1)))

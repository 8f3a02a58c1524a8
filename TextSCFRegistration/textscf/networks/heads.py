"""Flow heads: the textSCF spatially covariant filter head, its no-SCF ablation, and the authors' variant.

All heads map half-resolution features ``F (B, C2, i, j, k)`` to a half-resolution displacement
``(B, 3, i, j, k)``; its units and channel order are stated once, in docs/ARCHITECTURE.md ("Model").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FilterMLP(nn.Module):
    """Φθ: C1 -> CΦ -> 2CΦ -> out, ReLU between layers and none after (the paper's 3-layer MLP)."""

    def __init__(self, text_dim: int, hidden: int, out_features: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(text_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, 2 * hidden),
            nn.ReLU(inplace=True),
            nn.Linear(2 * hidden, out_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def gather_filters(bank: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Per-voxel filters from a filter bank by region index.

    Args:
        bank: ``(N, 3, C2)`` filters, one per region.
        regions: ``(B, 1, i, j, k)`` long region indices in ``[0, N)``.

    Returns:
        ``(B, i, j, k, 3, C2)``.
    """
    n, three, c2 = bank.shape
    w = F.embedding(regions[:, 0], bank.reshape(n, three * c2))
    return w.view(*w.shape[:-1], three, c2)


class TextSCFHead(nn.Module):
    """The textSCF head (paper eq. 3-4).

    ``w(x) = Φθ(B[J_f(x)])`` and ``u(x) = (p(x) w(x) + (1 - p(x)) w_r)ᵀ F(x)`` with a shared filter ``w_r``.
    Φθ runs once per call on the text matrix, giving an ``(N, 3, C2)`` filter bank that is gathered per voxel;
    it never runs per voxel. With ``covariant=False`` the head is the shared filter alone (the LKU-Net baseline,
    ``no_scf``).

    Args:
        text_dim: C1, the width of the text matrix B.
        feature_channels: C2, channels of F(x).
        hidden: CΦ.
        covariant: False for the no-SCF ablation.
    """

    def __init__(self, text_dim: int, feature_channels: int, hidden: int, covariant: bool = True):
        super().__init__()
        self.feature_channels = feature_channels
        self.covariant = covariant
        # w_r as a (3, C2) filter; tiny initial values so training starts from a near-zero field.
        self.shared_filter = nn.Parameter(torch.empty(3, feature_channels))
        if covariant:
            self.filter_mlp = FilterMLP(text_dim, hidden, 3 * feature_channels)
        self.init_output(1e-5)

    @torch.no_grad()
    def init_output(self, std: float) -> None:
        """The layers that emit the field (w_r and Φθ's last layer) at N(0, std), zero bias."""
        self.shared_filter.normal_(std=std)
        if self.covariant:
            self.filter_mlp.mlp[-1].weight.normal_(std=std)
            self.filter_mlp.mlp[-1].bias.zero_()

    def filter_bank(self, text_matrix: torch.Tensor) -> torch.Tensor:
        """Φθ(B) as ``(N, 3, C2)``."""
        return self.filter_mlp(text_matrix).view(-1, 3, self.feature_channels)

    def forward(
        self,
        features: torch.Tensor,
        text_matrix: torch.Tensor,
        regions: torch.Tensor,
        confidence: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            features: F, ``(B, C2, i, j, k)``.
            text_matrix: B, ``(N, C1)``.
            regions: J_f at the features' resolution, ``(B, 1, i, j, k)`` long.
            confidence: p at the features' resolution, ``(B, 1, i, j, k)`` in [0, 1]; None means 1.

        Returns:
            ``(B, 3, i, j, k)``.
        """
        shared = torch.einsum("ac,bcijk->baijk", self.shared_filter, features)
        if not self.covariant:
            return shared
        w = gather_filters(self.filter_bank(text_matrix), regions)  # (B, i, j, k, 3, C2)
        covariant = torch.einsum("bijkac,bcijk->baijk", w, features)
        if confidence is None:
            return covariant
        return confidence * covariant + (1.0 - confidence) * shared


class ReferenceSCFHead(nn.Module):
    """The head of the authors' released brain model (``brainTextSCFComplex``), for their checkpoints.

    One MLP per axis (``generate_flow_{x,y,z}``, C1 -> CΦ -> 2CΦ -> C2) gives per-region filters; the covariant
    flow is added to a 3x3x3 convolution of F (``flow``). There is no confidence blending.
    """

    def __init__(self, text_dim: int, feature_channels: int, hidden: int):
        super().__init__()
        self.generate_flow_x = FilterMLP(text_dim, hidden, feature_channels)
        self.generate_flow_y = FilterMLP(text_dim, hidden, feature_channels)
        self.generate_flow_z = FilterMLP(text_dim, hidden, feature_channels)
        self.flow = nn.Conv3d(feature_channels, 3, 3, 1, 1)
        self.init_output(1e-5)

    @torch.no_grad()
    def init_output(self, std: float) -> None:
        """The output convolution ``flow`` at N(0, std), zero bias."""
        self.flow.weight.normal_(std=std)
        self.flow.bias.zero_()

    def filter_bank(self, text_matrix: torch.Tensor) -> torch.Tensor:
        """``(N, 3, C2)``, axis order x, y, z = array axes 0, 1, 2."""
        mlps = (self.generate_flow_x, self.generate_flow_y, self.generate_flow_z)
        return torch.stack([m(text_matrix) for m in mlps], dim=1)

    def forward(
        self,
        features: torch.Tensor,
        text_matrix: torch.Tensor,
        regions: torch.Tensor,
        confidence: torch.Tensor | None = None,
    ) -> torch.Tensor:
        w = gather_filters(self.filter_bank(text_matrix), regions)
        return torch.einsum("bijkac,bcijk->baijk", w, features) + self.flow(features)

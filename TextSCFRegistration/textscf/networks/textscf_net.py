"""TextSCFNet: the whole textSCF registration network."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from textscf.networks.heads import ReferenceSCFHead, TextSCFHead
from textscf.networks.lkunet import LKUNet
from textscf.warp import ScalingAndSquaring, SpatialTransformer, resize_field

HEAD_KINDS = ("textscf", "no_scf", "reference")
INIT_SCHEMES = ("reference", "kaiming")


@dataclass
class TextSCFConfig:
    """Everything needed to rebuild and run a model without its training setup (stored in checkpoints).

    Attributes:
        num_regions: N, including the background (index 0).
        text_dim: C1, width of the text matrix.
        start_channels: N_s of the LKU-Net feature branch; features have C2 = 2 N_s channels.
        large_kernel: kernel size of the large-kernel blocks.
        hidden_channels: CΦ of the filter MLP.
        head: "textscf", "no_scf" (shared filter only) or "reference" (the authors' released head).
        integrate: diffeomorphic integration by scaling and squaring.
        integration_steps: squarings (7).
        region_names: N - 1 names in label order (the background is implicit).
        label_values: the label value of each region in the training label maps (for label-map inputs).
        text_encoder: encoder spec, e.g. "onehot" or "open_clip:ViT-L-14-336:openai".
        template: prompt template with one "{}".
        modality: "ct" or "mri" (selects the intensity normalisation).
        intensity: normalisation parameters, e.g. {"kind": "ct_window", "window": [-500, 800]}.
        spacing: voxel spacing (mm) of the model grid.
        input_shape: (I, J, K) of the model grid, each divisible by 16.
        direction: row-major 3x3 LPS direction matrix of the training data's array axes.
    """

    num_regions: int
    text_dim: int
    start_channels: int = 8
    large_kernel: int = 5
    hidden_channels: int = 256
    head: str = "textscf"
    integrate: bool = False
    integration_steps: int = 7
    region_names: list[str] = field(default_factory=list)
    label_values: list[int] = field(default_factory=list)
    text_encoder: str = "onehot"
    template: str = "A computerized tomography of a {} in human abdomen."
    modality: str = "ct"
    intensity: dict = field(default_factory=lambda: {"kind": "ct_window", "window": [-500.0, 800.0]})
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    input_shape: tuple[int, int, int] = (192, 160, 256)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self):
        if self.head not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {self.head!r}; choose one of {HEAD_KINDS}")
        if self.region_names and len(self.region_names) != self.num_regions - 1:
            raise ValueError(
                f"{len(self.region_names)} region names for {self.num_regions} regions; "
                "num_regions counts the background too"
            )
        self.spacing = tuple(float(s) for s in self.spacing)
        self.input_shape = tuple(int(s) for s in self.input_shape)
        self.direction = tuple(float(d) for d in self.direction)

    def to_dict(self) -> dict:
        """Plain types only, so checkpoints load with ``weights_only=True``."""
        d = asdict(self)
        for key in ("spacing", "input_shape", "direction"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TextSCFConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown configuration keys {sorted(unknown)}")
        return cls(**d)


class RegistrationOutput(NamedTuple):
    """What :class:`TextSCFNet` returns.

    displacement: ``(B, 3, I, J, K)`` full-resolution voxels, resampling convention.
    warped: ``(B, 1, I, J, K)`` the moving image warped by ``displacement``.
    regularised_field: the field the smoothness loss acts on: the full-resolution displacement, or with
        integration the half-resolution velocity (as the authors' code does).
    """

    displacement: torch.Tensor
    warped: torch.Tensor
    regularised_field: torch.Tensor


class TextSCFNet(nn.Module):
    """LKU-Net features + a textSCF head + optional scaling and squaring + upsampling + warping.

    Args:
        config: the model's :class:`TextSCFConfig`.
        text_matrix: B, ``(N, C1)``, row 0 the background vector. Stored as a buffer so the B a model was
            trained with travels with its weights.

    Forward: ``moving, fixed (B, 1, I, J, K)`` in [0, 1], ``fixed_regions (B, 1, I, J, K)`` long region
    indices of the fixed image, optional ``confidence (B, 1, I, J, K)``; returns :class:`RegistrationOutput`.
    """

    def __init__(self, config: TextSCFConfig, text_matrix: torch.Tensor):
        super().__init__()
        text_matrix = torch.as_tensor(text_matrix, dtype=torch.float32)
        if text_matrix.shape != (config.num_regions, config.text_dim):
            raise ValueError(
                f"text matrix has shape {tuple(text_matrix.shape)}, the configuration expects "
                f"({config.num_regions}, {config.text_dim})"
            )
        self.config = config
        self.backbone = LKUNet(2, config.start_channels, config.large_kernel)
        c2 = self.backbone.out_channels
        if config.head == "reference":
            self.head = ReferenceSCFHead(config.text_dim, c2, config.hidden_channels)
        else:
            self.head = TextSCFHead(config.text_dim, c2, config.hidden_channels, covariant=config.head == "textscf")
        self.register_buffer("text_matrix", text_matrix.clone())
        self.integrator = ScalingAndSquaring(config.integration_steps) if config.integrate else None
        self.transformer = SpatialTransformer()

    def initialise(self, scheme: str = "reference", seed: int | None = None) -> None:
        """Fresh weights.

        ``"reference"``: PyTorch's default layer initialisation and a near-zero output layer (weights N(0, 1e-5)),
        as the authors' code does. Without normalisation layers this leaves the deep backbone almost silent
        (the gradient reaching the deepest block is about 1e-12, far below Adam's epsilon), so the network
        learns very slowly. ``"kaiming"``: He-normal convolutions for the PReLU slope 0.25 (signal keeps its scale
        through the depth), zero biases, and an output layer at N(0, 1e-2): the initial field is well below a
        voxel while every layer receives a usable gradient (about 1e-4 at the deepest block).
        """
        if scheme not in INIT_SCHEMES:
            raise ValueError(f"unknown initialisation {scheme!r}; choose one of {INIT_SCHEMES}")
        if seed is not None:
            torch.manual_seed(seed)
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        if scheme == "kaiming":
            for module in self.backbone.modules():
                if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
                    nn.init.kaiming_normal_(module.weight, a=0.25, nonlinearity="leaky_relu")
                    nn.init.zeros_(module.bias)
        self.head.init_output(1e-2 if scheme == "kaiming" else 1e-5)

    @property
    def num_regions(self) -> int:
        return self.text_matrix.shape[0]

    def set_text_matrix(self, text_matrix: torch.Tensor) -> None:
        """Use another prompt set (same encoder width C1, any number of regions)."""
        text_matrix = torch.as_tensor(text_matrix, dtype=self.text_matrix.dtype, device=self.text_matrix.device)
        if text_matrix.ndim != 2 or text_matrix.shape[1] != self.config.text_dim:
            raise ValueError(
                f"text matrix must be (N, {self.config.text_dim}) for this model, got {tuple(text_matrix.shape)}"
            )
        self.text_matrix = text_matrix.clone()

    def filter_bank(self) -> torch.Tensor:
        """Φθ(B): ``(N, 3, C2)`` filters, one per region (shared filter repeated for ``no_scf``)."""
        if self.config.head == "no_scf":
            return self.head.shared_filter.unsqueeze(0).expand(self.num_regions, -1, -1)
        return self.head.filter_bank(self.text_matrix)

    def forward(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        fixed_regions: torch.Tensor,
        confidence: torch.Tensor | None = None,
    ) -> RegistrationOutput:
        displacement, regularised = self.displacement(moving, fixed, fixed_regions, confidence)
        warped = self.transformer(moving, displacement)
        return RegistrationOutput(displacement, warped, regularised)

    def displacement(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        fixed_regions: torch.Tensor,
        confidence: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward pass without the warp: ``(displacement (B, 3, I, J, K), regularised field)`` as in
        :class:`RegistrationOutput`; same inputs as :meth:`forward`."""
        if moving.shape != fixed.shape or moving.shape[1] != 1:
            raise ValueError(f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} must both be (B, 1, I, J, K)")
        if fixed_regions.shape != fixed.shape:
            raise ValueError(f"fixed_regions {tuple(fixed_regions.shape)} must match fixed {tuple(fixed.shape)}")
        size = fixed.shape[2:]
        features = self.backbone(torch.cat((moving, fixed), 1))
        # Nearest-neighbour halving picks voxel 2i, as the authors' code does.
        regions = fixed_regions[:, :, ::2, ::2, ::2].long()
        if regions.max() >= self.num_regions or regions.min() < 0:
            raise ValueError(f"region indices must lie in [0, {self.num_regions}), got [{int(regions.min())}, {int(regions.max())}]")
        p = None if confidence is None else confidence[:, :, ::2, ::2, ::2].to(features.dtype)
        # The field stages run on the standard layout (a no-op unless the backbone ran channels-last, as the
        # inference path does): converting here, at half resolution, spares a copy of the full-resolution field.
        half = self.head(features, self.text_matrix, regions, p).contiguous()
        if self.integrator is not None:
            # The half-resolution field is in full-resolution voxels: halve it into half-resolution voxels,
            # integrate there, and double back.
            velocity = half / 2.0
            displacement = resize_field(self.integrator(velocity) * 2.0, size)
            regularised = velocity
        else:
            displacement = resize_field(half, size)
            regularised = displacement
        return displacement, regularised

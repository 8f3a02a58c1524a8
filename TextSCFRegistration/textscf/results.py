"""What a registration returns: the one object the CLI writer and the Slicer logic both consume."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import SimpleITK as sitk


@dataclass
class RegistrationResult:
    """Outputs of :func:`textscf.pipeline.register`, all on the fixed image's grid.

    Attributes:
        displacement: 3-component float32 vector image on the fixed grid; physical LPS millimetres in the
            resampling convention (fixed point ``x`` maps to moving point ``x + d(x)``), already composed
            with the initial alignment.
        warped: the moving image resampled onto the fixed grid through ``displacement``.
        jacobian: float32 image, determinant of the Jacobian of ``x -> x + d(x)`` on the fixed grid
            (the deformable part only, so an affine initial alignment does not shift it).
        warped_labels: the moving label map resampled by nearest neighbour, or None.
        stats: numbers for reports and the Slicer table: ``sdlogj``, ``folding_percent``, ``jacobian_min``,
            ``jacobian_max``, ``seconds_total``, ``seconds_per_stage`` (dict), ``device``, and when a moving
            label map was given ``dice`` / ``hd95_mm`` (dict region name -> value), ``mean_dice``,
            ``mean_hd95_mm`` and their ``*_before`` counterparts.
        region_names: region names in index order, index 0 = background.
        initial_transform: the initial alignment (resampling convention) or None.
    """

    displacement: sitk.Image
    warped: sitk.Image
    jacobian: sitk.Image
    warped_labels: sitk.Image | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    region_names: list[str] = field(default_factory=list)
    initial_transform: sitk.Transform | None = None

    def transform(self) -> sitk.DisplacementFieldTransform:
        """A SimpleITK transform of the displacement (a copy: the transform takes ownership of its image)."""
        return sitk.DisplacementFieldTransform(sitk.Cast(self.displacement, sitk.sitkVectorFloat64))

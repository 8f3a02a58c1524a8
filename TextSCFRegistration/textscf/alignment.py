"""Initial (pre-deformable) alignment of the moving image to the fixed image: none, center or affine.

All transforms are in ITK's resampling convention and LPS mm: they map fixed points to moving points, so
``sitk.Resample(moving, fixed, T)`` brings the moving image onto the fixed image.
"""
from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from textscf.errors import InputError

__all__ = ["ALIGNMENT_METHODS", "initial_alignment", "describe_transform", "linear_part"]

ALIGNMENT_METHODS = ("none", "center", "affine")

# Registration runs on copies resampled to WORK_SPACING mm (never finer than the image): the affine only needs a
# few-mm precision (the deformable stage does the rest) and this makes its cost independent of the image size.
WORK_SPACING = 3.0
MASK_MARGIN = 15.0  # mm by which masks are dilated before they restrict the metric
# Stage schedules: shrink factors and smoothing sigmas (working voxels) per level, iterations per level.
_RIGID_SHRINK, _RIGID_SIGMAS = (4, 2, 1), (2.0, 1.0, 0.0)
_AFFINE_SHRINK, _AFFINE_SIGMAS = (2, 1), (1.0, 0.0)
_ITERATIONS = 80
_SAMPLES = 20_000  # metric samples per evaluation at the finest level (random, fixed seed)
_CENTRED = {"AffineTransform", "Euler3DTransform", "Similarity3DTransform", "VersorTransform",
            "VersorRigid3DTransform", "ScaleVersor3DTransform", "ScaleSkewVersor3DTransform",
            "ComposeScaleSkewVersor3DTransform", "ScaleTransform"}


def _mass_image(image: sitk.Image, mask: sitk.Image | None) -> sitk.Image:
    """Non-negative weights for centre-of-mass: intensity above the 1st percentile (air / background ~ 0)."""
    img = sitk.Cast(image, sitk.sitkFloat32)
    low = float(np.percentile(sitk.GetArrayViewFromImage(img), 1.0))
    mass = sitk.Maximum(img - low, 0.0)
    if mask is not None:
        mass = mass * sitk.Cast(sitk.Resample(mask, img, sitk.Transform(), sitk.sitkNearestNeighbor, 0) != 0,
                                sitk.sitkFloat32)
    return mass


def _center_transform(fixed: sitk.Image, moving: sitk.Image, fixed_mask, moving_mask) -> sitk.AffineTransform:
    """Identity matrix, translation = moving centre of mass - fixed centre of mass (GEOMETRY centres if the
    moments are unusable), centre of rotation at the fixed centre."""
    init = sitk.AffineTransform(3)
    try:
        fixed_mass, moving_mass = _mass_image(fixed, fixed_mask), _mass_image(moving, moving_mask)
        if float(np.sum(sitk.GetArrayViewFromImage(fixed_mass))) <= 0 or \
                float(np.sum(sitk.GetArrayViewFromImage(moving_mass))) <= 0:
            raise RuntimeError("zero mass")
        return sitk.AffineTransform(sitk.CenteredTransformInitializer(
            fixed_mass, moving_mass, init, sitk.CenteredTransformInitializerFilter.MOMENTS))
    except RuntimeError:
        return sitk.AffineTransform(sitk.CenteredTransformInitializer(
            fixed, moving, init, sitk.CenteredTransformInitializerFilter.GEOMETRY))


def _working_image(image: sitk.Image, spacing: float) -> sitk.Image:
    """``image`` (float32) on a grid of ``spacing`` mm (or its own spacing where finer), same direction and
    extent, Gaussian-smoothed first where it is downsampled (anti-aliasing)."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    old_sp = np.array(image.GetSpacing())
    new_sp = np.maximum(old_sp, spacing)
    if np.all(new_sp <= old_sp * 1.25):
        return image
    # variance (mm^2) that brings each axis' resolution to the new spacing; zero on axes kept as they are
    # (the recursive Gaussian refuses a zero sigma, the discrete one does not)
    variance = [float(0.25 * max(n * n - o * o, 0.0)) for n, o in zip(new_sp, old_sp)]
    smooth = sitk.DiscreteGaussian(image, variance, 32, 0.01, True)
    size = np.array(image.GetSize())
    new_size = np.maximum(np.round((size - 1) * old_sp / new_sp).astype(int) + 1, 4)
    ref = sitk.Image([int(v) for v in new_size], sitk.sitkFloat32)
    ref.SetSpacing(new_sp.tolist())
    ref.SetDirection(image.GetDirection())
    # keep the centre of the field of view
    centre = image.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2.0).tolist())
    d = np.array(image.GetDirection()).reshape(3, 3)
    ref.SetOrigin((np.array(centre) - d @ (new_sp * (new_size - 1) / 2.0)).tolist())
    return sitk.Resample(smooth, ref, sitk.Transform(), sitk.sitkLinear, float(np.min(sitk.GetArrayViewFromImage(
        image))), sitk.sitkFloat32)


def _working_mask(mask: sitk.Image | None, reference: sitk.Image) -> sitk.Image | None:
    """The mask on ``reference``'s grid, dilated by MASK_MARGIN mm: a metric restricted to the inside of a body
    or organ loses its outline, and the affine stage then drifts (2 mm at 5 cm on the test phantom)."""
    if mask is None:
        return None
    out = sitk.Resample(sitk.Cast(mask != 0, sitk.sitkUInt8), reference, sitk.Transform(),
                        sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    radius = [int(np.ceil(MASK_MARGIN / s)) for s in reference.GetSpacing()]
    return sitk.BinaryDilate(out, radius, sitk.sitkBall, 0.0, 1.0)


def _register(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, shrink, sigmas,
              fixed_mask, moving_mask, seed: int) -> None:
    """Optimise ``transform`` in place: Mattes MI, regular-step gradient descent, multi-resolution."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    # SimpleITK reads seed 0 as "seed from the wall clock": shift user seeds into 1..2**31-1
    reg.SetMetricSamplingPercentage(min(1.0, _SAMPLES / float(np.prod(fixed.GetSize()))),
                                    int(seed) % (2**31 - 1) + 1)
    # gradients by finite differences at the samples only (no full gradient image per level)
    reg.MetricUseFixedImageGradientFilterOff()
    reg.MetricUseMovingImageGradientFilterOff()
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=_ITERATIONS,
                                                 relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel(list(sigmas))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    if fixed_mask is not None:
        reg.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        reg.SetMetricMovingMask(moving_mask)
    reg.SetInitialTransform(transform, inPlace=True)
    reg.Execute(fixed, moving)


def _affine_registration(fixed: sitk.Image, moving: sitk.Image, init: sitk.AffineTransform,
                         fixed_mask, moving_mask, seed: int) -> sitk.AffineTransform:
    """Rigid (Euler) then affine, both from ``init``'s centre; returns the affine."""
    fixed_w, moving_w = _working_image(fixed, WORK_SPACING), _working_image(moving, WORK_SPACING)
    fmask, mmask = _working_mask(fixed_mask, fixed_w), _working_mask(moving_mask, moving_w)
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter(init.GetCenter())
    rigid.SetTranslation(init.GetTranslation())
    # Multi-threaded metric sums are reduced in a varying order (parameters then differ at ~1e-7): one thread
    # makes the result bit-for-bit reproducible; at the working resolution it costs a few seconds at most.
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        _register(fixed_w, moving_w, rigid, _RIGID_SHRINK, _RIGID_SIGMAS, fmask, mmask, seed)
        affine = sitk.AffineTransform(3)
        affine.SetCenter(rigid.GetCenter())
        affine.SetMatrix(rigid.GetMatrix())
        affine.SetTranslation(rigid.GetTranslation())
        _register(fixed_w, moving_w, affine, _AFFINE_SHRINK, _AFFINE_SIGMAS, fmask, mmask, seed)
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()[-1]
        raise InputError(f"affine alignment failed ({msg}). Fix: check that the fixed and moving images overlap "
                         "and show the same anatomy; try --init center, or give an initial transform "
                         "(--initial-transform).") from None
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    return affine


def initial_alignment(fixed: sitk.Image, moving: sitk.Image, method: str = "none",
                      fixed_mask: sitk.Image | None = None, moving_mask: sitk.Image | None = None,
                      seed: int = 0) -> sitk.Transform | None:
    """Initial alignment in the resampling convention (fixed points -> moving points, LPS mm).

    Args:
        fixed, moving: 3-D scalar images (any modality: the affine metric is Mattes mutual information).
        method: "none" (returns None), "center" (translation between the centres of mass of the images'
            intensities above their 1st percentile, or of the masks; falls back to the geometric centres) or
            "affine" (from the "center" result: a rigid stage, shrink 4/2/1 with smoothing 2/1/0 voxels, then a
            12-parameter affine stage, shrink 2/1; Mattes MI, regular-step gradient descent capped at 80
            iterations per level, 20 000 random samples drawn with ``seed``; both images are first resampled
            to 3 mm, so it takes a few seconds whatever the image size).
        fixed_mask, moving_mask: optional masks (non-zero = use), any grid: they restrict the centre of mass,
            and, dilated by 15 mm so that the metric still sees their outline, the affine metric.
        seed: sampling seed of the affine metric (same seed, same result).

    Returns:
        None, a ``sitk.TranslationTransform`` (center) or a ``sitk.AffineTransform`` (affine).

    Raises:
        InputError: unknown method, or an affine optimisation that fails.
    """
    method = str(method).lower()
    if method not in ALIGNMENT_METHODS:
        raise InputError(f"unknown alignment method {method!r}; choose one of {', '.join(ALIGNMENT_METHODS)}.")
    if method == "none":
        return None
    init = _center_transform(fixed, moving, fixed_mask, moving_mask)
    if method == "center":
        return sitk.TranslationTransform(3, init.GetTranslation())
    return _affine_registration(fixed, moving, init, fixed_mask, moving_mask, seed)


def linear_part(transform: sitk.Transform) -> tuple[np.ndarray, np.ndarray] | None:
    """``(A (3, 3), b (3,))`` with ``T(x) = A @ x + b`` if ``transform`` is linear (ITK's IsLinear: matrix-offset
    transforms and composites of them), else None. Read off the images of the origin and the unit points."""
    if transform.GetDimension() != 3 or not transform.IsLinear():
        return None
    probe = [(0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]
    images = np.array([transform.TransformPoint(p) for p in probe])
    b = images[0]
    return (images[1:] - b).T, b


def describe_transform(transform: sitk.Transform | None, at: tuple[float, float, float] | None = None) -> str:
    """A one-line summary for reports: for linear transforms the translation of the point ``at`` (default: the
    transform's centre, or the origin) in LPS mm, the rotation angle and axis, and the scales; otherwise the
    kind of transform."""
    if transform is None:
        return "none (identity)"
    name = transform.GetName()
    lin = linear_part(transform)
    if lin is None:
        if isinstance(transform, sitk.CompositeTransform) or name == "CompositeTransform":
            comp = sitk.CompositeTransform(transform)
            kinds = [comp.GetNthTransform(i).GetName() for i in range(comp.GetNumberOfTransforms())]
            return f"composite of {len(kinds)} transforms ({', '.join(kinds)}), non-linear"
        return f"{name} (non-linear)"
    a, b = lin
    if at is None:
        # centred transforms keep their centre in the first 3 fixed parameters
        fixed_params = transform.GetFixedParameters()
        at = tuple(fixed_params[:3]) if name in _CENTRED and len(fixed_params) >= 3 else (0.0, 0.0, 0.0)
    p = np.asarray(at, dtype=float)
    shift = a @ p + b - p
    u, s, vt = np.linalg.svd(a)
    rot = u @ vt
    if np.linalg.det(rot) < 0:  # a reflection: keep the rotation proper and report a negative scale
        u[:, -1] *= -1
        s = s.copy()
        s[-1] *= -1
        rot = u @ vt
    angle = math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(rot) - 1.0) / 2.0))))
    axis = np.array([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]])
    axis_txt = ""
    if angle > 1e-3 and np.linalg.norm(axis) > 1e-9:
        axis = axis / np.linalg.norm(axis)
        axis_txt = f" about ({axis[0]:.2f}, {axis[1]:.2f}, {axis[2]:.2f})"
    kind = {"TranslationTransform": "translation", "AffineTransform": "affine"}.get(name, name)
    return (f"{kind}: translation ({shift[0]:.2f}, {shift[1]:.2f}, {shift[2]:.2f}) mm LPS "
            f"(|t| = {np.linalg.norm(shift):.2f} mm at ({p[0]:.1f}, {p[1]:.1f}, {p[2]:.1f})), "
            f"rotation {angle:.2f} deg{axis_txt}, scales ({s[0]:.3f}, {s[1]:.3f}, {s[2]:.3f})")

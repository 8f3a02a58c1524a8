"""Classical registration peers run side by side with textSCF in the benchmarks.

Every method here takes the same inputs and hands back the same :class:`PeerResult`, so the benchmark computes Dice,
HD95, SDlogJ, % |J| <= 0 and time per pair identically for all of them:

- :func:`identity`: the unregistered start (zero displacement).
- :func:`register_ants_syn`: ANTs SyN through antspyx, ``ants.registration(type_of_transform="SyN")`` with the
  library's default settings (its own affine stage, Mattes MI, then SyN with ``reg_iterations=(40, 20, 0)``).
- :func:`register_elastix_bspline`: elastix through itk-elastix, the library's default ``"affine"`` map followed by its
  default ``"bspline"`` map (AdvancedMattesMutualInformation + bending-energy penalty, adaptive stochastic gradient
  descent, 4 resolutions, 256 iterations per resolution, final control-point spacing 10 mm).

Conventions (docs/ARCHITECTURE.md): inputs are numpy volumes in ITK index order ``(I, J, K)`` on one shared grid with the
given spacing, identity direction and origin 0. ``PeerResult.displacement_voxels`` is ``(3, I, J, K)`` float32, in voxels
of the fixed grid, channel ``a`` along array axis ``a``, resampling convention ``warped(x) = moving(x + u(x))``.
Both peers compute transforms that map a fixed-image point to a moving-image point (ITK resampling convention) and give
their dense field as physical LPS millimetre vectors ``(x, y, z)``; with an identity direction the voxel displacement
along array axis ``a`` is the physical component ``a`` divided by ``spacing[a]``.

Threads: ``threads`` (default 2) is applied through ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` (read by the ITK built into
antspyx) and ``itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads`` (the ITK of itk-elastix). Measured with antspyx
0.6.3 / itk-elastix 0.25.4 by counting the process's worker threads: both honour the setting, but antspyx reads the
variable once per process (its thread pool then persists), so a later ANTs call with another ``threads`` keeps the first
value; ``register_ants_syn`` warns and reports the effective value in ``settings["threads"]``. Use one ``threads`` per
process. The ``number_of_threads`` argument of ``itk.elastix_registration_method`` is deliberately not used: with
itk-elastix 0.25.4 any value above 1 segfaults (reproduced every time on a 48x40x32 image), while the global default
works.

Time: ``PeerResult.seconds`` is the whole call (registration, dense-field extraction, warps), without the one-off
library loading (itk loads its modules lazily, about 10 s on first use; done before the clock starts);
``settings["seconds_registration"]`` is the registration alone.

Measured once on the brain pair of ../shared/data/brain (moving = subject_l2r -> fixed = subject_vxm, 1 mm,
160x192x224, mean Dice over the 30 evaluation labels, 52.2 % before; 2 threads on a 2-core machine shared with other
jobs, so the wall times are pessimistic): ANTs SyN defaults 72.3 % (151.6 s wall, 134.5 s registration);
elastix affine + B-spline defaults (10 mm) 63.7 % (130.0 s). Elastix variants: B-spline only 65.0 % (70.9 s),
1000 iterations 65.3 % (248 s), 5 mm grid 68.9 % (257 s); its affine stage alone gives 51.0 %.
"""
from __future__ import annotations

import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "PeerResult",
    "PEERS",
    "available_peers",
    "identity",
    "physical_to_voxel_displacement",
    "register_ants_syn",
    "register_elastix_bspline",
    "set_threads",
]

THREAD_ENV_VARS = ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",)


@dataclass
class PeerResult:
    """What every method hands back for one (fixed, moving) pair.

    displacement_voxels: ``(3, I, J, K)`` float32 on the fixed grid, voxels along the array axes, resampling convention.
    warped_image: ``(I, J, K)`` the moving image resampled by the method itself (its own interpolator).
    warped_labels: ``(I, J, K)`` the moving labels warped with nearest-neighbour-type interpolation, same dtype as the
        input labels, or None when no labels were given.
    seconds: wall time of the whole call (registration, field extraction and the warps).
    settings: the parameters actually used, library versions, thread count and a timing breakdown.
    """

    name: str
    displacement_voxels: np.ndarray
    warped_image: np.ndarray
    warped_labels: np.ndarray | None
    seconds: float
    settings: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------------
# helpers


def set_threads(threads: int) -> int:
    """Ask ITK (antspyx's and itk-elastix's copies) to use ``threads`` threads; returns the number set."""
    threads = int(threads)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    for name in THREAD_ENV_VARS:
        os.environ[name] = str(threads)
    try:  # only when itk-elastix is installed; harmless otherwise
        import itk

        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    except ImportError:
        pass
    return threads


def _check_inputs(
    fixed: np.ndarray,
    moving: np.ndarray,
    spacing: Sequence[float] | None,
    moving_labels: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], np.ndarray | None]:
    fixed = np.asarray(fixed)
    moving = np.asarray(moving)
    if fixed.ndim != 3 or moving.ndim != 3:
        raise ValueError(f"fixed and moving must be 3-D (I, J, K) volumes, got shapes {fixed.shape} and {moving.shape}")
    if fixed.shape != moving.shape:
        raise ValueError(
            f"fixed {fixed.shape} and moving {moving.shape} must be on the same grid; resample the moving image first"
        )
    if spacing is None:
        spacing = (1.0, 1.0, 1.0)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive millimetre values along (I, J, K), got {spacing}")
    for name, arr in (("fixed", fixed), ("moving", moving)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} image has NaN or infinite values; replace them before registering")
    if moving_labels is not None:
        moving_labels = np.asarray(moving_labels)
        if moving_labels.shape != moving.shape:
            raise ValueError(f"moving_labels {moving_labels.shape} must have the moving image's shape {moving.shape}")
    fixed32 = np.ascontiguousarray(fixed, dtype=np.float32)
    moving32 = np.ascontiguousarray(moving, dtype=np.float32)
    return fixed32, moving32, spacing, moving_labels


def physical_to_voxel_displacement(
    displacement_mm: np.ndarray,
    spacing: Sequence[float],
    direction: np.ndarray | None = None,
) -> np.ndarray:
    """Physical displacement vectors ``(I, J, K, 3)`` (LPS mm, components x, y, z) -> ``(3, I, J, K)`` float32 voxels.

    A voxel displacement ``u`` is the physical vector ``D @ diag(spacing) @ u``, hence ``u = inv(D diag(spacing)) d``.
    The field must already be sampled on the ``(I, J, K)`` grid (array axis 0 = index i).
    """
    displacement_mm = np.asarray(displacement_mm, dtype=np.float64)
    if displacement_mm.ndim != 4 or displacement_mm.shape[-1] != 3:
        raise ValueError(f"expected a (I, J, K, 3) physical field, got shape {displacement_mm.shape}")
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64).reshape(3, 3)
    to_index = np.linalg.inv(d @ np.diag(np.asarray(spacing, dtype=np.float64)))
    out = np.einsum("ab,ijkb->aijk", to_index, displacement_mm)
    return np.ascontiguousarray(out, dtype=np.float32)


def _restore_label_dtype(warped: np.ndarray, like: np.ndarray) -> np.ndarray:
    warped = np.rint(warped)
    return warped.astype(like.dtype, copy=False)


# --------------------------------------------------------------------------------------------------------------------
# identity


def identity(
    fixed: np.ndarray,
    moving: np.ndarray,
    spacing: Sequence[float] | None = None,
    moving_labels: np.ndarray | None = None,
    **_: Any,
) -> PeerResult:
    """The unregistered start: zero displacement, the moving image and labels unchanged."""
    start = time.perf_counter()
    _, moving32, spacing, moving_labels = _check_inputs(fixed, moving, spacing, moving_labels)
    disp = np.zeros((3,) + moving32.shape, dtype=np.float32)
    labels = None if moving_labels is None else moving_labels.copy()
    return PeerResult(
        name="identity",
        displacement_voxels=disp,
        warped_image=moving32.copy(),
        warped_labels=labels,
        seconds=time.perf_counter() - start,
        settings={"spacing": spacing},
    )


# --------------------------------------------------------------------------------------------------------------------
# ANTs SyN (antspyx)


_ANTS_PROCESS_THREADS: int | None = None  # the thread count antspyx's ITK picked up in this process (first call)


def _import_ants():
    try:
        import ants
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("ANTs SyN needs antspyx: pip install 'antspyx>=0.4' (or the project's [peers] extra)") from exc
    return ants


def register_ants_syn(
    fixed: np.ndarray,
    moving: np.ndarray,
    spacing: Sequence[float],
    moving_labels: np.ndarray | None = None,
    type_of_transform: str = "SyN",
    threads: int = 2,
    label_interpolator: str = "nearestNeighbor",
    **kwargs: Any,
) -> PeerResult:
    """ANTs registration with antspyx's standard settings for ``type_of_transform`` (default "SyN").

    ``kwargs`` go straight to ``ants.registration`` (e.g. ``reg_iterations=(20, 10, 0)`` to make a test fast); anything
    not given keeps the antspyx default. The forward transforms (``[..1Warp.nii.gz, ..0GenericAffine.mat]``) are
    composed by ``ants.apply_transforms(..., compose=prefix)`` into one physical displacement field on the fixed grid,
    which is converted to voxels. The warped image is ANTs' own ``warpedmovout`` (linear interpolation); the labels are
    warped by ``ants.apply_transforms`` with ``label_interpolator``: "nearestNeighbor" by default, the same rule as the
    other methods (elastix order 0, the engine's nearest-neighbour warp), so Dice compares registrations, not label
    interpolators; "genericLabel" (ANTs' recommendation for label maps, a smoothed per-label vote) scored 0.7 Dice
    points higher on the brain pair.
    """
    global _ANTS_PROCESS_THREADS
    ants = _import_ants()
    start = time.perf_counter()
    threads = set_threads(threads)
    if _ANTS_PROCESS_THREADS is None:
        _ANTS_PROCESS_THREADS = threads
    elif _ANTS_PROCESS_THREADS != threads:
        warnings.warn(
            f"antspyx already runs with {_ANTS_PROCESS_THREADS} thread(s) in this process; threads={threads} is ignored "
            "(start a new process to change it)",
            RuntimeWarning,
            stacklevel=2,
        )
        threads = _ANTS_PROCESS_THREADS
    fixed32, moving32, spacing, moving_labels = _check_inputs(fixed, moving, spacing, moving_labels)
    kwargs = dict(kwargs)
    kwargs.pop("outprefix", None)  # we own the output files: they live in a temporary folder removed afterwards

    origin = (0.0, 0.0, 0.0)
    fixed_img = ants.from_numpy(fixed32, origin=origin, spacing=spacing)
    moving_img = ants.from_numpy(moving32, origin=origin, spacing=spacing)
    direction = np.asarray(fixed_img.direction, dtype=np.float64)

    with tempfile.TemporaryDirectory(prefix="textscf_ants_") as tmp:
        t0 = time.perf_counter()
        reg = ants.registration(
            fixed=fixed_img,
            moving=moving_img,
            type_of_transform=type_of_transform,
            outprefix=os.path.join(tmp, "tx_"),
            **kwargs,
        )
        t_reg = time.perf_counter() - t0
        fwd = list(reg["fwdtransforms"])

        t0 = time.perf_counter()
        composed_path = ants.apply_transforms(
            fixed=fixed_img, moving=moving_img, transformlist=fwd, compose=os.path.join(tmp, "composed_")
        )
        if not isinstance(composed_path, str) or not os.path.isfile(composed_path):
            raise RuntimeError(f"ants.apply_transforms(compose=...) did not write a composed field: {composed_path!r}")
        field_img = ants.image_read(composed_path)
        field_mm = field_img.numpy()
        if field_mm.shape != fixed32.shape + (3,):
            raise RuntimeError(f"composed ANTs field has shape {field_mm.shape}, expected {fixed32.shape + (3,)}")
        disp = physical_to_voxel_displacement(field_mm, spacing, direction)
        t_field = time.perf_counter() - t0

        warped = np.ascontiguousarray(reg["warpedmovout"].numpy(), dtype=np.float32)

        warped_labels = None
        t0 = time.perf_counter()
        if moving_labels is not None:
            labels_img = ants.from_numpy(
                np.ascontiguousarray(moving_labels, dtype=np.float32), origin=origin, spacing=spacing
            )
            out = ants.apply_transforms(
                fixed=fixed_img, moving=labels_img, transformlist=fwd, interpolator=label_interpolator
            )
            warped_labels = _restore_label_dtype(out.numpy(), moving_labels)
        t_labels = time.perf_counter() - t0

    seconds = time.perf_counter() - start
    settings = {
        "library": f"antspyx {getattr(ants, '__version__', '?')}",
        "type_of_transform": type_of_transform,
        "registration_kwargs": {k: v for k, v in kwargs.items()},
        "defaults": "antspyx ants.registration defaults for every argument not in registration_kwargs",
        "label_interpolator": label_interpolator,
        "threads": threads,
        "spacing": spacing,
        "seconds_registration": t_reg,
        "seconds_field": t_field,
        "seconds_labels": t_labels,
    }
    return PeerResult(
        name=f"ants_{type_of_transform.lower()}",
        displacement_voxels=disp,
        warped_image=warped,
        warped_labels=warped_labels,
        seconds=seconds,
        settings=settings,
    )


# --------------------------------------------------------------------------------------------------------------------
# Elastix B-spline (itk-elastix)


def _import_itk():
    try:
        import itk

        # itk loads its modules lazily on first attribute access (seconds): touch everything used here now, so that
        # it fails early without the elastix module and the load is not counted in a registration's time
        for name in (
            "ParameterObject",
            "elastix_registration_method",
            "transformix_deformation_field",
            "transformix_filter",
            "GetImageFromArray",
            "GetArrayFromImage",
            "GetArrayFromMatrix",
            "MultiThreaderBase",
        ):
            getattr(itk, name)
    except (ImportError, AttributeError) as exc:  # pragma: no cover - depends on the environment
        raise ImportError("Elastix needs itk-elastix: pip install 'itk-elastix>=0.20' (or the project's [peers] extra)") from exc
    return itk


def _elastix_value(value: Any) -> list[str]:
    """A Python value -> elastix parameter strings (bools as true/false, sequences element-wise)."""

    def one(v: Any) -> str:
        if isinstance(v, (bool, np.bool_)):
            return "true" if v else "false"
        if isinstance(v, (float, np.floating)):
            return repr(float(v))
        return str(v)

    if isinstance(value, (list, tuple, np.ndarray)):
        return [one(v) for v in value]
    return [one(value)]


def _to_itk_image(itk, volume: np.ndarray, spacing: tuple[float, float, float]):
    # ITK's numpy view is [k, j, i]; our arrays are [i, j, k].
    image = itk.GetImageFromArray(np.ascontiguousarray(volume.transpose(2, 1, 0), dtype=np.float32))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([0.0, 0.0, 0.0])
    return image


def _from_itk_scalar(itk, image) -> np.ndarray:
    return np.ascontiguousarray(itk.GetArrayFromImage(image).transpose(2, 1, 0))


def _map_to_dict(parameter_map) -> dict[str, tuple[str, ...]]:
    return {k: tuple(parameter_map[k]) for k in parameter_map.keys()}


def elastix_parameter_maps(
    grid_spacing_mm: float = 10.0,
    iterations: int = 256,
    affine_iterations: int | None = 256,
    resolutions: int = 4,
    affine_parameters: Mapping[str, Any] | None = None,
    bspline_parameters: Mapping[str, Any] | None = None,
):
    """The ``itk.ParameterObject`` used by :func:`register_elastix_bspline`.

    Starts from elastix's default maps: ``GetDefaultParameterMap("affine", resolutions)`` then
    ``GetDefaultParameterMap("bspline", resolutions, grid_spacing_mm)``; sets ``MaximumNumberOfIterations`` of each stage
    and applies the overrides. ``affine_iterations=None`` drops the affine stage.
    """
    itk = _import_itk()
    obj = itk.ParameterObject.New()
    if affine_iterations is not None:
        aff = obj.GetDefaultParameterMap("affine", int(resolutions))
        aff["MaximumNumberOfIterations"] = _elastix_value(int(affine_iterations))
        for key, value in (affine_parameters or {}).items():
            aff[key] = _elastix_value(value)
        obj.AddParameterMap(aff)
    bsp = obj.GetDefaultParameterMap("bspline", int(resolutions), float(grid_spacing_mm))
    bsp["MaximumNumberOfIterations"] = _elastix_value(int(iterations))
    for key, value in (bspline_parameters or {}).items():
        bsp[key] = _elastix_value(value)
    obj.AddParameterMap(bsp)
    return obj


def register_elastix_bspline(
    fixed: np.ndarray,
    moving: np.ndarray,
    spacing: Sequence[float],
    moving_labels: np.ndarray | None = None,
    grid_spacing_mm: float = 10.0,
    iterations: int = 256,
    affine_iterations: int | None = 256,
    resolutions: int = 4,
    threads: int = 2,
    affine_parameters: Mapping[str, Any] | None = None,
    **bspline_parameters: Any,
) -> PeerResult:
    """Elastix affine + B-spline registration with elastix's default parameter maps.

    Settings (elastix's own defaults, changed only where named): affine stage = ``GetDefaultParameterMap("affine")``
    (AdvancedMattesMutualInformation, AdaptiveStochasticGradientDescent, 4-level smoothing pyramids, 2048 random samples,
    256 iterations per level); B-spline stage = ``GetDefaultParameterMap("bspline", resolutions, grid_spacing_mm)``
    (AdvancedMattesMutualInformation + TransformBendingEnergyPenalty weight 1, grid-spacing schedule 2.83/2/1.41/1
    times the final ``grid_spacing_mm`` = 10 mm, 256 iterations per level). ``iterations`` and ``affine_iterations``
    set ``MaximumNumberOfIterations`` per level (``affine_iterations=None`` skips the affine stage); extra keyword
    arguments are elastix parameters of the B-spline map (e.g. ``Metric1Weight=0.1``), ``affine_parameters`` those of
    the affine map.

    The dense field is ``itk.transformix_deformation_field`` of the resulting transform chain (physical mm on the fixed
    grid); the warped image is elastix's own result (cubic B-spline interpolation, ``FinalBSplineInterpolationOrder`` 3);
    the labels go through transformix with ``FinalBSplineInterpolationOrder`` 0 (nearest neighbour).
    """
    itk = _import_itk()
    start = time.perf_counter()
    threads = set_threads(threads)
    fixed32, moving32, spacing, moving_labels = _check_inputs(fixed, moving, spacing, moving_labels)

    params = elastix_parameter_maps(
        grid_spacing_mm=grid_spacing_mm,
        iterations=iterations,
        affine_iterations=affine_iterations,
        resolutions=resolutions,
        affine_parameters=affine_parameters,
        bspline_parameters=bspline_parameters,
    )
    fixed_img = _to_itk_image(itk, fixed32, spacing)
    moving_img = _to_itk_image(itk, moving32, spacing)
    # elastix/transformix write result files (transformix: deformationField.nii, result.nii) into their output
    # directory, the current one by default: keep them in a temporary folder
    with tempfile.TemporaryDirectory(prefix="textscf_elastix_") as tmp:
        out_dir = os.path.join(tmp, "")
        t0 = time.perf_counter()
        result_img, result_params = itk.elastix_registration_method(
            fixed_img, moving_img, parameter_object=params, log_to_console=False, output_directory=out_dir
        )
        t_reg = time.perf_counter() - t0

        t0 = time.perf_counter()
        field_img = itk.transformix_deformation_field(
            moving_img, result_params, log_to_console=False, output_directory=out_dir
        )
        field_kji = itk.GetArrayFromImage(field_img)  # (K, J, I, 3), components (x, y, z) in mm
        expected = fixed32.shape[::-1] + (3,)
        if field_kji.shape != expected:
            raise RuntimeError(f"transformix field has shape {field_kji.shape}, expected {expected}")
        direction = np.asarray(itk.GetArrayFromMatrix(field_img.GetDirection()), dtype=np.float64)
        disp = physical_to_voxel_displacement(field_kji.transpose(2, 1, 0, 3), spacing, direction)
        t_field = time.perf_counter() - t0

        warped = _from_itk_scalar(itk, result_img).astype(np.float32, copy=False)

        warped_labels = None
        t0 = time.perf_counter()
        if moving_labels is not None:
            label_params = itk.ParameterObject.New()
            for index in range(result_params.GetNumberOfParameterMaps()):
                pmap = result_params.GetParameterMap(index)
                pmap["FinalBSplineInterpolationOrder"] = ["0"]
                pmap["ResultImagePixelType"] = ["float"]
                pmap["DefaultPixelValue"] = ["0"]
                label_params.AddParameterMap(pmap)
            labels_img = _to_itk_image(itk, np.asarray(moving_labels, dtype=np.float32), spacing)
            out = itk.transformix_filter(labels_img, label_params, log_to_console=False, output_directory=out_dir)
            warped_labels = _restore_label_dtype(_from_itk_scalar(itk, out), moving_labels)
        t_labels = time.perf_counter() - t0

    seconds = time.perf_counter() - start
    try:
        from importlib.metadata import version

        lib = f"itk-elastix {version('itk-elastix')}"
    except Exception:  # pragma: no cover
        lib = "itk-elastix"
    maps = [_map_to_dict(params.GetParameterMap(i)) for i in range(params.GetNumberOfParameterMaps())]
    settings = {
        "library": lib,
        "stages": [m["Transform"][0] for m in maps],
        "grid_spacing_mm": float(grid_spacing_mm),
        "iterations": int(iterations),
        "affine_iterations": None if affine_iterations is None else int(affine_iterations),
        "resolutions": int(resolutions),
        "parameter_maps": maps,
        "label_interpolation": "transformix FinalBSplineInterpolationOrder 0 (nearest neighbour)",
        "threads": threads,
        "spacing": spacing,
        "seconds_registration": t_reg,
        "seconds_field": t_field,
        "seconds_labels": t_labels,
    }
    return PeerResult(
        name="elastix_bspline",
        displacement_voxels=disp,
        warped_image=warped,
        warped_labels=warped_labels,
        seconds=seconds,
        settings=settings,
    )


# --------------------------------------------------------------------------------------------------------------------
# registry

PEERS: dict[str, Callable[..., PeerResult]] = {
    "identity": identity,
    "ants_syn": register_ants_syn,
    "elastix_bspline": register_elastix_bspline,
}


def available_peers() -> dict[str, str | None]:
    """``{peer name: None if usable, else the reason it is not}`` (checks the imports only)."""
    status: dict[str, str | None] = {"identity": None}
    try:
        _import_ants()
        status["ants_syn"] = None
    except ImportError as exc:
        status["ants_syn"] = str(exc)
    try:
        _import_itk()
        status["elastix_bspline"] = None
    except ImportError as exc:
        status["elastix_bspline"] = str(exc)
    return status

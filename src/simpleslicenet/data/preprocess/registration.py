"""Rigid, then affine registration of a scan to the template (SimpleITK, Mattes mutual information).

Both stages optimise Mattes mutual information (so any MRI contrast can be matched to the T1
template) with a regular-step gradient descent over a multi-resolution pyramid: each level is given
as the voxel size it works at (8, 4, 2 mm by default), the scan and template being smoothed with a
Gaussian of half that size. The rigid stage starts from a moment (centre-of-mass) alignment; the
affine stage starts from the rigid result and runs only on the two finest levels. Random sampling
uses a fixed seed, so a run is repeatable.

The metric is evaluated inside the template's brain mask dilated by a margin: the template has no
skull, and a scan with a skull would otherwise be pulled towards matching its scalp to the template's
empty background.

The transform returned maps template (fixed) points to scan (moving) points, in ITK's LPS
coordinates, which is what resampling the scan onto the template grid needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

__all__ = ["RegistrationResult", "pyramid", "register_to_template", "mutual_information", "ras_matrix"]


@dataclass(frozen=True)
class RegistrationResult:
    """Outcome of :func:`register_to_template`.

    Args:
        transform: Affine transform, template point → scan point (LPS, mm).
        mutual_information: Mattes mutual information at the final transform (higher is better),
            evaluated on the template grid inside the metric mask.
        rigid_stop: Why the rigid stage stopped (optimizer message).
        affine_stop: Why the affine stage stopped.
    """

    transform: sitk.AffineTransform
    mutual_information: float
    rigid_stop: str
    affine_stop: str


def pyramid(level_mm: tuple[float, ...], spacing_mm: float) -> tuple[list[int], list[float]]:
    """Shrink factors and smoothing sigmas (mm) for levels of the given voxel sizes on a grid.

    Levels coarser than the grid become shrink factors (at least 1); levels that collapse onto the
    same factor are merged, so a coarse grid simply gets fewer levels.
    """
    shrinks: list[int] = []
    sigmas: list[float] = []
    for level in sorted(level_mm, reverse=True):
        factor = max(1, round(level / spacing_mm))
        if shrinks and factor >= shrinks[-1]:
            continue
        shrinks.append(factor)
        sigmas.append(0.5 * factor * spacing_mm if factor > 1 else 0.0)
    return shrinks or [1], sigmas or [0.0]


def _method(
    fixed_mask: sitk.Image | None, iterations: int, sampling: float, bins: int, seed: int, learning_rate: float
) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    # SimpleITK reads a seed of 0 as "seed from the wall clock": shift by one to keep runs repeatable.
    method.SetMetricSamplingPercentage(sampling, seed + 1)
    if fixed_mask is not None:
        method.SetMetricFixedMask(fixed_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=learning_rate,
        minStep=1e-3,
        numberOfIterations=iterations,
        relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-8,
    )
    # One optimiser step moves voxels by about the same physical distance along every parameter.
    method.SetOptimizerScalesFromPhysicalShift()
    return method


def _run(
    method: sitk.ImageRegistrationMethod,
    fixed: sitk.Image,
    moving: sitk.Image,
    initial: sitk.Transform,
    shrinks: list[int],
    sigmas: list[float],
) -> tuple[sitk.Transform, str]:
    method.SetShrinkFactorsPerLevel(shrinks)
    method.SetSmoothingSigmasPerLevel(sigmas)
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=False)
    result = method.Execute(fixed, moving)
    # Execute wraps the optimised transform in a composite; unwrap it.
    if isinstance(result, sitk.CompositeTransform) or result.GetName() == "CompositeTransform":
        result = sitk.CompositeTransform(result).GetNthTransform(0)
    return result, method.GetOptimizerStopConditionDescription()


def _binned_to(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """The image averaged over bins of voxels so none is much finer than ``spacing_mm``.

    The registration never looks finer than the template grid, and smoothing a full-resolution scan at
    every pyramid level would dominate the run time of coarse grids.
    """
    factors = [max(1, int(spacing_mm / s + 1e-6)) for s in image.GetSpacing()]
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


def mutual_information(
    fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, fixed_mask: sitk.Image | None, bins: int = 32
) -> float:
    """Mattes mutual information of ``moving`` seen through ``transform`` on ``fixed``'s grid (all voxels).

    Returned with ITK's sign flipped, so higher means better aligned.
    """
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    method.SetMetricSamplingStrategy(method.NONE)
    if fixed_mask is not None:
        method.SetMetricFixedMask(fixed_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetInitialTransform(transform)
    return -float(method.MetricEvaluate(fixed, moving))


def register_to_template(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: sitk.Image | None = None,
    level_mm: tuple[float, ...] = (8.0, 4.0, 2.0),
    rigid_iterations: int = 200,
    affine_iterations: int = 200,
    sampling: float = 0.2,
    bins: int = 32,
    seed: int = 0,
) -> RegistrationResult:
    """Register ``moving`` (a scan) to ``fixed`` (the template): rigid, then affine.

    Args:
        fixed: Template image on the output grid.
        moving: The scan (float32, in its own space).
        fixed_mask: Where on the template grid the metric is evaluated (non-zero voxels); everywhere
            when ``None``.
        level_mm: Voxel size of each pyramid level (see :func:`pyramid`).
        rigid_iterations: Most optimiser iterations per level, rigid stage.
        affine_iterations: Most optimiser iterations per level, affine stage (two finest levels).
        sampling: Fraction of (masked) template voxels sampled per iteration.
        bins: Joint-histogram bins of the Mattes metric.
        seed: Seed of the random sampling (0 or more; the same seed gives the same result).

    Raises:
        ValueError: Bad options.
        RuntimeError: SimpleITK failed (e.g. the images do not overlap at all).
    """
    if not 0.0 < sampling <= 1.0:
        msg = f"sampling must be a fraction in (0, 1], got {sampling!r}"
        raise ValueError(msg)
    if seed < 0:
        msg = f"seed must be 0 or more, got {seed}"
        raise ValueError(msg)
    if rigid_iterations < 1 or affine_iterations < 0:
        msg = "rigid_iterations must be at least 1 and affine_iterations at least 0"
        raise ValueError(msg)
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = _binned_to(sitk.Cast(moving, sitk.sitkFloat32), float(min(fixed.GetSpacing())))
    mask = sitk.Cast(fixed_mask > 0, sitk.sitkUInt8) if fixed_mask is not None else None
    shrinks, sigmas = pyramid(level_mm, float(min(fixed.GetSpacing())))

    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    rigid_method = _method(mask, rigid_iterations, sampling, bins, seed, learning_rate=2.0)
    rigid, rigid_stop = _run(rigid_method, fixed, moving, initial, shrinks, sigmas)
    rigid = sitk.Euler3DTransform(rigid)

    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    affine_stop = "skipped"
    if affine_iterations > 0:
        affine_method = _method(mask, affine_iterations, sampling, bins, seed, learning_rate=1.0)
        result, affine_stop = _run(affine_method, fixed, moving, affine, shrinks[-2:], sigmas[-2:])
        affine = sitk.AffineTransform(result)
    return RegistrationResult(
        transform=affine,
        mutual_information=mutual_information(fixed, moving, affine, mask, bins),
        rigid_stop=rigid_stop,
        affine_stop=affine_stop,
    )


def ras_matrix(transform: sitk.AffineTransform) -> np.ndarray:
    """The transform as a 4×4 matrix in RAS millimetres (template point → scan point), for nibabel users."""
    matrix = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    centre = np.asarray(transform.GetCenter(), dtype=np.float64)
    translation = np.asarray(transform.GetTranslation(), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = translation + centre - matrix @ centre
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ lps @ flip

"""N4 bias-field correction (Tustison et al., 2010) with SimpleITK.

The field is smooth, so it is estimated on a copy shrunk to voxels of about ``shrink_to_mm`` (several
times faster) and then evaluated on the full-resolution grid; the scan is divided by it. The
estimate uses the head (an Otsu threshold) or a given mask, and only voxels with positive intensity,
since N4 works on log intensities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

__all__ = ["BiasCorrection", "correct_bias_field"]


@dataclass(frozen=True)
class BiasCorrection:
    """Result of :func:`correct_bias_field`.

    Args:
        image: The corrected scan (float32), on the input's grid.
        log_field: The estimated log bias field on the same grid (the scan was divided by its exp).
    """

    image: sitk.Image
    log_field: sitk.Image


def correct_bias_field(
    image: sitk.Image,
    mask: sitk.Image | None = None,
    shrink_to_mm: float = 6.0,
    iterations: tuple[int, ...] = (50, 50, 30),
    convergence: float = 1e-3,
) -> BiasCorrection:
    """Estimate and remove a multiplicative bias field.

    Args:
        image: The scan (any scalar type).
        mask: Voxels to fit the field on (non-zero); an Otsu head mask when ``None``.
        shrink_to_mm: Voxel size (mm) of the copy the field is fitted on.
        iterations: Iterations per fitting level; the number of entries is the number of levels
            (each level doubles the B-spline control-point resolution).
        convergence: N4's convergence threshold per level.

    Raises:
        ValueError: Empty ``iterations``, or nothing to fit on (no positive voxels in the mask).
    """
    if not iterations:
        msg = "iterations must name at least one fitting level"
        raise ValueError(msg)
    image = sitk.Cast(image, sitk.sitkFloat32)
    shrink = [max(1, round(shrink_to_mm / s)) for s in image.GetSpacing()]
    shrink = [min(f, max(1, n // 8)) for f, n in zip(shrink, image.GetSize(), strict=True)]  # keep ≥ 8 voxels
    small = sitk.Shrink(image, shrink) if max(shrink) > 1 else image
    if mask is None:
        small_mask = sitk.OtsuThreshold(small, 0, 1, 200)
    else:
        binary = sitk.Cast(mask > 0, sitk.sitkUInt8)
        small_mask = sitk.Resample(binary, small, sitk.Transform(), sitk.sitkNearestNeighbor)
    small_mask = sitk.And(sitk.Cast(small_mask, sitk.sitkUInt8), sitk.Cast(small > 0, sitk.sitkUInt8))
    if not np.any(sitk.GetArrayViewFromImage(small_mask)):
        msg = "no positive voxels to fit the bias field on"
        raise ValueError(msg)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([int(i) for i in iterations])
    corrector.SetConvergenceThreshold(float(convergence))
    corrector.Execute(small, small_mask)
    log_field = sitk.Cast(corrector.GetLogBiasFieldAsImage(image), sitk.sitkFloat32)
    corrected = sitk.Cast(image / sitk.Exp(log_field), sitk.sitkFloat32)
    return BiasCorrection(image=corrected, log_field=log_field)

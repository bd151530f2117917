"""Brain extraction without a network: the template's brain mask, carried through the registration, refined.

After registration the scan lies on the template grid, so the template's brain mask laid on it *is*
the mask carried back through the registration. It is only a prior: an affine map cannot follow
every subject's cortex, and it misses by a few millimetres where the subject's brain is narrower or
wider than the template's. :func:`refine_brain_mask` corrects it in a band of ``band_mm`` on both
sides of its surface, using the scan's own intensities:

1. the core (the prior eroded by ``band_mm``) is brain for certain, and its intensities describe the
   subject's brain tissue;
2. a two-class Otsu threshold on the band's intensities separates tissue from what surrounds the
   brain (CSF, bone, meninges). The class kept is the one on the side of the core's median, so the
   rule does not assume T1 contrast (tissue brighter than CSF) and also applies to T2 (tissue darker
   than CSF); voxels far outside the core's own range (fat, air, bone) are dropped as well. Only T1
   has been measured: Colin27 is the one real head with its skull available offline;
3. a morphological opening of ``opening_mm`` cuts thin bridges to the scalp, the largest connected
   component is kept and enclosed holes (ventricles) are filled.

Measured on Colin27 at 1 mm (``benchmarks/preprocess_quality.py``), this lifts the Dice against BET's
mask of the same head from 0.95 (the registered template mask alone) to 0.97.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

__all__ = ["dice", "refine_brain_mask", "otsu_threshold"]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def otsu_threshold(values: np.ndarray, bins: int = 128) -> float:
    """Otsu's two-class threshold of a set of values (the one maximising the between-class variance).

    Raises:
        ValueError: Fewer than two distinct values.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        msg = "Otsu's threshold needs at least two distinct values"
        raise ValueError(msg)
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2.0
    weight = np.cumsum(counts).astype(np.float64)
    mass = np.cumsum(counts * centres)
    total_weight, total_mass = weight[-1], mass[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_mass * weight / total_weight - mass) ** 2 / (weight * (total_weight - weight))
    between[~np.isfinite(between)] = -1.0
    # The threshold sits at the upper edge of the lower class.
    return float(edges[int(np.argmax(between)) + 1])


def _distance_to(mask: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Euclidean distance (mm) from every voxel outside ``mask`` to the nearest voxel of it (0 inside).

    SimpleITK's Maurer distance map gives the same distances as scipy's exact transform, several
    times faster (it does not build the nearest-voxel index that scipy computes along the way).
    """
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing([float(spacing_mm)] * 3)
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return np.maximum(sitk.GetArrayFromImage(distance), 0.0)


def _erode(mask: np.ndarray, radius_mm: float, spacing_mm: float) -> np.ndarray:
    # Exact Euclidean ball: keep the voxels farther than the radius from everything outside.
    if radius_mm <= 0 or mask.all():
        return mask.copy()
    return _distance_to(~mask, spacing_mm) > radius_mm


def _dilate(mask: np.ndarray, radius_mm: float, spacing_mm: float) -> np.ndarray:
    if radius_mm <= 0 or not mask.any():
        return mask.copy()
    return _distance_to(mask, spacing_mm) <= radius_mm


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def refine_brain_mask(
    image: np.ndarray,
    prior: np.ndarray,
    spacing_mm: float,
    band_mm: float = 4.0,
    opening_mm: float = 2.0,
) -> np.ndarray:
    """Correct a registered template brain mask with the scan's intensities (see the module notes).

    Args:
        image: The scan on the template grid (isotropic voxels, any axis order shared with ``prior``).
        prior: The template's brain mask on the same grid.
        spacing_mm: Voxel size.
        band_mm: Half-width of the band around the prior's surface in which voxels may change.
        opening_mm: Radius of the opening that cuts thin bridges (0: none).

    Returns:
        The refined brain mask (boolean); the prior itself if the band holds too little contrast to
        decide anything.

    Raises:
        ValueError: ``image`` and ``prior`` differ in shape, or ``prior`` is empty.
    """
    image = np.asarray(image, dtype=np.float32)
    prior = np.asarray(prior, dtype=bool)
    if image.shape != prior.shape:
        msg = f"image shape {image.shape} differs from the prior mask's {prior.shape}"
        raise ValueError(msg)
    if not prior.any():
        msg = "the prior brain mask is empty"
        raise ValueError(msg)
    # Work inside the prior's bounding box plus everything the band and the opening can reach.
    margin = int(np.ceil((band_mm + opening_mm) / spacing_mm)) + 2
    lo = np.maximum(np.argwhere(prior).min(axis=0) - margin, 0)
    hi = np.minimum(np.argwhere(prior).max(axis=0) + margin + 1, prior.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    refined = np.zeros(prior.shape, dtype=bool)
    refined[box] = _refine(image[box], prior[box], spacing_mm, band_mm, opening_mm)
    return refined


def _refine(image: np.ndarray, prior: np.ndarray, spacing_mm: float, band_mm: float, opening_mm: float) -> np.ndarray:
    core = _erode(prior, band_mm, spacing_mm)
    if not core.any():
        core = prior
    band = _dilate(prior, band_mm, spacing_mm) & ~core
    band_values = image[band]
    core_values = image[core]
    try:
        threshold = otsu_threshold(band_values)
    except ValueError:
        return prior.copy()
    median = float(np.median(core_values))
    low, high = (float(v) for v in np.percentile(core_values, [0.5, 99.5]))
    spread = high - low
    # Tissue-like band voxels: on the core's side of the threshold, and not far outside its range.
    if median >= threshold:
        tissue = (image > threshold) & (image < high + 0.1 * spread)
    else:
        tissue = (image < threshold) & (image > low - 0.1 * spread)
    mask = core | (band & tissue)
    if opening_mm > 0:
        mask = _dilate(_erode(mask, opening_mm, spacing_mm), opening_mm, spacing_mm) | core
    mask = _largest_component(mask)
    return ndimage.binary_fill_holes(mask)

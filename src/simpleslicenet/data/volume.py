"""How a scan becomes a model input: the preprocessing record and the one function that applies it.

:class:`VolumePreprocessing` is the single description of that preparation (model grid, voxel
spacing, intensity scaling, brain-mask source, modality). Datamodules build it from their arguments,
models store it in checkpoints and exported graphs as it is, and the deployed inferencer rebuilds it
from there, so training and inference prepare a scan with exactly the same steps:
:func:`load_volume` (read → brain mask → scale to [0, 1] → crop/pad around the brain).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from simpleslicenet.data.geometry import VolumeGeometry, brain_bounding_box, centred_start, crop_or_pad
from simpleslicenet.data.nifti import VolumeError, check_voxel_count, read_mask, read_nifti
from simpleslicenet.choices import check_choice
from simpleslicenet.records import SettingsRecord

__all__ = [
    "VolumePreprocessing",
    "LoadedVolume",
    "INTENSITY_MODES",
    "CROP_MODES",
    "BRAIN_MASK_SOURCES",
    "brain_mask_from_intensity",
    "scale_intensity",
    "load_volume",
]

INTENSITY_MODES = ("percentile", "minmax", "minmax_crop")
BRAIN_MASK_SOURCES = ("auto", "intensity")
CROP_MODES = ("brain", "fixed", "whole_brain")
# The authors' slab on the 1 mm MNI grid: 96 axial slices from slice 24 (24–119), in-plane centre crop.
AUTHORS_FIRST_SLICE = 24


@dataclass(frozen=True)
class VolumePreprocessing(SettingsRecord):
    """Everything that decides how a scan is turned into a model input.

    Args:
        target_shape: Model grid ``(x, y, z)``; ``None`` keeps each scan's own shape.
        spacing_mm: Isotropic voxel size the scans are brought to (resampled only when a file's voxel
            size differs by more than 1%); ``None`` keeps each file's grid.
        intensity: ``"percentile"`` (robust range inside the brain), ``"minmax"`` (the paper's
            per-volume min–max) or ``"minmax_crop"`` (min–max over the cropped box, as the authors'
            code scales after cropping).
        brain_mask: ``"auto"`` (the scan's brain-mask file when there is one, else derived from
            intensities) or ``"intensity"`` (always derived).
        modality: Contrast of the scans (``"t1"``, ``"t2"``, ``"flair"`` …), when known.
        crop: ``"brain"`` (the grid centred on the brain's bounding box), ``"fixed"`` (the authors'
            slab for scans registered to MNI: axial slices from ``first_slice`` on, in-plane centre
            of the array, so every scan gives the same anatomical box) or ``"whole_brain"`` (in-plane
            as ``"brain"``, axially every slice the brain reaches: the slice count follows each
            scan's brain and ``target_shape[2]`` is not used, so no part of the brain goes unscored).
        first_slice: First axial slice of the ``"fixed"`` crop (the authors' 24 on the 1 mm MNI grid).

    Raises:
        ValueError: An unknown mode or a non-positive size.
    """

    target_shape: tuple[int, int, int] | None = (192, 192, 96)
    spacing_mm: float | None = None
    intensity: str = "percentile"
    brain_mask: str = "auto"
    modality: str | None = None
    crop: str = "brain"
    first_slice: int = AUTHORS_FIRST_SLICE

    def __post_init__(self) -> None:
        if self.target_shape is not None:
            shape = tuple(int(t) for t in self.target_shape)
            if len(shape) != 3 or min(shape) < 1:
                msg = f"target_shape must be three positive sizes (x, y, z), got {self.target_shape!r}"
                raise ValueError(msg)
            # A record read from a model file must not make us allocate an arbitrary grid.
            check_voxel_count(shape, None, what="model grid")
            object.__setattr__(self, "target_shape", shape)
        if self.spacing_mm is not None:
            spacing = float(self.spacing_mm)
            if not np.isfinite(spacing) or spacing <= 0:
                msg = f"spacing_mm must be a positive number of millimetres, got {self.spacing_mm!r}"
                raise ValueError(msg)
            object.__setattr__(self, "spacing_mm", spacing)
        check_choice("intensity scaling", self.intensity, INTENSITY_MODES)
        check_choice("brain-mask source", self.brain_mask, BRAIN_MASK_SOURCES)
        if self.modality is not None:
            object.__setattr__(self, "modality", str(self.modality).lower())
        check_choice("crop", self.crop, CROP_MODES)
        object.__setattr__(self, "first_slice", int(self.first_slice))

    def model_box(
        self, shape: tuple[int, int, int], brain_box: tuple[np.ndarray, np.ndarray]
    ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """Start and size of the model grid in a canonical array of ``shape`` whose brain spans ``brain_box``.

        The start may be negative (padding). ``crop="whole_brain"`` replaces the grid's axial size by the
        brain's extent; ``crop="fixed"`` ignores the brain.
        """
        if self.crop == "fixed":
            x, y = ((n - t) // 2 for n, t in zip(shape[:2], self.target_shape[:2], strict=True))
            return (x, y, self.first_slice), self.target_shape
        lo, hi = brain_box
        grid = self.target_shape if self.crop == "brain" else (*self.target_shape[:2], int(hi[2] - lo[2]))
        return centred_start(brain_box, grid), grid


def _warn_if_cut_in_plane(
    path: str | os.PathLike,
    brain_box: tuple[np.ndarray, np.ndarray],
    start: tuple[int, ...],
    grid: tuple[int, int, int],
) -> None:
    """Warn when the model grid cuts the brain in-plane.

    The slab may cut the brain along z by design (the paper scores 96 axial slices); a cut across x or
    y leaves brain unscored and gives the slices a straight tissue edge that no healthy training scan
    has, which scores as anomalous.
    """
    lo, hi = brain_box
    outside = [max(int(start[a]) - int(lo[a]), 0) + max(int(hi[a]) - int(start[a]) - grid[a], 0) for a in (0, 1)]
    if any(outside):
        warnings.warn(
            f"{path}: the model grid ({grid[0]}x{grid[1]} in-plane) cuts {outside[0]} columns (x) and "
            f"{outside[1]} rows (y) off the brain, whose box is {int(hi[0] - lo[0])}x{int(hi[1] - lo[1])}; "
            "the part outside is not scored and the cut edge can score as anomalous. "
            "A target_shape at least as wide as the brain keeps it whole.",
            UserWarning,
            stacklevel=3,
        )


@dataclass
class LoadedVolume:
    """A scan after preprocessing, with its masks and geometry (all arrays ``(x, y, z)``)."""

    image: np.ndarray
    brain_mask: np.ndarray
    lesion_mask: np.ndarray | None
    geometry: VolumeGeometry


def brain_mask_from_intensity(image: np.ndarray, fraction: float = 0.05) -> np.ndarray:
    """Brain (foreground) mask of a skull-stripped scan: voxels above a fraction of the robust maximum,
    holes filled, only the largest connected component kept."""
    positive = image[image > 0]
    if positive.size == 0:
        return np.zeros(image.shape, dtype=bool)
    threshold = fraction * float(np.percentile(positive, 99))
    mask = image > threshold
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = ndimage.sum(mask, labels, index=range(1, count + 1))
        mask = labels == (int(np.argmax(sizes)) + 1)
    return ndimage.binary_fill_holes(mask)


def scale_intensity(
    image: np.ndarray,
    brain_mask: np.ndarray,
    mode: str = "percentile",
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> np.ndarray:
    """Scale intensities to [0, 1].

    Args:
        image: Canonical array.
        brain_mask: Voxels used to estimate the range (``percentile`` mode).
        mode: ``"percentile"`` (robust range inside the brain, clipped; default) or ``"minmax"``
            (the original paper's per-volume min–max).
        percentiles: Lower and upper percentile for ``percentile`` mode.
    """
    if mode in {"minmax", "minmax_crop"}:
        lo, hi = float(image.min()), float(image.max())
    elif mode == "percentile":
        values = image[brain_mask] if brain_mask.any() else image.ravel()
        lo, hi = (float(v) for v in np.percentile(values, percentiles))
    else:
        msg = f"unknown intensity scaling mode {mode!r}: use one of {INTENSITY_MODES}"
        raise ValueError(msg)
    scale = hi - lo if hi > lo else 1.0
    # In place on one new array: a 1-mm scan is 7 million voxels, each pass over it costs.
    out = np.subtract(image, lo, dtype=np.promote_types(image.dtype, np.float32))
    out /= scale
    np.clip(out, 0.0, 1.0, out=out)
    if mode == "percentile":
        out *= brain_mask  # background carries no information after skull stripping
    return out.astype(np.float32, copy=False)


def load_volume(
    image_path: str | os.PathLike,
    preprocessing: VolumePreprocessing | None = None,
    mask_path: str | os.PathLike | None = None,
    brain_mask_path: str | os.PathLike | None = None,
    require_mask: bool = False,
) -> LoadedVolume:
    """Read, mask, scale and crop/pad one scan (with its lesion mask) as ``preprocessing`` says.

    Args:
        image_path: The scan.
        preprocessing: The preparation to apply (default :class:`VolumePreprocessing()`).
        mask_path: Lesion mask (anything > 0 is lesion); ``None`` for a healthy scan.
        brain_mask_path: Brain mask file, used when ``preprocessing.brain_mask`` is ``"auto"``.
        require_mask: Raise if ``mask_path`` is missing or its mask empty (lesion scans must have one).
            Datamodules check this for every file once, at setup (``check_samples``), and leave it off.
    """
    prep = preprocessing if preprocessing is not None else VolumePreprocessing()
    image, geometry = read_nifti(image_path, spacing_mm=prep.spacing_mm)
    if require_mask and (mask_path is None or not Path(mask_path).exists()):
        raise VolumeError(image_path, f"lesion scan has no mask (looked for {mask_path})")
    lesion = read_mask(mask_path, geometry, prep.spacing_mm) if mask_path is not None else None
    if prep.brain_mask == "auto" and brain_mask_path is not None and Path(brain_mask_path).exists():
        brain = read_mask(brain_mask_path, geometry, prep.spacing_mm)
    else:
        brain = brain_mask_from_intensity(image)
    if require_mask and lesion is not None and not lesion.any():
        raise VolumeError(mask_path, "lesion mask of a lesion scan is empty")
    if lesion is not None:
        brain = brain | lesion  # a lesion is always inside the brain, whatever the brain mask says
    if not brain.any():
        raise VolumeError(brain_mask_path or image_path, "brain mask is empty: nothing of the scan would be scored")
    if prep.intensity != "minmax_crop":
        image = scale_intensity(image, brain, mode=prep.intensity)
    if prep.target_shape is not None:
        brain_box = brain_bounding_box(brain)
        start, grid = prep.model_box(image.shape, brain_box)
        _warn_if_cut_in_plane(image_path, brain_box, start, grid)
        image = crop_or_pad(image, start, grid)
        brain = crop_or_pad(brain, start, grid)
        lesion = crop_or_pad(lesion, start, grid) if lesion is not None else None
        geometry.crop_start = start
    if prep.intensity == "minmax_crop":
        image = scale_intensity(image, brain, mode="minmax")
    geometry.target_shape = tuple(image.shape)
    return LoadedVolume(image=image, brain_mask=brain, lesion_mask=lesion, geometry=geometry)

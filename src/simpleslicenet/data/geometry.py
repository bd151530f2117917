"""Where a model-grid volume sits inside its scan, and the one way back from the model grid to the scan.

Conventions used everywhere in the package:

* Arrays read from disk are brought to canonical RAS orientation, so array axes are
  (x: left→right, y: posterior→anterior, z: inferior→superior).
* A volume handed to models is ``[D, H, W] = [z, y, x]``: one axial slice per depth index
  (:func:`to_slices` / :func:`from_slices`).
* :class:`VolumeGeometry` remembers the scan's shape, affines and the crop box, so no caller handles
  affines itself: :meth:`VolumeGeometry.to_scan` puts a model-grid map back onto the scan's grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "VolumeGeometry",
    "brain_bounding_box",
    "centred_start",
    "crop_or_pad",
    "to_slices",
    "from_slices",
]


def to_slices(array: np.ndarray) -> np.ndarray:
    """Canonical ``(x, y, z)`` → model layout ``(z, y, x)`` = ``[D, H, W]``."""
    return np.ascontiguousarray(array.transpose(2, 1, 0))


def from_slices(array: np.ndarray) -> np.ndarray:
    """Model layout ``[D, H, W]`` → canonical ``(x, y, z)``."""
    return np.ascontiguousarray(array.transpose(2, 1, 0))


def brain_bounding_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive-exclusive bounds ``(lo, hi)`` of the mask's non-zero voxels; the whole array if empty."""
    mask = np.asarray(mask)
    lo, hi = [], []
    for axis in range(mask.ndim):
        # One projection per axis instead of the coordinates of every voxel (argwhere: ~0.3 s a 1 mm head).
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if present.size == 0:
            return np.zeros(mask.ndim, dtype=int), np.array(mask.shape)
        lo.append(present[0])
        hi.append(present[-1] + 1)
    return np.array(lo), np.array(hi)


def centred_start(box: tuple[np.ndarray, np.ndarray], target: tuple[int, ...]) -> tuple[int, ...]:
    """Start per axis of a box of size ``target`` centred on ``box`` (``(lo, hi)`` of :func:`brain_bounding_box`)."""
    lo, hi = box
    centre = (np.asarray(lo) + np.asarray(hi)) / 2.0
    return tuple(int(np.floor(c - t / 2.0)) for c, t in zip(centre, target, strict=True))


def crop_or_pad(array: np.ndarray, start: tuple[int, ...], target: tuple[int, ...], fill: float = 0) -> np.ndarray:
    """Box of size ``target`` starting at ``start`` (may be negative or run past the end: ``fill`` padded)."""
    out = np.full(target, fill, dtype=array.dtype)
    src, dst = [], []
    for s, t, n in zip(start, target, array.shape, strict=True):
        a0, a1 = max(s, 0), min(s + t, n)
        if a1 <= a0:
            return out
        src.append(slice(a0, a1))
        dst.append(slice(a0 - s, a1 - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


@dataclass
class VolumeGeometry:
    """Where a model-grid volume sits inside the original scan.

    Args:
        original_shape: Shape of the canonical (RAS) array the model grid was cut from, ``(x, y, z)``.
        affine: Affine of the file as stored on disk (before reorientation), 4×4.
        canonical_affine: Affine of the canonical RAS array.
        crop_start: Per axis, the index in the canonical array of the model volume's first voxel.
            Negative values mean the model volume was padded on that side.
        target_shape: Shape of the model volume ``(x, y, z)``.
        path: The scan this geometry came from.
        file_shape: Shape of the file's own grid, set only when the scan was resampled on reading;
            the NIfTI writer then resamples results back onto that grid.
    """

    original_shape: tuple[int, int, int]
    affine: np.ndarray
    canonical_affine: np.ndarray
    crop_start: tuple[int, int, int] = (0, 0, 0)
    target_shape: tuple[int, int, int] | None = None
    path: str = ""
    file_shape: tuple[int, int, int] | None = None

    @property
    def voxel_ml(self) -> float:
        """Volume of one model-grid voxel in millilitres (cm³)."""
        return abs(float(np.linalg.det(np.asarray(self.canonical_affine)[:3, :3]))) / 1000.0

    def to_scan(self, model_map: np.ndarray, fill: float | None = None) -> np.ndarray:
        """A model-grid array ``[D, H, W]`` back on the scan's canonical grid ``(x, y, z)``.

        Args:
            model_map: Array in the model layout, on the model grid.
            fill: Value outside the model's box; default the array's own minimum, so a map never
                shows a score there that could exceed real ones (log-likelihood scores are negative).

        Raises:
            ValueError: The array is not on this geometry's model grid.
        """
        # A view, not a copy: crop_or_pad below copies the box once, straight from the model layout.
        canonical = np.asarray(model_map).transpose(2, 1, 0)
        if self.target_shape is not None and tuple(canonical.shape) != tuple(self.target_shape):
            msg = (
                f"{self.path}: array of shape {tuple(model_map.shape)} is not on the model grid "
                f"{tuple(reversed(self.target_shape))} (D, H, W)"
            )
            raise ValueError(msg)
        if fill is None:
            fill = canonical.min() if canonical.size else 0
        return crop_or_pad(canonical, tuple(-s for s in self.crop_start), self.original_shape, fill=fill)

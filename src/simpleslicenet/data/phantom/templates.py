"""Healthy anatomy source: the MNI152 2009a tissue maps that ship inside nilearn (no download).

The maps are read once at 1 mm, resampled once per voxel spacing and kept in memory. Everything in
the phantom lives on the template's own voxel grid at that spacing: a subject is the template warped
by a random transform and re-sampled on the same grid, so every output file shares the template's
(spacing-scaled) affine.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["TissueTemplate", "load_tissue_template", "TEMPLATE_NAME"]

TEMPLATE_NAME = "MNI152 2009a (nilearn)"

_CACHE: dict[float, TissueTemplate] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class TissueTemplate:
    """Tissue probability maps of the template on a grid of ``spacing_mm`` voxels.

    The maps are cropped to the brain's bounding box (plus a margin) to keep warping cheap;
    ``offset`` is the index of the crop's first voxel in the full grid.

    Args:
        gm: Grey-matter probability, cropped, float32.
        wm: White-matter probability, cropped, float32.
        brain: Brain mask (0/1), cropped, float32.
        csf: Cerebrospinal fluid: the part of the brain mask that is neither grey nor white matter.
        offset: Index of ``gm[0, 0, 0]`` in the full grid, ``(x, y, z)``.
        shape: Shape of the full grid ``(x, y, z)``.
        affine: Voxel-to-world (mm) affine of the full grid.
        spacing_mm: Isotropic voxel size.
    """

    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray
    csf: np.ndarray
    offset: tuple[int, int, int]
    shape: tuple[int, int, int]
    affine: np.ndarray
    spacing_mm: float

    @property
    def brain_centre(self) -> np.ndarray:
        """Centre of the brain's bounding box, full-grid voxel coordinates ``(x, y, z)``."""
        return np.asarray(self.offset, dtype=np.float64) + (np.asarray(self.brain.shape) - 1) / 2.0


def _read_maps() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # Imported here: nilearn is slow to import and only the generator needs it.
    from nilearn import datasets

    gm_img = datasets.load_mni152_gm_template(resolution=1)
    gm = np.asarray(gm_img.get_fdata(dtype=np.float32))
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32))
    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32))
    brain = (brain > 0.5).astype(np.float32)
    # Tissue outside the mask would leak through partial voluming at the skull-stripped edge.
    gm *= brain
    wm *= brain
    total = gm + wm
    over = total > 1.0
    gm[over] /= total[over]
    wm[over] /= total[over]
    return gm, wm, brain, np.asarray(gm_img.affine, dtype=np.float64)


def _resample(volume: np.ndarray, factor: float, shape: tuple[int, ...]) -> np.ndarray:
    """Resample a 1 mm map onto a grid of ``factor`` mm voxels sharing voxel 0's centre (anti-aliased)."""
    if factor == 1.0:
        return volume
    sigma = 0.5 * np.sqrt(max(factor**2 - 1.0, 0.0))  # removes what the coarser grid cannot hold
    smooth = ndimage.gaussian_filter(volume, sigma=sigma, mode="constant") if sigma > 0 else volume
    coords = [np.arange(n, dtype=np.float32) * factor for n in shape]
    # Separable linear interpolation along each axis: exact for an axis-aligned scaling and cheap.
    out = smooth
    for axis, c in enumerate(coords):
        lo = np.floor(c).astype(int)
        lo = np.clip(lo, 0, out.shape[axis] - 1)
        hi = np.clip(lo + 1, 0, out.shape[axis] - 1)
        w = (c - lo).astype(np.float32)
        shape_w = [1, 1, 1]
        shape_w[axis] = -1
        w = w.reshape(shape_w)
        out = np.take(out, lo, axis=axis) * (1 - w) + np.take(out, hi, axis=axis) * w
    return out.astype(np.float32)


def load_tissue_template(spacing_mm: float = 1.0) -> TissueTemplate:
    """Tissue maps on a ``spacing_mm`` grid, computed once per spacing and cached in memory.

    Args:
        spacing_mm: Isotropic voxel size in mm (1.0 is the template's native grid).

    Raises:
        ValueError: ``spacing_mm`` is not a positive number of at most 8 mm.
    """
    spacing_mm = float(spacing_mm)
    if not np.isfinite(spacing_mm) or not 0.5 <= spacing_mm <= 8.0:
        msg = f"spacing_mm must lie between 0.5 and 8 mm, got {spacing_mm}"
        raise ValueError(msg)
    with _LOCK:
        if spacing_mm in _CACHE:
            return _CACHE[spacing_mm]
        if 1.0 not in _CACHE or spacing_mm == 1.0:
            native = _build(1.0, *_read_maps())
            _CACHE[1.0] = native
        if spacing_mm != 1.0:
            _CACHE[spacing_mm] = _build_from(_CACHE[1.0], spacing_mm)
        return _CACHE[spacing_mm]


def _uncropped(template: TissueTemplate, volume: np.ndarray) -> np.ndarray:
    full = np.zeros(template.shape, dtype=np.float32)
    x, y, z = template.offset
    full[x : x + volume.shape[0], y : y + volume.shape[1], z : z + volume.shape[2]] = volume
    return full


def _build_from(native: TissueTemplate, spacing_mm: float) -> TissueTemplate:
    shape = tuple(int(np.floor((n - 1) / spacing_mm)) + 1 for n in native.shape)
    gm = _resample(_uncropped(native, native.gm), spacing_mm, shape)
    wm = _resample(_uncropped(native, native.wm), spacing_mm, shape)
    brain = (_resample(_uncropped(native, native.brain), spacing_mm, shape) >= 0.5).astype(np.float32)
    gm *= brain
    wm *= brain
    affine = native.affine.copy()
    affine[:3, :3] *= spacing_mm
    return _build(spacing_mm, gm, wm, brain, affine)


def _build(spacing_mm: float, gm: np.ndarray, wm: np.ndarray, brain: np.ndarray, affine: np.ndarray) -> TissueTemplate:
    coords = np.argwhere(brain > 0)
    lo = np.maximum(coords.min(axis=0) - 2, 0)
    hi = np.minimum(coords.max(axis=0) + 3, brain.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    return TissueTemplate(
        gm=np.ascontiguousarray(gm[box]),
        wm=np.ascontiguousarray(wm[box]),
        brain=np.ascontiguousarray(brain[box]),
        csf=np.ascontiguousarray(np.clip(brain[box] - gm[box] - wm[box], 0.0, 1.0)),
        offset=tuple(int(v) for v in lo),
        shape=tuple(int(s) for s in brain.shape),
        affine=affine,
        spacing_mm=spacing_mm,
    )

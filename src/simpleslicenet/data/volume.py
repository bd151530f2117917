"""NIfTI volumes in and out: reading, orientation, crop/pad, intensity scaling, brain masks.

Conventions used everywhere in the package:

* Arrays read from disk are brought to canonical RAS orientation (``nibabel.as_closest_canonical``),
  so array axes are (x: left→right, y: posterior→anterior, z: inferior→superior).
* A volume handed to models is a tensor ``[D, H, W] = [z, y, x]``: one axial slice per depth index.
  :func:`to_slices` / :func:`from_slices` convert between the two layouts.
* :class:`VolumeGeometry` remembers everything needed to put a model's output back into the scan's
  own space (original shape, affine, header and the crop box), so no caller handles affines itself.
"""

from __future__ import annotations

import gzip
import os
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

__all__ = [
    "VolumeError",
    "VolumeGeometry",
    "LoadedVolume",
    "read_nifti",
    "read_mask",
    "write_nifti",
    "save_nifti_atomic",
    "brain_mask_from_intensity",
    "brain_bounding_box",
    "crop_or_pad",
    "uncrop",
    "scale_intensity",
    "to_slices",
    "from_slices",
    "load_volume",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class VolumeError(ValueError):
    """A scan or mask that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)


@dataclass
class VolumeGeometry:
    """Where a model-space volume sits inside the original scan.

    Args:
        original_shape: Shape of the canonical (RAS) array as read from disk, ``(x, y, z)``.
        affine: Affine of the file as stored on disk (before reorientation), 4×4.
        canonical_affine: Affine of the canonical RAS array.
        crop_start: Per axis, the index in the canonical array of the model volume's first voxel.
            Negative values mean the model volume was padded on that side.
        target_shape: Shape of the model volume ``(x, y, z)``.
        path: The scan this geometry came from.
        file_shape: Shape of the file's own grid, set only when the scan was resampled on reading
            (``resample_mm``); :func:`write_nifti` then resamples results back onto that grid.
    """

    original_shape: tuple[int, int, int]
    affine: np.ndarray
    canonical_affine: np.ndarray
    crop_start: tuple[int, int, int] = (0, 0, 0)
    target_shape: tuple[int, int, int] | None = None
    path: str = ""
    header: nib.Nifti1Header | None = field(default=None, repr=False)
    file_shape: tuple[int, int, int] | None = None


@dataclass
class LoadedVolume:
    """A scan after preprocessing, with its masks and geometry (all arrays ``(x, y, z)``)."""

    image: np.ndarray
    brain_mask: np.ndarray
    lesion_mask: np.ndarray | None
    geometry: VolumeGeometry


def _check_path(path: Path) -> None:
    if not path.exists():
        raise VolumeError(path, "file does not exist")
    if path.is_dir():
        raise VolumeError(path, "is a folder, expected a NIfTI file (.nii or .nii.gz)")
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise VolumeError(path, "not a NIfTI file: expected a name ending in .nii or .nii.gz")


def _load_image(path: Path) -> nib.Nifti1Image:
    _check_path(path)
    try:
        img = nib.load(str(path))
    except Exception as error:  # nibabel raises several unrelated types for bad files
        raise VolumeError(path, f"not a readable NIfTI file ({type(error).__name__}: {error})") from error
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise VolumeError(path, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
    return img


def _squeeze_to_3d(data: np.ndarray, path: Path) -> np.ndarray:
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(path, f"expected a 3-D scan, got shape {tuple(data.shape)} ({data.ndim}-D)")
    return data


def _canonical(img: nib.Nifti1Image, path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    if len(img.shape) == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    if len(img.shape) != 3:
        raise VolumeError(path, f"expected a 3-D scan, got shape {tuple(img.shape)} ({len(img.shape)}-D)")
    canonical = nib.as_closest_canonical(img)
    try:
        data = np.asanyarray(canonical.dataobj, dtype=np.float32)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as error:
        raise VolumeError(path, f"truncated or corrupt data ({type(error).__name__}: {error})") from error
    return _squeeze_to_3d(data, path), canonical


def read_nifti(path: str | os.PathLike, resample_mm: float | None = None) -> tuple[np.ndarray, VolumeGeometry]:
    """Read a scan as a float32 canonical-RAS array and its geometry.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        resample_mm: If given, resample to this isotropic voxel size first (trilinear).

    Raises:
        VolumeError: Missing, non-NIfTI, truncated or corrupt file, a real 4-D series, NaN/Inf voxels,
            or an all-zero scan.
    """
    path = Path(path)
    img = _load_image(path)
    original_affine = img.affine.copy()
    file_shape = None
    if resample_mm is not None:
        file_shape = tuple(int(s) for s in img.shape[:3])
        from nibabel.processing import resample_to_output

        img = resample_to_output(_as_3d_image(img, path), voxel_sizes=(resample_mm,) * 3, order=1)
    data, canonical = _canonical(img, path)
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise VolumeError(path, f"contains {bad} NaN or infinite voxels")
    if not np.any(data):
        raise VolumeError(path, "all voxels are zero (empty scan)")
    geometry = VolumeGeometry(
        original_shape=tuple(int(s) for s in data.shape),
        affine=original_affine,
        canonical_affine=canonical.affine.copy(),
        path=str(path),
        header=img.header.copy(),
        file_shape=file_shape,
    )
    return data, geometry


def _as_3d_image(img: nib.Nifti1Image, path: Path) -> nib.Nifti1Image:
    if len(img.shape) == 4 and img.shape[3] == 1:
        return img.slicer[..., 0]
    if len(img.shape) != 3:
        raise VolumeError(path, f"expected a 3-D scan, got shape {tuple(img.shape)} ({len(img.shape)}-D)")
    return img


def read_mask(
    path: str | os.PathLike,
    reference: VolumeGeometry,
    resample_mm: float | None = None,
    atol: float = 1e-3,
) -> np.ndarray:
    """Read a label/mask file that must share its scan's grid; returns a boolean canonical array.

    Raises:
        VolumeError: The mask's shape or affine differs from the scan's, or the file is unreadable.
    """
    path = Path(path)
    img = _load_image(path)
    if resample_mm is not None:
        from nibabel.processing import resample_to_output

        img = resample_to_output(_as_3d_image(img, path), voxel_sizes=(resample_mm,) * 3, order=0)
    data, canonical = _canonical(img, path)
    if tuple(data.shape) != tuple(reference.original_shape):
        raise VolumeError(
            path,
            f"mask shape {tuple(data.shape)} differs from its scan's {tuple(reference.original_shape)} "
            f"({reference.path})",
        )
    if not np.allclose(canonical.affine, reference.canonical_affine, atol=atol):
        raise VolumeError(path, f"mask affine differs from its scan's ({reference.path})")
    if not np.isfinite(data).all():
        raise VolumeError(path, "mask contains NaN or infinite voxels")
    return data > 0


def write_nifti(
    data: np.ndarray,
    geometry: VolumeGeometry,
    path: str | os.PathLike,
    dtype: type = np.float32,
    overwrite: bool = False,
) -> Path:
    """Write a canonical array back in the scan's own orientation and affine, atomically.

    The file is written under a temporary name in the same folder and renamed into place, so an
    existing file is either fully replaced or left untouched.

    Args:
        data: Array in canonical RAS layout with the scan's original shape.
        geometry: Geometry of the scan the array belongs to.
        path: Destination ``.nii.gz`` / ``.nii``.
        dtype: Stored data type.
        overwrite: Replace an existing file.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
    if tuple(data.shape) != tuple(geometry.original_shape):
        msg = f"{path}: array shape {tuple(data.shape)} differs from the scan's {geometry.original_shape}"
        raise ValueError(msg)
    canonical = nib.Nifti1Image(np.asarray(data, dtype=dtype), geometry.canonical_affine)
    if geometry.file_shape is not None:
        # Read with resampling: resample back onto the file's grid (nearest for labels, linear otherwise).
        from nibabel.processing import resample_from_to

        order = 1 if np.issubdtype(np.dtype(dtype), np.floating) else 0
        resampled = resample_from_to(canonical, (geometry.file_shape, geometry.affine), order=order)
        img = nib.Nifti1Image(np.asarray(resampled.dataobj).astype(dtype), geometry.affine)
    else:
        # Undo the reorientation so the output overlays the input scan voxel for voxel.
        original_ornt = nib.orientations.io_orientation(geometry.affine)
        transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), original_ornt)
        img = canonical.as_reoriented(transform)
    img.set_qform(geometry.affine, code=1)
    img.set_sform(geometry.affine, code=1)
    return save_nifti_atomic(img, path, overwrite=True)


def save_nifti_atomic(img: nib.Nifti1Image, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Save a NIfTI image under a temporary name in the destination folder, then rename it into place,
    so an existing file is either fully replaced or left untouched.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false (the file is left untouched).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    # Created by nibabel itself (not mkstemp), so the file gets the usual permissions.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{suffix}")
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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


def brain_bounding_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive-exclusive bounds ``(lo, hi)`` of the mask's non-zero voxels; the whole array if empty."""
    coords = np.argwhere(mask)
    if coords.size == 0:
        return np.zeros(mask.ndim, dtype=int), np.array(mask.shape)
    return coords.min(axis=0), coords.max(axis=0) + 1


def crop_start_for(shape: tuple[int, ...], target: tuple[int, ...], mask: np.ndarray | None) -> tuple[int, ...]:
    """Crop start per axis that centres the target box on the mask's bounding box (or the array)."""
    if mask is not None and mask.any():
        lo, hi = brain_bounding_box(mask)
        centre = (lo + hi) / 2.0
    else:
        centre = np.array(shape) / 2.0
    return tuple(int(np.floor(c - t / 2.0)) for c, t in zip(centre, target, strict=True))


def crop_or_pad(array: np.ndarray, start: tuple[int, ...], target: tuple[int, ...], fill: float = 0) -> np.ndarray:
    """Box of size ``target`` starting at ``start`` (may be negative or run past the end: zero padded)."""
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


def uncrop(array: np.ndarray, geometry: VolumeGeometry, fill: float = 0) -> np.ndarray:
    """Put a model-space array back into the scan's canonical grid (inverse of :func:`crop_or_pad`)."""
    original = geometry.original_shape
    if geometry.target_shape is not None and tuple(array.shape) != tuple(geometry.target_shape):
        msg = f"{geometry.path}: array of shape {tuple(array.shape)} is not on the model grid {tuple(geometry.target_shape)}"
        raise ValueError(msg)
    neg_start = tuple(-s for s in geometry.crop_start)
    return crop_or_pad(array, neg_start, original, fill=fill)


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
    if mode == "minmax":
        lo, hi = float(image.min()), float(image.max())
    elif mode == "percentile":
        values = image[brain_mask] if brain_mask.any() else image.ravel()
        lo, hi = (float(v) for v in np.percentile(values, percentiles))
    else:
        msg = f"unknown intensity scaling mode {mode!r}: use 'percentile' or 'minmax'"
        raise ValueError(msg)
    scale = hi - lo if hi > lo else 1.0
    out = np.clip((image - lo) / scale, 0.0, 1.0).astype(np.float32)
    if mode == "percentile":
        out[~brain_mask] = 0.0  # background carries no information after skull stripping
    return out


def to_slices(array: np.ndarray) -> np.ndarray:
    """Canonical ``(x, y, z)`` → model layout ``(z, y, x)`` = ``[D, H, W]``."""
    return np.ascontiguousarray(array.transpose(2, 1, 0))


def from_slices(array: np.ndarray) -> np.ndarray:
    """Model layout ``[D, H, W]`` → canonical ``(x, y, z)``."""
    return np.ascontiguousarray(array.transpose(2, 1, 0))


def load_volume(
    image_path: str | os.PathLike,
    target_shape: tuple[int, int, int] | None = (192, 192, 96),
    mask_path: str | os.PathLike | None = None,
    brain_mask_path: str | os.PathLike | None = None,
    intensity: str = "percentile",
    resample_mm: float | None = None,
    require_mask: bool = False,
) -> LoadedVolume:
    """Read, mask, scale and crop/pad one scan (with its lesion mask) to the model's grid.

    Args:
        image_path: The scan.
        target_shape: Model grid ``(x, y, z)``; ``None`` keeps the scan's own shape.
        mask_path: Lesion mask (anything > 0 is lesion); ``None`` for a healthy scan.
        brain_mask_path: Brain mask; when absent one is derived from intensities.
        intensity: ``"percentile"`` or ``"minmax"`` (see :func:`scale_intensity`).
        resample_mm: Resample to this isotropic spacing before anything else.
        require_mask: Raise if ``mask_path`` is missing (lesion scans must have one).
    """
    image, geometry = read_nifti(image_path, resample_mm=resample_mm)
    if require_mask and (mask_path is None or not Path(mask_path).exists()):
        raise VolumeError(image_path, f"lesion scan has no mask (looked for {mask_path})")
    lesion = read_mask(mask_path, geometry, resample_mm) if mask_path is not None else None
    if brain_mask_path is not None and Path(brain_mask_path).exists():
        brain = read_mask(brain_mask_path, geometry, resample_mm)
    else:
        brain = brain_mask_from_intensity(image)
    if lesion is not None:
        brain = brain | lesion  # a lesion is always inside the brain, whatever the brain mask says
    image = scale_intensity(image, brain, mode=intensity)
    if target_shape is not None:
        target_shape = tuple(int(t) for t in target_shape)
        start = crop_start_for(image.shape, target_shape, brain)
        image = crop_or_pad(image, start, target_shape)
        brain = crop_or_pad(brain, start, target_shape)
        lesion = crop_or_pad(lesion, start, target_shape) if lesion is not None else None
        geometry.crop_start = start
    geometry.target_shape = tuple(image.shape)
    return LoadedVolume(image=image, brain_mask=brain, lesion_mask=lesion, geometry=geometry)

"""Measuring preprocessing: move a real head by a known rigid motion, and see how well it comes back.

A registration can be checked without ground-truth landmarks by moving a scan by a known rigid
motion ``M`` (world millimetres) and registering both the original and the moved copy. If ``T0`` maps
template points into the original scan, the moved copy should come out with ``M ∘ T0``; the distance
between what the registration returned and ``M ∘ T0``, averaged over the template's brain voxels,
is the registration error in millimetres (:func:`registration_error`). It measures how consistently
the registration recovers the brain's position, independently of the motion; it cannot see a bias
both runs share (e.g. the subject's anatomy differing from the template's).

All matrices here are 4×4 in RAS millimetres (nibabel's convention).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
from scipy import ndimage

__all__ = [
    "rigid_motion",
    "moved_scan",
    "downsampled_scan",
    "registration_error",
    "template_brain_points",
    "mean_surface_distance",
]


def rigid_motion(
    axis: tuple[float, float, float],
    angle_deg: float,
    translation_mm: tuple[float, float, float] | np.ndarray,
    centre_mm: tuple[float, float, float] | np.ndarray,
) -> np.ndarray:
    """Rotation by ``angle_deg`` about ``axis`` through ``centre_mm``, then a translation (4×4, RAS mm).

    Args:
        axis: Rotation axis (any length).
        angle_deg: Rotation angle in degrees.
        translation_mm: Translation applied after the rotation, 3 values.
        centre_mm: World point the rotation turns around (e.g. the head's centre), 3 values.
    """
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    angle = np.deg2rad(angle_deg)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross  # Rodrigues
    centre = np.asarray(centre_mm, dtype=np.float64)
    motion = np.eye(4)
    motion[:3, :3] = rotation
    motion[:3, 3] = centre - rotation @ centre + np.asarray(translation_mm, dtype=np.float64)
    return motion


def _grid_around(corners: np.ndarray, spacing_mm: float, margin_mm: float) -> tuple[tuple[int, int, int], np.ndarray]:
    lo = corners.min(axis=0) - margin_mm
    hi = corners.max(axis=0) + margin_mm
    shape = tuple(int(np.ceil(v)) + 1 for v in (hi - lo) / spacing_mm)
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    affine[:3, 3] = lo
    return shape, affine


def _corners(img: nib.Nifti1Image) -> np.ndarray:
    shape = np.asarray(img.shape[:3]) - 1
    corners = np.array([[i, j, k] for i in (0, shape[0]) for j in (0, shape[1]) for k in (0, shape[2])], float)
    return corners @ img.affine[:3, :3].T + img.affine[:3, 3]


def moved_scan(
    img: nib.Nifti1Image, motion: np.ndarray, spacing_mm: float, order: int = 1, margin_mm: float = 20.0
) -> nib.Nifti1Image:
    """The scan moved by ``motion`` and resampled onto a plain axis-aligned grid, as a scanner would store it.

    Args:
        img: The scan.
        motion: 4×4 rigid motion in world mm (see :func:`rigid_motion`).
        spacing_mm: Voxel size of the new grid.
        order: Interpolation order (0 for masks, 1 for scans).
        margin_mm: Room around the moved field of view, so no part of the head is cut.
    """
    moved_corners = _corners(img) @ motion[:3, :3].T + motion[:3, 3]
    shape, affine = _grid_around(moved_corners, spacing_mm, margin_mm)
    # new voxel -> world -> unmoved world (inverse motion) -> old voxel
    pull = np.linalg.inv(img.affine) @ np.linalg.inv(motion) @ affine
    data = np.asarray(img.dataobj, dtype=np.float32)
    if order > 0 and spacing_mm > min(img.header.get_zooms()[:3]):
        data = ndimage.gaussian_filter(data, 0.4 * spacing_mm / np.asarray(img.header.get_zooms()[:3]))
    out = ndimage.affine_transform(data, pull, output_shape=shape, order=order, mode="constant", cval=0.0)
    return nib.Nifti1Image(np.clip(out, 0, None).astype(np.float32), affine)


def downsampled_scan(img: nib.Nifti1Image, spacing_mm: float, order: int = 1) -> nib.Nifti1Image:
    """The scan, unmoved, on an axis-aligned grid of ``spacing_mm`` voxels over the same field of view."""
    return moved_scan(img, np.eye(4), spacing_mm, order=order, margin_mm=0.0)


def template_brain_points(spacing_mm: float = 2.0) -> np.ndarray:
    """World coordinates (RAS mm, N×3) of the MNI152 brain mask's voxels, on a ``spacing_mm`` lattice."""
    from nilearn.datasets import load_mni152_brain_mask

    mask_img = load_mni152_brain_mask(resolution=1)
    step = max(1, round(spacing_mm))
    mask = np.asarray(mask_img.dataobj)[::step, ::step, ::step] > 0
    voxels = np.argwhere(mask).astype(np.float64) * step
    return voxels @ mask_img.affine[:3, :3].T + mask_img.affine[:3, 3]


def registration_error(
    recovered: np.ndarray, reference: np.ndarray, motion: np.ndarray, points: np.ndarray
) -> dict[str, float]:
    """Distances (mm) between where two registrations put template points, once the known motion is undone.

    Args:
        recovered: Template → moved-scan matrix the registration of the moved copy returned.
        reference: Template → scan matrix of the unmoved scan.
        motion: The motion applied to the scan (moved = ``motion`` ∘ unmoved).
        points: Template points (N×3, mm), e.g. :func:`template_brain_points`.

    Returns:
        ``mean_mm``, ``p95_mm`` and ``max_mm`` of the distances.
    """
    homogeneous = np.c_[points, np.ones(len(points))]
    expected = homogeneous @ (motion @ reference).T
    found = homogeneous @ np.asarray(recovered).T
    distance = np.linalg.norm(found[:, :3] - expected[:, :3], axis=1)
    return {
        "mean_mm": float(distance.mean()),
        "p95_mm": float(np.percentile(distance, 95)),
        "max_mm": float(distance.max()),
    }


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def mean_surface_distance(a: np.ndarray, b: np.ndarray, spacing_mm: float) -> float:
    """Symmetric mean distance (mm) between the surfaces of two masks on the same isotropic grid.

    Raises:
        ValueError: The masks differ in shape, or one is empty.
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        msg = f"mask shapes differ: {a.shape} and {b.shape}"
        raise ValueError(msg)
    if not a.any() or not b.any():
        msg = "cannot measure the surface of an empty mask"
        raise ValueError(msg)
    surface_a, surface_b = _surface(a), _surface(b)
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing_mm)
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing_mm)
    return float((to_b[surface_a].sum() + to_a[surface_b].sum()) / (surface_a.sum() + surface_b.sum()))

"""SimpleITK images to and from NIfTI arrays, affines and files.

SimpleITK (like DICOM) places voxels in LPS patient coordinates; NIfTI affines and nibabel use RAS.
The two differ by a sign on the first two world axes, and a SimpleITK array is indexed ``[z, y, x]``
where a nibabel array is ``[x, y, z]``. Every conversion between the two goes through this module so
that the flip and the axis order are written down once.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from simpleslicenet.data.nifti import save_nifti_atomic

__all__ = [
    "LPS_TO_RAS",
    "image_from_array",
    "array_from_image",
    "affine_of",
    "reference_image",
    "save_array_as_nifti",
    "save_image_as_nifti",
]

# Diagonal sign flip between LPS (ITK, DICOM) and RAS (NIfTI) world coordinates; its own inverse.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

# NIfTI qform/sform codes: 1 = scanner coordinates, 4 = aligned to an MNI152 template.
XFORM_SCANNER = 1
XFORM_MNI = 4


def image_from_array(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A SimpleITK image of a nibabel-layout array (``[x, y, z]``) with a RAS voxel-to-world affine.

    Args:
        array: 3-D array indexed ``[x, y, z]`` as nibabel reads it.
        affine: Its 4×4 RAS affine (rotation and zoom; shear is not representable in ITK).

    Raises:
        ValueError: The array is not 3-D or the affine is singular.
    """
    array = np.asarray(array)
    if array.ndim != 3:
        msg = f"expected a 3-D array, got shape {array.shape}"
        raise ValueError(msg)
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0) or abs(np.linalg.det(linear)) < 1e-12:
        msg = f"singular affine: {np.asarray(affine).tolist()}"
        raise ValueError(msg)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection((LPS_TO_RAS @ (linear / spacing)).ravel().tolist())
    image.SetOrigin((LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)[:3, 3]).tolist())
    return image


def array_from_image(image: sitk.Image) -> np.ndarray:
    """The image's voxels as a nibabel-layout array (``[x, y, z]``), a copy."""
    return np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))


def affine_of(image: sitk.Image) -> np.ndarray:
    """RAS voxel-to-world affine (4×4) of a SimpleITK image, for nibabel."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=np.float64)
    return affine


def reference_image(shape: tuple[int, int, int], affine: np.ndarray) -> sitk.Image:
    """An empty float32 image defining a grid (``[x, y, z]`` shape, RAS affine), for resampling onto it."""
    return image_from_array(np.zeros(tuple(int(s) for s in shape), dtype=np.float32), affine)


def save_array_as_nifti(
    array: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    template_space: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a nibabel-layout array (``[x, y, z]``) with a RAS affine as NIfTI, atomically.

    Args:
        array: The voxels (boolean arrays are stored as uint8).
        affine: 4×4 RAS affine.
        path: Destination ``.nii.gz`` / ``.nii``.
        template_space: Label the affine as MNI152-aligned (NIfTI code 4) instead of scanner (code 1).
        overwrite: Replace an existing file.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    nifti = nib.Nifti1Image(array, affine)
    code = XFORM_MNI if template_space else XFORM_SCANNER
    nifti.set_qform(affine, code=code)
    nifti.set_sform(affine, code=code)
    return save_nifti_atomic(nifti, path, overwrite=overwrite)


def save_image_as_nifti(image: sitk.Image, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a SimpleITK image as NIfTI (RAS affine, scanner coordinates, its own voxel type), atomically.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    return save_array_as_nifti(array_from_image(image), affine_of(image), path, overwrite=overwrite)

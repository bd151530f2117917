"""Bring raw scans into the space the models expect: RAS, 1 mm, roughly aligned to MNI152, brain-masked.

The paper's data is skull-stripped and affinely registered to MNI152 at 1 mm. This module does an
honest, *approximate* version of that with nibabel, nilearn and scipy only:

1. reorientation to RAS and resampling to ``resample_mm`` isotropic voxels (trilinear);
2. optional alignment to nilearn's MNI152 2009 template (197×233×189, 1 mm): the foreground's centre
   of mass is moved onto the template brain's, and each world axis is scaled so the foreground's
   spread (standard deviation) matches the template brain's. There is no rotation and no
   intensity-based optimisation: it is a moment match, good to a few millimetres for skull-stripped
   scans in near-standard head position, not a substitute for FSL FLIRT or ANTs;
3. a brain mask from intensities (skull-stripped input) or from the template (a crude skull strip
   after alignment), voxels outside it set to zero.

Not done: bias-field (N4) correction, deep-learning skull stripping, non-linear registration. Raw IXI
scans still hold the skull: strip it with a dedicated tool first for results close to the paper's.

Example:
    >>> from simpleslicenet.data.preprocess import preprocess_scan
    >>> preprocess_scan("IXI002-Guys-0828-T2.nii.gz", "mni/IXI002-Guys-0828-T2.nii.gz")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from simpleslicenet.data.datamodules.folder import BRAIN_SUFFIX, MASK_SUFFIX, find_scans, nifti_stem
from simpleslicenet.data.volume import (
    VolumeError,
    brain_mask_from_intensity,
    read_mask,
    read_nifti,
    save_nifti_atomic,
)

__all__ = ["PreprocessResult", "preprocess_scan", "preprocess_folder", "moment_alignment"]


@dataclass
class PreprocessResult:
    """Files written by :func:`preprocess_scan` and the transform used.

    Args:
        image_path: The preprocessed scan.
        brain_mask_path: Its brain mask (``NAME_brain.nii.gz``), if written.
        mask_path: The lesion mask carried along, if any.
        output_to_input: 4×4 map from output voxel indices to input-canonical voxel indices.
    """

    image_path: Path
    brain_mask_path: Path | None
    mask_path: Path | None
    output_to_input: np.ndarray


def _world_moments(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre of mass and per-axis standard deviation (mm) of a mask's voxels in world space."""
    voxels = np.argwhere(mask).astype(np.float64)
    world = voxels @ affine[:3, :3].T + affine[:3, 3]
    return world.mean(axis=0), world.std(axis=0)


def moment_alignment(
    moving_mask: np.ndarray,
    moving_affine: np.ndarray,
    fixed_mask: np.ndarray,
    fixed_affine: np.ndarray,
    scale: bool = True,
) -> np.ndarray:
    """Map from fixed-grid voxel indices to moving-grid voxel indices that matches the masks' moments.

    World coordinates are matched as ``x_moving = c_moving + s * (x_fixed - c_fixed)`` with ``c`` the
    centres of mass and ``s`` the per-axis ratio of standard deviations (1 when ``scale`` is false).

    Args:
        moving_mask: Foreground of the scan to align.
        moving_affine: Its voxel-to-world affine.
        fixed_mask: Foreground of the template.
        fixed_affine: The template's affine.
        scale: Also match the spread along each world axis.

    Returns:
        4×4 matrix for :func:`scipy.ndimage.affine_transform` (fixed voxel → moving voxel).
    """
    if not moving_mask.any():
        msg = "cannot align an empty foreground mask"
        raise ValueError(msg)
    c_moving, s_moving = _world_moments(moving_mask, moving_affine)
    c_fixed, s_fixed = _world_moments(fixed_mask, fixed_affine)
    ratio = s_moving / np.maximum(s_fixed, 1e-6) if scale else np.ones(3)
    world = np.eye(4)
    world[:3, :3] = np.diag(ratio)
    world[:3, 3] = c_moving - ratio * c_fixed
    return np.linalg.inv(moving_affine) @ world @ fixed_affine


def _template(resolution_mm: int = 1) -> tuple[nib.Nifti1Image, np.ndarray]:
    """nilearn's MNI152 2009 template (ships with nilearn, read offline) and its brain mask."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    template = load_mni152_template(resolution=resolution_mm)
    brain = np.asarray(load_mni152_brain_mask(resolution=resolution_mm).dataobj) > 0
    return template, brain


def preprocess_scan(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    mask_path: str | os.PathLike | None = None,
    resample_mm: float = 1.0,
    register: bool = True,
    scale: bool = True,
    brain_mask: str = "intensity",
    write_brain_mask: bool = True,
    overwrite: bool = False,
) -> PreprocessResult:
    """Reorient, resample, (approximately) register to MNI152 and brain-mask one scan.

    Outputs follow :class:`~simpleslicenet.data.datamodules.folder.NiftiFolder`'s naming rule:
    ``NAME_brain.nii.gz`` (brain mask) and ``NAME_mask.nii.gz`` (lesion mask) beside ``NAME.nii.gz``.

    Args:
        in_path: Raw scan (``.nii`` / ``.nii.gz``).
        out_path: Output scan (``.nii.gz``).
        mask_path: Lesion mask on the scan's grid, carried along with nearest-neighbour interpolation.
        resample_mm: Output voxel size when ``register`` is false (the template grid is used otherwise).
        register: Align to nilearn's MNI152 template grid (see the module notes: approximate).
        scale: Match the foreground's spread per axis, not just its centre.
        brain_mask: ``"intensity"`` (for skull-stripped input) or ``"template"`` (MNI152 brain mask,
            dilated by 2 mm; needs ``register``).
        write_brain_mask: Also write ``NAME_brain.nii.gz``.
        overwrite: Replace existing outputs.

    Raises:
        VolumeError: The scan or mask cannot be used (the message names the file).
        ValueError: Bad options.
        FileExistsError: An output exists and ``overwrite`` is false (nothing is written then).
    """
    if brain_mask not in {"intensity", "template"}:
        msg = f"unknown brain_mask {brain_mask!r}: use 'intensity' or 'template'"
        raise ValueError(msg)
    if brain_mask == "template" and not register:
        msg = "brain_mask='template' needs register=True (the template mask lives on the template grid)"
        raise ValueError(msg)
    out_path = Path(out_path)
    name = nifti_stem(out_path)
    if name is None:
        raise VolumeError(out_path, "output must be a NIfTI file name ending in .nii.gz or .nii")
    suffix = out_path.name[len(name) :]
    brain_out = out_path.with_name(f"{name}{BRAIN_SUFFIX}{suffix}") if write_brain_mask else None
    mask_out = out_path.with_name(f"{name}{MASK_SUFFIX}{suffix}") if mask_path is not None else None
    if not overwrite:
        for target in (out_path, brain_out, mask_out):
            if target is not None and target.exists():
                raise FileExistsError(f"{target}: already exists (pass overwrite=True to replace it)")

    image, geometry = read_nifti(in_path)  # canonical RAS, validated
    lesion = read_mask(mask_path, geometry) if mask_path is not None else None
    source_affine = geometry.canonical_affine
    foreground = brain_mask_from_intensity(image)
    if register:
        template, template_brain = _template(1)
        out_affine, out_shape = template.affine, template.shape[:3]
        matrix = moment_alignment(foreground, source_affine, template_brain, out_affine, scale=scale)
    else:
        from nibabel.processing import vox2out_vox

        # The smallest RAS grid of resample_mm voxels that holds the whole scan.
        out_shape, out_affine = vox2out_vox((image.shape, source_affine), voxel_sizes=(resample_mm,) * 3)
        matrix = np.linalg.inv(source_affine) @ out_affine

    def warp(array: np.ndarray, order: int) -> np.ndarray:
        return ndimage.affine_transform(array, matrix, output_shape=out_shape, order=order, mode="constant", cval=0.0)

    out_image = np.clip(warp(image, 1), image.min(), image.max()).astype(np.float32)
    if brain_mask == "template":
        brain = ndimage.binary_dilation(template_brain, iterations=2)
    else:
        brain = brain_mask_from_intensity(out_image)
    out_lesion = warp(lesion.astype(np.float32), 0) > 0.5 if lesion is not None else None
    if out_lesion is not None:
        brain |= out_lesion  # a lesion is inside the brain even where its intensity is unusual
    out_image[~brain] = 0.0
    if not out_image.any():
        raise VolumeError(in_path, "nothing of the scan is left after alignment and brain masking")

    save_nifti_atomic(nib.Nifti1Image(out_image, out_affine), out_path, overwrite=overwrite)
    if brain_out is not None:
        save_nifti_atomic(nib.Nifti1Image(brain.astype(np.uint8), out_affine), brain_out, overwrite=overwrite)
    if mask_out is not None:
        save_nifti_atomic(nib.Nifti1Image(out_lesion.astype(np.uint8), out_affine), mask_out, overwrite=overwrite)
    return PreprocessResult(out_path, brain_out, mask_out, matrix)


def preprocess_folder(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    **kwargs,  # noqa: ANN003 - forwarded to preprocess_scan
) -> list[PreprocessResult]:
    """Preprocess every scan of a folder tree (naming rule of ``NiftiFolder``), keeping names and sub-folders.

    Lesion masks ``NAME_mask.nii.gz`` beside a scan are carried along.

    Args:
        in_dir: Folder of raw scans.
        out_dir: Output folder (the same relative layout is created).
        **kwargs: Options of :func:`preprocess_scan`.

    Raises:
        VolumeError: ``in_dir`` is missing or holds no scans.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    scans = find_scans(in_dir, recursive=True)
    if not scans:
        raise VolumeError(in_dir, "no scans (*.nii.gz) found")
    results = []
    for scan in scans:
        target = out_dir / scan.image_path.parent.relative_to(in_dir) / f"{scan.name}.nii.gz"
        results.append(preprocess_scan(scan.image_path, target, mask_path=scan.mask_path, **kwargs))
    return results

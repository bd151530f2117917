"""One scan, raw to model-ready: read, N4, register to MNI152, resample, extract the brain, write.

:func:`preprocess_scan` runs the whole chain for one NIfTI file or one DICOM series folder and
writes, beside each other and by the dataset naming rule (:mod:`simpleslicenet.data.scans`):

* ``NAME.nii.gz``: the bias-corrected scan on the template grid, zero outside the brain;
* ``NAME_brain.nii.gz``: its brain mask;
* ``NAME_mask.nii.gz``: the lesion mask, when the input had one (nearest-neighbour resampling);
* ``NAME_template_to_scan.tfm``: the affine transform (ITK format, LPS), template point → scan
  point, to carry maps computed on the template grid back onto the raw scan.

Other names can be given per output kind (:func:`output_paths`); the BIDS derivatives writer
(:mod:`.bids`) names them by the BIDS entities that way.

:class:`PreprocessSettings` holds every choice that changes those outputs; the batch runner records it
in its manifest, so a changed setting redoes a scan.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from simpleslicenet.atomic import atomic_path
from simpleslicenet.data.geometry import VolumeGeometry
from simpleslicenet.data.nifti import VolumeError, read_mask, read_nifti
from simpleslicenet.data.preprocess.bias_field import correct_bias_field
from simpleslicenet.data.preprocess.brain_mask import dice, refine_brain_mask
from simpleslicenet.data.preprocess.dicom import read_dicom_series
from simpleslicenet.data.preprocess.images import (
    affine_of,
    array_from_image,
    image_from_array,
    reference_image,
    save_array_as_nifti,
    save_image_as_nifti,
)
from simpleslicenet.data.preprocess.registration import RegistrationResult, ras_matrix, register_to_template
from simpleslicenet.data.preprocess.template import load_template
from simpleslicenet.data.scans import BRAIN_SUFFIX, MASK_SUFFIX, nifti_stem
from simpleslicenet.data.volume import brain_mask_from_intensity

__all__ = [
    "PreprocessSettings",
    "PreprocessResult",
    "OutputPaths",
    "TRANSFORM_SUFFIX",
    "PIPELINE_VERSION",
    "OUTPUT_KINDS",
    "output_paths",
    "preprocess_scan",
]

TRANSFORM_SUFFIX = "_template_to_scan"

# What one scan's preprocessing writes, by kind (the keys of OutputPaths and PreprocessResult.outputs).
OUTPUT_KINDS = ("image", "brain_mask", "lesion_mask", "transform")

# Raised whenever a change to the steps changes what is written for the same settings, so that
# resumable batches redo scans made by an older version.
PIPELINE_VERSION = 2  # 2: NIfTI outputs state their units (mm)

# Below either figure the registration has failed (a brain off by centimetres, upside down, or not a
# head at all) and the scan is reported instead of written. Well registered scans measured here: mutual
# information 0.5-0.75 (T1 with skull, T1 and T2 skull-stripped), Dice with the template mask 0.95-0.97;
# an upside-down head reached 0.14, noise 0.02, a head with its skull taken for skull-stripped 0.60 Dice.
MIN_MUTUAL_INFORMATION = 0.15
MIN_TEMPLATE_DICE = 0.75


@dataclass(frozen=True)
class PreprocessSettings:
    """Every option that changes what :func:`preprocess_scan` writes.

    Args:
        skull_stripped: The input holds only the brain: the brain mask comes from its intensities,
            not from the template.
        register: Register to MNI152 and resample onto the template grid; if false, only reorient
            to RAS and resample to ``spacing_mm`` (brain mask from intensities).
        bias_correction: Run N4 bias-field correction first.
        dicom_only: Only convert DICOM series to NIfTI (geometry and values unchanged); nothing else.
        spacing_mm: Output voxel size; 1 mm is the template's own grid (197×233×189).
        bias_iterations: N4 iterations per fitting level.
        bias_shrink_mm: Voxel size N4 fits its field at.
        level_mm: Voxel sizes of the registration pyramid's levels.
        rigid_iterations: Rigid stage, most iterations per level.
        affine_iterations: Affine stage, most iterations per level (0: rigid only).
        sampling: Fraction of template voxels the metric samples per iteration.
        mask_margin_mm: The metric is evaluated inside the template brain mask dilated by this much.
        refine_band_mm: Half-width of the band where the brain mask is refined (0: the template's mask as is).
        opening_mm: Radius of the opening in the refinement.
        seed: Seed of the registration's random sampling.

    Raises:
        ValueError: An out-of-range value.
    """

    skull_stripped: bool = False
    register: bool = True
    bias_correction: bool = True
    dicom_only: bool = False
    spacing_mm: float = 1.0
    bias_iterations: tuple[int, ...] = (50, 50, 30)
    bias_shrink_mm: float = 6.0
    level_mm: tuple[float, ...] = (8.0, 4.0, 2.0)
    rigid_iterations: int = 200
    affine_iterations: int = 200
    sampling: float = 0.2
    mask_margin_mm: float = 5.0
    refine_band_mm: float = 4.0
    opening_mm: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("bias_iterations", "level_mm"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "spacing_mm", float(self.spacing_mm))
        if not np.isfinite(self.spacing_mm) or self.spacing_mm <= 0:
            msg = f"spacing_mm must be a positive number of millimetres, got {self.spacing_mm!r}"
            raise ValueError(msg)
        if not self.level_mm or min(self.level_mm) <= 0:
            msg = f"level_mm must be positive voxel sizes, got {self.level_mm!r}"
            raise ValueError(msg)
        if not self.bias_iterations or min(self.bias_iterations) < 1:
            msg = f"bias_iterations must be positive counts, got {self.bias_iterations!r}"
            raise ValueError(msg)
        if not 0.0 < self.sampling <= 1.0:
            msg = f"sampling must be a fraction in (0, 1], got {self.sampling!r}"
            raise ValueError(msg)
        if min(self.mask_margin_mm, self.refine_band_mm, self.opening_mm) < 0:
            msg = "mask_margin_mm, refine_band_mm and opening_mm must not be negative"
            raise ValueError(msg)

    @classmethod
    def quick(cls, spacing_mm: float = 3.0, **overrides: Any) -> PreprocessSettings:
        """Coarse, fast settings (a few seconds a scan): for trials and tests, not for training data.

        Args:
            spacing_mm: Output voxel size.
            **overrides: Any other field.
        """
        quick = {
            "spacing_mm": spacing_mm,
            "bias_shrink_mm": 4.0 * spacing_mm,
            "level_mm": (4.0 * spacing_mm, 2.0 * spacing_mm, spacing_mm),
            "rigid_iterations": 100,
            "affine_iterations": 100,
        }
        return cls(**{**quick, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (tuples as lists), as recorded in the batch manifest."""
        record = asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in record.items()}


@dataclass(frozen=True)
class OutputPaths:
    """Where :func:`preprocess_scan` writes for one output name (``None``: not written)."""

    image: Path
    brain_mask: Path | None
    lesion_mask: Path | None
    transform: Path | None

    def existing(self) -> list[Path]:
        """The paths that already exist."""
        return [path for path in self.as_dict().values() if path.exists()]

    def as_dict(self) -> dict[str, Path]:
        """The written kinds and their paths."""
        return {key: value for key, value in asdict(self).items() if value is not None}


def output_paths(
    out_path: str | os.PathLike,
    settings: PreprocessSettings,
    has_lesion: bool,
    names: Mapping[str, str] | None = None,
) -> OutputPaths:
    """The files :func:`preprocess_scan` writes for ``out_path`` under ``settings``.

    Args:
        out_path: The output scan.
        settings: What is done (a DICOM conversion writes the scan only, no registration no transform).
        has_lesion: A lesion mask is carried along.
        names: File names by kind (``brain_mask``, ``lesion_mask``, ``transform``), beside ``out_path``,
            instead of the dataset naming rule's ``NAME_brain``, ``NAME_mask`` and ``NAME_template_to_scan.tfm``.

    Raises:
        VolumeError: ``out_path`` is not a NIfTI file name, or ``names`` holds an unknown kind or a path
            instead of a file name.
    """
    out_path = Path(out_path)
    name = nifti_stem(out_path)
    if name is None:
        raise VolumeError(out_path, "output must be a NIfTI file name ending in .nii.gz or .nii")
    suffix = out_path.name[len(name) :]
    chosen = {
        "brain_mask": f"{name}{BRAIN_SUFFIX}{suffix}",
        "lesion_mask": f"{name}{MASK_SUFFIX}{suffix}",
        "transform": f"{name}{TRANSFORM_SUFFIX}.tfm",
    }
    for kind, file_name in (names or {}).items():
        if kind not in chosen or Path(file_name).name != file_name or file_name == out_path.name:
            problem = f"cannot name its {kind!r} output {file_name!r}: kinds are {', '.join(chosen)}, each named "
            raise VolumeError(out_path, problem + "by a file name of its own in the same folder")
        chosen[kind] = file_name
    if settings.dicom_only:
        return OutputPaths(out_path, None, None, None)
    return OutputPaths(
        image=out_path,
        brain_mask=out_path.with_name(chosen["brain_mask"]),
        lesion_mask=out_path.with_name(chosen["lesion_mask"]) if has_lesion else None,
        transform=out_path.with_name(chosen["transform"]) if settings.register else None,
    )


@dataclass
class PreprocessResult:
    """What :func:`preprocess_scan` wrote and how well the registration went.

    Args:
        image_path: The preprocessed scan.
        brain_mask_path: Its brain mask (``NAME_brain.nii.gz``); ``None`` for a DICOM conversion.
        mask_path: The lesion mask carried along, if the input had one.
        transform_path: The template → scan transform (ITK ``.tfm``), if registered.
        template_to_scan: The same transform as a 4×4 RAS matrix (mm), if registered.
        mutual_information: Mattes mutual information with the template at the end (higher is better).
        template_dice: Dice of the brain mask with the template's brain mask on the output grid: a
            registration-quality figure (about 0.95 for a well registered adult brain).
        seconds: Time spent per step.
        sidecars: JSON sidecars written beside outputs, by the kind of the output they describe (the
            batch writes them for BIDS derivatives).
    """

    image_path: Path
    brain_mask_path: Path | None = None
    mask_path: Path | None = None
    transform_path: Path | None = None
    template_to_scan: np.ndarray | None = None
    mutual_information: float | None = None
    template_dice: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    sidecars: dict[str, Path] = field(default_factory=dict)

    def outputs(self) -> dict[str, Path]:
        """The files written, by kind (a sidecar as ``<kind>_sidecar``)."""
        paths = {
            "image": self.image_path,
            "brain_mask": self.brain_mask_path,
            "lesion_mask": self.mask_path,
            "transform": self.transform_path,
        }
        paths.update({f"{kind}_sidecar": path for kind, path in self.sidecars.items()})
        return {key: value for key, value in paths.items() if value is not None}


def _read_source(source: Path) -> tuple[sitk.Image, VolumeGeometry | None]:
    """The scan as a float32 SimpleITK image, and its NIfTI geometry (``None`` for DICOM)."""
    if source.is_dir():
        image = sitk.Cast(read_dicom_series(source), sitk.sitkFloat32)
        values = sitk.GetArrayViewFromImage(image)
        if not np.isfinite(values).all():
            raise VolumeError(source, "DICOM series contains NaN or infinite voxels")
        if not values.any():
            raise VolumeError(source, "all voxels of the DICOM series are zero (empty scan)")
        return image, None
    data, geometry = read_nifti(source)
    return image_from_array(data, geometry.canonical_affine), geometry


def _scan_grid(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """The smallest RAS-aligned grid of ``spacing_mm`` voxels that holds the whole scan."""
    from nibabel.processing import vox2out_vox

    shape, affine = vox2out_vox((tuple(image.GetSize()), affine_of(image)), voxel_sizes=(spacing_mm,) * 3)
    return reference_image(shape, affine)


def _read_label(path: str | os.PathLike | None, geometry: VolumeGeometry | None) -> sitk.Image | None:
    """A mask file on the scan's grid as a uint8 image in the scan's space."""
    if path is None:
        return None
    return image_from_array(read_mask(path, geometry).astype(np.uint8), geometry.canonical_affine)


def _carried(label: sitk.Image | None, grid: sitk.Image, transform: sitk.Transform) -> np.ndarray | None:
    """A mask resampled onto the output grid (nearest neighbour), as a boolean ``[x, y, z]`` array."""
    if label is None:
        return None
    carried = sitk.Resample(label, grid, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return array_from_image(carried) > 0


def _brain_mask(
    image: np.ndarray, template_brain: np.ndarray | None, own_brain: np.ndarray | None, settings: PreprocessSettings
) -> np.ndarray:
    """The brain mask on the output grid: the dataset's own, the refined template mask, or from intensities."""
    if own_brain is not None:
        return own_brain
    if template_brain is None or settings.skull_stripped:
        return brain_mask_from_intensity(image)
    if settings.refine_band_mm <= 0:
        return template_brain.copy()
    return refine_brain_mask(image, template_brain, settings.spacing_mm, settings.refine_band_mm, settings.opening_mm)


def _check_registration(
    source: Path, registration: RegistrationResult | None, template_dice: float | None, settings: PreprocessSettings
) -> None:
    """Refuse a scan whose registration visibly failed (see ``MIN_MUTUAL_INFORMATION``)."""
    if registration is None:
        return
    if registration.mutual_information < MIN_MUTUAL_INFORMATION:
        raise VolumeError(
            source,
            f"registration to MNI152 failed: mutual information with the template is only "
            f"{registration.mutual_information:.3f} (< {MIN_MUTUAL_INFORMATION}); check that this is a head scan "
            "and that its orientation in the header is right",
        )
    if template_dice is not None and template_dice < MIN_TEMPLATE_DICE:
        hint = " (does the scan still hold the skull?)" if settings.skull_stripped else ""
        raise VolumeError(
            source,
            f"registration to MNI152 failed: the brain mask overlaps the template's by Dice {template_dice:.2f} "
            f"(< {MIN_TEMPLATE_DICE}){hint}",
        )


def _dilated(mask: sitk.Image, margin_mm: float) -> sitk.Image:
    """A binary mask grown by ``margin_mm`` (exact Euclidean distance)."""
    if margin_mm <= 0:
        return mask
    distance = sitk.SignedMaurerDistanceMap(
        mask > 0, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    return sitk.Cast(distance <= margin_mm, sitk.sitkUInt8)


def preprocess_scan(
    source: str | os.PathLike,
    out_path: str | os.PathLike,
    mask_path: str | os.PathLike | None = None,
    settings: PreprocessSettings | None = None,
    overwrite: bool = False,
    brain_mask_path: str | os.PathLike | None = None,
    output_names: Mapping[str, str] | None = None,
    **overrides: Any,
) -> PreprocessResult:
    """Bias-correct, register to MNI152, resample and brain-extract one scan (see the module notes).

    Args:
        source: A NIfTI scan, or a folder holding one DICOM series.
        out_path: The output scan, ``NAME.nii.gz``; the other outputs are named after it.
        mask_path: Lesion mask on the scan's grid (NIfTI scans only), carried along with
            nearest-neighbour interpolation.
        settings: What to do; :class:`PreprocessSettings` defaults when ``None``.
        overwrite: Replace existing outputs.
        brain_mask_path: The dataset's own brain mask on the scan's grid (NIfTI scans only): carried
            along like the lesion mask and used instead of the template's or the intensity-derived one.
        output_names: File names of the other outputs by kind, instead of the naming rule's (see
            :func:`output_paths`).
        **overrides: Fields of :class:`PreprocessSettings` changed for this call.

    Raises:
        VolumeError: The scan or mask cannot be used, or the registration visibly failed (the
            message names the file).
        ValueError: Bad settings.
        FileExistsError: An output exists and ``overwrite`` is false (nothing is written then).
    """
    settings = replace(settings or PreprocessSettings(), **overrides)
    source = Path(source)
    has_lesion = mask_path is not None and not settings.dicom_only
    paths = output_paths(out_path, settings, has_lesion, output_names)
    if not overwrite and paths.existing():
        raise FileExistsError(f"{paths.existing()[0]}: already exists (pass overwrite=True to replace it)")
    if not source.exists():
        raise VolumeError(source, "no such file or folder")
    for extra in (mask_path, brain_mask_path):
        if extra is not None and source.is_dir():
            raise VolumeError(extra, "masks are supported for NIfTI scans only, not for a DICOM series")
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[step] = round(now - clock, 3)
        clock = now

    if settings.dicom_only:
        if not source.is_dir():
            raise VolumeError(source, "not a DICOM series folder (DICOM-only mode converts DICOM series)")
        image = read_dicom_series(source)
        save_image_as_nifti(image, paths.image, overwrite=overwrite)
        lap("convert")
        return PreprocessResult(image_path=paths.image, seconds=seconds)

    image, geometry = _read_source(source)
    lesion = _read_label(mask_path, geometry)
    own_brain = _read_label(brain_mask_path, geometry)
    lap("read")

    if settings.bias_correction:
        fit_mask = sitk.Cast(image > 0, sitk.sitkUInt8) if settings.skull_stripped else None
        try:
            image = correct_bias_field(
                image, mask=fit_mask, shrink_to_mm=settings.bias_shrink_mm, iterations=settings.bias_iterations
            ).image
        except ValueError as error:
            raise VolumeError(source, f"bias-field correction failed: {error}") from error
        lap("bias_field")

    template = load_template(settings.spacing_mm) if settings.register else None
    registration = None
    if template is not None:
        # The pyramid never looks finer than its finest level, so the registration runs on a template
        # grid that coarse: far less to smooth and sample at 1 mm output, the same transform.
        target = load_template(max(settings.spacing_mm, min(settings.level_mm)))
        try:
            registration = register_to_template(
                target.image,
                image,
                fixed_mask=_dilated(target.brain_mask, settings.mask_margin_mm),
                level_mm=settings.level_mm,
                rigid_iterations=settings.rigid_iterations,
                affine_iterations=settings.affine_iterations,
                sampling=settings.sampling,
                seed=settings.seed,
            )
        except RuntimeError as error:
            raise VolumeError(source, f"registration failed ({str(error).strip().splitlines()[-1]})") from error
        grid, transform = template.image, registration.transform
        lap("registration")
    else:
        grid, transform = _scan_grid(image, settings.spacing_mm), sitk.Transform(3, sitk.sitkIdentity)

    resampled = sitk.Resample(image, grid, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    out_image = array_from_image(resampled)
    out_lesion = _carried(lesion, grid, transform)
    out_own_brain = _carried(own_brain, grid, transform)
    lap("resample")

    template_brain = array_from_image(template.brain_mask) > 0 if template is not None else None
    brain = _brain_mask(out_image, template_brain, out_own_brain, settings)
    if out_lesion is not None:
        brain |= out_lesion  # a lesion is inside the brain even where its intensity is unusual
    out_image[~brain] = 0.0
    if not out_image.any():
        raise VolumeError(source, "nothing of the scan is left after registration and brain extraction")
    template_dice = dice(brain, template_brain) if template_brain is not None else None
    _check_registration(source, registration, template_dice, settings)
    lap("brain_mask")

    grid_affine = affine_of(grid)
    in_template = template is not None
    save_array_as_nifti(out_image.astype(np.float32), grid_affine, paths.image, in_template, overwrite)
    save_array_as_nifti(brain, grid_affine, paths.brain_mask, in_template, overwrite)
    if out_lesion is not None:
        save_array_as_nifti(out_lesion, grid_affine, paths.lesion_mask, in_template, overwrite)
    if registration is not None:
        with atomic_path(paths.transform, overwrite=overwrite) as tmp:
            sitk.WriteTransform(registration.transform, str(tmp))
    lap("write")
    return PreprocessResult(
        image_path=paths.image,
        brain_mask_path=paths.brain_mask,
        mask_path=paths.lesion_mask if out_lesion is not None else None,
        transform_path=paths.transform,
        template_to_scan=ras_matrix(registration.transform) if registration is not None else None,
        mutual_information=registration.mutual_information if registration is not None else None,
        template_dice=template_dice,
        seconds=seconds,
    )

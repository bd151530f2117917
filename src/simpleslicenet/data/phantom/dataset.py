"""Write a phantom as a BraTS-like folder with a manifest, and reuse it when it already matches.

Layout::

    ROOT/manifest.json
    ROOT/Phantom_00000/Phantom_00000_t2.nii.gz         image (int16, scanner units)
    ROOT/Phantom_00000/Phantom_00000_seg.nii.gz        lesion mask (uint8; all zero when healthy)
    ROOT/Phantom_00000/Phantom_00000_brainmask.nii.gz  brain mask (uint8)

Healthy subjects come first (indices ``0 … n_healthy-1``), lesion subjects after them. Every file is
written under a temporary name and renamed into place, and the manifest is written last, so a folder
with a manifest is always complete; an interrupted run leaves no manifest and is redone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np

from simpleslicenet.data.phantom.contrasts import check_contrast
from simpleslicenet.data.phantom.generator import PhantomOptions, PhantomSubject, generate_subject
from simpleslicenet.data.phantom.lesions import check_families
from simpleslicenet.data.phantom.templates import TEMPLATE_NAME, load_tissue_template
from simpleslicenet._version import __version__
from simpleslicenet.atomic import atomic_write_json
from simpleslicenet.data.nifti import save_nifti_atomic

__all__ = [
    "MANIFEST_NAME",
    "generate_phantom_dataset",
    "nifti_image",
    "read_manifest",
    "subject_id",
    "subject_files",
    "write_subject",
]

MANIFEST_NAME = "manifest.json"
FORMAT = "simpleslicenet-phantom"
# Bump whenever the generator's output changes for the same parameters: old folders are then redone.
GENERATOR_VERSION = 1
DEFAULT_FAMILIES = ("tumour",)


def subject_id(index: int) -> str:
    """Folder and file prefix of subject ``index``."""
    return f"Phantom_{index:05d}"


def subject_files(root: str | os.PathLike, index: int, contrast: str) -> dict[str, Path]:
    """Paths of a subject's ``image``, ``seg`` and ``brainmask`` files."""
    sid = subject_id(index)
    folder = Path(root) / sid
    return {
        "image": folder / f"{sid}_{contrast}.nii.gz",
        "seg": folder / f"{sid}_seg.nii.gz",
        "brainmask": folder / f"{sid}_brainmask.nii.gz",
    }


def nifti_image(array: np.ndarray, affine: np.ndarray, dtype: type) -> nib.Nifti1Image:
    """A phantom volume as a NIfTI image: ``dtype``, millimetres, aligned to MNI152 space (qform and sform)."""
    image = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)  # scanner-anatomical alignment to MNI space
    image.set_sform(affine, code=4)  # MNI152 space
    return image


def write_subject(subject: PhantomSubject, root: str | os.PathLike) -> dict[str, Path]:
    """Write one subject's image (int16), lesion mask and brain mask atomically; return their paths."""
    files = subject_files(root, subject.index, subject.contrast)
    pixels = np.clip(np.rint(subject.image), 0, np.iinfo(np.int16).max)
    save_nifti_atomic(nifti_image(pixels, subject.affine, np.int16), files["image"], overwrite=True)
    save_nifti_atomic(nifti_image(subject.seg, subject.affine, np.uint8), files["seg"], overwrite=True)
    save_nifti_atomic(nifti_image(subject.brain_mask, subject.affine, np.uint8), files["brainmask"], overwrite=True)
    return files


def read_manifest(root: str | os.PathLike) -> dict | None:
    """The folder's manifest, or ``None`` when it has none or it is unreadable."""
    path = Path(root) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def _parameters(
    n_healthy: int,
    n_lesion: int,
    contrast: str,
    seed: int,
    spacing_mm: float,
    options: PhantomOptions,
    families: tuple[str, ...],
) -> dict:
    # A JSON round trip turns tuples into lists, so manifests compare equal to freshly built parameters.
    parameters = {
        "generator_version": GENERATOR_VERSION,
        "n_healthy": n_healthy,
        "n_lesion": n_lesion,
        "contrast": contrast,
        "seed": seed,
        "spacing_mm": spacing_mm,
        "options": asdict(options),
    }
    if families != DEFAULT_FAMILIES:  # tumour-only phantoms keep the manifests they always had
        parameters["lesion_families"] = list(families)
    return json.loads(json.dumps(parameters))


def _complete(root: Path, manifest: dict) -> bool:
    contrast = manifest["parameters"]["contrast"]
    return all(
        path.is_file() for entry in manifest["subjects"] for path in subject_files(root, entry["index"], contrast).values()
    )


def _remove_stale(root: Path, previous: dict, keep: set[str], contrast: str) -> None:
    """Delete what the previous phantom wrote and the new one does not use (only its own files)."""
    old_contrast = str(previous.get("parameters", {}).get("contrast", ""))
    for entry in previous.get("subjects", []):
        sid = str(entry.get("id", "")) if isinstance(entry, dict) else ""
        if not re.fullmatch(r"Phantom_\d{5}", sid) or not (root / sid).is_dir():
            continue
        if sid not in keep:
            shutil.rmtree(root / sid)
        elif old_contrast and old_contrast != contrast:
            (root / sid / f"{sid}_{old_contrast}.nii.gz").unlink(missing_ok=True)


def generate_phantom_dataset(
    root: str | os.PathLike,
    n_healthy: int = 20,
    n_lesion: int = 20,
    contrast: str = "t2",
    seed: int = 0,
    spacing_mm: float = 1.0,
    options: PhantomOptions | None = None,
    progress: bool = True,
    lesion_families: tuple[str, ...] | list[str] = ("tumour",),
) -> Path:
    """Generate (or reuse) a phantom dataset in ``root``.

    If ``root`` already holds a complete phantom made with the same parameters, nothing is written.
    Otherwise every subject is (re)written there, subject folders of a previous phantom that the new
    one does not have are removed, and the manifest is written last.

    Args:
        root: Output folder (created if needed).
        n_healthy: Number of healthy subjects (indices ``0 … n_healthy-1``).
        n_lesion: Number of lesion subjects (the indices after them).
        contrast: ``"t1"``, ``"t1ce"``, ``"t2"`` or ``"flair"``.
        seed: Seed of the phantom; subject ``i`` depends only on ``(seed, i)``.
        spacing_mm: Isotropic voxel size (1.0: the MNI152 grid, 197×233×189 voxels).
        options: Anatomy, scanner and lesion settings (defaults when ``None``).
        progress: Show a progress bar.
        lesion_families: Families of the lesion subjects, taken in turn (the ``k``-th lesion subject
            gets ``lesion_families[k % len(lesion_families)]``); see
            :data:`~simpleslicenet.data.phantom.lesions.LESION_FAMILIES`.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: Unknown contrast or family, negative counts, no subjects at all, or a bad spacing.
    """
    contrast = check_contrast(contrast)
    families = check_families(lesion_families)
    if n_healthy < 0 or n_lesion < 0 or n_healthy + n_lesion == 0:
        msg = f"need a non-negative number of healthy and lesion subjects, not both zero (got {n_healthy}, {n_lesion})"
        raise ValueError(msg)
    options = options or PhantomOptions()
    template = load_tissue_template(spacing_mm)  # also validates the spacing
    root = Path(root)
    parameters = _parameters(int(n_healthy), int(n_lesion), contrast, int(seed), float(spacing_mm), options, families)

    previous = read_manifest(root)
    if previous is not None and previous.get("parameters") == parameters and _complete(root, previous):
        return root

    root.mkdir(parents=True, exist_ok=True)
    if previous is not None:
        # Without a manifest the folder reads as incomplete until the new phantom is fully written.
        (root / MANIFEST_NAME).unlink(missing_ok=True)

    labels = [False] * n_healthy + [True] * n_lesion
    family_of = {n_healthy + k: families[k % len(families)] for k in range(n_lesion)}
    indices = range(len(labels))
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc=f"phantom {contrast} {spacing_mm:g} mm", unit="subject")
    subjects = []
    for index in indices:
        subject = generate_subject(
            index, labels[index], contrast, seed, spacing_mm, options, family=family_of.get(index, "tumour")
        )
        write_subject(subject, root)
        subjects.append(
            {
                "index": index,
                "id": subject_id(index),
                "label": "lesion" if labels[index] else "healthy",
                "family": subject.family,
                "files": {k: str(p.relative_to(root)) for k, p in subject_files(root, index, contrast).items()},
                "brain_voxels": int(subject.brain_mask.sum()),
                "lesion_voxels": int(subject.seg.sum()),
                "lesion_volume_ml": round(int(subject.seg.sum()) * subject.spacing_mm**3 / 1000.0, 4),
                "intensities": subject.intensities,
                "noise_std": subject.noise_std,
                "lesions": subject.lesions,
            }
        )

    if previous is not None:
        _remove_stale(root, previous, keep={entry["id"] for entry in subjects}, contrast=contrast)

    manifest = {
        "format": FORMAT,
        "package_version": __version__,
        "template": TEMPLATE_NAME,
        "parameters": parameters,
        "shape": list(template.shape),
        "affine": np.asarray(template.affine).round(6).tolist(),
        "subjects": subjects,
    }
    atomic_write_json(root / MANIFEST_NAME, manifest)
    return root


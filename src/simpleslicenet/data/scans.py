"""The dataset naming rule, in one place: which files are scans, and which files belong to a scan.

``NAME.nii.gz`` (or ``NAME.nii``) is a scan; ``NAME_mask.nii.gz`` beside it is its lesion mask and
``NAME_brain.nii.gz`` its brain mask. Files whose name ends in ``_mask`` or ``_brain`` are never scans,
nor are the package's own outputs (``NAME_anomaly_map``, ``NAME_anomaly_mask``), hidden files or
temporary files. Every datamodule and ``simpleslicenet predict`` list scans with these functions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from simpleslicenet.data.nifti import NIFTI_SUFFIXES, VolumeError

__all__ = [
    "ScanFiles",
    "nifti_stem",
    "companion_file",
    "list_scans",
    "scans_from",
    "MASK_SUFFIX",
    "BRAIN_SUFFIX",
    "OUTPUT_SUFFIXES",
]

MASK_SUFFIX = "_mask"
BRAIN_SUFFIX = "_brain"
# What predict and the map writer write next to a scan's name: never read back as a scan.
OUTPUT_SUFFIXES = ("_anomaly_map", "_anomaly_mask", "_pvalue_map")


@dataclass(frozen=True)
class ScanFiles:
    """A scan and the files that belong to it by the naming rule.

    Args:
        name: Scan name without the NIfTI suffix (``NAME`` of ``NAME.nii.gz``).
        image_path: The scan.
        mask_path: Lesion mask ``NAME_mask.nii[.gz]`` beside the scan, if present.
        brain_mask_path: Brain mask ``NAME_brain.nii[.gz]`` beside the scan, if present.
    """

    name: str
    image_path: Path
    mask_path: Path | None
    brain_mask_path: Path | None


def nifti_stem(path: str | os.PathLike) -> str | None:
    """``NAME`` of ``NAME.nii`` / ``NAME.nii.gz``; ``None`` if the file is not a NIfTI file."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def companion_file(folder: Path, name: str) -> Path | None:
    """``folder/name.nii.gz`` or ``folder/name.nii`` if either exists."""
    for suffix in NIFTI_SUFFIXES:
        candidate = folder / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _scan_files(path: Path, name: str) -> ScanFiles:
    return ScanFiles(
        name=name,
        image_path=path,
        mask_path=companion_file(path.parent, name + MASK_SUFFIX),
        brain_mask_path=companion_file(path.parent, name + BRAIN_SUFFIX),
    )


def list_scans(folder: str | os.PathLike, recursive: bool = False) -> list[ScanFiles]:
    """Scans in a folder by the naming rule, sorted by path.

    Args:
        folder: Folder to list.
        recursive: Also look in sub-folders.

    Raises:
        VolumeError: The folder does not exist; a mask has no scan of the same ``NAME`` beside it
            (almost always a naming mistake that would otherwise silently drop a lesion mask); or two
            files are the same scan (``NAME.nii`` beside ``NAME.nii.gz``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeError(folder, "folder does not exist")
    files = folder.rglob("*") if recursive else folder.iterdir()
    scans: dict[tuple[Path, str], ScanFiles] = {}
    for path in sorted(files):
        name = nifti_stem(path)
        if name is None or path.name.startswith(".") or name.endswith(OUTPUT_SUFFIXES):
            continue
        if not path.is_file():
            # A folder, broken link or link loop with a scan's name is a mistake worth naming.
            if recursive and path.is_dir():
                continue  # its files are listed on their own
            raise VolumeError(path, "has a scan's name but is not a regular file")
        if name.endswith((MASK_SUFFIX, BRAIN_SUFFIX)):
            owner = name.rsplit("_", 1)[0]
            if companion_file(path.parent, owner) is None:
                raise VolumeError(path, f"mask without a scan: expected {owner}.nii.gz beside it")
            continue
        key = (path.parent, name)
        if key in scans:
            raise VolumeError(path, f"the same scan twice: {scans[key].image_path.name} and {path.name}; keep one")
        scans[key] = _scan_files(path, name)
    return sorted(scans.values(), key=lambda scan: scan.image_path)


def scans_from(inputs: str | os.PathLike) -> list[ScanFiles]:
    """A single scan file, or every scan of a folder (see :func:`list_scans`); a clear error if none."""
    inputs = Path(inputs)
    if inputs.is_file():
        name = nifti_stem(inputs)
        if name is None:
            raise VolumeError(inputs, "not a NIfTI file: expected a name ending in .nii or .nii.gz")
        return [_scan_files(inputs, name)]
    if inputs.is_dir():
        scans = list_scans(inputs)
        if not scans:
            raise VolumeError(inputs, "folder holds no NIfTI scans (.nii or .nii.gz)")
        return scans
    raise VolumeError(inputs, "no such file or folder")

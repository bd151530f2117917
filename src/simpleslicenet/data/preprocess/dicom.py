"""DICOM series in: find them, read them with SimpleITK, write them as NIfTI with their geometry kept.

The rule is simple: a folder that directly holds DICOM files is one series. Files are recognised by
their content (the ``DICM`` marker after the 128-byte preamble), not by their name, since many
scanners and archives write files without an extension. SimpleITK's ``ImageSeriesReader`` (GDCM)
sorts the slices along the slice normal and builds the volume's origin, direction and spacing from
ImagePositionPatient, ImageOrientationPatient and PixelSpacing; the slice positions are checked here
for even spacing first, because a series with a gap would otherwise be read with a wrong geometry.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from simpleslicenet.data.nifti import VolumeError
from simpleslicenet.data.preprocess.images import save_image_as_nifti

__all__ = ["is_dicom_file", "holds_dicom", "dicom_series_folders", "read_dicom_series", "convert_dicom_series"]

# Relative tolerance on the distance between neighbouring slices.
SLICE_GAP_TOLERANCE = 0.05


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether a file is a DICOM part-10 image file (preamble followed by ``DICM``; not a DICOMDIR)."""
    path = Path(path)
    # A DICOMDIR is a DICOM file too, but an index of a media's series, not a slice of one.
    if not path.is_file() or path.name.startswith(".") or path.name.upper() == "DICOMDIR":
        return False
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def holds_dicom(folder: str | os.PathLike) -> bool:
    """Whether a folder directly holds at least one DICOM file."""
    folder = Path(folder)
    return folder.is_dir() and any(is_dicom_file(child) for child in folder.iterdir())


def dicom_series_folders(root: str | os.PathLike) -> list[Path]:
    """Every folder at or below ``root`` that directly holds DICOM files, sorted.

    Raises:
        VolumeError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise VolumeError(root, "folder does not exist")
    folders = [root, *(p for p in root.rglob("*") if p.is_dir() and not p.name.startswith("."))]
    return sorted(folder for folder in folders if holds_dicom(folder))


def _slice_positions(files: list[str]) -> np.ndarray:
    """Positions of the slices along their normal (mm), in the reader's order."""
    import pydicom

    positions = []
    normal = None
    for name in files:
        try:
            header = pydicom.dcmread(name, stop_before_pixels=True)
        except Exception as error:  # pydicom raises several types for damaged files
            raise VolumeError(name, f"unreadable DICOM file ({type(error).__name__}: {error})") from error
        if "ImagePositionPatient" not in header or "ImageOrientationPatient" not in header:
            raise VolumeError(name, "DICOM slice without ImagePositionPatient/ImageOrientationPatient")
        if normal is None:
            orientation = np.asarray(header.ImageOrientationPatient, dtype=np.float64)
            normal = np.cross(orientation[:3], orientation[3:])
        positions.append(float(np.dot(normal, np.asarray(header.ImagePositionPatient, dtype=np.float64))))
    return np.asarray(positions)


def _check_even_spacing(files: list[str], folder: Path) -> None:
    positions = np.sort(_slice_positions(files))
    gaps = np.diff(positions)
    if gaps.size == 0:
        return
    if np.any(gaps < 1e-3):
        raise VolumeError(folder, "two DICOM slices share one position (repeated slices or several series mixed)")
    typical = float(np.median(gaps))
    if np.any(np.abs(gaps - typical) > SLICE_GAP_TOLERANCE * typical):
        raise VolumeError(
            folder,
            f"DICOM slices are not evenly spaced (gaps from {gaps.min():.3g} to {gaps.max():.3g} mm): "
            "missing slices or several series in one folder",
        )


def read_dicom_series(folder: str | os.PathLike) -> sitk.Image:
    """Read the one DICOM series of a folder as a 3-D SimpleITK image (LPS geometry from the headers).

    Args:
        folder: Folder holding the series' slice files (and nothing of another series).

    Raises:
        VolumeError: No series, several series, a single 2-D slice, colour images, unevenly spaced
            slices, or files the reader cannot decode (the message names the folder or file).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeError(folder, "DICOM input must be a folder holding one series")
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise VolumeError(folder, "holds no readable DICOM image series")
    if len(series) > 1:
        raise VolumeError(
            folder, f"holds {len(series)} DICOM series; a folder must hold one series (move each into its own folder)"
        )
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise VolumeError(folder, f"DICOM series could not be read ({str(error).strip().splitlines()[-1]})") from error
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(folder, "colour DICOM images are not MRI volumes")
    if image.GetDimension() != 3 or image.GetSize()[2] < 2:
        raise VolumeError(folder, "a single DICOM slice is not a volume (a series needs at least two slices)")
    if len(files) > 1:
        _check_even_spacing(files, folder)
    return image


def convert_dicom_series(folder: str | os.PathLike, out_path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a folder's DICOM series as one NIfTI file, voxel values and geometry unchanged.

    Args:
        folder: The series folder.
        out_path: Destination ``.nii.gz``.
        overwrite: Replace an existing file.

    Raises:
        VolumeError: See :func:`read_dicom_series`.
        FileExistsError: ``out_path`` exists and ``overwrite`` is false.
    """
    return save_image_as_nifti(read_dicom_series(folder), out_path, overwrite=overwrite)

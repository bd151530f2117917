"""NIfTI files in and out: the guarded read path and the atomic writer.

Everything that touches a NIfTI file on disk lives here. Reading ends in a float32 canonical-RAS
array plus its :class:`~simpleslicenet.data.geometry.VolumeGeometry`, or in a :class:`VolumeError`
that names the file and the problem; no other exception type leaves the read functions for a bad
file. Reading goes in two stages:

1. :func:`read_header` opens the file and checks everything the header promises before a single
   voxel is read: a regular ``.nii``/``.nii.gz`` file, a NIfTI-1 or NIfTI-2 header, extensions that fit
   before the voxel data, 3-D data (or 4-D with one volume), a real-valued data type, voxel sizes of at
   least 10 µm, a finite non-singular affine that agrees with them, no more voxels than
   :func:`max_voxels` allows, and (uncompressed files) enough bytes.
2. The voxel data is read (at most the bytes the header names, so a damaged compressed file costs no
   more memory than it really holds), scaled, converted to float32, optionally resampled (the
   resampled grid is held to the same voxel limit first) and reoriented to RAS.

Writing puts an array back into the file's own orientation, affine and grid, atomically (see
:mod:`simpleslicenet.atomic`).
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from isal import igzip, isal_zlib

from simpleslicenet.atomic import atomic_path
from simpleslicenet.data.geometry import VolumeGeometry

__all__ = [
    "NIFTI_SUFFIXES",
    "DEFAULT_MAX_VOXELS",
    "MAX_VOXELS_ENV",
    "VolumeError",
    "NiftiHeader",
    "voxel_limit",
    "check_same_grid",
    "check_voxel_count",
    "read_header",
    "read_nifti",
    "read_mask",
    "write_nifti",
    "save_nifti_atomic",
    "voxel_spacing",
    "common_spacing",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")  # longest first, so ``.nii.gz`` is matched before ``.nii``

# A voxel size within this relative tolerance of the wanted spacing is not resampled.
SPACING_TOLERANCE = 0.01

# 512³ voxels: a 0.5 mm whole head fits, and a float32 copy stays at 512 MiB.
DEFAULT_MAX_VOXELS = 2**27
MAX_VOXELS_ENV = "SIMPLESLICENET_MAX_VOXELS"

# Affines whose axes are this close to coplanar (|det| over the product of the axis lengths) are singular.
_MIN_AXIS_INDEPENDENCE = 1e-6
# Voxel sizes below 10 µm belong to no MRI scan: a header that says so is damaged.
MIN_VOXEL_MM = 0.01
# The affine's voxel sizes may differ from the header's (an sform written after resampling), but a
# factor of this size means one of them is wrong, and the scan would be read at the wrong scale.
MAX_AFFINE_ZOOM_RATIO = 100.0
# A header extension is an 8-byte (size, code) pair and its content, 16 bytes at the least.
_MIN_EXTENSION_BYTES = 16
# Resampling may make at most this many voxels per voxel of the file (16× finer along every axis):
# more means the header's voxel sizes are wrong, and a tiny file would cost seconds and gigabytes.
MAX_RESAMPLING_GROWTH = 16**3
# After the voxel data, a compressed file is read on to its end (at most this much) so that gzip
# checks its CRC: a damaged stream is refused instead of loading altered voxels.
_GZIP_TRAILER_READ = 1 << 20
_READ_CHUNK = 16 << 20
# Maps are written at ISA-L's level 1: about ten times zlib level 1's speed on float maps, files no larger.
_GZIP_WRITE_LEVEL = 1
_HEADER_SIZES = {348: nib.Nifti1Image, 540: nib.Nifti2Image}


class VolumeError(ValueError):
    """A scan or mask that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)


def voxel_limit() -> int:
    """Most voxels a scan, a mask, a resampled grid or a model grid may have.

    :data:`DEFAULT_MAX_VOXELS` (2**27, i.e. 512³) unless the environment variable
    ``SIMPLESLICENET_MAX_VOXELS`` sets another positive whole number.

    Raises:
        ValueError: The environment variable is not a positive whole number.
    """
    value = os.environ.get(MAX_VOXELS_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_VOXELS
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        msg = f"{MAX_VOXELS_ENV} must be a positive whole number of voxels, got {value!r}"
        raise ValueError(msg)
    return limit


def check_voxel_count(
    shape: Iterable[int],
    source: str | os.PathLike | None,
    what: str = "image",
    limit: int | None = None,
) -> int:
    """Refuse a grid with more voxels than the limit, before anything of that size is allocated.

    Args:
        shape: Grid size along each axis.
        source: File the grid comes from (named in the error).
        what: What the grid is, for the message (``"image"``, ``"resampled grid"``, ``"model grid"``).
        limit: Most voxels allowed; default :func:`voxel_limit`.

    Returns:
        The number of voxels.

    Raises:
        VolumeError: The grid holds more voxels than the limit.
    """
    limit = voxel_limit() if limit is None else limit
    count = 1
    for size in shape:
        count *= int(size)  # Python integers: no overflow, however large the claim
    if count > limit:
        raise VolumeError(
            source,
            f"{what} of {count:,} voxels exceeds the limit of {limit:,} "
            f"(set {MAX_VOXELS_ENV} to allow larger volumes)",
        )
    return count


@dataclass(frozen=True, eq=False)
class NiftiHeader:
    """What a NIfTI header promises, checked (see :func:`read_header`); no voxel has been read.

    Args:
        path: The file.
        shape: Spatial shape in the file's own axes ``(i, j, k)``.
        dtype: Data type of the stored voxels.
        affine: Voxel-to-world affine of the file, 4×4.
        zooms: Voxel size in mm along the file's three axes.
        canonical_shape: Shape once reoriented to RAS.
        canonical_affine: Affine of the RAS-reoriented array.
    """

    path: Path
    shape: tuple[int, int, int]
    dtype: np.dtype
    affine: np.ndarray
    zooms: tuple[float, float, float]
    canonical_shape: tuple[int, int, int]
    canonical_affine: np.ndarray
    _image: nib.Nifti1Image = field(repr=False, compare=False)
    _orientation: np.ndarray = field(repr=False, compare=False)
    _data_shape: tuple[int, ...] = field(repr=False, compare=False)
    _scaling: tuple[float | None, float | None] = field(repr=False, compare=False)

    def geometry(self) -> VolumeGeometry:
        """Geometry of the scan as :func:`read_nifti` would report it without resampling."""
        return VolumeGeometry(
            original_shape=self.canonical_shape,
            affine=self.affine.copy(),
            canonical_affine=self.canonical_affine.copy(),
            path=str(self.path),
        )


@contextmanager
def _quiet() -> Iterator[None]:
    """No warnings, floating-point messages or nibabel header-repair log lines while a file is read."""
    nibabel_logger = nib.imageglobals.logger
    was_disabled = nibabel_logger.disabled
    nibabel_logger.disabled = True
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            yield
    finally:
        nibabel_logger.disabled = was_disabled


def _check_path(path: Path) -> None:
    try:
        status = path.stat()
    except FileNotFoundError:
        problem = "broken symbolic link (its target does not exist)" if path.is_symlink() else "file does not exist"
        raise VolumeError(path, problem) from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise VolumeError(path, "symbolic link loop, not a file") from None
        raise VolumeError(path, f"cannot be opened ({error.strerror or error})") from None
    if stat.S_ISDIR(status.st_mode):
        raise VolumeError(path, "is a folder, expected a NIfTI file (.nii or .nii.gz)")
    if not stat.S_ISREG(status.st_mode):
        # A pipe or device would block or never end; only regular files are read.
        raise VolumeError(path, "not a regular file (a pipe, socket or device)")
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise VolumeError(path, "not a NIfTI file: expected a name ending in .nii or .nii.gz")


def _is_gzip(path: Path) -> bool:
    return path.name.endswith(".gz")


def _open_raw(path: Path):  # noqa: ANN202 - a binary file object
    # ISA-L's gzip reader: the standard format, decompressed about twice as fast as by zlib.
    return igzip.open(path, "rb") if _is_gzip(path) else path.open("rb")


def _image_class(path: Path) -> type[nib.Nifti1Image]:
    """NIfTI-1 or NIfTI-2, from the header-size field (either byte order); nothing else is parsed."""
    with _open_raw(path) as handle:
        first = handle.read(4)
    if len(first) < 4:
        msg = f"file holds only {len(first)} bytes, too short for a NIfTI header"
        raise ValueError(msg)
    for order in ("<", ">"):
        size = int(np.frombuffer(first, dtype=f"{order}i4")[0])
        if size in _HEADER_SIZES:
            return _HEADER_SIZES[size]
    little = int(np.frombuffer(first, dtype="<i4")[0])
    msg = f"header size field is {little}, expected 348 (NIfTI-1) or 540 (NIfTI-2)"
    raise ValueError(msg)


def _check_extensions(path: Path, image_class: type[nib.Nifti1Image]) -> None:
    """Refuse header extensions that contradict the data offset, before nibabel reads (and trusts) them.

    Each extension must fit between the header and the voxel data and hold the bytes it declares, read
    in bounded chunks: a damaged size can neither shift the voxels nor make the reader allocate it.
    """
    header_class = image_class.header_class
    header_bytes = header_class.template_dtype.itemsize
    with _open_raw(path) as handle:
        raw = handle.read(header_bytes + 4)
        if len(raw) < header_bytes + 4 or raw[header_bytes : header_bytes + 1] == b"\x00":
            return  # no extension flag: nothing follows the header but the data
        header = header_class(raw[:header_bytes], check=False)
        offset = float(header["vox_offset"])
        start = header_bytes + 4
        if not np.isfinite(offset) or offset < start + _MIN_EXTENSION_BYTES:
            msg = (
                f"the header's extension flag is set, but the voxel data offset ({offset:g}) leaves no room "
                f"for an extension between byte {start} and the data"
            )
            raise VolumeError(path, msg)
        if not _is_gzip(path) and offset > path.stat().st_size:
            msg = f"voxel data offset {offset:g} lies past the end of the file ({path.stat().st_size:,} bytes)"
            raise VolumeError(path, msg)
        order = header.endianness
        position, end = start, int(offset)
        while end - position >= _MIN_EXTENSION_BYTES:
            size = int(np.frombuffer(handle.read(8).ljust(8, b"\x00"), dtype=f"{order}i4")[0])
            if size < _MIN_EXTENSION_BYTES or size > end - position:
                msg = (
                    f"header extension at byte {position} declares {size:,} bytes, but {end - position:,} "
                    "lie between it and the voxel data"
                )
                raise VolumeError(path, msg)
            remaining = size - 8
            while remaining > 0:
                chunk = handle.read(min(_READ_CHUNK, remaining))
                if not chunk:
                    msg = f"header extension at byte {position} runs past the end of the file"
                    raise VolumeError(path, msg)
                remaining -= len(chunk)
            position += size


def _load_header_image(path: Path) -> nib.Nifti1Image:
    try:
        with _quiet():
            image_class = _image_class(path)
            _check_extensions(path, image_class)
            return image_class.from_filename(str(path), mmap=False)
    except VolumeError:
        raise
    except MemoryError as error:
        raise VolumeError(path, "not enough memory to read the header and its extensions") from error
    except Exception as error:  # nibabel, gzip and numpy raise many unrelated types for damaged headers
        raise VolumeError(path, f"not a readable NIfTI file ({type(error).__name__}: {error})") from error


def _checked_affine(path: Path, affine: np.ndarray | None) -> np.ndarray:
    if affine is None or np.shape(affine) != (4, 4):
        raise VolumeError(path, "header holds no usable voxel-to-world affine")
    affine = np.asarray(affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise VolumeError(path, "affine holds NaN or infinite values (sform/qform of the header)")
    axes = affine[:3, :3]
    lengths = np.linalg.norm(axes, axis=0)
    with np.errstate(all="ignore"):
        independence = abs(float(np.linalg.det(axes))) / float(np.prod(lengths)) if lengths.all() else 0.0
    if not np.isfinite(independence) or independence < _MIN_AXIS_INDEPENDENCE:
        raise VolumeError(path, "affine is singular: its voxel axes do not span 3-D space (sform/qform of the header)")
    return affine


def _checked_shape(path: Path, data_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(data_shape) > 4 or len(data_shape) < 3 or (len(data_shape) == 4 and data_shape[3] != 1):
        raise VolumeError(path, f"expected a 3-D scan, got shape {data_shape} ({len(data_shape)}-D)")
    if min(data_shape) < 1:
        raise VolumeError(path, f"shape {data_shape} has an empty axis")
    return data_shape[0], data_shape[1], data_shape[2]


def _canonical_grid(
    path: Path, shape: tuple[int, int, int], affine: np.ndarray
) -> tuple[np.ndarray, tuple[int, int, int], np.ndarray]:
    """Orientation that brings the file to RAS, with the resulting shape and affine (no data needed)."""
    orientation = nib.orientations.io_orientation(affine)
    if not np.isfinite(orientation).all():
        raise VolumeError(path, "cannot tell the scan's orientation from its affine")
    # apply_orientation moves input axis argsort(orientation[:, 0])[j] to output axis j.
    order = np.argsort(orientation[:, 0])
    canonical_shape = tuple(int(shape[axis]) for axis in order)
    canonical_affine = affine @ nib.orientations.inv_ornt_aff(orientation, shape)
    return orientation, canonical_shape, canonical_affine


def read_header(path: str | os.PathLike, max_voxels: int | None = None) -> NiftiHeader:
    """Open a NIfTI file and check its header; no voxel data is read.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        max_voxels: Most voxels allowed; default :func:`voxel_limit`.

    Raises:
        VolumeError: Missing file, folder, link loop, pipe or device, wrong name, unreadable or
            non-NIfTI header, header extensions that do not fit before the voxel data, more than 3-D
            data (4-D only with a single volume), a complex, RGB or other non-real data type,
            non-positive, non-finite or sub-10-µm voxel sizes, a NaN/infinite or singular affine, an
            affine whose voxel sizes contradict the header's by more than 100×, too many voxels, a
            data offset inside the header, or an uncompressed file shorter than its header says.
    """
    path = Path(path)
    _check_path(path)
    image = _load_header_image(path)
    with _quiet():
        return _checked_header(path, image, max_voxels)


def _checked_header(path: Path, image: nib.Nifti1Image, max_voxels: int | None) -> NiftiHeader:
    header = image.header
    try:
        data_shape = tuple(int(s) for s in header.get_data_shape())
        dtype = np.dtype(header.get_data_dtype())
        zooms = tuple(float(z) for z in header.get_zooms()[:3])
        # The image's own header copy forgets the data offset; the array proxy keeps what will be read.
        proxy = image.dataobj
        offset = int(proxy.offset)
        scaling = (proxy.slope, proxy.inter)
    except Exception as error:  # damaged fields surface as assorted nibabel / numpy errors
        raise VolumeError(path, f"not a readable NIfTI file ({type(error).__name__}: {error})") from error
    shape = _checked_shape(path, data_shape)
    if dtype.kind not in "iuf" or dtype.fields is not None:
        raise VolumeError(
            path, f"voxel data type {dtype} is not a real number type (complex or RGB scans are not supported)"
        )
    check_voxel_count(data_shape, path, "image", limit=max_voxels)
    if len(zooms) != 3 or not all(np.isfinite(z) and z > 0 for z in zooms):
        raise VolumeError(path, f"voxel sizes {zooms} in the header are not positive finite millimetres")
    if min(zooms) < MIN_VOXEL_MM:
        raise VolumeError(path, f"voxel sizes {zooms} in the header lie below {MIN_VOXEL_MM} mm: no MRI scan has them")
    affine = _checked_affine(path, image.affine)
    lengths = np.linalg.norm(affine[:3, :3], axis=0)
    if min(lengths) < MIN_VOXEL_MM:
        raise VolumeError(path, f"the affine's voxel sizes ({_axis_lengths(affine)}) lie below {MIN_VOXEL_MM} mm")
    ratios = lengths / np.asarray(zooms)
    if ratios.max() > MAX_AFFINE_ZOOM_RATIO or ratios.min() < 1 / MAX_AFFINE_ZOOM_RATIO:
        header_sizes = " × ".join(f"{z:.4g}" for z in zooms)
        raise VolumeError(
            path,
            f"the affine's voxel sizes ({_axis_lengths(affine)}) contradict the header's ({header_sizes} mm) "
            f"by more than {MAX_AFFINE_ZOOM_RATIO:g}×",
        )
    first_data_byte = int(getattr(header, "single_vox_offset", 352))
    if offset < first_data_byte:
        # nibabel would read the header itself as voxels here.
        raise VolumeError(
            path, f"voxel data offset {offset} lies inside the header (it must be at least {first_data_byte})"
        )
    if not _is_gzip(path):
        needed = offset + int(np.prod(data_shape, dtype=object)) * dtype.itemsize
        available = path.stat().st_size
        if available < needed:
            raise VolumeError(
                path,
                f"truncated or corrupt data: the header needs {needed:,} bytes, the file holds {available:,}",
            )
    orientation, canonical_shape, canonical_affine = _canonical_grid(path, shape, affine)
    return NiftiHeader(
        path=path,
        shape=shape,
        dtype=dtype,
        affine=affine,
        zooms=zooms,
        canonical_shape=canonical_shape,
        canonical_affine=canonical_affine,
        _image=image,
        _orientation=orientation,
        _data_shape=data_shape,
        _scaling=scaling,
    )


def voxel_spacing(img: nib.Nifti1Image | NiftiHeader) -> tuple[float, float, float]:
    """Voxel size in mm along the image's three axes (a nibabel image or a checked header)."""
    if isinstance(img, NiftiHeader):
        return img.zooms
    return tuple(float(z) for z in img.header.get_zooms()[:3])


def _needs_resampling(header: NiftiHeader, spacing_mm: float | None) -> bool:
    if spacing_mm is None:
        return False
    return any(abs(z - spacing_mm) > SPACING_TOLERANCE * spacing_mm for z in header.zooms)


def _read_voxels(header: NiftiHeader) -> np.ndarray:
    """The scaled voxel data as float32 in the file's axes, read with no more memory than the file holds."""
    n_bytes = int(np.prod(header._data_shape, dtype=object)) * header.dtype.itemsize
    chunks, received = [], 0
    with _open_raw(header.path) as handle:
        handle.seek(int(header._image.dataobj.offset))
        # In chunks: memory grows with the bytes that really arrive, not with what the header claims.
        while received < n_bytes:
            chunk = handle.read(min(_READ_CHUNK, n_bytes - received))
            if not chunk:
                break
            chunks.append(chunk)
            received += len(chunk)
        if received == n_bytes and _is_gzip(header.path):
            handle.read(_GZIP_TRAILER_READ)  # reaching the end makes gzip verify the CRC
    raw = b"".join(chunks)
    del chunks
    if len(raw) != n_bytes:
        msg = f"the header needs {n_bytes:,} bytes of voxel data, the file holds {len(raw):,}"
        raise EOFError(msg)
    stored = np.frombuffer(raw, dtype=header.dtype).reshape(header._data_shape, order="F")
    scaled = nib.volumeutils.apply_read_scaling(stored, *header._scaling)
    return np.asarray(scaled, dtype=np.float32).reshape(header.shape, order="A")


def _axis_lengths(affine: np.ndarray) -> str:
    return " × ".join(f"{length:.4g}" for length in np.linalg.norm(affine[:3, :3], axis=0)) + " mm"


def _resampled_grid(
    header: NiftiHeader, spacing_mm: float, limit: int
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the RAS grid at ``spacing_mm`` that holds the whole scan (as nibabel builds it).

    Raises:
        VolumeError: The grid would hold more than ``limit`` voxels.
    """
    corners = np.array(list(itertools.product(*[(0, n - 1) for n in header.shape])), dtype=np.float64)
    world = corners @ header.affine[:3, :3].T + header.affine[:3, 3]
    low, high = world.min(axis=0), world.max(axis=0)
    sizes = np.ceil((high - low) / spacing_mm) + 1
    # Checked as floats: an absurd voxel size must not overflow the integer conversion.
    count = float(np.prod(sizes))
    if not np.isfinite(count) or count > limit:
        raise VolumeError(
            header.path,
            f"resampled grid at {spacing_mm:g} mm would hold {count:.4g} voxels, over the limit of {limit:,} "
            f"(set {MAX_VOXELS_ENV} to allow larger volumes)",
        )
    growth = count / float(np.prod(header.shape))
    if growth > MAX_RESAMPLING_GROWTH:
        raise VolumeError(
            header.path,
            f"resampling to {spacing_mm:g} mm would make {growth:.4g} voxels of each voxel of the file (at most "
            f"{MAX_RESAMPLING_GROWTH:,}); the voxel sizes of its affine ({_axis_lengths(header.affine)}) look wrong",
        )
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    affine[:3, 3] = low
    return (int(sizes[0]), int(sizes[1]), int(sizes[2])), affine


def _check_scan_values(path: Path, data: np.ndarray) -> None:
    """Refuse NaN or infinite voxels and an all-zero or constant scan.

    Judged on the file's own voxels: resampling would add a zero edge to a constant scan and pass it.
    """
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise VolumeError(path, f"contains {bad} NaN or infinite voxels")
    low, high = float(data.min()), float(data.max())
    if low == high == 0.0:
        raise VolumeError(path, "all voxels are zero (empty scan)")
    if low == high:
        raise VolumeError(path, f"every voxel has the same value ({low:g}): a constant image, not a scan")


def _read_canonical(
    header: NiftiHeader,
    spacing_mm: float | None,
    order: int,
    max_voxels: int | None,
    check_values: Callable[[Path, np.ndarray], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int] | None]:
    """Voxels of a checked header as a float32 RAS array, its affine, and the file shape if resampled.

    ``check_values`` sees the file's voxels before anything is made of them.
    """
    path = header.path
    try:
        with _quiet():
            data = _read_voxels(header)
            if check_values is not None:
                check_values(path, data)
            if not _needs_resampling(header, spacing_mm):
                canonical = nib.orientations.apply_orientation(data, header._orientation)
                return canonical, header.canonical_affine.copy(), None
            limit = voxel_limit() if max_voxels is None else max_voxels
            shape, affine = _resampled_grid(header, float(spacing_mm), limit)
            from nibabel.processing import resample_from_to

            resampled = resample_from_to(nib.Nifti1Image(data, header.affine), (shape, affine), order=order, cval=0)
            return np.asarray(resampled.dataobj, dtype=np.float32), affine, header.shape
    except VolumeError:
        raise
    except MemoryError as error:
        raise VolumeError(path, "not enough memory to read the voxel data") from error
    except Exception as error:  # gzip, zlib, numpy and scipy raise many unrelated types for damaged data
        raise VolumeError(path, f"truncated or corrupt data ({type(error).__name__}: {error})") from error


def read_nifti(
    path: str | os.PathLike,
    spacing_mm: float | None = None,
    max_voxels: int | None = None,
) -> tuple[np.ndarray, VolumeGeometry]:
    """Read a scan as a float32 canonical-RAS array and its geometry.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        spacing_mm: Bring the scan to this isotropic voxel size (trilinear) unless it already has it.
        max_voxels: Most voxels the file and the resampled grid may hold; default :func:`voxel_limit`.

    Raises:
        VolumeError: Everything :func:`read_header` refuses, truncated or corrupt voxel data, NaN/Inf
            voxels, or an all-zero or constant scan.
    """
    header = read_header(path, max_voxels=max_voxels)
    data, canonical_affine, file_shape = _read_canonical(
        header, spacing_mm, order=1, max_voxels=max_voxels, check_values=_check_scan_values
    )
    geometry = VolumeGeometry(
        original_shape=tuple(int(s) for s in data.shape),
        affine=header.affine.copy(),
        canonical_affine=canonical_affine,
        path=str(header.path),
        file_shape=file_shape,
    )
    return data, geometry


def check_same_grid(
    path: str | os.PathLike,
    shape: tuple[int, ...],
    affine: np.ndarray,
    reference: VolumeGeometry,
    atol: float = 1e-3,
) -> None:
    """Refuse a mask whose canonical grid differs from its scan's.

    Args:
        path: The mask file.
        shape: The mask's canonical shape.
        affine: The mask's canonical affine.
        reference: Geometry of its scan.
        atol: Tolerance on the affine, in mm.

    Raises:
        VolumeError: Shapes differ, or affines differ by more than ``atol``.
    """
    if tuple(shape) != tuple(reference.original_shape):
        raise VolumeError(
            path,
            f"mask shape {tuple(shape)} differs from its scan's {tuple(reference.original_shape)} ({reference.path})",
        )
    if not np.allclose(affine, reference.canonical_affine, atol=atol):
        raise VolumeError(path, f"mask affine differs from its scan's ({reference.path})")


def read_mask(
    path: str | os.PathLike,
    reference: VolumeGeometry,
    spacing_mm: float | None = None,
    atol: float = 1e-3,
    max_voxels: int | None = None,
) -> np.ndarray:
    """Read a label/mask file that must share its scan's grid; returns a boolean canonical array.

    Args:
        path: The mask file.
        reference: Geometry of its scan (as read with the same ``spacing_mm``).
        spacing_mm: As for :func:`read_nifti` (nearest-neighbour resampling).
        atol: Tolerance on the affine, in mm.
        max_voxels: As for :func:`read_nifti`.

    Raises:
        VolumeError: Everything :func:`read_header` refuses, the mask's shape or affine differs from the
            scan's (checked from the header, before its data is read, when no resampling is asked for),
            or its data is corrupt or not finite.
    """
    header = read_header(path, max_voxels=max_voxels)
    resampled = _needs_resampling(header, spacing_mm)
    if not resampled:  # refused from the header alone, before the data is read
        check_same_grid(header.path, header.canonical_shape, header.canonical_affine, reference, atol)
    data, canonical_affine, _ = _read_canonical(header, spacing_mm, order=0, max_voxels=max_voxels)
    if resampled:
        check_same_grid(header.path, data.shape, canonical_affine, reference, atol)
    if not np.isfinite(data).all():
        raise VolumeError(header.path, "mask contains NaN or infinite voxels")
    return data > 0


def write_nifti(
    data: np.ndarray,
    geometry: VolumeGeometry,
    path: str | os.PathLike,
    dtype: type = np.float32,
    overwrite: bool = False,
) -> Path:
    """Write a canonical array back in the scan's own orientation, affine and grid, atomically.

    Args:
        data: Array in canonical RAS layout with the scan's (possibly resampled) shape, e.g. from
            :meth:`VolumeGeometry.to_scan <simpleslicenet.data.geometry.VolumeGeometry.to_scan>`.
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
    if not (np.isfinite(geometry.affine).all() and np.isfinite(geometry.canonical_affine).all()):
        msg = f"{path}: the scan's affine holds NaN or infinite values; refusing to write it into a map"
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
    """Save a NIfTI image atomically: an existing file is either fully replaced or left untouched.

    A header that states no spatial units is given millimetres (those of every affine this package
    writes), as viewers and the BIDS validator (``NIFTI_UNIT``) read them; ``img``'s header is changed.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false (the file is left untouched).
    """
    path = Path(path)
    spatial, temporal = img.header.get_xyzt_units()
    if spatial == "unknown":
        img.header.set_xyzt_units(xyz="mm", t=None if temporal == "unknown" else temporal)
    with atomic_path(path, overwrite=overwrite) as tmp:
        if _is_gzip(path):
            # The zlib-style call with a gzip wrapper (wbits 31) releases the GIL while it compresses.
            tmp.write_bytes(isal_zlib.compress(img.to_bytes(), _GZIP_WRITE_LEVEL, wbits=31))
        else:
            nib.save(img, tmp)
    return path


def common_spacing(paths: list[str | os.PathLike]) -> float:
    """The voxel size the given scans share (median over all their axes), read from their headers only.

    Scans whose voxel size differs from it by more than 1% are resampled to it when loaded.

    Raises:
        VolumeError: A scan's header is refused by :func:`read_header`, or ``paths`` is empty.
    """
    if not paths:
        raise VolumeError(None, "no scans to take the voxel spacing from")
    zooms = [z for path in paths for z in read_header(path).zooms]
    return float(np.median(zooms))

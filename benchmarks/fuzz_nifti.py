"""Fuzzing the NIfTI read path: thousands of damaged files, and what each one did.

Every case starts from a small valid scan (NIfTI-1 and NIfTI-2, little- and big-endian, several data
types, orientations, scaling, extensions, a 4-D singleton) and damages it in one way of one family:

``byte_flip``, ``compressed_flip``, ``truncate_nii``, ``truncate_gz``, ``header_field``, ``extension``,
``endianness``, ``container``, ``voxel_values``, ``mask_mismatch``, ``resample``, and ``contradiction``:
files that parse but contradict themselves (an extension flag with no room before the data, an extension
declaring gigabytes, an affine whose voxel sizes differ from the header's by orders of magnitude, voxel
sizes of micrometres or less, a constant scan that resampling would give a zero edge). A contradiction
must be refused: loading one counts as ``insane``.

It is then read with :func:`simpleslicenet.data.nifti.read_nifti` (or :func:`read_mask` against its
scan; some cases with resampling). The bar: every case ends in a sane load (float32, 3-D, finite,
the shape the geometry reports) or in a :class:`VolumeError` that names the file; no other exception
type, no case over 5 s, and bounded memory. Cases run one after another in a worker process, so a
hang or a crash is caught and counted rather than stopping the run.

    python benchmarks/fuzz_nifti.py                     # 12,000 cases, writes benchmarks/results/fuzz_nifti.json
    python benchmarks/fuzz_nifti.py --cases 500 --seed 3 --no-save

The case generator (:func:`build_corpus`, :func:`case_from`, :func:`run_case`) is also driven by
hypothesis in ``tests/test_fuzz_nifti.py``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import platform
import random
import resource
import shutil
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from simpleslicenet.data.nifti import VolumeError, read_mask, read_nifti

__all__ = ["FAMILIES", "Base", "Case", "build_corpus", "case_from", "make_case", "run_case", "main"]

RESULTS = Path(__file__).resolve().parent / "results" / "fuzz_nifti.json"
TIMEOUT_S = 5.0
SHAPE = (12, 14, 10)


# -- the corpus of valid scans -------------------------------------------------------------------


@dataclass(frozen=True)
class Base:
    """A valid scan as the bytes of an uncompressed single-file NIfTI.

    Args:
        name: Label of the variant.
        raw: The ``.nii`` bytes.
        header_size: 348 (NIfTI-1) or 540 (NIfTI-2).
        endian: ``"<"`` or ``">"``.
        data_offset: Where the voxel data starts.
    """

    name: str
    raw: bytes
    header_size: int
    endian: str
    data_offset: int


def _volume(dtype: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"))
    inside = (grid**2).sum(0) < 0.8
    values = np.where(inside, 200 + 50 * grid[0] + rng.integers(0, 40, SHAPE), 0)
    return values.astype(dtype)


def _bytes_of(image: nib.Nifti1Image, folder: Path, name: str) -> bytes:
    path = folder / f"{name}.nii"
    nib.save(image, path)
    return path.read_bytes()


def build_corpus(folder: Path) -> list[Base]:
    """The valid scans every case starts from (written once into ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    oblique = np.array([[1.8, 0.3, 0, -10], [-0.3, 1.8, 0.1, -12], [0, -0.1, 2.5, -8], [0, 0, 0, 1]])
    lps = np.array([[-2.0, 0, 0, 11], [0, -2.0, 0, 13], [0, 0, 2.0, -9], [0, 0, 0, 1]])
    variants: list[tuple[str, nib.Nifti1Image]] = []
    variants.append(("int16", nib.Nifti1Image(_volume("int16", 0), np.diag([2.0, 2.0, 2.0, 1.0]))))
    variants.append(("float32_lps", nib.Nifti1Image(_volume("float32", 1), lps)))
    variants.append(("float64_oblique", nib.Nifti1Image(_volume("float64", 2), oblique)))
    scaled = nib.Nifti1Image(_volume("uint8", 3), np.diag([1.0, 1.5, 2.0, 1.0]))
    scaled.header.set_slope_inter(0.5, 10.0)
    variants.append(("uint8_scaled", scaled))
    qform_only = nib.Nifti1Image(_volume("int16", 4), lps)
    qform_only.set_sform(None, code=0)
    qform_only.set_qform(lps, code=1)
    variants.append(("int16_qform_only", qform_only))
    variants.append(("int16_4d_singleton", nib.Nifti1Image(_volume("int16", 5)[..., None], np.eye(4))))
    with_extension = nib.Nifti1Image(_volume("int16", 6), np.eye(4))
    with_extension.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"fuzz corpus scan"))
    variants.append(("int16_extension", with_extension))
    variants.append(("nifti2_float32", nib.Nifti2Image(_volume("float32", 7), lps)))
    corpus = []
    for name, image in variants:
        raw = _bytes_of(image, folder, name)
        corpus.append(_base(name, raw))
    for name in ("int16", "float32_lps", "nifti2_float32"):
        swapped = nib.load(folder / f"{name}.nii")
        header = swapped.header.as_byteswapped(">")
        image_class = type(swapped)
        big = image_class(np.asanyarray(swapped.dataobj), swapped.affine, header)
        corpus.append(_base(f"{name}_big_endian", _bytes_of(big, folder, f"{name}_be")))
    return corpus


def _base(name: str, raw: bytes) -> Base:
    little = struct.unpack("<i", raw[:4])[0]
    endian = "<" if little in (348, 540) else ">"
    header_size = struct.unpack(f"{endian}i", raw[:4])[0]
    if header_size == 348:
        offset = int(struct.unpack(f"{endian}f", raw[108:112])[0])
    else:
        offset = struct.unpack(f"{endian}q", raw[168:176])[0]
    return Base(name=name, raw=raw, header_size=header_size, endian=endian, data_offset=offset)


# -- cases ---------------------------------------------------------------------------------------


@dataclass
class Case:
    """One damaged input, written to disk.

    Args:
        family: The kind of damage.
        operation: What exactly was done (for the report).
        path: The file to read.
        scan: For mask cases, the valid scan the mask must match; else ``None``.
        spacing_mm: Resample on reading, or ``None``.
        must_refuse: The file contradicts itself: any load is wrong.
    """

    family: str
    operation: str
    path: Path
    scan: Path | None = None
    spacing_mm: float | None = None
    must_refuse: bool = False


def _flip(data: bytes, rng: random.Random, count: int, region: tuple[int, int] | None = None) -> bytes:
    out = bytearray(data)
    if not out:
        return bytes(out)
    low, high = region if region is not None else (0, len(out))
    high = max(low + 1, min(high, len(out)))
    for _ in range(count):
        position = rng.randrange(low, high)
        out[position] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
    return bytes(out)


def _fields(base: Base) -> dict[str, tuple[np.dtype, int]]:
    dtype = nib.nifti1.header_dtype if base.header_size == 348 else nib.nifti2.header_dtype
    return {name: (field[0], field[1]) for name, field in dtype.fields.items()}


_INT_VALUES = [0, 1, -1, 2, 3, 4, 5, 7, 8, 9, 16, 127, 255, 1024, 32767, -32768, 2**31 - 1, -(2**31), 2**40]
_FLOAT_VALUES = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    2.0,
    1e-30,
    1e-6,
    1e6,
    1e30,
    3.4e38,
    -3.4e38,
    float("nan"),
    float("inf"),
    float("-inf"),
]
_DATATYPES = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 99, -1]


def _set_field(raw: bytes, base: Base, name: str, value: object, index: int | None = None) -> bytes:
    field_dtype, offset = _fields(base)[name]
    if field_dtype.subdtype is not None:
        element, shape = field_dtype.subdtype
        index = 0 if index is None else index % shape[0]
        offset += index * element.itemsize
        field_dtype = element
    field_dtype = field_dtype.newbyteorder(base.endian)
    if field_dtype.kind in "iu":
        info = np.iinfo(field_dtype)
        value = int(min(max(int(value), info.min), info.max))
    packed = np.array(value, dtype=field_dtype).tobytes()
    return raw[:offset] + packed + raw[offset + len(packed) :]


def _random_field_value(rng: random.Random, name: str, field_dtype: np.dtype) -> object:
    element = field_dtype.subdtype[0] if field_dtype.subdtype is not None else field_dtype
    if name == "datatype":
        return rng.choice(_DATATYPES)
    if name == "magic":
        return rng.choice([b"n+1\0", b"ni1\0", b"n+2\0", b"\0\0\0\0", bytes(rng.randrange(256) for _ in range(4))])
    if element.kind == "f":
        return rng.choice(_FLOAT_VALUES) if rng.random() < 0.8 else rng.uniform(-1e4, 1e4)
    if element.kind in "iu":
        return rng.choice(_INT_VALUES) if rng.random() < 0.8 else rng.randrange(-100, 100)
    return bytes(rng.randrange(256) for _ in range(element.itemsize))


_HEADER_FIELDS = [
    "sizeof_hdr", "dim_info", "dim", "intent_code", "datatype", "bitpix", "slice_start", "pixdim", "vox_offset",
    "scl_slope", "scl_inter", "slice_end", "slice_code", "xyzt_units", "qform_code", "sform_code", "quatern_b",
    "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z", "magic",
]  # fmt: skip


def _header_field(rng: random.Random, base: Base) -> tuple[bytes, str]:
    raw = base.raw
    edits = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        name = rng.choice(_HEADER_FIELDS)
        field_dtype = _fields(base)[name][0]
        index = rng.randrange(8) if field_dtype.subdtype is not None else None
        if name == "dim" and rng.random() < 0.5:
            index, value = 0, rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, -1])
        else:
            value = _random_field_value(rng, name, field_dtype)
        raw = _set_field(raw, base, name, value, index)
        edits.append(f"{name}{'' if index is None else f'[{index}]'}={value!r}")
    return raw, ", ".join(edits)


def _extension(rng: random.Random, base: Base) -> tuple[bytes, str]:
    header, data = base.raw[: base.header_size], base.raw[base.data_offset :]
    payload = bytes(rng.randrange(256) for _ in range(rng.choice([0, 4, 8, 16, 40, 200])))
    if rng.random() < 0.3:
        payload = rng.choice([b"<?xml version='1.0'?><AFNI_attributes><ATR", b"\x02\x00\x10\x00DICM", b"{" * 50])
    esize = rng.choice([len(payload) + 8, (len(payload) + 8 + 15) // 16 * 16, 0, 8, 15, -16, 2**31 - 1, 1 << 20])
    ecode = rng.choice([0, 2, 4, 6, 14, 32, 40, 99, -1])
    blocks = struct.pack(f"{base.endian}ii", esize, ecode) + payload
    blocks *= rng.choice([1, 1, 2, 5])
    flag = rng.choice([b"\x01\x00\x00\x00", b"\x00\x00\x00\x00", b"\xff\xff\xff\xff"])
    # The data offset is kept right, set just past the header, or left where it was.
    new_offset = rng.choice([base.header_size + 4 + len(blocks), base.header_size + 4, base.data_offset])
    raw = header + flag + blocks + data
    raw = _set_field(raw, base, "vox_offset", new_offset)
    return raw, f"esize={esize} ecode={ecode} blocks={len(blocks)} flag={flag.hex()} vox_offset={new_offset}"


def _endianness(rng: random.Random, base: Base) -> tuple[bytes, str]:
    raw = bytearray(base.raw)
    choice = rng.choice(["swap_sizeof_hdr", "swap_header_fields", "swap_data", "swap_all_header"])
    if choice == "swap_sizeof_hdr":
        raw[:4] = raw[:4][::-1]
    elif choice == "swap_data":
        step = rng.choice([2, 4, 8])
        data = raw[base.data_offset :]
        for start in range(0, len(data) - step + 1, step):
            data[start : start + step] = data[start : start + step][::-1]
        raw[base.data_offset :] = data
    else:
        count = base.header_size // 4 if choice == "swap_all_header" else rng.randrange(1, 10)
        words = (
            range(count)
            if choice == "swap_all_header"
            else [rng.randrange(base.header_size // 4) for _ in range(count)]
        )
        for word in words:
            raw[4 * word : 4 * word + 4] = raw[4 * word : 4 * word + 4][::-1]
    return bytes(raw), choice


def _voxel_values(rng: random.Random, base: Base) -> tuple[bytes, str]:
    raw = bytearray(base.raw)
    data_type = np.dtype(_data_dtype(base))
    voxels = np.frombuffer(bytes(raw[base.data_offset :]), dtype=data_type).copy()
    choice = rng.choice(["nan", "inf", "zero", "constant", "extreme", "scale_overflow"])
    if choice in ("nan", "inf") and data_type.kind == "f":
        voxels[rng.randrange(voxels.size)] = np.nan if choice == "nan" else np.inf
    elif choice == "zero":
        voxels[:] = 0
    elif choice == "constant":
        voxels[:] = 7
    elif choice == "extreme":
        info = np.finfo(data_type) if data_type.kind == "f" else np.iinfo(data_type)
        voxels[rng.randrange(voxels.size)] = info.max
    else:
        raw = bytearray(_set_field(bytes(raw), base, "scl_slope", 1e38))
    raw[base.data_offset :] = voxels.tobytes()
    return bytes(raw), choice


def _contradiction(rng: random.Random, base: Base) -> tuple[bytes, str, float | None]:
    """A file that parses but says two incompatible things; returns ``(raw, operation, spacing_mm)``."""
    header, data = base.raw[: base.header_size], base.raw[base.data_offset :]
    choice = rng.choice(["flag_without_room", "huge_extension", "affine_scale", "micro_voxels", "constant_resampled"])
    if choice == "flag_without_room":
        raw = _set_field(header + b"\x01\x00\x00\x00" + data, base, "vox_offset", base.header_size + 4)
        return raw, choice, None
    if choice == "huge_extension":
        esize = rng.choice([2**31 - 16, 1 << 30, 1 << 24])
        block = struct.pack(f"{base.endian}ii", esize, 6) + b"comment\x00"
        raw = _set_field(header + b"\x01\x00\x00\x00" + block + data, base, "vox_offset", base.header_size + 4 + 16)
        return raw, f"{choice} esize={esize}", None
    if choice == "affine_scale":
        # One voxel axis of the sform scaled as a whole: its length no longer matches the header's voxel size.
        factor, axis = rng.choice([1e-38, 1e-6, 1e-3, 1e3, 1e6]), rng.randrange(3)
        raw = _set_field(base.raw, base, "sform_code", 1)
        for row in ("srow_x", "srow_y", "srow_z"):
            field_dtype, offset = _fields(base)[row]
            values = np.frombuffer(raw[offset : offset + field_dtype.itemsize], dtype=field_dtype.newbyteorder(base.endian))
            raw = _set_field(raw, base, row, float(values[0][axis]) * factor, axis)
        return raw, f"{choice} axis {axis} × {factor:g}", None
    if choice == "micro_voxels":
        size = rng.choice([1e-6, 1e-9, 1e-4])
        raw = _set_field(_set_field(base.raw, base, "qform_code", 0), base, "sform_code", 0)
        return _set_field(raw, base, "pixdim", size, rng.randrange(1, 4)), f"{choice} {size:g} mm", None
    voxels = np.frombuffer(data, dtype=_data_dtype(base)).copy()
    voxels[:] = 7
    return header + base.raw[base.header_size : base.data_offset] + voxels.tobytes(), choice, rng.choice([0.7, 1.5, 3.0])


def _data_dtype(base: Base) -> np.dtype:
    code = struct.unpack(f"{base.endian}h", base.raw[70:72] if base.header_size == 348 else base.raw[12:14])[0]
    return np.dtype(nib.nifti1.data_type_codes.dtype[code]).newbyteorder(base.endian)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _container(rng: random.Random, base: Base, folder: Path, stem: str) -> tuple[Path, str]:
    gz = gzip.compress(base.raw)
    choice = rng.choice(
        [
            "double_gzip", "gzip_named_nii", "raw_named_gz", "zlib_stream", "bz2_named_gz", "empty_nii", "empty_gz",
            "random_bytes", "gzip_trailing_garbage", "two_gzip_members", "gzip_flags", "folder", "symlink_loop",
            "broken_symlink", "fifo", "device", "no_suffix",
        ]
    )  # fmt: skip
    nii, niigz = folder / f"{stem}.nii", folder / f"{stem}.nii.gz"
    if choice == "double_gzip":
        return _write(niigz, gzip.compress(gz)), choice
    if choice == "gzip_named_nii":
        return _write(nii, gz), choice
    if choice == "raw_named_gz":
        return _write(niigz, base.raw), choice
    if choice == "zlib_stream":
        return _write(niigz, zlib.compress(base.raw)), choice
    if choice == "bz2_named_gz":
        import bz2

        return _write(niigz, bz2.compress(base.raw)), choice
    if choice == "empty_nii":
        return _write(nii, b""), choice
    if choice == "empty_gz":
        return _write(niigz, b""), choice
    if choice == "random_bytes":
        return _write(
            rng.choice([nii, niigz]), bytes(rng.randrange(256) for _ in range(rng.choice([3, 100, 400, 2000])))
        ), choice
    if choice == "gzip_trailing_garbage":
        return _write(niigz, gz + bytes(rng.randrange(256) for _ in range(rng.choice([1, 9, 100])))), choice
    if choice == "two_gzip_members":
        return _write(niigz, gzip.compress(base.raw[:200]) + gzip.compress(base.raw[200:])), choice
    if choice == "gzip_flags":
        damaged = bytearray(gz)
        damaged[3] = rng.randrange(256)  # FLG: FTEXT, FHCRC, FEXTRA, FNAME, FCOMMENT and reserved bits
        return _write(niigz, bytes(damaged)), choice
    if choice == "folder":
        niigz.mkdir()
        return niigz, choice
    if choice == "symlink_loop":
        niigz.symlink_to(niigz.name)
        return niigz, choice
    if choice == "broken_symlink":
        niigz.symlink_to(folder / f"{stem}_absent.nii.gz")
        return niigz, choice
    if choice == "fifo":
        os.mkfifo(nii)
        return nii, choice
    if choice == "device":
        nii.symlink_to("/dev/zero")
        return nii, choice
    return _write(folder / f"{stem}.img", base.raw), choice


def _mask_mismatch(rng: random.Random, corpus: list[Base], folder: Path, stem: str) -> Case:
    base = corpus[0]  # int16, 2 mm, RAS
    scan = _write(folder / f"{stem}_scan.nii.gz", gzip.compress(base.raw))
    image = nib.load(scan)
    lesion = (np.asanyarray(image.dataobj) > 230).astype(np.uint8)
    affine = image.affine.copy()
    choice = rng.choice(
        ["same", "shape", "shift_small", "shift_large", "flipped_storage", "nan", "complex", "series", "spacing"]
    )
    data, spacing = lesion, None
    if choice == "shape":
        data = lesion[: rng.randrange(1, SHAPE[0]), :, : rng.randrange(1, SHAPE[2] + 1)]
    elif choice == "shift_small":
        affine[0, 3] += 1e-5
    elif choice == "shift_large":
        affine[rng.randrange(3), 3] += rng.choice([0.01, 1.0, 50.0])
    elif choice == "flipped_storage":
        # The same grid stored left-right flipped: it must be recognised as matching.
        data = lesion[::-1].copy()
        affine = affine @ np.array([[-1, 0, 0, SHAPE[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    elif choice == "nan":
        data = lesion.astype(np.float32)
        data[0, 0, 0] = np.nan
    elif choice == "complex":
        data = lesion.astype(np.complex64)
    elif choice == "series":
        data = np.stack([lesion, lesion], axis=-1)
    elif choice == "spacing":
        spacing = rng.choice([1.0, 3.0])
    mask = folder / f"{stem}_mask.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), mask)
    return Case("mask_mismatch", choice, mask, scan=scan, spacing_mm=spacing)


def case_from(family: str, rng: random.Random, corpus: list[Base], folder: Path, stem: str) -> Case:
    """One case of ``family``, its choices drawn from ``rng``, written into ``folder`` as ``stem``."""
    base = rng.choice(corpus)
    gzip_it = rng.random() < 0.5
    if family == "mask_mismatch":
        return _mask_mismatch(rng, corpus, folder, stem)
    if family == "container":
        path, operation = _container(rng, base, folder, stem)
        return Case(family, f"{base.name}: {operation}", path)
    spacing = None
    if family == "byte_flip":
        region = (0, base.data_offset) if rng.random() < 0.6 else None
        raw, operation = _flip(base.raw, rng, rng.choice([1, 1, 2, 4, 8]), region), "flipped bytes"
    elif family == "compressed_flip":
        raw, operation, gzip_it = (
            _flip(gzip.compress(base.raw), rng, rng.choice([1, 1, 2, 4])),
            "flipped gzip bytes",
            None,
        )
    elif family == "truncate_nii":
        cut = rng.choice(
            [0, 3, 4, 100, base.header_size - 1, base.header_size, base.data_offset, rng.randrange(len(base.raw))]
        )
        raw, operation, gzip_it = base.raw[:cut], f"cut at {cut}", False
    elif family == "truncate_gz":
        compressed = gzip.compress(base.raw)
        cut = rng.randrange(len(compressed))
        raw, operation, gzip_it = compressed[:cut], f"cut gzip at {cut} of {len(compressed)}", None
    elif family == "header_field":
        raw, operation = _header_field(rng, base)
    elif family == "extension":
        raw, operation = _extension(rng, base)
    elif family == "endianness":
        raw, operation = _endianness(rng, base)
    elif family == "voxel_values":
        raw, operation = _voxel_values(rng, base)
    elif family == "contradiction":
        raw, operation, spacing = _contradiction(rng, base)
    elif family == "resample":
        spacing = rng.choice([0.5, 1.0, 1.5, 3.0, 4.0])
        field = rng.choice(["pixdim", "srow_x", "srow_y", "srow_z", None])
        raw, operation = base.raw, f"spacing {spacing}"
        if field is not None:
            raw = _set_field(
                raw, base, field, rng.choice([0.25, 0.5, 3.0, 8.0, 1e-3, 1e3, float("nan")]), rng.randrange(4)
            )
            operation += f", {field} changed"
    else:
        msg = f"unknown family {family!r}"
        raise ValueError(msg)
    if gzip_it is None:  # already a gzip stream
        path = _write(folder / f"{stem}.nii.gz", raw)
    elif gzip_it:
        path = _write(folder / f"{stem}.nii.gz", gzip.compress(raw))
    else:
        path = _write(folder / f"{stem}.nii", raw)
    return Case(family, f"{base.name}: {operation}", path, spacing_mm=spacing, must_refuse=family == "contradiction")


FAMILIES = (
    "byte_flip", "compressed_flip", "truncate_nii", "truncate_gz", "header_field", "extension", "endianness",
    "container", "voxel_values", "mask_mismatch", "resample", "contradiction",
)  # fmt: skip


def make_case(index: int, seed: int, corpus: list[Base], folder: Path) -> Case:
    """Case ``index`` of a run (deterministic in ``seed``); families take turns."""
    rng = random.Random(f"{seed}-{index}")
    return case_from(FAMILIES[index % len(FAMILIES)], rng, corpus, folder, f"case{index}")


def _sane(image: np.ndarray, geometry: object) -> str | None:
    if image.dtype != np.float32 or image.ndim != 3 or image.size == 0:
        return f"dtype {image.dtype} / shape {image.shape}"
    if tuple(image.shape) != tuple(geometry.original_shape):
        return "shape differs from the geometry"
    if not np.isfinite(image).all():
        return "non-finite voxels"
    if not (np.isfinite(geometry.affine).all() and np.isfinite(geometry.canonical_affine).all()):
        return "non-finite affine"
    return None


def run_case(case: Case) -> tuple[str, str]:
    """Read one case; returns ``(outcome, detail)``.

    Outcomes: ``loaded``, ``refused`` (a :class:`VolumeError` naming the file), ``refused_unnamed``,
    ``insane`` (loaded but broken) or ``raw:<ExceptionType>``.
    """
    try:
        if case.scan is not None:
            _, geometry = read_nifti(case.scan, spacing_mm=case.spacing_mm)
            mask = read_mask(case.path, geometry, spacing_mm=case.spacing_mm)
            if mask.dtype != bool or tuple(mask.shape) != tuple(geometry.original_shape):
                return "insane", f"mask {mask.dtype} {mask.shape} vs {geometry.original_shape}"
            return "loaded", ""
        image, geometry = read_nifti(case.path, spacing_mm=case.spacing_mm)
    except VolumeError as error:
        named = error.path is not None and Path(error.path) == case.path and case.path.name in str(error)
        return ("refused" if named else "refused_unnamed"), error.problem[:120]
    except Exception as error:  # noqa: BLE001 - the point is to count these
        return f"raw:{type(error).__name__}", str(error)[:200]
    if case.must_refuse:
        return "insane", "loaded a file that contradicts itself"
    problem = _sane(image, geometry)
    return ("insane", problem) if problem else ("loaded", "")


def _clean(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _worker(connection: object, seed: int, corpus: list[Base], folder: str) -> None:
    cases_folder = Path(folder)
    cases_folder.mkdir(parents=True, exist_ok=True)
    connection.send(("ready", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
    while True:
        index = connection.recv()
        if index is None:
            return
        start = time.perf_counter()
        try:
            case = make_case(index, seed, corpus, cases_folder)
        except Exception as error:  # noqa: BLE001 - a bug of the generator, reported apart from the reader's
            connection.send((index, FAMILIES[index % len(FAMILIES)], "", "generator_error", repr(error), 0.0, 0))
            _clean(cases_folder)
            continue
        outcome, detail = run_case(case)
        seconds = time.perf_counter() - start
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        connection.send((index, case.family, case.operation, outcome, detail, seconds, rss))
        _clean(cases_folder)


class _Worker:
    def __init__(self, seed: int, corpus: list[Base], folder: Path) -> None:
        context = multiprocessing.get_context("fork")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, seed, corpus, str(folder)), daemon=True)
        self.process.start()
        _, self.baseline_kb = self.connection.recv()

    def run(self, index: int, timeout: float) -> tuple | None:
        self.connection.send(index)
        if self.connection.poll(timeout):
            try:
                return self.connection.recv()
            except EOFError:
                return None
        return None

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()


def run(cases: int, seed: int, timeout: float = TIMEOUT_S, progress: bool = True) -> dict:
    """Run ``cases`` cases and return the outcome table and the worst cases."""
    work = Path(tempfile.mkdtemp(prefix="fuzz_nifti_"))
    try:
        corpus = build_corpus(work / "corpus")
        table: dict[str, Counter] = defaultdict(Counter)
        examples: dict[str, list[str]] = defaultdict(list)
        slowest: list[tuple[float, str]] = []
        peak_kb, baseline_kb, worst_memory_case = 0, None, ""
        worker = _Worker(seed, corpus, work / "cases")
        baseline_kb = worker.baseline_kb
        started = time.perf_counter()
        for index in range(cases):
            family = FAMILIES[index % len(FAMILIES)]
            result = worker.run(index, timeout)
            if result is None:
                worker.process.join(timeout=1.0)  # a crashed worker closes its pipe just before it exits
                outcome = "hang" if worker.process.is_alive() else f"crash (exit {worker.process.exitcode})"
                worker.stop()
                _clean(work / "cases")
                table[family][outcome] += 1
                examples[outcome].append(f"case {index} ({family})")
                worker = _Worker(seed, corpus, work / "cases")
                continue
            _, family, operation, outcome, detail, seconds, rss_kb = result
            table[family][outcome] += 1
            if outcome not in ("loaded", "refused") and len(examples[outcome]) < 5:
                examples[outcome].append(f"case {index} {family} [{operation}]: {detail}")
            slowest = sorted([*slowest, (seconds, f"case {index} {family} [{operation}]")], reverse=True)[:5]
            if rss_kb > peak_kb:
                peak_kb, worst_memory_case = rss_kb, f"case {index} {family} [{operation}]"
            if progress and (index + 1) % 1000 == 0:
                print(f"  {index + 1:,} cases, {time.perf_counter() - started:.0f} s", file=sys.stderr)
        worker.stop()
        elapsed = time.perf_counter() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "cases": cases,
        "seed": seed,
        "timeout_s": timeout,
        "seconds": round(elapsed, 1),
        "table": {family: dict(counts) for family, counts in table.items()},
        "totals": dict(sum(table.values(), Counter())),
        "examples": dict(examples),
        "slowest_cases": [{"seconds": round(s, 3), "case": c} for s, c in slowest],
        "worker_rss_mb": {
            "at_start": round(baseline_kb / 1024, 1),
            "peak": round(peak_kb / 1024, 1),
            "peak_case": worst_memory_case,
        },
    }


# Table columns: the two acceptable outcomes, then every way a case can miss the bar (always shown).
COLUMNS = {
    "loaded": "sane load",
    "refused": "VolumeError naming the file",
    "refused_unnamed": "VolumeError without the file",
    "insane": "loaded but broken",
    "raw": "other exception types",
    "hang": f"over {TIMEOUT_S:g} s",
    "crash": "worker crashed",
}


def _column(outcome: str) -> str:
    return outcome.split(":", 1)[0].split(" ", 1)[0]  # "raw:OSError" -> "raw", "crash (exit 1)" -> "crash"


def format_table(result: dict) -> str:
    """The outcome table as Markdown: one row per family, one column per kind of outcome."""
    rows = {family: dict.fromkeys(COLUMNS, 0) for family in FAMILIES}
    for family, counts in result["table"].items():
        for outcome, count in counts.items():
            rows[family][_column(outcome)] = rows[family].get(_column(outcome), 0) + count
    header = ["family", "cases", *COLUMNS.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for family, counts in rows.items():
        lines.append(
            "| " + " | ".join([family, f"{sum(counts.values()):,}", *[f"{counts[c]:,}" for c in COLUMNS]]) + " |"
        )
    totals = {column: sum(counts[column] for counts in rows.values()) for column in COLUMNS}
    cells = ["**all**", f"**{sum(totals.values()):,}**", *[f"**{totals[c]:,}**" for c in COLUMNS]]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the fuzzer, print the table, and (unless ``--no-save``) write the results JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=12_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds after which a case counts as a hang")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.cases, args.seed, args.timeout)
    result["machine"] = {
        "python": platform.python_version(),
        "nibabel": nib.__version__,
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
    }
    print(format_table(result))
    bad = {k: v for k, v in result["totals"].items() if k not in ("loaded", "refused")}
    print(
        f"\n{result['cases']:,} cases in {result['seconds']} s; slowest {result['slowest_cases'][0]['seconds']} s; "
        f"worker memory {result['worker_rss_mb']['at_start']} MB at start, {result['worker_rss_mb']['peak']} MB peak"
    )
    print("other outcomes: " + (", ".join(f"{k} {v}" for k, v in bad.items()) if bad else "none"))
    for outcome, cases in result["examples"].items():
        print(f"  {outcome}: " + " | ".join(cases[:3]))
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        from simpleslicenet.atomic import atomic_write_text

        atomic_write_text(RESULTS, json.dumps(result, indent=2) + "\n")
        print(f"written {RESULTS}")
    return result


if __name__ == "__main__":
    main()

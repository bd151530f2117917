"""Bad input gives a clear error naming the file (or folder) and the problem; writes are atomic."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from simpleslicenet import atomic
from simpleslicenet.atomic import recover_directory, replace_directory
from simpleslicenet.data.datamodules import IXI, BraTS2021, IXIBraTS, NiftiFolder
from simpleslicenet.data.nifti import VolumeError, read_mask, read_nifti, write_nifti
from simpleslicenet.data.volume import VolumePreprocessing, load_volume

SHAPE = (24, 28, 16)


def brain(shape: tuple[int, int, int] = SHAPE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = (grid**2).sum(0) < 0.7
    return np.where(inside, 300 + rng.integers(0, 100, shape), 0).astype(np.int16)


def save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


@pytest.fixture(scope="session")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every kind of bad (and one good) file, written once."""
    root = tmp_path_factory.mktemp("bad_input")
    files = {"good": save(root / "good.nii.gz", brain())}

    whole = (root / "good.nii.gz").read_bytes()
    files["truncated_gz"] = root / "truncated.nii.gz"
    files["truncated_gz"].write_bytes(whole[: len(whole) // 2])
    plain = save(root / "plain.nii", brain()).read_bytes()
    files["truncated_nii"] = root / "truncated.nii"
    files["truncated_nii"].write_bytes(plain[: len(plain) // 2])

    files["text_as_nifti"] = root / "notes.nii.gz"
    files["text_as_nifti"].write_text("patient list, not an image\n")
    files["gzipped_text"] = root / "zipped_notes.nii.gz"
    files["gzipped_text"].write_bytes(gzip.compress(b"not an image at all" * 50))
    png = b"\x89PNG\r\n\x1a\n" + bytes(200)
    files["png_renamed"] = root / "photo.nii"
    files["png_renamed"].write_bytes(png)
    files["png"] = root / "photo.png"
    files["png"].write_bytes(png)

    files["singleton_4d"] = save(root / "single_4d.nii.gz", brain()[..., None])
    files["series_4d"] = save(root / "series_4d.nii.gz", np.stack([brain(seed=s) for s in range(3)], axis=-1))
    with_nan = brain().astype(np.float32)
    with_nan[5, 6, 7] = np.nan
    files["nan"] = save(root / "nan.nii.gz", with_nan)
    with_inf = brain().astype(np.float32)
    with_inf[3, 3, 3] = np.inf
    files["inf"] = save(root / "inf.nii.gz", with_inf)
    files["zero"] = save(root / "zero.nii.gz", np.zeros(SHAPE, dtype=np.int16))

    lesion = np.zeros(SHAPE, dtype=np.uint8)
    lesion[10:14, 12:16, 6:9] = 1
    files["mask_ok"] = save(root / "good_mask.nii.gz", lesion)
    files["mask_shape"] = save(root / "short_mask.nii.gz", lesion[:, :, :-2])
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    files["mask_affine"] = save(root / "moved_mask.nii.gz", lesion, shifted)
    return files


# --- unreadable files -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("truncated_gz", "truncated or corrupt"),
        ("truncated_nii", "truncated or corrupt"),
        ("text_as_nifti", "not a readable NIfTI"),
        ("gzipped_text", "not a readable NIfTI"),
        ("png_renamed", "not a readable NIfTI"),
        ("png", "not a NIfTI file"),
    ],
)
def test_unreadable_file_is_named(bad: dict, key: str, problem: str) -> None:
    with pytest.raises(VolumeError, match=problem) as info:
        read_nifti(bad[key])
    assert bad[key].name in str(info.value)
    assert info.value.path == bad[key]


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="does not exist") as info:
        read_nifti(tmp_path / "absent.nii.gz")
    assert "absent.nii.gz" in str(info.value)


def test_folder_given_as_scan_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "looks_like.nii.gz"
    folder.mkdir()
    with pytest.raises(VolumeError, match="is a folder") as info:
        read_nifti(folder)
    assert "looks_like.nii.gz" in str(info.value)


# --- shapes and values ------------------------------------------------------------------------


def test_singleton_4d_is_squeezed(bad: dict) -> None:
    image, geometry = read_nifti(bad["singleton_4d"])
    assert image.shape == SHAPE
    reference, _ = read_nifti(bad["good"])
    np.testing.assert_array_equal(image, reference)
    assert load_volume(bad["singleton_4d"], VolumePreprocessing(target_shape=(16, 16, 8))).image.shape == (16, 16, 8)
    assert read_nifti(bad["singleton_4d"], spacing_mm=2.0)[0].ndim == 3


def test_real_4d_series_is_refused(bad: dict) -> None:
    with pytest.raises(VolumeError, match="expected a 3-D scan") as info:
        read_nifti(bad["series_4d"])
    assert "series_4d.nii.gz" in str(info.value) and "4-D" in str(info.value)
    with pytest.raises(VolumeError, match="4-D"):
        read_nifti(bad["series_4d"], spacing_mm=2.0)


@pytest.mark.parametrize("key", ["nan", "inf"])
def test_non_finite_voxels_are_refused(bad: dict, key: str) -> None:
    with pytest.raises(VolumeError, match="1 NaN or infinite voxels") as info:
        read_nifti(bad[key])
    assert bad[key].name in str(info.value)


def test_all_zero_scan_is_refused(bad: dict) -> None:
    with pytest.raises(VolumeError, match="all voxels are zero") as info:
        load_volume(bad["zero"])
    assert "zero.nii.gz" in str(info.value)


# --- masks ------------------------------------------------------------------------------------


def test_matching_mask_is_read(bad: dict) -> None:
    _, geometry = read_nifti(bad["good"])
    mask = read_mask(bad["mask_ok"], geometry)
    assert mask.dtype == bool and mask.sum() == 4 * 4 * 3


def test_mask_with_other_shape_is_refused(bad: dict) -> None:
    with pytest.raises(VolumeError, match="shape") as info:
        load_volume(bad["good"], mask_path=bad["mask_shape"])
    message = str(info.value)
    assert "short_mask.nii.gz" in message and "good.nii.gz" in message
    assert str(SHAPE) in message


def test_mask_with_other_affine_is_refused(bad: dict) -> None:
    with pytest.raises(VolumeError, match="affine differs") as info:
        load_volume(bad["good"], mask_path=bad["mask_affine"])
    assert "moved_mask.nii.gz" in str(info.value)


def test_lesion_scan_without_mask_file_is_refused(bad: dict, tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="no mask") as info:
        load_volume(bad["good"], mask_path=tmp_path / "absent_mask.nii.gz", require_mask=True)
    assert "good.nii.gz" in str(info.value)


# --- folders and datasets ---------------------------------------------------------------------


def test_empty_folder_is_named(tmp_path: Path) -> None:
    root = tmp_path / "empty_dataset"
    (root / "train" / "good").mkdir(parents=True)
    (root / "train" / "good" / "readme.txt").write_text("scans go here")
    with pytest.raises(VolumeError, match="no scans found") as info:
        NiftiFolder(root).setup()
    assert "empty_dataset" in str(info.value)


def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="does not exist") as info:
        NiftiFolder(tmp_path / "nowhere").setup()
    assert "nowhere" in str(info.value)


def test_folder_without_training_scans_is_named(tmp_path: Path, bad: dict) -> None:
    root = tmp_path / "no_train"
    save(root / "test" / "good" / "a.nii.gz", brain())
    with pytest.raises(VolumeError, match="no healthy training scans") as info:
        NiftiFolder(root).setup()
    assert str(Path("train") / "good") in str(info.value)


def test_lesion_scan_without_mask_in_folder_is_named(tmp_path: Path) -> None:
    root = tmp_path / "unmasked"
    save(root / "train" / "good" / "h1.nii.gz", brain())
    save(root / "test" / "lesion" / "tumour7.nii.gz", brain(seed=7))
    with pytest.raises(VolumeError, match="lesion scan has no mask") as info:
        NiftiFolder(root).setup()
    assert "tumour7.nii.gz" in str(info.value) and "tumour7_mask.nii.gz" in str(info.value)


def test_mask_without_scan_is_named(tmp_path: Path) -> None:
    root = tmp_path / "orphan"
    save(root / "train" / "good" / "h1.nii.gz", brain())
    save(root / "test" / "lesion" / "tumor3_mask.nii.gz", brain())  # typo: the scan is tumour3
    save(root / "test" / "lesion" / "tumour3.nii.gz", brain())
    with pytest.raises(VolumeError, match="mask without a scan") as info:
        NiftiFolder(root).setup()
    assert "tumor3_mask.nii.gz" in str(info.value)


def test_lesion_scans_in_training_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    save(root / "train" / "good" / "h1.nii.gz", brain())
    save(root / "train" / "lesion" / "t1.nii.gz", brain())
    with pytest.raises(VolumeError, match="healthy scans only") as info:
        NiftiFolder(root).setup()
    assert str(Path("train") / "lesion") in str(info.value)


def test_bad_scan_is_named_when_the_dataset_reads_it(tmp_path: Path, bad: dict) -> None:
    root = tmp_path / "corrupt_member"
    save(root / "train" / "good" / "h1.nii.gz", brain())
    (root / "test" / "good").mkdir(parents=True)
    (root / "test" / "good" / "broken.nii.gz").write_bytes(bad["truncated_gz"].read_bytes())
    datamodule = NiftiFolder(root, target_shape=(16, 16, 8), val_fraction=0)
    datamodule.setup()
    with pytest.raises(VolumeError, match="truncated or corrupt") as info:
        next(iter(datamodule.test_dataloader()))
    assert "broken.nii.gz" in str(info.value)


def test_empty_brats_and_ixi_folders_are_named(tmp_path: Path) -> None:
    brats = tmp_path / "BraTS_empty"
    brats.mkdir()
    with pytest.raises(VolumeError, match="no BraTS subjects") as info:
        BraTS2021(brats).setup()
    assert "BraTS_empty" in str(info.value)
    ixi = tmp_path / "IXI_empty"
    save(ixi / "IXI002-Guys-0828-T1.nii.gz", brain())  # only T1 present, T2 asked for
    with pytest.raises(VolumeError, match="no IXI T2 scans") as info:
        IXI(ixi, modality="t2").setup()
    assert "IXI_empty" in str(info.value)


def test_brats_subject_without_seg_or_modality_is_named(tmp_path: Path) -> None:
    root = tmp_path / "brats_partial"
    save(root / "BraTS2021_00042" / "BraTS2021_00042_t2.nii.gz", brain())
    with pytest.raises(VolumeError, match="lesion scan has no mask") as info:
        BraTS2021(root).setup()
    assert "BraTS2021_00042_t2.nii.gz" in str(info.value) and "_seg" in str(info.value)
    with pytest.raises(VolumeError, match="no flair scan") as info:
        BraTS2021(root, modality="flair").setup()
    assert "BraTS2021_00042" in str(info.value)


@pytest.mark.parametrize(
    ("factory", "allowed"),
    [
        (lambda: BraTS2021("unused", modality="t3"), "t1, t1ce, t2, flair"),
        (lambda: IXI("unused", modality="flair"), "t1, t2, pd"),
        (lambda: IXIBraTS("unused", "unused", modality="pd"), "t1, t2"),
    ],
)
def test_unknown_modality_lists_the_allowed_ones(factory, allowed: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="modality") as info:
        factory()
    assert allowed in str(info.value)


def test_brats_without_healthy_scans_cannot_train(tmp_path: Path) -> None:
    root = tmp_path / "brats_only"
    for i in range(2):
        subject = root / f"BraTS2021_0000{i}"
        save(subject / f"{subject.name}_t2.nii.gz", brain(seed=i))
        save(subject / f"{subject.name}_seg.nii.gz", (brain(seed=i) > 350).astype(np.uint8))
    datamodule = BraTS2021(root, target_shape=(16, 16, 8))
    datamodule.setup()
    assert len(datamodule.test_data) + len(datamodule.val_data) == 2  # evaluation still works
    with pytest.raises(ValueError, match="healthy_root") as info:
        datamodule.train_dataloader()
    assert "brats_only" in str(info.value)


# --- atomic writes ----------------------------------------------------------------------------


@pytest.fixture
def geometry_and_image(bad: dict) -> tuple:
    image, geometry = read_nifti(bad["good"])
    return image, geometry


def test_write_refuses_to_overwrite_and_leaves_file_untouched(tmp_path: Path, geometry_and_image: tuple) -> None:
    image, geometry = geometry_and_image
    target = tmp_path / "map.nii.gz"
    target.write_bytes(b"previous result")
    with pytest.raises(FileExistsError, match="overwrite=True") as info:
        write_nifti(image, geometry, target)
    assert "map.nii.gz" in str(info.value)
    with pytest.raises(ValueError, match="differs") as info:
        write_nifti(image[:-1], geometry, target, overwrite=True)
    assert "map.nii.gz" in str(info.value)
    assert target.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.nii.gz"]  # no temporary left behind


def test_write_overwrite_replaces_atomically(tmp_path: Path, geometry_and_image: tuple) -> None:
    image, geometry = geometry_and_image
    target = tmp_path / "map.nii.gz"
    write_nifti(np.zeros_like(image), geometry, target)
    inode_before = target.stat().st_ino
    write_nifti(image, geometry, target, overwrite=True)
    np.testing.assert_array_equal(np.asarray(nib.load(target).dataobj), image)
    # os.replace swaps in a new file rather than rewriting the old one in place.
    assert target.stat().st_ino != inode_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.nii.gz"]


def test_failed_write_leaves_existing_file_and_no_temporary(
    tmp_path: Path,
    geometry_and_image: tuple,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image, geometry = geometry_and_image
    target = tmp_path / "map.nii.gz"
    target.write_bytes(b"previous result")

    def write_half_then_fail(path: Path, data: bytes) -> None:
        with open(path, "wb") as handle:  # noqa: PTH123
            handle.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_nifti(image, geometry, target, overwrite=True)
    assert target.read_bytes() == b"previous result"
    assert os.listdir(tmp_path) == ["map.nii.gz"]


def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "scores.json").write_text(text)
    return path


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])  # noqa: S603
    child.wait()
    return child.pid


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-exchange", "two-renames"])
def test_folder_swap_replaces_the_whole_folder(tmp_path: Path, exchange: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not exchange:  # the path taken on file systems without renameat2's exchange
        monkeypatch.setattr(atomic, "_exchange", lambda first, second: False)
    target = _folder(tmp_path / "maps", "old")
    (target / "stale.nii.gz").write_bytes(b"")
    replace_directory(_folder(tmp_path / ".tmp-new", "new"), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps"]
    assert sorted(p.name for p in target.iterdir()) == ["scores.json"]
    assert (target / "scores.json").read_text() == "new"


def test_swap_killed_between_its_renames_is_undone(tmp_path: Path) -> None:
    # What a kill between the two renames leaves: no target, the old folder set aside under a dead pid.
    aside = _folder(tmp_path / f".tmp-maps.previous.{_dead_pid()}-0123abcd", "old")
    recover_directory(tmp_path / "maps")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps"]
    assert (tmp_path / "maps" / "scores.json").read_text() == "old"
    # Killed while deleting the old folder: the new one is in place, the leftover goes.
    _folder(aside, "old")
    live = _folder(tmp_path / f".tmp-maps.previous.{os.getpid()}-4567ef", "in use")  # a running swap's
    recover_directory(tmp_path / "maps")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "maps"]


# --- header checks before any voxel is read ---------------------------------------------------


def _with_header(path: Path, data: np.ndarray, **fields: object) -> Path:
    """A scan whose header fields are overwritten with ``fields`` after nibabel wrote a valid file."""
    raw = bytearray(save(path.with_name("valid_" + path.name.replace(".gz", "")), data).read_bytes())
    header = np.frombuffer(bytes(raw[:348]), dtype=nib.nifti1.header_dtype).copy()
    for name, value in fields.items():
        header[name] = value
    raw[:348] = header.tobytes()
    path.write_bytes(gzip.compress(bytes(raw)) if path.name.endswith(".gz") else bytes(raw))
    return path


def _extension(size: int) -> bytes:
    """An extension's 8-byte (size, code) head declaring ``size`` bytes, with 8 bytes of content."""
    return np.array([size, 6], dtype="<i4").tobytes() + b"comment\x00"


def _with_extension_bytes(path: Path, extension: bytes, room: int | None = None) -> Path:
    """A scan with the extension flag set, ``extension`` after it and the voxel data ``room`` bytes later."""
    raw = bytearray(save(path.with_name("valid_" + path.name.replace(".gz", "")), brain()).read_bytes())
    room = len(extension) if room is None else room
    header = np.frombuffer(bytes(raw[:348]), dtype=nib.nifti1.header_dtype).copy()
    header["vox_offset"] = 352 + room
    body = bytes(header.tobytes()) + b"\x01\x00\x00\x00" + extension.ljust(room, b"\x00") + bytes(raw[352:])
    path.write_bytes(gzip.compress(body) if path.name.endswith(".gz") else body)
    return path


def test_scans_with_real_extensions_are_read(tmp_path: Path) -> None:
    image = nib.Nifti1Image(brain(), np.eye(4))
    image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"acquired at site 3" * 5))
    for name in ("extended.nii", "extended.nii.gz"):
        nib.save(image, tmp_path / name)
        data, _ = read_nifti(tmp_path / name)
        np.testing.assert_array_equal(data, brain().astype(np.float32))


def test_constant_scan_is_refused_before_resampling_adds_an_edge(tmp_path: Path) -> None:
    path = save(tmp_path / "constant_2mm.nii.gz", np.full(SHAPE, 40, dtype=np.int16), np.diag([2.0, 2.0, 2.0, 1.0]))
    with pytest.raises(VolumeError, match="same value"):
        read_nifti(path, spacing_mm=1.5)


@pytest.mark.parametrize(
    ("name", "make", "problem"),
    [
        ("nan_affine.nii.gz", lambda p: _with_header(p, brain(), srow_x=[np.nan, 0, 0, 0]), "affine holds NaN"),
        ("inf_affine.nii", lambda p: _with_header(p, brain(), srow_y=[0, np.inf, 0, 0]), "NaN or infinite values"),
        ("flat_affine.nii.gz", lambda p: _with_header(p, brain(), srow_z=[0, 0, 0, 5]), "affine is singular"),
        ("complex.nii.gz", lambda p: save(p, brain().astype(np.complex64)), "not a real number type"),
        ("rgb.nii.gz", lambda p: save(p, np.zeros(SHAPE, dtype=[(c, "u1") for c in "RGB"])), "not a real number type"),
        ("five_d.nii.gz", lambda p: save(p, brain()[..., None, None].repeat(2, axis=4)), r"got shape .* \(5-D\)"),
        ("flat.nii.gz", lambda p: save(p, brain()[:, :, 0]), r"\(2-D\)"),
        ("nan_voxels.nii.gz", lambda p: _with_header(p, brain(), pixdim=[1, np.nan, 1, 1, 1, 1, 1, 1]), "voxel sizes"),
        ("constant.nii.gz", lambda p: save(p, np.full(SHAPE, 40, dtype=np.int16)), "same value"),
        ("offset_zero.nii", lambda p: _with_header(p, brain(), vox_offset=0), "offset 0 lies inside the header"),
        ("micro_voxels.nii.gz", lambda p: _with_header(p, brain(), pixdim=[1, 1e-6, 1, 1, 1, 1, 1, 1]), "below 0.01 mm"),
        ("micro_affine.nii.gz", lambda p: _with_header(p, brain(), srow_x=[1e-38, 0, 0, 0]), "affine's voxel sizes .* below"),
        ("wide_affine.nii", lambda p: _with_header(p, brain(), srow_x=[500, 0, 0, 0]), r"contradict the header's \(1 × 1 × 1 mm\)"),
        ("flag_without_room.nii", lambda p: _with_extension_bytes(p, b""), "extension flag is set, but the voxel data offset"),
        ("flag_without_room.nii.gz", lambda p: _with_extension_bytes(p, b""), "leaves no room for an extension"),
        ("huge_extension.nii.gz", lambda p: _with_extension_bytes(p, _extension(2**31 - 16)), "declares 2,147,483,632 bytes"),
        ("tiny_extension.nii", lambda p: _with_extension_bytes(p, _extension(8)), "declares 8 bytes"),
        ("short_extension.nii", lambda p: _with_extension_bytes(p, _extension(64), room=32), "declares 64 bytes, but 32"),
    ],
)
def test_refused_with_the_problem_named(tmp_path: Path, name: str, make, problem: str) -> None:  # noqa: ANN001
    path = make(tmp_path / name)
    with pytest.raises(VolumeError, match=problem) as info:
        read_nifti(path)
    assert info.value.path == path and name in str(info.value)


def test_header_claiming_32_gib_is_refused_before_reading(tmp_path: Path) -> None:
    import tracemalloc

    header = nib.Nifti1Header()
    header.set_data_shape((2048, 2048, 2048))  # 8.6 G voxels of float32: 32 GiB
    header.set_data_dtype(np.float32)
    header.set_data_offset(352)
    for suffix, opener in ((".nii", open), (".nii.gz", gzip.open)):
        path = tmp_path / f"claims_32gib{suffix}"
        with opener(path, "wb") as handle:
            handle.write(header.binaryblock + b"\0" * 4 + bytes(64))
        assert path.stat().st_size < 2048
        tracemalloc.start()
        try:
            with pytest.raises(VolumeError, match="image of 8,589,934,592 voxels exceeds the limit of 134,217,728"):
                read_nifti(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 5_000_000


def test_compressed_file_under_the_limit_costs_only_what_it_holds(tmp_path: Path) -> None:
    import tracemalloc

    header = nib.Nifti1Header()
    header.set_data_shape((512, 512, 256))  # 64 M float64 voxels claimed: 512 MiB; the file holds 1 KiB
    header.set_data_dtype(np.float64)
    header.set_data_offset(352)
    path = tmp_path / "claims_512mib.nii.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(header.binaryblock + b"\0" * 4 + bytes(1024))
    tracemalloc.start()
    try:
        with pytest.raises(VolumeError, match="truncated or corrupt data") as info:
            read_nifti(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "the file holds 1,024" in str(info.value)
    assert peak < 20_000_000


def test_uncompressed_file_shorter_than_its_header_is_refused_before_reading(bad: dict) -> None:
    with pytest.raises(VolumeError, match=r"truncated or corrupt data: the header needs [\d,]+ bytes, the file holds"):
        read_nifti(bad["truncated_nii"])


def test_corrupt_compressed_data_fails_the_checksum(tmp_path: Path, bad: dict) -> None:
    damaged = bytearray(bad["good"].read_bytes())
    damaged[-8] ^= 0xFF  # the gzip CRC of the data: the voxels themselves are intact
    path = tmp_path / "bad_crc.nii.gz"
    path.write_bytes(bytes(damaged))
    with pytest.raises(VolumeError, match=r"truncated or corrupt data \(BadGzipFile: CRC check failed"):
        read_nifti(path)


def test_voxel_limit_is_configurable(bad: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from simpleslicenet.data.nifti import MAX_VOXELS_ENV, voxel_limit

    monkeypatch.setenv(MAX_VOXELS_ENV, "1000")
    assert voxel_limit() == 1000
    with pytest.raises(VolumeError, match="image of 10,752 voxels exceeds the limit of 1,000") as info:
        read_nifti(bad["good"])
    assert MAX_VOXELS_ENV in str(info.value)
    assert read_nifti(bad["good"], max_voxels=20_000)[0].shape == SHAPE
    monkeypatch.setenv(MAX_VOXELS_ENV, "lots")
    with pytest.raises(ValueError, match="must be a positive whole number of voxels, got 'lots'"):
        voxel_limit()


def test_resampled_grid_is_held_to_the_limits(tmp_path: Path, bad: dict) -> None:
    huge_voxels = save(tmp_path / "huge_voxels.nii.gz", brain(), np.diag([20.0, 20.0, 20.0, 1.0]))
    with pytest.raises(VolumeError, match="resampling to 1 mm would make .* voxels of each voxel") as info:
        read_nifti(huge_voxels, spacing_mm=1.0)
    assert "20 × 20 × 20 mm" in str(info.value)
    with pytest.raises(VolumeError, match="resampled grid at 0.5 mm would hold .* over the limit of 20,000"):
        read_nifti(bad["good"], spacing_mm=0.5, max_voxels=20_000)


@pytest.mark.parametrize("kind", ["symlink_loop", "broken_symlink", "fifo", "device"])
def test_links_pipes_and_devices_are_refused_without_blocking(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.nii"
    if kind == "symlink_loop":
        path.symlink_to(path.name)
        problem = "symbolic link loop"
    elif kind == "broken_symlink":
        path.symlink_to(tmp_path / "gone.nii")
        problem = "broken symbolic link"
    elif kind == "fifo":
        os.mkfifo(path)  # opening it for reading would block forever
        problem = "not a regular file"
    else:
        path.symlink_to(os.devnull)
        problem = "not a regular file"
    with pytest.raises(VolumeError, match=problem) as info:
        read_nifti(path)
    assert info.value.path == path


def test_mask_grid_is_checked_from_its_header_before_reading(bad: dict) -> None:
    from simpleslicenet.data.nifti import read_header

    reference = read_header(bad["good"]).geometry()
    with pytest.raises(VolumeError, match="mask shape") as info:
        read_mask(bad["mask_shape"], reference)
    assert "short_mask.nii.gz" in str(info.value)


# --- datamodule validation at setup -----------------------------------------------------------


def test_setup_lists_every_bad_file_at_once(tmp_path: Path) -> None:
    from simpleslicenet.data.datamodules.base import DatasetError

    root = tmp_path / "many_problems"
    lesion = np.zeros(SHAPE, dtype=np.uint8)
    lesion[10:14, 12:16, 6:9] = 1
    save(root / "train" / "good" / "h1.nii.gz", brain())
    save(root / "train" / "good" / "h2.nii.gz", brain(seed=2))
    save(root / "train" / "good" / "h2_brain.nii.gz", np.zeros(SHAPE, dtype=np.uint8))  # empty brain mask
    (root / "train" / "good" / "h3.nii.gz").write_bytes(b"not a scan")
    save(root / "test" / "lesion" / "t1.nii.gz", brain(seed=3))
    save(root / "test" / "lesion" / "t1_mask.nii.gz", lesion[:, :, :-2])  # wrong shape
    save(root / "test" / "lesion" / "t2.nii.gz", brain(seed=4))
    shifted = np.eye(4)
    shifted[1, 3] = 3.0
    save(root / "test" / "lesion" / "t2_mask.nii.gz", lesion, shifted)  # other affine
    save(root / "test" / "lesion" / "t3.nii.gz", brain(seed=5))
    save(root / "test" / "lesion" / "t3_mask.nii.gz", np.zeros(SHAPE, dtype=np.uint8))  # empty lesion mask
    save(root / "test" / "good" / "g1.nii.gz", brain(seed=6))
    datamodule = NiftiFolder(root, target_shape=(16, 16, 8), val_fraction=0)
    with pytest.raises(DatasetError, match="5 bad files in the dataset") as info:
        datamodule.setup()
    message = str(info.value)
    for name, problem in [
        ("h2_brain.nii.gz", "brain mask is empty"),
        ("h3.nii.gz", "not a readable NIfTI file"),
        ("t1_mask.nii.gz", "mask shape"),
        ("t2_mask.nii.gz", "mask affine differs"),
        ("t3_mask.nii.gz", "lesion mask is empty"),
    ]:
        assert any(name in line and problem in line for line in message.splitlines()), (name, message)
    assert len(info.value.errors) == 5


def test_check_samples_finds_duplicates_and_non_files(tmp_path: Path) -> None:
    import pandas as pd

    from simpleslicenet.data.datamodules.base import check_samples

    scan = save(tmp_path / "a.nii.gz", brain())
    folder = tmp_path / "x.nii.gz"
    folder.mkdir()
    loop = tmp_path / "loop.nii.gz"
    loop.symlink_to(loop.name)
    rows = [
        ("v1", scan, "train"), ("v1", tmp_path / "b.nii.gz", "test"), ("v2", scan, "test"),
        ("v3", folder, "test"), ("v4", loop, "test"),
    ]  # fmt: skip
    empty = {"mask_path": None, "brain_mask_path": None, "label_index": 0}
    samples = pd.DataFrame([{"volume_id": v, "image_path": str(p), **empty, "split": s} for v, p, s in rows])
    problems = [str(problem) for problem in check_samples(samples, VolumePreprocessing())]
    assert any("volume id 'v1' is used by 2 scans" in p for p in problems)
    assert any("a.nii.gz: the same file is listed 2 times (v1, v2)" in p for p in problems)
    assert any("b.nii.gz: file does not exist" in p for p in problems)
    assert any("x.nii.gz: is a folder" in p for p in problems)
    assert any("loop.nii.gz: symbolic link loop" in p for p in problems)

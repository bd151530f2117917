"""Bad input gives a clear error naming the file (or folder) and the problem; writes are atomic."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from simpleslicenet.data.datamodules import IXI, BraTS2021, IXIBraTS, NiftiFolder
from simpleslicenet.data.volume import VolumeError, load_volume, read_mask, read_nifti, write_nifti

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
    assert load_volume(bad["singleton_4d"], target_shape=(16, 16, 8)).image.shape == (16, 16, 8)
    assert read_nifti(bad["singleton_4d"], resample_mm=2.0)[0].ndim == 3


def test_real_4d_series_is_refused(bad: dict) -> None:
    with pytest.raises(VolumeError, match="expected a 3-D scan") as info:
        read_nifti(bad["series_4d"])
    assert "series_4d.nii.gz" in str(info.value) and "4-D" in str(info.value)
    with pytest.raises(VolumeError, match="4-D"):
        read_nifti(bad["series_4d"], resample_mm=2.0)


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

    def save_half_then_fail(img: nib.Nifti1Image, filename: str) -> None:
        with open(filename, "wb") as handle:  # noqa: PTH123
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_nifti(image, geometry, target, overwrite=True)
    assert target.read_bytes() == b"previous result"
    assert os.listdir(tmp_path) == ["map.nii.gz"]

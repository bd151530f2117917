"""Every datamodule on small generated files with the real datasets' names, layouts and orientations."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from simpleslicenet.data import VolumeBatch
from simpleslicenet.data.datamodules import IXI, Br35H, BraTS2021, IXIBraTS, NiftiFolder

SMALL = (36, 40, 24)  # on-disk shape of the small scans
TARGET = (32, 28, 16)  # model grid (x, y, z): x != y so a swapped H/W cannot pass
BRATS_SHAPE = (240, 240, 155)
# The official BraTS files are stored with flipped x and y (LPS-like), 1 mm.
BRATS_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239], [0, 0, 1.0, 0], [0, 0, 0, 1]])
BRATS_MODALITY_OFFSET = {"t1": 100, "t1ce": 200, "t2": 300, "flair": 400}
IXI_SUBJECTS = ["IXI002-Guys-0828", "IXI012-HH-1211", "IXI013-HH-1212", "IXI014-HH-1236", "IXI015-HH-1258"]


def phantom_scan(
    shape: tuple[int, int, int],
    seed: int,
    lesion: bool,
    offset: int = 300,
) -> tuple[np.ndarray, np.ndarray]:
    """Ellipsoid brain (int16) and a spherical lesion mask near its centre (empty when healthy)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = ((grid / 0.75) ** 2).sum(0) < 1
    image = np.where(inside, offset + rng.integers(0, 80, shape), 0).astype(np.int16)
    mask = np.zeros(shape, dtype=np.uint8)
    if lesion:
        centre = rng.uniform(-0.2, 0.2, size=3)
        mask[(((grid - centre[:, None, None, None]) / 0.25) ** 2).sum(0) < 1] = 1
        image[mask > 0] += 400
    return image, mask


def brain_box(shape: tuple[int, int, int]) -> np.ndarray:
    """Brain mask file content: a 28×28×16 box centred in the scan (fits the model grid exactly in y)."""
    box = np.zeros(shape, dtype=np.uint8)
    box[4:32, 6:34, 4:20] = 1
    return box


def save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


@pytest.fixture(scope="session")
def folder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """NiftiFolder layout: 3 healthy training scans, 2 healthy and 4 lesion test scans, no val folder."""
    root = tmp_path_factory.mktemp("nifti_folder")
    seed = 0
    for split, label, count in (("train", "good", 3), ("test", "good", 2), ("test", "lesion", 4)):
        for i in range(count):
            seed += 1
            image, mask = phantom_scan(SMALL, seed, lesion=label == "lesion")
            save(root / split / label / f"case{seed:02d}.nii.gz", image)
            if label == "lesion":
                save(root / split / label / f"case{seed:02d}_mask.nii.gz", mask)
            if i == 0:  # a box, unlike any intensity-derived mask, so its use is visible
                save(root / split / label / f"case{seed:02d}_brain.nii.gz", brain_box(SMALL))
    (root / "train" / "good" / "README.txt").write_text("not a scan")
    return root


@pytest.fixture(scope="session")
def brats_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four small BraTS subjects with every modality; each modality has its own intensity level."""
    root = tmp_path_factory.mktemp("brats")
    for s in range(4):
        subject = root / f"BraTS2021_{s:05d}"
        for modality, offset in BRATS_MODALITY_OFFSET.items():
            image, mask = phantom_scan(SMALL, seed=10 + s, lesion=True, offset=offset)
            save(subject / f"{subject.name}_{modality}.nii.gz", image, BRATS_AFFINE)
        labels = mask * np.array([1, 2, 4], dtype=np.uint8)[np.arange(mask.size) % 3].reshape(mask.shape)
        save(subject / f"{subject.name}_seg.nii.gz", labels, BRATS_AFFINE)  # BraTS labels 1, 2, 4
    (root / "results").mkdir()  # a stray folder that is not a subject
    return root


@pytest.fixture(scope="session")
def brats_full_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One subject at the real BraTS size (240×240×155, int16 / uint8): its t2 and seg only."""
    root = tmp_path_factory.mktemp("brats_full")
    subject = root / "BraTS2021_01666"
    image, mask = phantom_scan(BRATS_SHAPE, seed=5, lesion=True)
    save(subject / f"{subject.name}_t2.nii.gz", image, BRATS_AFFINE)
    save(subject / f"{subject.name}_seg.nii.gz", mask * 2, BRATS_AFFINE)
    return root


@pytest.fixture(scope="session")
def ixi_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five IXI subjects with T1, T2 and PD, plus files the modality filter must skip."""
    root = tmp_path_factory.mktemp("ixi")
    for s, subject in enumerate(IXI_SUBJECTS):
        for m, modality in enumerate(("T1", "T2", "PD")):
            image, _ = phantom_scan(SMALL, seed=100 + 3 * s + m, lesion=False, offset=100 * (m + 1))
            save(root / f"{subject}-{modality}.nii.gz", image)
    save(root / "IXI002-Guys-0828-MRA.nii.gz", phantom_scan(SMALL, 1, lesion=False)[0])
    return root


@pytest.fixture(scope="session")
def folder_datamodule(folder_root: Path) -> NiftiFolder:
    datamodule = NiftiFolder(folder_root, target_shape=TARGET, seed=3)
    datamodule.setup()
    return datamodule


def volume_ids(dataset) -> set[str]:  # noqa: ANN001
    return set(dataset.samples["volume_id"])


def labels(dataset) -> list[int]:  # noqa: ANN001
    return sorted(int(v) for v in dataset.samples["label_index"])


def check_volume_batch(batch: VolumeBatch, expect_lesion: bool | None = None) -> None:
    """One volume as a batch of its slices, in the model layout ``[D, H, W] = (z, y, x)``."""
    x, y, z = TARGET
    assert isinstance(batch, VolumeBatch)
    assert batch.image.shape == (z, 3, y, x)
    assert batch.image.min() >= 0 and batch.image.max() <= 1
    assert torch.equal(batch.image[:, 0], batch.image[:, 2])  # grey repeated to three channels
    assert batch.gt_mask.shape == (z, y, x) and batch.gt_mask.dtype == torch.bool
    assert batch.brain_mask.shape == (z, y, x) and batch.brain_mask.any()
    assert batch.volume_index.unique().numel() == 1
    assert torch.equal(batch.slice_index, torch.arange(z))
    assert torch.equal(batch.gt_label, batch.gt_mask.flatten(1).any(1).long())
    assert len(batch.geometry) == z and batch.geometry[0] is batch.geometry[-1]
    if expect_lesion is not None:
        assert bool(batch.gt_mask.any()) == expect_lesion
        assert (batch.volume_label == int(expect_lesion)).all()
        if expect_lesion:  # the lesion is inside the brain mask
            assert not (batch.gt_mask & ~batch.brain_mask).any()


# --- NiftiFolder ------------------------------------------------------------------------------


def test_folder_counts_per_split(folder_datamodule: NiftiFolder) -> None:
    # val carved from test at 0.3 per label: round(2 * 0.3) = 1 healthy, round(4 * 0.3) = 1 lesion.
    assert labels(folder_datamodule.train_data) == [0, 0, 0]
    assert labels(folder_datamodule.val_data) == [0, 1]
    assert labels(folder_datamodule.test_data) == [0, 1, 1, 1]  # healthy test volumes are kept
    assert not volume_ids(folder_datamodule.val_data) & volume_ids(folder_datamodule.test_data)
    assert all(v.startswith("train/good/") for v in volume_ids(folder_datamodule.train_data))
    # Brain masks beside a scan are found by the naming rule, and are never scans themselves.
    table = folder_datamodule.volume_table
    assert table["brain_mask_path"].notna().sum() == 3
    assert not table["image_path"].str.contains("_mask|_brain").any()
    assert table.loc[table.label_index == 0, "mask_path"].isna().all()


def test_folder_batches(folder_datamodule: NiftiFolder) -> None:
    for batch in folder_datamodule.train_dataloader():
        check_volume_batch(batch, expect_lesion=False)
    seen = []
    for batch in folder_datamodule.test_dataloader():
        is_lesion = "/lesion/" in batch.image_path[0]
        check_volume_batch(batch, expect_lesion=is_lesion)
        seen.append(int(batch.volume_index[0]))
    assert sorted(seen) == list(range(len(folder_datamodule.test_data)))


def test_cached_volume_holds_one_grey_channel(folder_datamodule: NiftiFolder) -> None:
    dataset = folder_datamodule.train_data
    first, again = dataset[0], dataset[0]
    # Three channels seen, one stored: the cache keeps a single grey copy of the volume.
    assert first.image.stride(1) == 0 and first.image.untyped_storage().nbytes() == first.image[:, 0].numel() * 4
    assert first.image.data_ptr() == again.image.data_ptr() and first is not again


def test_folder_brain_mask_file_is_used(folder_datamodule: NiftiFolder) -> None:
    dataset = folder_datamodule.train_data
    row = int(dataset.samples.index[dataset.samples["brain_mask_path"].notna()][0])
    batch = dataset[row]
    # The box (28×28×16) lies wholly inside the 32×28×16 grid centred on it.
    assert int(batch.brain_mask.sum()) == 28 * 28 * 16
    assert (batch.brain_mask.flatten(1).sum(1) == 28 * 28).all()  # the box spans every slice
    assert not batch.image[~batch.brain_mask.unsqueeze(1).expand_as(batch.image)].any()  # percentile mode


def test_folder_split_is_seeded(folder_root: Path) -> None:
    def split(seed: int) -> tuple[frozenset, frozenset]:
        table = NiftiFolder(folder_root, target_shape=TARGET, seed=seed).split_samples()
        return tuple(frozenset(table.loc[table.split == s, "volume_id"]) for s in ("val", "test"))

    assert split(3) == split(3)
    assert len({split(seed) for seed in range(8)}) > 1  # the seed matters


def test_folder_uses_given_validation_folder(tmp_path: Path, folder_root: Path) -> None:
    root = tmp_path / "with_val"
    for path in folder_root.rglob("*.nii.gz"):
        target = root / path.relative_to(folder_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    image, mask = phantom_scan(SMALL, 99, lesion=True)
    save(root / "val" / "lesion" / "v1.nii.gz", image)
    save(root / "val" / "lesion" / "v1_mask.nii.gz", mask)
    table = NiftiFolder(root, target_shape=TARGET).split_samples()
    assert list(table.loc[table.split == "val", "volume_id"]) == ["val/lesion/v1"]
    assert (table.split == "test").sum() == 6


# --- BraTS ------------------------------------------------------------------------------------


def test_brats_counts_and_modality(brats_root: Path, ixi_root: Path) -> None:
    datamodule = BraTS2021(brats_root, modality="flair", healthy_root=ixi_root, target_shape=TARGET)
    datamodule.setup()
    assert len(datamodule.train_data) == 16  # every scan under healthy_root
    assert labels(datamodule.train_data) == [0] * 16
    assert labels(datamodule.val_data) == [1]  # round(4 * 0.3)
    assert labels(datamodule.test_data) == [1, 1, 1]
    assert not volume_ids(datamodule.val_data) & volume_ids(datamodule.test_data)
    assert datamodule.test_data.samples["image_path"].str.endswith("_flair.nii.gz").all()
    assert datamodule.test_data.samples["mask_path"].str.endswith("_seg.nii.gz").all()
    batch = next(iter(datamodule.test_dataloader()))
    check_volume_batch(batch, expect_lesion=True)
    next(iter(datamodule.train_dataloader()))  # healthy_root makes training possible


@pytest.mark.parametrize("modality", ["t1", "t1ce", "t2", "flair"])
def test_brats_modality_selects_the_file(brats_root: Path, modality: str) -> None:
    datamodule = BraTS2021(brats_root, modality=modality.upper(), target_shape=TARGET, intensity="minmax")
    datamodule.setup()
    path = datamodule.test_data.samples["image_path"].iloc[0]
    assert path.endswith(f"_{modality}.nii.gz")
    # The loaded volume is that modality: min-max scaling puts healthy tissue (offset + 0..79, lesion
    # + 400, background 0) at its own level, (offset + 39.5) / (offset + 479) on average.
    batch = next(iter(datamodule.test_dataloader()))
    tissue = batch.image[:, 0][batch.brain_mask & ~batch.gt_mask]
    offset = BRATS_MODALITY_OFFSET[modality]
    assert tissue.mean().item() == pytest.approx((offset + 39.5) / (offset + 479), abs=0.01)


def test_brats_full_size_volume(brats_full_root: Path) -> None:
    datamodule = BraTS2021(brats_full_root, target_shape=(192, 192, 96), val_fraction=0)
    datamodule.setup()
    batch = next(iter(datamodule.test_dataloader()))
    assert batch.image.shape == (96, 3, 192, 192)
    assert batch.geometry[0].original_shape == BRATS_SHAPE
    np.testing.assert_allclose(batch.geometry[0].affine, BRATS_AFFINE)
    # seg labels {0, 2}: every labelled voxel is anomalous, and the whole tumour fits in the box.
    seg = np.asarray(nib.load(datamodule.test_data.samples["mask_path"].iloc[0]).dataobj)
    assert int(batch.gt_mask.sum()) == int((seg > 0).sum())


# --- IXI --------------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["t1", "t2", "pd"])
def test_ixi_modality_filter_and_held_out_subjects(ixi_root: Path, modality: str) -> None:
    datamodule = IXI(ixi_root, modality=modality, target_shape=TARGET, test_fraction=0.4, seed=1)
    datamodule.setup()
    table = datamodule.volume_table
    assert len(table) == len(IXI_SUBJECTS)  # MRA and other modalities skipped
    assert table["image_path"].str.endswith(f"-{modality.upper()}.nii.gz").all()
    assert (table.label_index == 0).all()
    # 2 of 5 subjects held out; 1 of those 2 becomes validation.
    assert (len(datamodule.train_data), len(datamodule.val_data), len(datamodule.test_data)) == (3, 1, 1)
    ids = [volume_ids(d) for d in (datamodule.train_data, datamodule.val_data, datamodule.test_data)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    check_volume_batch(next(iter(datamodule.train_dataloader())), expect_lesion=False)


def test_ixi_held_out_subjects_are_seeded(ixi_root: Path) -> None:
    def test_subjects(seed: int) -> frozenset:
        table = IXI(ixi_root, test_fraction=0.4, seed=seed, val_fraction=0).split_samples()
        return frozenset(table.loc[table.split == "test", "volume_id"])

    assert test_subjects(5) == test_subjects(5)
    assert len({test_subjects(seed) for seed in range(8)}) > 1


def test_ixi_brats_protocol(ixi_root: Path, brats_root: Path) -> None:
    datamodule = IXIBraTS(ixi_root, brats_root, modality="t2", target_shape=TARGET)
    datamodule.setup()
    assert datamodule.category == "IXIBraTS_t2"
    train = datamodule.train_data.samples
    assert len(train) == 5 and train["image_path"].str.endswith("-T2.nii.gz").all()
    assert labels(datamodule.val_data) == [1] and labels(datamodule.test_data) == [1, 1, 1]
    assert datamodule.test_data.samples["image_path"].str.endswith("_t2.nii.gz").all()
    assert not volume_ids(datamodule.val_data) & volume_ids(datamodule.test_data)
    check_volume_batch(next(iter(datamodule.train_dataloader())), expect_lesion=False)
    check_volume_batch(next(iter(datamodule.val_dataloader())), expect_lesion=True)


def test_ixi_brats_with_healthy_test_volumes(ixi_root: Path, brats_root: Path) -> None:
    datamodule = IXIBraTS(ixi_root, brats_root, healthy_test_fraction=0.4, target_shape=TARGET)
    datamodule.setup()
    assert labels(datamodule.train_data) == [0, 0, 0]
    # Both evaluation splits hold healthy and tumour volumes, stratified.
    assert labels(datamodule.val_data) == [0, 1]
    assert labels(datamodule.test_data) == [0, 1, 1, 1]


# --- Br35H ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def br35h_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Kaggle layout: yes/ (tumour) and no/ (healthy) JPG/PNG images of mixed sizes and modes, plus pred/."""
    root = tmp_path_factory.mktemp("br35h")
    rng = np.random.default_rng(0)
    for folder, count in (("yes", 6), ("no", 10), ("pred", 2)):
        (root / folder).mkdir()
        for i in range(count):
            size = (20 + 3 * i, 24 + 2 * i)
            pixels = rng.integers(0, 255, size, dtype=np.uint8)
            image = PILImage.fromarray(pixels) if i % 2 else PILImage.fromarray(np.stack([pixels] * 3, -1))
            image.save(root / folder / f"{folder}{i}.{'jpg' if i % 3 else 'png'}")
    return root


def test_br35h(br35h_root: Path) -> None:
    datamodule = Br35H(br35h_root, image_size=(64, 64), train_batch_size=4, eval_batch_size=4)
    datamodule.setup()
    train, val, test = (d.samples for d in (datamodule.train_data, datamodule.val_data, datamodule.test_data))
    assert (train.label_index == 0).all()
    assert (val.label_index == 1).sum() + (test.label_index == 1).sum() == 6
    assert len(train) + (val.label_index == 0).sum() + (test.label_index == 0).sum() == 10
    for split in (val, test):
        assert set(split.label_index) == {0, 1}
    assert not set(val.image_path) & set(test.image_path)
    assert not any("/pred/" in p for p in (*train.image_path, *val.image_path, *test.image_path))
    assert datamodule.test_data.task == "classification"
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.image.shape == (4, 3, 64, 64)
    batch = next(iter(datamodule.test_dataloader()))
    assert batch.image.shape[1:] == (3, 64, 64)

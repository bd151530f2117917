"""Your own NIfTI scans in a folder tree: healthy scans to train on, healthy and lesion scans to test on.

Example:
    >>> from simpleslicenet.data.datamodules import NiftiFolder
    >>> datamodule = NiftiFolder(root="./datasets/my_mri", target_shape=(96, 96, 48))  # doctest: +SKIP
    >>> datamodule.setup()  # doctest: +SKIP
    >>> batch = next(iter(datamodule.test_dataloader()))  # doctest: +SKIP
    >>> batch.image.shape  # one volume: [D, 3, H, W]  # doctest: +SKIP
    torch.Size([48, 3, 96, 96])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from simpleslicenet.data.dataset import SAMPLE_COLUMNS
from simpleslicenet.data.datamodules.base import VolumeDataModule
from simpleslicenet.data.volume import NIFTI_SUFFIXES, VolumeError

__all__ = [
    "NiftiFolder",
    "ScanFiles",
    "find_scans",
    "scans_to_samples",
    "companion_file",
    "nifti_stem",
    "MASK_SUFFIX",
    "BRAIN_SUFFIX",
]

MASK_SUFFIX = "_mask"
BRAIN_SUFFIX = "_brain"


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


def nifti_stem(path: Path) -> str | None:
    """``NAME`` of ``NAME.nii`` / ``NAME.nii.gz``; ``None`` if the file is not a NIfTI file."""
    for suffix in sorted(NIFTI_SUFFIXES, key=len, reverse=True):
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def companion_file(folder: Path, name: str) -> Path | None:
    """``folder/name.nii.gz`` or ``folder/name.nii`` if either exists."""
    for suffix in NIFTI_SUFFIXES:
        candidate = folder / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def find_scans(folder: Path, recursive: bool = False) -> list[ScanFiles]:
    """Scans in a folder by the naming rule, sorted by path.

    ``NAME.nii[.gz]`` is a scan; ``NAME_mask.nii[.gz]`` beside it is its lesion mask and
    ``NAME_brain.nii[.gz]`` its brain mask. Files whose name ends in ``_mask`` or ``_brain`` are never
    scans; hidden files and non-NIfTI files are ignored.

    Args:
        folder: Folder to scan.
        recursive: Also look in sub-folders.

    Raises:
        VolumeError: The folder does not exist, or a mask has no scan of the same ``NAME`` beside it
            (almost always a naming mistake that would otherwise silently drop a lesion mask).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeError(folder, "folder does not exist")
    files = folder.rglob("*") if recursive else folder.iterdir()
    scans: list[ScanFiles] = []
    for path in sorted(files):
        name = nifti_stem(path)
        if name is None or path.name.startswith(".") or not path.is_file():
            continue
        if name.endswith((MASK_SUFFIX, BRAIN_SUFFIX)):
            owner = name.rsplit("_", 1)[0]
            if companion_file(path.parent, owner) is None:
                raise VolumeError(path, f"mask without a scan: expected {owner}.nii.gz beside it")
            continue
        scans.append(
            ScanFiles(
                name=name,
                image_path=path,
                mask_path=companion_file(path.parent, name + MASK_SUFFIX),
                brain_mask_path=companion_file(path.parent, name + BRAIN_SUFFIX),
            ),
        )
    return scans


def scans_to_samples(scans: list[ScanFiles], split: str, label: int, id_prefix: str) -> pd.DataFrame:
    """Samples table rows for scans of one split and label.

    Raises:
        VolumeError: A lesion scan (``label == 1``) has no lesion mask.
    """
    rows = []
    for scan in scans:
        if label == 1 and scan.mask_path is None:
            raise VolumeError(
                scan.image_path,
                f"lesion scan has no mask: expected {scan.name}{MASK_SUFFIX}.nii.gz beside it",
            )
        rows.append(
            {
                "volume_id": f"{id_prefix}{scan.name}",
                "image_path": str(scan.image_path),
                # Healthy scans are healthy: a mask beside one is not used as a lesion label.
                "mask_path": str(scan.mask_path) if label == 1 else None,
                "brain_mask_path": str(scan.brain_mask_path) if scan.brain_mask_path else None,
                "label_index": label,
                "split": split,
            },
        )
    return pd.DataFrame(rows, columns=SAMPLE_COLUMNS)


class NiftiFolder(VolumeDataModule):
    """Healthy and lesion NIfTI scans in a folder tree.

    Layout::

        root/
        ├── train/good/            healthy scans (training uses these only)
        ├── val/good/  val/lesion/ optional; carved from test (stratified, seeded) when absent
        └── test/good/ test/lesion/

    Naming rule, in every folder: ``NAME.nii.gz`` (or ``NAME.nii``) is a scan; ``NAME_mask.nii.gz``
    beside it is its lesion mask (anything > 0 is lesion; required for scans under ``lesion/``,
    ignored under ``good/``); ``NAME_brain.nii.gz`` beside it is its brain mask (optional; derived
    from intensities when absent). Files ending in ``_mask`` or ``_brain`` are never scans. Masks must
    share their scan's shape and affine.

    Scans should be skull-stripped and registered to a common space (the paper uses MNI152 at 1 mm);
    :func:`simpleslicenet.data.preprocess.preprocess_scan` does an approximate version of that.

    Args:
        root: Dataset folder with the layout above.
        target_shape: Model grid ``(x, y, z)``; ``(192, 192, 96)`` as in the paper.
        intensity: ``"percentile"`` or ``"minmax"`` intensity scaling.
        resample_mm: Resample scans to this isotropic spacing first (``None``: keep the file's grid).
        val_fraction: Share of test volumes moved to validation when ``root/val`` holds no scans.
        train_batch_size: Volumes per training batch.
        eval_batch_size: Volumes per evaluation batch.
        num_workers: Data loader workers.
        cache: Keep preprocessed volumes in memory.
        seed: Seed of the validation split.

    Raises:
        VolumeError: ``root`` is missing, holds no training or no test scans, or a lesion scan has no mask.
    """

    SPLITS = ("train", "val", "test")
    LABELS = {"good": 0, "lesion": 1}

    def __init__(
        self,
        root: str | Path,
        target_shape: tuple[int, int, int] = (192, 192, 96),
        intensity: str = "percentile",
        resample_mm: float | None = None,
        val_fraction: float = 0.3,
        train_batch_size: int = 1,
        eval_batch_size: int = 1,
        num_workers: int = 0,
        cache: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(
            root=root,
            target_shape=target_shape,
            intensity=intensity,
            resample_mm=resample_mm,
            val_fraction=val_fraction,
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            cache=cache,
            seed=seed,
        )

    def make_samples(self) -> pd.DataFrame:
        """One row per scan under ``root/{train,val,test}/{good,lesion}``."""
        if not self.root.is_dir():
            raise VolumeError(self.root, "dataset folder does not exist")
        tables = []
        for split in self.SPLITS:
            for label_name, label in self.LABELS.items():
                folder = self.root / split / label_name
                if split == "train" and label == 1:
                    if folder.is_dir() and find_scans(folder):
                        raise VolumeError(folder, "training must use healthy scans only; move these to test/lesion")
                    continue
                if folder.is_dir():
                    tables.append(scans_to_samples(find_scans(folder), split, label, f"{split}/{label_name}/"))
        samples = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=SAMPLE_COLUMNS)
        if samples.empty:
            raise VolumeError(
                self.root,
                "no scans found: expected NAME.nii.gz files under train/good, test/good and test/lesion",
            )
        if not (samples["split"] == "train").any():
            raise VolumeError(self.root / "train" / "good", "no healthy training scans (NAME.nii.gz) found")
        if not (samples["split"] == "test").any():
            raise VolumeError(self.root / "test", "no test scans found under test/good or test/lesion")
        return samples

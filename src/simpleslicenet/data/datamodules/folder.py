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


import pandas as pd

from simpleslicenet.data.dataset import SAMPLE_COLUMNS
from simpleslicenet.data.datamodules.base import VolumeDataModule
from simpleslicenet.data.nifti import VolumeError
from simpleslicenet.data.scans import MASK_SUFFIX, ScanFiles, list_scans

__all__ = ["NiftiFolder", "scans_to_samples"]


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
    ``simpleslicenet preprocess`` (:mod:`simpleslicenet.data.preprocess`) does that for raw scans and DICOM series.

    Takes the :class:`~simpleslicenet.data.datamodules.base.VolumeDataModule` arguments (``root``: the
    dataset folder with the layout above; grid, spacing, scaling, splits, loaders).

    Raises:
        VolumeError: ``root`` is missing, holds no training or no test scans, or a lesion scan has no mask.
    """

    SPLITS = ("train", "val", "test")
    LABELS = {"good": 0, "lesion": 1}

    def make_samples(self) -> pd.DataFrame:
        """One row per scan under ``root/{train,val,test}/{good,lesion}``."""
        if not self.root.is_dir():
            raise VolumeError(self.root, "dataset folder does not exist")
        tables = []
        for split in self.SPLITS:
            for label_name, label in self.LABELS.items():
                folder = self.root / split / label_name
                if split == "train" and label == 1:
                    if folder.is_dir() and list_scans(folder):
                        raise VolumeError(folder, "training must use healthy scans only; move these to test/lesion")
                    continue
                if folder.is_dir():
                    tables.append(scans_to_samples(list_scans(folder), split, label, f"{split}/{label_name}/"))
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

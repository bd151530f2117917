"""BraTS 2021: brain tumour MRI with whole-tumour labels, the paper's test set.

Every BraTS volume holds a tumour, so BraTS alone can only validate and test; training needs healthy
scans from elsewhere (``healthy_root``, e.g. preprocessed IXI), or use
:class:`~simpleslicenet.data.datamodules.ixi.IXIBraTS` for the paper's protocol in one datamodule.

The dataset cannot be downloaded automatically (registration at the Synapse / Kaggle pages is needed).

Example:
    >>> from simpleslicenet.data.datamodules import BraTS2021
    >>> datamodule = BraTS2021(  # doctest: +SKIP
    ...     root="./datasets/BraTS2021", modality="t2", healthy_root="./datasets/IXI_T2_mni",
    ... )
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from simpleslicenet.data.datamodules.base import MODALITIES, VolumeDataModule, check_modality
from simpleslicenet.data.datamodules.folder import scans_to_samples
from simpleslicenet.data.scans import companion_file, list_scans, nifti_stem
from simpleslicenet.data.dataset import SAMPLE_COLUMNS
from simpleslicenet.data.nifti import VolumeError

__all__ = ["BraTS2021", "BRATS_MODALITIES", "list_brats", "list_healthy", "hold_out_healthy"]

BRATS_MODALITIES = MODALITIES


def list_brats(root: str | Path, modality: str = "t2", split: str = "test") -> pd.DataFrame:
    """Samples table of a BraTS 2021 folder: one lesion volume per subject, mask ``seg > 0``.

    Layout: ``root/BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz`` (the official one;
    any sub-folder ``NAME`` holding ``NAME_<modality>`` and ``NAME_seg`` is a subject), or that layout
    after ``simpleslicenet preprocess --skull-stripped`` (``NAME_<modality>_mask`` and ``_brain`` beside
    each registered scan).

    Args:
        root: BraTS folder.
        modality: One of ``t1``, ``t1ce``, ``t2``, ``flair``.
        split: Split given to every volume.

    Raises:
        ValueError: Unknown modality.
        VolumeError: ``root`` missing or without subjects, or a subject lacks the modality or its ``seg``.
    """
    modality = check_modality(modality, BRATS_MODALITIES, "BraTS")
    root = Path(root)
    if not root.is_dir():
        raise VolumeError(root, "BraTS folder does not exist")
    subjects = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    rows = []
    for subject in subjects:
        present = list(subject.glob(f"{subject.name}_*.nii*"))
        if not present:
            continue  # not a subject folder (e.g. a notes or results folder)
        image = companion_file(subject, f"{subject.name}_{modality}")
        if image is None:
            raise VolumeError(subject, f"no {modality} scan: expected {subject.name}_{modality}.nii.gz")
        # The official mask, or the one `simpleslicenet preprocess` writes beside the registered scan.
        seg = companion_file(subject, f"{subject.name}_seg") or companion_file(subject, f"{nifti_stem(image)}_mask")
        if seg is None:
            raise VolumeError(image, f"lesion scan has no mask: expected {subject.name}_seg.nii.gz beside it")
        brain = companion_file(subject, f"{nifti_stem(image)}_brain")
        rows.append(
            {
                "volume_id": f"brats/{subject.name}",
                "image_path": str(image),
                "mask_path": str(seg),
                # BraTS is skull-stripped: the brain mask comes from intensities, or from preprocess's file.
                "brain_mask_path": None if brain is None else str(brain),
                "label_index": 1,
                "split": split,
            },
        )
    if not rows:
        raise VolumeError(root, "no BraTS subjects found: expected BraTS2021_XXXXX/BraTS2021_XXXXX_<modality>.nii.gz")
    return pd.DataFrame(rows, columns=SAMPLE_COLUMNS)


def list_healthy(root: str | Path) -> pd.DataFrame:
    """Samples table of a folder of healthy scans (any ``*.nii[.gz]``, searched recursively), all ``train``.

    The naming rule of :class:`~simpleslicenet.data.datamodules.folder.NiftiFolder` applies:
    ``NAME_brain.nii.gz`` beside a scan is its brain mask, ``_mask`` / ``_brain`` files are not scans.

    Raises:
        VolumeError: The folder is missing or holds no scans.
    """
    root = Path(root)
    scans = list_scans(root, recursive=True)
    if not scans:
        raise VolumeError(root, "no healthy scans (*.nii.gz) found")
    samples = scans_to_samples(scans, "train", 0, "healthy/")
    # Sub-folders may repeat a file name; the relative path keeps volume ids unique.
    samples["volume_id"] = ["healthy/" + str(s.image_path.relative_to(root)) for s in scans]
    return samples


def hold_out_healthy(
    samples: pd.DataFrame,
    fraction: float,
    seed: int,
    groups: list[str] | None = None,
) -> pd.DataFrame:
    """Move a seeded ``fraction`` of healthy training subjects to the test split.

    Args:
        samples: Table whose ``train`` rows are healthy.
        fraction: Share of subjects held out (0 keeps all for training).
        seed: Seed of the choice.
        groups: Subject of each row (rows of one subject move together); default one subject a row.
    """
    samples = samples.copy()
    if fraction <= 0:
        return samples
    groups = list(samples["volume_id"]) if groups is None else groups
    subjects = sorted(set(groups))
    n_test = int(round(len(subjects) * fraction))
    n_test = min(max(n_test, 1), len(subjects) - 1) if len(subjects) >= 2 else 0  # keep training non-empty
    chosen = set(np.random.default_rng(seed).choice(subjects, size=n_test, replace=False)) if n_test else set()
    samples.loc[[g in chosen for g in groups], "split"] = "test"
    return samples


class BraTS2021(VolumeDataModule):
    """BraTS 2021 tumour volumes for validation and test, healthy scans from ``healthy_root`` for training.

    ``seg > 0`` (whole tumour) is the anomaly mask. Every BraTS volume is a lesion volume: a
    ``val_fraction`` of them becomes the validation split (seeded), the rest the test split.
    BraTS is skull-stripped and co-registered (SRI24, 1 mm, 240×240×155); the paper's protocol also
    registers it affinely to MNI152 (see :mod:`simpleslicenet.data.preprocess`).

    Args:
        root: BraTS folder (``BraTS2021_XXXXX/BraTS2021_XXXXX_<modality>.nii.gz`` and ``_seg``).
        modality: ``t1``, ``t1ce``, ``t2`` (paper) or ``flair``.
        healthy_root: Folder of healthy scans for training (any ``*.nii.gz``, e.g. IXI preprocessed
            the same way). Without it the datamodule can validate and test a trained model, not train one.
        healthy_test_fraction: Share of the healthy subjects held out as normal test volumes
            (0 = the paper's protocol, tumour volumes only).
        **kwargs: The shared :class:`~simpleslicenet.data.datamodules.base.VolumeDataModule` arguments
            (``target_shape``, ``spacing_mm``, ``intensity``, ``brain_mask``, ``val_fraction``, loaders, ``seed``).

    Raises:
        ValueError: Unknown modality (raised at construction).
    """

    MODALITIES = BRATS_MODALITIES

    def __init__(
        self,
        root: str | Path = "./datasets/BraTS2021",
        modality: str = "t2",
        healthy_root: str | Path | None = None,
        healthy_test_fraction: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(root=root, modality=modality, **kwargs)
        self.healthy_root = Path(healthy_root) if healthy_root is not None else None
        self.healthy_test_fraction = healthy_test_fraction

    def make_samples(self) -> pd.DataFrame:
        """BraTS subjects (test) plus the healthy scans (train, a fraction held out for test)."""
        tables = [list_brats(self.root, self.modality)]
        if self.healthy_root is not None:
            healthy = list_healthy(self.healthy_root)
            tables.append(hold_out_healthy(healthy, self.healthy_test_fraction, self.seed))
        return pd.concat(tables, ignore_index=True)

    def train_dataloader(self):  # noqa: ANN201
        """Training loader over the healthy scans.

        Raises:
            ValueError: No ``healthy_root`` was given (BraTS has no healthy volumes to train on).
        """
        if self.healthy_root is None:
            msg = (
                f"{self.root}: BraTS2021 holds tumour volumes only, so it cannot train an anomaly detector; "
                "pass healthy_root=<folder of healthy scans, e.g. preprocessed IXI> or use IXIBraTS"
            )
            raise ValueError(msg)
        return super().train_dataloader()

"""IXI: about 600 healthy subjects (T1, T2, PD), the paper's training set; and IXI + BraTS together.

IXI files are named ``IXI<id>-<site>-<n>-<T1|T2|PD>.nii.gz`` (e.g. ``IXI002-Guys-0828-T2.nii.gz``).
The raw scans still hold the skull and sit in scanner space; the paper's data is skull-stripped and
affinely registered to MNI152 at 1 mm. Preprocess the scans first (keeping their names), e.g. with
``simpleslicenet preprocess`` (:func:`simpleslicenet.data.preprocess.preprocess_folder`) or a dedicated tool (FSL, ANTs, HD-BET).

Example:
    >>> from simpleslicenet.data.datamodules import IXIBraTS
    >>> datamodule = IXIBraTS(  # doctest: +SKIP
    ...     ixi_root="./datasets/IXI_T2_mni", brats_root="./datasets/BraTS2021", modality="t2",
    ... )
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from simpleslicenet.data.datamodules.base import VolumeDataModule
from simpleslicenet.data.datamodules.base import check_modality
from simpleslicenet.data.datamodules.brats import hold_out_healthy, list_brats
from simpleslicenet.data.datamodules.folder import scans_to_samples
from simpleslicenet.data.scans import list_scans
from simpleslicenet.data.nifti import VolumeError

__all__ = ["IXI", "IXIBraTS", "IXI_MODALITIES", "IXI_NAME", "list_ixi"]

IXI_MODALITIES = ("t1", "t2", "pd")
# IXI<subject>-<site>-<series>-<modality>; DTI and MRA files share the pattern but are not used.
IXI_NAME = re.compile(r"^IXI(?P<subject>\d+)-(?P<site>[A-Za-z]+)-(?P<series>\d+)-(?P<modality>[A-Za-z0-9]+)$")


def list_ixi(root: str | Path, modality: str = "t2") -> tuple[pd.DataFrame, list[str]]:
    """Samples table (all ``train``) of the IXI scans of one modality, and the subject of each row.

    Args:
        root: Folder of IXI scans (sub-folders are searched too).
        modality: ``t1``, ``t2`` or ``pd``.

    Raises:
        ValueError: Unknown modality.
        VolumeError: The folder is missing or holds no IXI scan of that modality.
    """
    modality = check_modality(modality, IXI_MODALITIES, "IXI")
    root = Path(root)
    scans = []
    for scan in list_scans(root, recursive=True):
        match = IXI_NAME.match(scan.name)
        if match and match["modality"].lower() == modality:
            scans.append((scan, f"IXI{match['subject']}"))
    if not scans:
        raise VolumeError(
            root,
            f"no IXI {modality.upper()} scans found (expected names like IXI002-Guys-0828-{modality.upper()}.nii.gz)",
        )
    samples = scans_to_samples([scan for scan, _ in scans], "train", 0, "ixi/")
    return samples, [subject for _, subject in scans]


class IXI(VolumeDataModule):
    """Healthy IXI scans of one modality: training volumes and held-out healthy test volumes.

    A seeded ``test_fraction`` of the subjects is held out as normal test volumes (a share of those
    becomes validation). IXI has no lesions, so this datamodule suits training, feature fine-tuning
    and false-positive checks; pair it with BraTS (:class:`IXIBraTS`) for detection metrics.

    Args:
        root: Folder of (preprocessed) IXI scans named ``IXI<id>-<site>-<n>-<T1|T2|PD>.nii.gz``.
        modality: ``t1``, ``t2`` (paper) or ``pd``.
        test_fraction: Share of subjects held out as healthy test volumes.
        **kwargs: The shared :class:`~simpleslicenet.data.datamodules.base.VolumeDataModule` arguments
            (``target_shape``, ``spacing_mm``, ``intensity``, ``brain_mask``, ``val_fraction``, loaders, ``seed``).

    Raises:
        ValueError: Unknown modality (raised at construction).
    """

    MODALITIES = IXI_MODALITIES

    def __init__(
        self,
        root: str | Path = "./datasets/IXI",
        modality: str = "t2",
        test_fraction: float = 0.2,
        **kwargs,
    ) -> None:
        super().__init__(root=root, modality=modality, **kwargs)
        self.test_fraction = test_fraction

    def make_samples(self) -> pd.DataFrame:
        """IXI scans of the modality; a seeded fraction of subjects moved to ``test``."""
        samples, subjects = list_ixi(self.root, self.modality)
        return hold_out_healthy(samples, self.test_fraction, self.seed, groups=subjects)


class IXIBraTS(VolumeDataModule):
    """The paper's protocol in one datamodule: train on healthy IXI, validate and test on BraTS 2021.

    Validation is a seeded ``val_fraction`` of the BraTS volumes (disjoint from test). Both datasets
    must be preprocessed the same way (skull-stripped, registered to MNI152 at 1 mm).

    Args:
        ixi_root: Folder of IXI scans (``IXI<id>-<site>-<n>-<T1|T2|PD>.nii.gz``).
        brats_root: BraTS 2021 folder (``BraTS2021_XXXXX/BraTS2021_XXXXX_<modality>.nii.gz`` and ``_seg``).
        modality: ``t1`` or ``t2`` (paper); the modalities both datasets have.
        healthy_test_fraction: Share of IXI subjects held out as normal test volumes (0 = paper).
        **kwargs: The shared :class:`~simpleslicenet.data.datamodules.base.VolumeDataModule` arguments
            (``target_shape``, ``spacing_mm``, ``intensity``, ``brain_mask``, ``val_fraction``, loaders, ``seed``).

    Raises:
        ValueError: Unknown modality (raised at construction).
    """

    MODALITIES = ("t1", "t2")

    def __init__(
        self,
        ixi_root: str | Path = "./datasets/IXI",
        brats_root: str | Path = "./datasets/BraTS2021",
        modality: str = "t2",
        healthy_test_fraction: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(root=brats_root, modality=modality, **kwargs)
        self.ixi_root = Path(ixi_root)
        self.brats_root = Path(brats_root)
        self.healthy_test_fraction = healthy_test_fraction
        self.category = f"IXIBraTS_{self.modality}"

    def make_samples(self) -> pd.DataFrame:
        """IXI scans (train, optionally a held-out fraction for test) and BraTS volumes (test)."""
        ixi, subjects = list_ixi(self.ixi_root, self.modality)
        ixi = hold_out_healthy(ixi, self.healthy_test_fraction, self.seed, groups=subjects)
        return pd.concat([ixi, list_brats(self.brats_root, self.modality)], ignore_index=True)

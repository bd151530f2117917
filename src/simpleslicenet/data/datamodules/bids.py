"""A BIDS dataset as a datamodule: healthy participants chosen from ``participants.tsv`` train, patients test.

Example:
    >>> from simpleslicenet.data.datamodules import BIDS
    >>> datamodule = BIDS(root="datasets/bids", suffix="T2w", healthy="group=control")  # doctest: +SKIP
    >>> datamodule.setup()  # doctest: +SKIP

or ``anomalib train --model SimpleSliceNet --data BIDS --data.root datasets/bids --data.healthy group=control``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from simpleslicenet.data.bids import BidsDataset, BidsError, BidsScan
from simpleslicenet.data.datamodules.base import VolumeDataModule
from simpleslicenet.data.datamodules.folder import scans_to_samples
from simpleslicenet.data.dataset import SAMPLE_COLUMNS

__all__ = ["BIDS", "SUFFIX_MODALITIES"]

# BIDS suffix -> the modality recorded with a model.
SUFFIX_MODALITIES = {"T1w": "t1", "T2w": "t2", "FLAIR": "flair"}


class BIDS(VolumeDataModule):
    """Anatomical scans of a BIDS dataset, split by participant.

    Participants chosen by ``healthy`` (a selection spec on ``participants.tsv``, see
    :meth:`~simpleslicenet.data.bids.BidsDataset.select`) are healthy: a seeded share of them
    (``healthy_test_fraction``, every session of a participant together) are normal test volumes, the rest
    train. Every other participant's scan that has a lesion mask (``derivatives/<name>/..._desc-lesion_mask``)
    is a lesion test volume. Scans of other participants without a lesion mask are neither healthy nor
    labelled, so they are left out with a warning naming them (e.g. ``group=reference`` participants kept
    for calibration). The base class carves the validation split out of the test volumes. Brain masks
    (``..._desc-brain_mask``) are used where present. Volume ids are the scans' BIDS names
    (``sub-01_ses-01_T2w``).

    Args:
        root: The BIDS dataset.
        suffix: Contrast read (``"T2w"``, ``"T1w"``, ``"FLAIR"``, ...).
        healthy: Selection spec of the healthy participants: ``"COLUMN=VALUE[,VALUE...]"`` or a list of labels
            (on the command line ``participant_id=sub-01,sub-02`` names participants without YAML reading
            ``01`` as a number).
        session: Only this session.
        acquisition: Only scans with this ``acq`` entity.
        run: Only scans with this ``run`` index.
        derivatives: Pipeline folder under ``derivatives/`` whose preprocessed scans
            (``..._desc-preproc_<suffix>.nii.gz``) are read instead of the raw ones, with that folder's masks.
        space: With ``derivatives``, the space of the preprocessed scans read (when there are several).
        lesion_masks: Where the lesion masks come from, as :class:`~simpleslicenet.data.bids.BidsDataset`
            reads them: ``"auto"``: every folder under ``derivatives/`` for raw scans, the ``derivatives``
            folder only for preprocessed ones; a folder name: that folder too; ``None``: only the
            ``derivatives`` folder's (none without it: then no lesion test volumes).
        healthy_test_fraction: Share of the healthy participants that are normal test volumes (at least
            one, and at least one left to train, when there are two or more).
        modality: Recorded with the model; default from the suffix (``T1w``: ``t1``, ``T2w``: ``t2``,
            ``FLAIR``: ``flair``; give ``t1ce`` for contrast-enhanced T1w).
        **kwargs: The other :class:`~simpleslicenet.data.datamodules.base.VolumeDataModule` arguments
            (``target_shape``, ``spacing_mm``, ``intensity``, ``brain_mask``, ``val_fraction``, loaders, ``seed``).

    Raises:
        BidsError: At setup: the dataset cannot be read (see :class:`~simpleslicenet.data.bids.BidsDataset`),
            the selection names an unknown column, value or participant, or no healthy scan is left to train.
    """

    def __init__(
        self,
        root: str | Path,
        suffix: str = "T2w",
        healthy: str | Sequence[str] = "group=control",
        session: str | None = None,
        acquisition: str | None = None,
        run: str | int | None = None,
        derivatives: str | None = None,
        space: str | None = None,
        lesion_masks: str | None = "auto",
        healthy_test_fraction: float = 0.25,
        modality: str | None = None,
        **kwargs,
    ) -> None:
        if not 0.0 <= healthy_test_fraction < 1.0:
            msg = f"healthy_test_fraction must lie in [0, 1), got {healthy_test_fraction}"
            raise ValueError(msg)
        if modality is None:
            modality = SUFFIX_MODALITIES.get(str(suffix))
        super().__init__(root=root, modality=modality, **kwargs)
        self.suffix = str(suffix)
        self.healthy = healthy
        self.session = session
        self.acquisition = acquisition
        self.run = run
        self.derivatives = derivatives
        self.space = space
        self.lesion_masks = lesion_masks
        self.healthy_test_fraction = float(healthy_test_fraction)
        self.category = f"bids_{self.root.name}"

    def bids_dataset(self) -> BidsDataset:
        """The BIDS dataset as this datamodule reads it."""
        return BidsDataset(
            self.root,
            suffix=self.suffix,
            session=self.session,
            acquisition=self.acquisition,
            run=self.run,
            derivatives=self.derivatives,
            lesion_masks=self.lesion_masks,
            space=self.space,
        )

    def _healthy_test(self, participants: list[str]) -> set[str]:
        """The healthy participants held out as normal test volumes (seeded)."""
        if len(participants) < 2 or self.healthy_test_fraction == 0:
            return set()
        n_test = min(max(int(round(len(participants) * self.healthy_test_fraction)), 1), len(participants) - 1)
        rng = np.random.default_rng([self.seed, 2])
        return {str(label) for label in rng.choice(sorted(participants), size=n_test, replace=False)}

    def make_samples(self) -> pd.DataFrame:
        """One row per scan: healthy participants train or test, others' scans with lesion masks test."""
        dataset = self.bids_dataset()
        healthy = dataset.select(self.healthy)
        scans = dataset.scans()
        healthy_set = set(healthy)
        without = sorted(healthy_set - {scan.subject for scan in scans})
        if without:
            subjects = ", ".join(f"sub-{label}" for label in without)
            warnings.warn(f"{self.root}: no {self.suffix} scan for the healthy {subjects}; left out", stacklevel=2)
        with_scans = sorted({scan.subject for scan in scans if scan.subject in healthy_set})
        test_healthy = self._healthy_test(with_scans)
        groups: dict[tuple[str, int], list[BidsScan]] = {("train", 0): [], ("test", 0): [], ("test", 1): []}
        left_out = []
        for scan in scans:
            if scan.subject in healthy_set:
                groups[("test" if scan.subject in test_healthy else "train", 0)].append(scan)
            elif scan.mask_path is not None:
                groups[("test", 1)].append(scan)
            else:
                left_out.append(scan.name)
        if left_out:
            warnings.warn(
                f"{self.root}: {len(left_out)} scan(s) neither healthy ({self.healthy}) nor with a lesion mask, "
                f"left out: {', '.join(left_out)}",
                stacklevel=2,
            )
        if not groups[("train", 0)]:
            raise BidsError(self.root, f"no {self.suffix} scan of a healthy participant ({self.healthy}) to train on")
        tables = []
        for (split, label), chosen in groups.items():
            if chosen:
                table = scans_to_samples([scan.files() for scan in chosen], split, label, id_prefix="")
                table["subject"] = [scan.subject for scan in chosen]
                table["session"] = [scan.session or "" for scan in chosen]
                tables.append(table)
        samples = pd.concat(tables, ignore_index=True)
        if not (samples["split"] == "test").any():
            raise BidsError(self.root, "no test scans: every healthy participant trains and no scan has a lesion mask")
        return samples[[*SAMPLE_COLUMNS, "subject", "session"]]

    def split_samples(self) -> pd.DataFrame:
        """The base class's splits, then each participant's scans kept together in one split.

        Validation and calibration are carved out scan by scan; a participant scanned twice must not
        choose the threshold (or calibrate) with one session and be tested (or trained) on the other, so
        all their scans follow their first scan's split.
        """
        samples = super().split_samples()
        first = samples.groupby("subject", sort=False)["split"].transform("first")
        return samples.assign(split=first)

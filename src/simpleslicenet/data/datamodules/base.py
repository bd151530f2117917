"""Shared machinery of the volumetric datamodules: splits by whole volume, seeded, one volume per item."""

from __future__ import annotations

import os
from abc import abstractmethod
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anomalib.data import AnomalibDataModule
from torch.utils.data import DataLoader

from simpleslicenet.data.dataset import VolumeDataset, optional_path, require_columns
from simpleslicenet.data.nifti import (
    VolumeError,
    check_same_grid,
    common_spacing,
    read_header,
    read_mask,
)
from simpleslicenet.data.volume import VolumePreprocessing
from simpleslicenet.random_state import capture_random_state, restore_random_state

__all__ = ["VolumeDataModule", "MODALITIES", "DatasetError", "check_modality", "check_samples"]

MODALITIES = ("t1", "t1ce", "t2", "flair")

# Masks whose affine differs from their scan's by more than this (in mm) are refused.
MASK_AFFINE_TOLERANCE = 1e-3


def check_modality(modality: str, allowed: tuple[str, ...], dataset: str) -> str:
    """Lower-cased modality, or a ValueError listing the allowed ones."""
    name = str(modality).lower()
    if name not in allowed:
        msg = f"unknown {dataset} modality {modality!r}: choose one of {', '.join(allowed)}"
        raise ValueError(msg)
    return name


class DatasetError(VolumeError):
    """Every bad file of a dataset at once (``errors``), found when the datamodule is set up."""

    def __init__(self, root: str | Path, errors: list[VolumeError]) -> None:
        self.errors = list(errors)
        listing = "\n".join(f"  - {error}" for error in self.errors)
        count = len(self.errors)
        super().__init__(root, f"{count} bad file{'s' if count != 1 else ''} in the dataset:\n{listing}")


def _check_masks(row: pd.Series, preprocessing: VolumePreprocessing) -> list[VolumeError]:
    """Problems of one sample's scan header and masks (shape, affine, readability, emptiness)."""
    image_path, is_lesion = str(row.image_path), int(row.label_index) == 1
    try:
        reference = read_header(image_path).geometry()
    except VolumeError as error:
        reference, problems = None, [error]
    else:
        problems = []
    mask_path = optional_path(row.mask_path)
    brain_path = optional_path(row.brain_mask_path) if preprocessing.brain_mask == "auto" else None
    if is_lesion and mask_path is None:
        problems.append(VolumeError(image_path, "lesion scan has no lesion mask"))
    for path, what, must_hold_voxels in ((mask_path, "lesion mask", is_lesion), (brain_path, "brain mask", True)):
        if path is None:
            continue
        try:
            header = read_header(path)
            if reference is None:
                continue
            check_same_grid(
                header.path, header.canonical_shape, header.canonical_affine, reference, MASK_AFFINE_TOLERANCE
            )
            # An empty mask would silently turn a lesion scan healthy, or a brain into background.
            if must_hold_voxels and not read_mask(path, reference, atol=MASK_AFFINE_TOLERANCE).any():
                problems.append(VolumeError(path, f"{what} is empty (no voxel above 0) for {image_path}"))
        except VolumeError as error:
            problems.append(error)
    return problems


def check_samples(samples: pd.DataFrame, preprocessing: VolumePreprocessing) -> list[VolumeError]:
    """Every problem of a samples table that can be found without reading the scans' voxels.

    Checked: duplicate volume ids and files listed twice; each scan's header (a regular NIfTI file,
    3-D, real data type, finite non-singular affine, within the voxel limit); each mask's header
    against its scan's (shape, affine within :data:`MASK_AFFINE_TOLERANCE` mm); lesion scans have a
    non-empty lesion mask, and brain-mask files (used with ``brain_mask="auto"``) are not empty.

    Args:
        samples: Table with :data:`~simpleslicenet.data.dataset.SAMPLE_COLUMNS`.
        preprocessing: The datamodule's preprocessing (decides whether brain-mask files are used).

    Returns:
        One :class:`VolumeError` per problem, each naming its file; empty if all is well.
    """
    problems: list[VolumeError] = []
    for volume_id, group in samples.groupby("volume_id", sort=True):
        if len(group) > 1:
            paths = ", ".join(str(p) for p in group["image_path"])
            problem = f"volume id {volume_id!r} is used by {len(group)} scans: {paths}"
            problems.append(VolumeError(group["image_path"].iloc[0], problem))
    real_paths = samples["image_path"].map(lambda p: os.path.realpath(str(p)))
    for _, group in samples.groupby(real_paths, sort=True):
        if len(group) > 1:
            ids = ", ".join(str(v) for v in group["volume_id"])
            problem = f"the same file is listed {len(group)} times ({ids})"
            problems.append(VolumeError(group["image_path"].iloc[0], problem))
    for _, row in samples.iterrows():
        problems.extend(_check_masks(row, preprocessing))
    return problems


class VolumeDataModule(AnomalibDataModule):
    """Base of every NIfTI datamodule.

    Subclasses only list their volumes (:meth:`make_samples`): a table with one row per scan, its
    lesion label and its split (``train``, ``val``, ``test``; ``val`` may be absent). Splits are made
    here by whole volume, never by slice, with a seeded generator:

    * training uses healthy volumes only;
    * if no volume is marked ``val``, a ``val_fraction`` of the test volumes (healthy and lesion alike,
      stratified) becomes the validation split. anomalib picks thresholds and normalisation on it, so
      it must contain lesions, and it never overlaps the test split;
    * a ``calibration_fraction`` of the healthy training volumes becomes the calibration split, held out
      of training (:meth:`calibration_dataloader`).

    Args:
        root: Dataset folder.
        target_shape: Model grid ``(x, y, z)``; ``(192, 192, 96)`` as in the paper, ``(96, 96, 48)`` for quick runs.
        spacing_mm: Isotropic voxel size scans are brought to (resampled only when a file differs);
            ``None``: the training scans' own voxel size, found at setup and recorded with the model.
        intensity: ``"percentile"`` or ``"minmax"`` intensity scaling.
        brain_mask: ``"auto"`` (brain-mask files where present) or ``"intensity"``.
        modality: Contrast of the scans, recorded with the model (``None``: unknown).
        crop: ``"brain"`` (grid centred on the brain), ``"fixed"`` (the authors' MNI slab from ``first_slice``)
            or ``"whole_brain"`` (every slice the brain reaches; the slice count varies by scan).
        first_slice: First axial slice of the ``"fixed"`` crop.
        val_fraction: Share of test volumes moved to validation when the data has no validation split.
        calibration_fraction: Share of the healthy training volumes held out as the calibration split
            (:mod:`simpleslicenet.calibration`): never trained on, the reference of label-free p-values.
        train_batch_size: Volumes per training batch (a batch holds all their slices).
        eval_batch_size: Volumes per evaluation batch.
        num_workers: Data loader workers.
        cache: Keep preprocessed volumes in memory.
        seed: Seed of the split.
    """

    # The modalities the dataset has (``None``: any); a datamodule refuses others at construction.
    MODALITIES: tuple[str, ...] | None = None

    def __init__(
        self,
        root: str | Path,
        target_shape: tuple[int, int, int] = (192, 192, 96),
        spacing_mm: float | None = None,
        intensity: str = "percentile",
        brain_mask: str = "auto",
        modality: str | None = None,
        crop: str = "brain",
        first_slice: int = 24,
        val_fraction: float = 0.3,
        calibration_fraction: float = 0.0,
        train_batch_size: int = 1,
        eval_batch_size: int = 1,
        num_workers: int = 0,
        cache: bool = True,
        seed: int = 0,
    ) -> None:
        if self.MODALITIES is not None:
            modality = check_modality(modality, self.MODALITIES, type(self).__name__)
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            val_split_mode="none",
            test_split_mode="none",
            seed=seed,
        )
        self.root = Path(root)
        # The one record of how scans become model inputs; models store it with their weights.
        self.preprocessing = VolumePreprocessing(
            target_shape=target_shape,
            spacing_mm=spacing_mm,
            intensity=intensity,
            brain_mask=brain_mask,
            modality=modality,
            crop=crop,
            first_slice=first_slice,
        )
        self.modality = self.preprocessing.modality
        self.val_fraction = val_fraction
        if not 0.0 <= calibration_fraction < 1.0:
            msg = f"calibration_fraction must lie in [0, 1), got {calibration_fraction}"
            raise ValueError(msg)
        self.calibration_fraction = float(calibration_fraction)
        self.cache = cache

    @property
    def category(self) -> str:
        """Name used in result folders."""
        return self._category or self.root.name

    @category.setter
    def category(self, category: str) -> None:
        self._category = category

    @abstractmethod
    def make_samples(self) -> pd.DataFrame:
        """One row per scan with columns ``SAMPLE_COLUMNS`` (``split`` in train/val/test)."""

    def prepare_data(self) -> None:
        """Nothing to download: real datasets must already be on disk (see each datamodule)."""

    def split_samples(self) -> pd.DataFrame:
        """Samples with the final ``split`` column (validation carved out of test if needed)."""
        samples = self.make_samples()
        require_columns(samples, f"{type(self).__name__}.make_samples()")
        if (samples["split"] == "train").any() and (samples.loc[samples["split"] == "train", "label_index"] != 0).any():
            msg = f"{self.root}: training split holds lesion volumes; training must be on healthy scans only"
            raise ValueError(msg)
        samples = samples.sort_values("volume_id", kind="stable").reset_index(drop=True)
        if not (samples["split"] == "val").any() and self.val_fraction > 0:
            rng = np.random.default_rng(self.seed)
            for label in (0, 1):
                idx = samples.index[(samples["split"] == "test") & (samples["label_index"] == label)].to_numpy()
                n_val = int(round(len(idx) * self.val_fraction))
                if len(idx) >= 2:
                    n_val = min(max(n_val, 1), len(idx) - 1)  # keep both splits non-empty
                else:
                    n_val = 0
                chosen = rng.choice(idx, size=n_val, replace=False) if n_val else []
                samples.loc[chosen, "split"] = "val"
        if self.calibration_fraction > 0 and not (samples["split"] == "calibration").any():
            # Held out of training, never a lesion scan: the reference of the label-free p-values.
            train = samples.index[samples["split"] == "train"].to_numpy()
            n_calibration = min(max(int(round(len(train) * self.calibration_fraction)), 1), len(train) - 1)
            if n_calibration > 0:
                chosen = np.random.default_rng([self.seed, 1]).choice(train, size=n_calibration, replace=False)
                samples.loc[chosen, "split"] = "calibration"
        return samples

    def _dataset(self, samples: pd.DataFrame) -> VolumeDataset:
        return VolumeDataset(samples, preprocessing=self.preprocessing, cache=self.cache)

    def _create_test_split(self) -> None:
        """Splits are final after :meth:`split_samples`.

        anomalib's own version would move the healthy test volumes out of the test split (and, with
        ``test_split_mode="none"``, drop them), leaving volume-level metrics without negatives.
        """

    def _create_val_split(self) -> None:
        """Validation is carved out by :meth:`split_samples`, by whole volume."""

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the random generators, so a resumed training repeats the same draws."""
        return {"random_state": capture_random_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` when training resumes from a checkpoint (``--ckpt_path``)."""
        if "random_state" in state_dict:
            restore_random_state(state_dict["random_state"])

    def _setup(self, _stage: str | None = None) -> None:
        samples = self.split_samples()
        # Every bad file at once, before any training: headers, mask grids, empty masks, duplicates.
        problems = check_samples(samples, self.preprocessing)
        if problems:
            raise DatasetError(self.root, problems)
        if self.preprocessing.spacing_mm is None:
            # A model must know the voxel size it learnt at, so new scans can be brought to it.
            train = samples[samples["split"] == "train"]
            paths = list((train if len(train) else samples)["image_path"])
            self.preprocessing = replace(self.preprocessing, spacing_mm=common_spacing(paths))
        self.volume_table = samples
        self.train_data = self._dataset(samples[samples["split"] == "train"])
        self.val_data = self._dataset(samples[samples["split"] == "val"])
        self.test_data = self._dataset(samples[samples["split"] == "test"])
        self.calibration_data = self._dataset(samples[samples["split"] == "calibration"])

    def calibration_dataloader(self) -> DataLoader:
        """The calibration volumes (healthy, held out of training; empty unless ``calibration_fraction``)."""
        return DataLoader(
            self.calibration_data,
            shuffle=False,
            batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
            collate_fn=self.calibration_data.collate_fn,
        )

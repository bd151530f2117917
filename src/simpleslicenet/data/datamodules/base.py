"""Shared machinery of the volumetric datamodules: splits by whole volume, seeded, one volume per item."""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path

import numpy as np
import pandas as pd
from anomalib.data import AnomalibDataModule

from simpleslicenet.data.dataset import SAMPLE_COLUMNS, VolumeDataset

__all__ = ["VolumeDataModule", "MODALITIES"]

MODALITIES = ("t1", "t1ce", "t2", "flair")


class VolumeDataModule(AnomalibDataModule):
    """Base of every NIfTI datamodule.

    Subclasses only list their volumes (:meth:`make_samples`): a table with one row per scan, its
    lesion label and its split (``train``, ``val``, ``test``; ``val`` may be absent). Splits are made
    here by whole volume, never by slice, with a seeded generator:

    * training uses healthy volumes only;
    * if no volume is marked ``val``, a ``val_fraction`` of the test volumes (healthy and lesion alike,
      stratified) becomes the validation split. anomalib picks thresholds and normalisation on it, so
      it must contain lesions, and it never overlaps the test split.

    Args:
        root: Dataset folder.
        target_shape: Model grid ``(x, y, z)``; ``(192, 192, 96)`` as in the paper, ``(96, 96, 48)`` for quick runs.
        intensity: ``"percentile"`` or ``"minmax"`` intensity scaling.
        resample_mm: Resample scans to this isotropic spacing first.
        val_fraction: Share of test volumes moved to validation when the data has no validation split.
        train_batch_size: Volumes per training batch (a batch holds all their slices).
        eval_batch_size: Volumes per evaluation batch.
        num_workers: Data loader workers.
        cache: Keep preprocessed volumes in memory.
        seed: Seed of the split.
    """

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        from simpleslicenet.plugin import expose

        expose(cls, "anomalib.data")  # visible to anomalib by its short name as soon as it exists

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
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            val_split_mode="none",
            test_split_mode="none",
            seed=seed,
        )
        self.root = Path(root)
        self.target_shape = tuple(int(t) for t in target_shape)
        self.intensity = intensity
        self.resample_mm = resample_mm
        self.val_fraction = val_fraction
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
        missing = [c for c in SAMPLE_COLUMNS if c not in samples.columns]
        if missing:
            msg = f"{type(self).__name__}.make_samples() lacks columns {missing}"
            raise ValueError(msg)
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
        return samples

    def _dataset(self, samples: pd.DataFrame) -> VolumeDataset:
        return VolumeDataset(
            samples,
            target_shape=self.target_shape,
            intensity=self.intensity,
            resample_mm=self.resample_mm,
            cache=self.cache,
        )

    def _create_test_split(self) -> None:
        """Splits are final after :meth:`split_samples`.

        anomalib's own version would move the healthy test volumes out of the test split (and, with
        ``test_split_mode="none"``, drop them), leaving volume-level metrics without negatives.
        """

    def _create_val_split(self) -> None:
        """Validation is carved out by :meth:`split_samples`, by whole volume."""

    def _setup(self, _stage: str | None = None) -> None:
        samples = self.split_samples()
        self.volume_table = samples
        self.train_data = self._dataset(samples[samples["split"] == "train"])
        self.val_data = self._dataset(samples[samples["split"] == "val"])
        self.test_data = self._dataset(samples[samples["split"] == "test"])

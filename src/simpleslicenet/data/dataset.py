"""One row per volume; each item is the whole volume as a :class:`VolumeBatch` of its axial slices."""

from __future__ import annotations

import copy

import pandas as pd
import torch
from anomalib.data.datasets.base import AnomalibDataset
from torchvision.tv_tensors import Image, Mask

from simpleslicenet.data.batch import VolumeBatch, collate_volumes
from simpleslicenet.data.slices import slice_masks, slice_stack
from simpleslicenet.data.volume import VolumePreprocessing, load_volume

__all__ = ["VolumeDataset", "SAMPLE_COLUMNS", "optional_path", "require_columns", "volume_to_batch"]

# label_index: 0 healthy, 1 lesion. mask_path / brain_mask_path may be None.
SAMPLE_COLUMNS = ["volume_id", "image_path", "mask_path", "brain_mask_path", "label_index", "split"]


def require_columns(samples: pd.DataFrame, owner: str) -> None:
    """Refuse a samples table without every one of :data:`SAMPLE_COLUMNS`.

    Raises:
        ValueError: Naming ``owner`` and the missing columns.
    """
    missing = [c for c in SAMPLE_COLUMNS if c not in samples.columns]
    if missing:
        msg = f"{owner} lacks columns {missing}"
        raise ValueError(msg)


def optional_path(value: object) -> str | None:
    """A samples table's optional path: the string, or ``None`` for a missing or empty entry."""
    return value if isinstance(value, str) and value else None


class VolumeDataset(AnomalibDataset):
    """Volumes listed in a samples table, served one volume per item.

    Args:
        samples: Table with :data:`SAMPLE_COLUMNS`.
        preprocessing: How each scan becomes a model input (:class:`~simpleslicenet.data.volume.VolumePreprocessing`).
        cache: Keep preprocessed volumes in memory (reading a compressed NIfTI costs far more than a
            training step on a small grid).
    """

    def __init__(
        self,
        samples: pd.DataFrame,
        preprocessing: VolumePreprocessing | None = None,
        cache: bool = True,
    ) -> None:
        super().__init__()
        # The files themselves are validated once, when a datamodule is set up (check_samples).
        require_columns(samples, "samples table")
        samples = samples.reset_index(drop=True).copy()
        # A stable volume index survives anomalib's re-sorting of samples (it sorts by image_path).
        samples["volume_index"] = range(len(samples))
        samples.attrs["task"] = "segmentation"
        self.samples = samples
        self.preprocessing = preprocessing if preprocessing is not None else VolumePreprocessing()
        self.cache = cache
        self._cache: dict[int, VolumeBatch] = {}

    def __getitem__(self, index: int) -> VolumeBatch:
        row = self.samples.iloc[index]
        volume_index = int(row.volume_index)
        if self.cache and volume_index in self._cache:
            # A shallow copy: anomalib's pre-processor re-assigns batch.image, which must not
            # reach the cached volume (it would be normalised again every epoch).
            return copy.copy(self._cache[volume_index])
        batch = self.load(row)
        if self.cache:
            self._cache[volume_index] = batch
            return copy.copy(batch)
        return batch

    def load(self, row: pd.Series) -> VolumeBatch:
        """Read one volume (a samples row) and lay it out as a batch of slices."""
        mask_path = optional_path(row.mask_path)
        volume = load_volume(
            row.image_path, self.preprocessing, mask_path=mask_path, brain_mask_path=optional_path(row.brain_mask_path)
        )
        return volume_to_batch(
            volume.image,
            brain_mask=volume.brain_mask,
            lesion_mask=volume.lesion_mask,
            volume_index=int(row.volume_index),
            geometry=volume.geometry,
            image_path=str(row.image_path),
            mask_path=mask_path or "",
        )

    @property
    def collate_fn(self):  # noqa: ANN201
        """Volumes are joined along the slice axis, never stacked into a new dimension."""
        return collate_volumes


def volume_to_batch(
    image,  # noqa: ANN001 - canonical (x, y, z) numpy array in [0, 1]
    brain_mask=None,  # noqa: ANN001
    lesion_mask=None,  # noqa: ANN001
    volume_index: int = 0,
    geometry=None,  # noqa: ANN001
    image_path: str = "",
    mask_path: str = "",
) -> VolumeBatch:
    """Turn a canonical volume (and masks) into a :class:`VolumeBatch` of its axial slices.

    The image is :func:`~simpleslicenet.data.slices.slice_stack`: one grey channel in memory, seen as three.
    """
    image = slice_stack(image)
    depth = image.shape[0]
    lesion = slice_masks(lesion_mask) if lesion_mask is not None else torch.zeros(image[:, 0].shape, dtype=torch.bool)
    brain = slice_masks(brain_mask) if brain_mask is not None else torch.ones_like(lesion)
    slice_label = lesion.flatten(1).any(dim=1).long()
    return VolumeBatch(
        image=Image(image),
        gt_mask=Mask(lesion),
        gt_label=slice_label,
        image_path=[image_path] * depth,
        mask_path=[mask_path] * depth,
        volume_index=torch.full((depth,), volume_index, dtype=torch.long),
        slice_index=torch.arange(depth),
        brain_mask=brain,
        volume_label=torch.full((depth,), int(lesion.any()), dtype=torch.long),
        geometry=[geometry] * depth,
    )

"""A volume travels as a batch of its axial slices, in order.

:class:`VolumeBatch` is an anomalib :class:`~anomalib.data.ImageBatch` whose rows are the slices of one
or more whole volumes, so every anomalib image model, metric and post-processor accepts it unchanged.
The extra fields say which volume and which depth each row belongs to, and carry the brain mask and
the geometry needed to write results back into the scan's own space.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TypeVar

import torch
from anomalib.data import ImageBatch, ImageItem
from torchvision.tv_tensors import Image, Mask

from simpleslicenet.data.geometry import VolumeGeometry

__all__ = ["VolumeBatch", "VolumeItem", "collate_volumes", "take_rows", "volume_rows"]

BatchT = TypeVar("BatchT")


@dataclass
class VolumeItem(ImageItem):
    """One axial slice of a volume: ``image [3, H, W]``, ``gt_mask [H, W]`` and where it came from.

    Args:
        volume_index: Index of the volume in its dataset.
        slice_index: Depth index of this slice in the model grid.
        brain_mask: Boolean brain mask of the slice ``[H, W]``.
        volume_label: 1 if the volume holds any lesion, else 0.
        geometry: Geometry of the source volume (shared by all its slices).
    """

    volume_index: torch.Tensor | None = None
    slice_index: torch.Tensor | None = None
    brain_mask: torch.Tensor | None = None
    volume_label: torch.Tensor | None = None
    volume_score: torch.Tensor | None = None
    geometry: VolumeGeometry | None = None


@dataclass
class VolumeBatch(ImageBatch):
    """Slices of whole volumes in depth order: ``image [N, 3, H, W]`` with ``N = sum of depths``.

    ``gt_label`` is the slice label (any lesion voxel in the slice) and ``gt_mask`` the voxel mask,
    so anomalib's image metrics are slice metrics and its pixel metrics are voxel metrics.

    Args:
        volume_index: ``[N]`` volume of each row.
        slice_index: ``[N]`` depth of each row.
        brain_mask: ``[N, H, W]`` boolean brain mask.
        volume_label: ``[N]`` label of each row's volume.
        volume_score: ``[N]`` predicted anomaly score of each row's volume (set by the models).
        geometry: ``N`` references to each row's :class:`VolumeGeometry`.
    """

    item_class = VolumeItem

    volume_index: torch.Tensor | None = None
    slice_index: torch.Tensor | None = None
    brain_mask: torch.Tensor | None = None
    volume_label: torch.Tensor | None = None
    volume_score: torch.Tensor | None = None
    geometry: list[VolumeGeometry] | None = None

    def volumes(self) -> list[tuple[int, slice]]:
        """``(volume_index, rows)`` for each volume in the batch, in order of appearance."""
        return volume_rows(self.volume_index, self.batch_size)

    def rows(self, rows: slice) -> VolumeBatch:
        """The batch of ``rows`` only (e.g. one volume of :meth:`volumes`), every per-row field cut alike."""
        return take_rows(self, rows)

    @classmethod
    def collate(cls, items: list) -> VolumeBatch:
        """Concatenate whole volumes (each already a :class:`VolumeBatch`) along the slice axis."""
        return collate_volumes(items)


def volume_rows(volume_index: torch.Tensor | None, rows: int) -> list[tuple[int, slice]]:
    """``(volume_index, rows)`` of each run of consecutive rows that share a volume index (a batch's volumes).

    Args:
        volume_index: ``[N]`` volume of each row; ``None``: all ``rows`` are one volume (index 0).
        rows: Number of rows ``N``.

    Raises:
        ValueError: ``volume_index`` does not have one entry per row.
    """
    if volume_index is None:
        return [(0, slice(0, rows))]
    ids = torch.as_tensor(volume_index).reshape(-1).tolist()
    if len(ids) != rows:
        msg = f"volume_index has {len(ids)} entries for {rows} rows"
        raise ValueError(msg)
    runs, start = [], 0
    for row in range(1, rows + 1):
        if row == rows or ids[row] != ids[start]:
            runs.append((int(ids[start]), slice(start, row)))
            start = row
    return runs


def take_rows(batch: BatchT, rows: slice | torch.Tensor) -> BatchT:
    """A new batch of the same class holding only ``rows`` of every per-row field (tensor or list).

    Args:
        batch: Any anomalib batch dataclass.
        rows: A slice (its tensors stay views), or a boolean or index tensor over the rows.
    """
    if isinstance(rows, torch.Tensor):
        rows = rows.nonzero().flatten().tolist() if rows.dtype == torch.bool else rows.tolist()
    size = batch.batch_size
    changes = {}
    for field in fields(batch):
        value = getattr(batch, field.name)
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
            changes[field.name] = value[rows]
        elif isinstance(value, list) and len(value) == size:
            changes[field.name] = value[rows] if isinstance(rows, slice) else [value[i] for i in rows]
    return replace(batch, **changes)


def collate_volumes(volumes: list[VolumeBatch]) -> VolumeBatch:
    """Join several single-volume batches into one batch of all their slices, in order."""
    if len(volumes) == 1:
        return volumes[0]
    merged = {}
    for f in fields(VolumeBatch):
        values = [getattr(v, f.name) for v in volumes]
        if any(value is None for value in values):
            merged[f.name] = None
        elif isinstance(values[0], torch.Tensor):
            joined = torch.cat([torch.as_tensor(value) for value in values])
            merged[f.name] = (
                Image(joined) if f.name == "image" else Mask(joined) if f.name == "gt_mask" else joined
            )
        else:
            merged[f.name] = [entry for value in values for entry in value]
    return VolumeBatch(**merged)

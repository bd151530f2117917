"""Pulling voxel, slice and volume samples out of a :class:`~simpleslicenet.data.VolumeBatch`.

Every voxel metric sees the same voxels through these helpers: the brain voxels of every volume, one
volume at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from simpleslicenet.data.batch import volume_rows
from simpleslicenet.metrics.exact import dice_at_threshold
from simpleslicenet.metrics.histogram import (
    ScoreHistogram,
    auroc_from_counts,
    average_precision_from_counts,
    max_dice_from_counts,
)

__all__ = [
    "PER_VOLUME_STATISTICS",
    "VolumeVoxels",
    "iter_volume_voxels",
    "minmax_scale",
    "per_volume_statistic",
    "volume_entries",
]

PER_VOLUME_STATISTICS = ("auroc", "auprc", "max_dice", "dice_at_threshold")


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """Drop torchvision's tv_tensor wrappers (Mask, Image) so ops return plain tensors."""
    tensor = torch.as_tensor(tensor)
    return tensor.as_subclass(torch.Tensor) if type(tensor) is not torch.Tensor else tensor


@dataclass
class VolumeVoxels:
    """The brain voxels of one volume: ``scores`` and ``labels`` (1-D) and its ``volume_index``."""

    volume_index: int
    scores: torch.Tensor
    labels: torch.Tensor

    @property
    def has_lesion(self) -> bool:
        """Whether any brain voxel of the volume is a lesion."""
        return bool(self.labels.any())


def iter_volume_voxels(
    anomaly_map: torch.Tensor,
    gt_mask: torch.Tensor,
    brain_mask: torch.Tensor | None = None,
    volume_index: torch.Tensor | None = None,
) -> list[VolumeVoxels]:
    """Split a batch's voxel scores into brain voxels per volume.

    Args:
        anomaly_map: ``[N, H, W]`` (or ``[N, 1, H, W]``) voxel scores.
        gt_mask: ``[N, H, W]`` lesion mask.
        brain_mask: ``[N, H, W]`` brain mask; all voxels count when ``None``.
        volume_index: ``[N]`` volume of each row; one volume when ``None``.

    Raises:
        ValueError: Shapes that do not match, naming them.
    """
    scores = _plain(anomaly_map)
    labels = _plain(gt_mask)
    rows = scores.shape[0]
    scores = scores.reshape(rows, -1)
    labels = labels.reshape(labels.shape[0], -1).bool()
    if labels.shape != scores.shape:
        msg = f"anomaly_map {tuple(anomaly_map.shape)} does not match gt_mask {tuple(gt_mask.shape)}"
        raise ValueError(msg)
    if brain_mask is not None:
        brain = _plain(brain_mask).reshape(brain_mask.shape[0], -1).bool()
        if brain.shape != scores.shape:
            msg = f"brain_mask {tuple(brain_mask.shape)} does not match anomaly_map {tuple(anomaly_map.shape)}"
            raise ValueError(msg)
    else:
        brain = None
    out = []
    for index, rows_of_volume in volume_rows(volume_index, rows):
        volume_scores, volume_labels = scores[rows_of_volume], labels[rows_of_volume]
        if brain is not None:
            inside = brain[rows_of_volume]
            volume_scores, volume_labels = volume_scores[inside], volume_labels[inside]
        out.append(VolumeVoxels(index, volume_scores.reshape(-1), volume_labels.reshape(-1)))
    return out


def minmax_scale(scores: torch.Tensor) -> torch.Tensor:
    """Scale one volume's scores to ``[0, 1]`` (the original protocol); a constant map becomes zeros."""
    low, high = scores.min(), scores.max()
    if high <= low:
        return torch.zeros_like(scores, dtype=torch.float64)
    return (scores.double() - low) / (high - low)


def per_volume_statistic(
    voxels: VolumeVoxels,
    statistic: str,
    threshold: float | None = None,
    num_bins: int = 4096,
) -> float:
    """One voxel statistic of one volume (NaN for a volume without lesion: undefined there).

    Args:
        voxels: Brain voxels of the volume.
        statistic: ``"auroc"``, ``"auprc"``, ``"max_dice"`` (best threshold for this very volume:
            the optimistic paper protocol) or ``"dice_at_threshold"`` (exact, at ``threshold``).
        threshold: Threshold for ``"dice_at_threshold"``.
        num_bins: Bins of the per-volume histogram.
    """
    if statistic not in PER_VOLUME_STATISTICS:
        msg = f"unknown per-volume statistic {statistic!r}; choose from {PER_VOLUME_STATISTICS}"
        raise ValueError(msg)
    if not voxels.has_lesion:
        return float("nan")
    if statistic == "dice_at_threshold":
        if threshold is None:
            msg = "statistic 'dice_at_threshold' needs a threshold"
            raise ValueError(msg)
        return dice_at_threshold(voxels.scores, voxels.labels, threshold)
    hist = ScoreHistogram(num_bins=num_bins, device=voxels.scores.device)
    hist.update(voxels.scores, voxels.labels)
    if statistic == "auroc":
        return auroc_from_counts(hist.positives, hist.negatives)
    if statistic == "auprc":
        return average_precision_from_counts(hist.positives, hist.negatives)
    return max_dice_from_counts(hist.positives, hist.negatives)


def volume_entries(
    volume_index: torch.Tensor | None,
    scores: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ``(volume_index, score, label)`` per volume from per-row repeats.

    Args:
        volume_index: ``[N]`` volume of each row (one volume when ``None``).
        scores: ``[N]`` volume score repeated on each row of the volume.
        labels: ``[N]`` volume label repeated on each row.

    Raises:
        ValueError: When the rows of one volume disagree on its score or label.
    """
    scores = _plain(scores).reshape(-1)
    labels = _plain(labels).reshape(-1)
    ids, values, targets = [], [], []
    for index, rows in volume_rows(volume_index, scores.numel()):
        score, label = scores[rows], labels[rows]
        if not (torch.all(score == score[0]) and torch.all(label == label[0])):
            msg = f"rows of volume {index} disagree on volume_score or volume_label"
            raise ValueError(msg)
        ids.append(index)
        values.append(score[0].double())
        targets.append(label[0].long())
    return torch.tensor(ids, dtype=torch.long), torch.stack(values), torch.stack(targets)

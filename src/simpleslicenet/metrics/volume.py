"""Volume-level metrics: one ``(volume_score, volume_label)`` per volume, grouped by ``volume_index``."""

from __future__ import annotations

import torch
from anomalib.metrics import AnomalibMetric
from torchmetrics.utilities import dim_zero_cat

from simpleslicenet.metrics.named import ExactScores, NamedMetric
from simpleslicenet.metrics.volumetric import volume_entries

__all__ = ["VolumeAUPRC", "VolumeAUROC"]

VOLUME_FIELDS = ("volume_score", "volume_label", "volume_index")


class _VolumeScores(ExactScores):
    """Exact volume-level AUROC/AUPRC: one ``(volume_score, volume_label)`` per volume, grouped by ``volume_index``."""

    default_fields = VOLUME_FIELDS

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("volume_ids", default=[], dist_reduce_fx="cat")

    def update(
        self,
        volume_score: torch.Tensor,
        volume_label: torch.Tensor,
        volume_index: torch.Tensor | None = None,
    ) -> None:
        """Keep one entry per volume of the batch."""
        ids, scores, labels = volume_entries(volume_index, volume_score, volume_label)
        self.volume_ids.append(ids)
        self.scores.append(scores)
        self.labels.append(labels)

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(volume_ids, scores, labels)``, one per volume (a volume seen in two batches counts once)."""
        ids, scores, labels = (dim_zero_cat(s) for s in (self.volume_ids, self.scores, self.labels))
        unique_ids, first = _first_occurrence(ids)
        for index in unique_ids.tolist():
            rows = ids == index
            if not (torch.all(scores[rows] == scores[rows][0]) and torch.all(labels[rows] == labels[rows][0])):
                msg = f"volume {index} was scored differently in two batches"
                raise ValueError(msg)
        return unique_ids, scores[first], labels[first]

    def scored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One score and label per volume."""
        _, scores, labels = self.entries()
        return scores, labels


def _first_occurrence(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique ids (sorted) and the position of each one's first occurrence."""
    unique_ids, inverse = torch.unique(ids, return_inverse=True)
    positions = torch.arange(ids.numel(), device=ids.device)
    first = torch.full((unique_ids.numel(),), ids.numel(), dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    return unique_ids, first


class VolumeAUROC(NamedMetric, AnomalibMetric, _VolumeScores):
    """Volume AUROC of ``volume_score`` vs ``volume_label``, one entry per volume (``volume_AUROC``)."""

    metric_name = "volume_AUROC"
    statistic = "auroc"


class VolumeAUPRC(NamedMetric, AnomalibMetric, _VolumeScores):
    """Volume average precision, one entry per volume (``volume_AUPRC``)."""

    metric_name = "volume_AUPRC"
    statistic = "auprc"

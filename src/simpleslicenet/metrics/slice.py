"""Slice-level metrics: a slice is anomalous if any of its voxels is; its score is ``pred_score``."""

from __future__ import annotations

import torch
from anomalib.metrics import AnomalibMetric

from simpleslicenet.metrics.named import ExactScores, NamedMetric
from simpleslicenet.metrics.volumetric import _plain

__all__ = ["SliceAUPRC", "SliceAUROC"]

SLICE_FIELDS = ("pred_score", "gt_label", "brain_mask")


class _SliceScores(ExactScores):
    """Exact slice-level AUROC/AUPRC of ``pred_score`` vs ``gt_label``.

    Slices without any brain voxel are left out when ``brain_mask`` is given: they are trivially
    normal and would only inflate the result.
    """

    default_fields = SLICE_FIELDS

    def update(self, pred_score: torch.Tensor, gt_label: torch.Tensor, brain_mask: torch.Tensor | None = None) -> None:
        """Keep the score and label of every (brain) slice."""
        scores, labels = _plain(pred_score).reshape(-1).double(), _plain(gt_label).reshape(-1).long()
        if brain_mask is not None:
            keep = _plain(brain_mask).reshape(scores.numel(), -1).any(dim=1)
            scores, labels = scores[keep], labels[keep]
        self.scores.append(scores)
        self.labels.append(labels)


class SliceAUROC(NamedMetric, AnomalibMetric, _SliceScores):
    """Slice AUROC of ``pred_score`` vs ``gt_label`` over slices holding brain (``slice_AUROC``)."""

    metric_name = "slice_AUROC"
    statistic = "auroc"


class SliceAUPRC(NamedMetric, AnomalibMetric, _SliceScores):
    """Slice average precision (``slice_AUPRC``)."""

    metric_name = "slice_AUPRC"
    statistic = "auprc"

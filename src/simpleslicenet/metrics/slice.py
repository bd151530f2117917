"""Slice-level metrics: a slice is anomalous if any of its voxels is; its score is ``pred_score``."""

from __future__ import annotations

import torch
from anomalib.metrics import AnomalibMetric
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from simpleslicenet.metrics.exact import exact_statistic
from simpleslicenet.metrics.named import NamedMetric, no_entries
from simpleslicenet.metrics.volumetric import _plain

__all__ = ["SliceAUPRC", "SliceAUROC"]


class _SliceScores(Metric):
    """Exact slice-level AUROC/AUPRC of ``pred_score`` vs ``gt_label``.

    Slices without any brain voxel are left out when ``brain_mask`` is given: they are trivially
    normal and would only inflate the result.

    Args:
        statistic: ``"auroc"`` or ``"auprc"``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, statistic: str = "auroc", **kwargs) -> None:
        super().__init__(**kwargs)
        self.statistic = statistic
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, pred_score: torch.Tensor, gt_label: torch.Tensor, brain_mask: torch.Tensor | None = None) -> None:
        """Keep the score and label of every (brain) slice."""
        scores, labels = _plain(pred_score).reshape(-1).double(), _plain(gt_label).reshape(-1).long()
        if brain_mask is not None:
            keep = _plain(brain_mask).reshape(scores.numel(), -1).any(dim=1)
            scores, labels = scores[keep], labels[keep]
        self.scores.append(scores)
        self.labels.append(labels)

    def compute(self) -> torch.Tensor:
        if no_entries(self.scores):
            return torch.tensor(float("nan"), dtype=torch.float64)
        return exact_statistic(self.statistic, dim_zero_cat(self.scores), dim_zero_cat(self.labels))


class SliceAUROC(NamedMetric, AnomalibMetric, _SliceScores):
    """Slice AUROC of ``pred_score`` vs ``gt_label`` over slices holding brain (``slice_AUROC``)."""

    default_fields = ("pred_score", "gt_label", "brain_mask")
    metric_name = "slice_AUROC"

    def __init__(self, **kwargs) -> None:
        super().__init__(statistic="auroc", **kwargs)


class SliceAUPRC(NamedMetric, AnomalibMetric, _SliceScores):
    """Slice average precision (``slice_AUPRC``)."""

    default_fields = ("pred_score", "gt_label", "brain_mask")
    metric_name = "slice_AUPRC"

    def __init__(self, **kwargs) -> None:
        super().__init__(statistic="auprc", **kwargs)

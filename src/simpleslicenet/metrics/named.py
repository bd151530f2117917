"""The naming scheme of the volumetric metrics (``voxel_AUROC``, ``slice_AUROC``, ``volume_AUROC`` …).

Each metric class pairs anomalib's :class:`~anomalib.metrics.AnomalibMetric` (which pulls ``fields``
from the batch) with a torchmetrics core that takes plain tensors, so the classes work in an
:class:`~anomalib.metrics.Evaluator`, in DDP and on their own. ``metric.name``, the key the Evaluator
logs under, is ``prefix + metric_name``; metrics of the original paper's optimistic protocol start
with ``paper_``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from simpleslicenet.metrics.exact import exact_statistic

__all__ = ["EpochMetric", "ExactScores", "NamedMetric", "no_entries"]


def no_entries(state: list | torch.Tensor) -> bool:
    """Whether a ``cat``-reduced list state holds nothing (after a DDP sync it is one tensor, not a list)."""
    return len(state) == 0 if isinstance(state, list) else state.numel() == 0


class NamedMetric:
    """Gives a metric its documented name (``prefix + metric_name``) instead of its class name.

    ``fixed`` holds the arguments of the core metric that a named class settles (e.g. which statistic).
    """

    metric_name: str
    fixed: ClassVar[dict[str, Any]] = {}

    def __init__(self, fields: Sequence[str] | None = None, prefix: str = "", strict: bool = True, **kwargs) -> None:
        super().__init__(fields=fields, prefix=prefix, strict=strict, **self.fixed, **kwargs)
        self.name = prefix + self.metric_name


class EpochMetric(Metric):
    """Core of every volumetric metric: states gathered over the epoch, computed once, not differentiable."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True


class ExactScores(EpochMetric):
    """Exact AUROC or average precision (``statistic``: ``"auroc"`` or ``"auprc"``) of the ``scores`` and
    ``labels`` that ``update`` keeps."""

    statistic: str = "auroc"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def scored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scores and labels the statistic is taken over."""
        return dim_zero_cat(self.scores), dim_zero_cat(self.labels)

    def compute(self) -> torch.Tensor:
        if no_entries(self.scores):
            return torch.tensor(float("nan"), dtype=torch.float64)
        return exact_statistic(self.statistic, *self.scored())

"""The naming scheme of the volumetric metrics (``voxel_AUROC``, ``slice_AUROC``, ``volume_AUROC`` …).

Each metric class pairs anomalib's :class:`~anomalib.metrics.AnomalibMetric` (which pulls ``fields``
from the batch) with a torchmetrics core that takes plain tensors, so the classes work in an
:class:`~anomalib.metrics.Evaluator`, in DDP and on their own. ``metric.name``, the key the Evaluator
logs under, is ``prefix + metric_name``; metrics of the original paper's optimistic protocol start
with ``paper_``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["NamedMetric", "no_entries"]


def no_entries(state: list | torch.Tensor) -> bool:
    """Whether a ``cat``-reduced list state holds nothing (after a DDP sync it is one tensor, not a list)."""
    return len(state) == 0 if isinstance(state, list) else state.numel() == 0


class NamedMetric:
    """Gives a metric its documented name (``prefix + metric_name``) instead of its class name."""

    metric_name: str

    def __init__(self, fields: Sequence[str] | None = None, prefix: str = "", strict: bool = True, **kwargs) -> None:
        super().__init__(fields=fields, prefix=prefix, strict=strict, **kwargs)
        self.name = prefix + self.metric_name

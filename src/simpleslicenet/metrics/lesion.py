"""Lesion-wise detection at a threshold: found lesions and false clusters, as lesion studies report them.

The thresholded map (``score >= threshold`` inside the brain) and the lesion mask are split into
26-connected components (:mod:`simpleslicenet.clusters`). A true lesion counts as detected when at least one
flagged voxel falls on it; a flagged cluster that touches no lesion is a false-positive cluster.

* ``lesion_detection``: share of true lesions of at least ``min_lesion_ml`` (1 ml = 1 cm³) that are
  detected, pooled over all test volumes;
* ``lesion_FPclusters``: false-positive clusters per healthy volume (mean over healthy volumes).

Sizes come from each volume's geometry (the model grid's voxel size), so they hold at any spacing.
"""

from __future__ import annotations

import math

import torch
from anomalib.metrics import AnomalibMetric
from torchmetrics import Metric

from simpleslicenet.clusters import count_lesions, lesion_components
from simpleslicenet.metrics.named import NamedMetric
from simpleslicenet.metrics.voxel import DiceThreshold, ValidationDiceThreshold, shared_threshold

__all__ = ["LESION_FIELDS", "LesionDetection", "LesionFalseClusters", "lesion_components"]

LESION_FIELDS = ("anomaly_map", "gt_mask", "brain_mask", "volume_index", "geometry")


class _LesionWise(Metric):
    """Counts of detected lesions and false clusters at a (validation) threshold."""

    full_state_update = False
    is_differentiable = False

    def __init__(
        self,
        threshold: float | DiceThreshold | ValidationDiceThreshold,
        min_lesion_ml: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        # A plain attribute, not a submodule: the validation metric must not be registered twice.
        self._threshold = shared_threshold(threshold)
        self.min_lesion_ml = float(min_lesion_ml)
        for name in ("lesions", "detected", "healthy_volumes", "healthy_false_clusters"):
            self.add_state(name, default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @property
    def threshold(self) -> float:
        """The threshold in use (NaN until the validation split has chosen one)."""
        return self._threshold.value

    def update(
        self,
        anomaly_map: torch.Tensor,
        gt_mask: torch.Tensor,
        brain_mask: torch.Tensor,
        volume_index: torch.Tensor,
        geometry: list | None = None,
    ) -> None:
        """Label the components of every volume in the batch (a volume must arrive whole)."""
        if math.isnan(self.threshold):
            return
        maps = anomaly_map.reshape(gt_mask.shape).detach().cpu()
        ids = volume_index.detach().cpu()
        for index in ids.unique().tolist():
            rows = (ids == index).nonzero().flatten()
            brain = brain_mask[rows].detach().cpu().numpy().astype(bool)
            flagged = (maps[rows].numpy() >= self.threshold) & brain
            lesion = gt_mask[rows].detach().cpu().numpy().astype(bool) & brain
            # Without a geometry the sizes are unknown: no lesion is counted, false clusters still are.
            where = geometry[int(rows[0])] if geometry is not None else None
            voxel_ml = where.voxel_ml if where is not None else math.nan
            lesions, found, false_clusters = count_lesions(flagged, lesion, voxel_ml, self.min_lesion_ml)
            self.lesions += lesions
            self.detected += found
            if not lesion.any():
                self.healthy_volumes += 1
                self.healthy_false_clusters += false_clusters


class LesionDetection(NamedMetric, AnomalibMetric, _LesionWise):
    """Share of true lesions of at least ``min_lesion_ml`` found at the threshold (``lesion_detection``).

    Args:
        threshold: A number, a :class:`DiceThreshold` or the :class:`ValidationDiceThreshold` metric.
        min_lesion_ml: Smallest lesion counted, in millilitres.
        **kwargs: ``fields``, ``prefix``, ``strict``.
    """

    default_fields = LESION_FIELDS
    metric_name = "lesion_detection"
    higher_is_better = True

    def compute(self) -> torch.Tensor:
        if math.isnan(self.threshold) or self.lesions == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.detected.double() / self.lesions.double()


class LesionFalseClusters(NamedMetric, AnomalibMetric, _LesionWise):
    """False-positive clusters per healthy volume at the threshold (``lesion_FPclusters``; lower is better)."""

    default_fields = LESION_FIELDS
    metric_name = "lesion_FPclusters"
    higher_is_better = False

    def compute(self) -> torch.Tensor:
        if math.isnan(self.threshold) or self.healthy_volumes == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.healthy_false_clusters.double() / self.healthy_volumes.double()

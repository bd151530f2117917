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

from simpleslicenet.clusters import count_lesions, lesion_components
from simpleslicenet.data.batch import volume_rows
from simpleslicenet.metrics.named import NamedMetric
from simpleslicenet.metrics.voxel import DiceThreshold, ValidationDiceThreshold, AtThreshold

__all__ = ["LESION_FIELDS", "LesionDetection", "LesionFalseClusters", "lesion_components"]

LESION_FIELDS = ("anomaly_map", "gt_mask", "brain_mask", "volume_index", "geometry")


class _LesionWise(AtThreshold):
    """Counts of detected lesions and false clusters at a (validation) threshold."""

    def __init__(
        self,
        threshold: float | DiceThreshold | ValidationDiceThreshold,
        min_lesion_ml: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(threshold, **kwargs)
        self.min_lesion_ml = float(min_lesion_ml)
        for name in ("lesions", "detected", "healthy_volumes", "healthy_false_clusters"):
            self.add_state(name, default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def _share(self, part: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
        """``part / whole``; NaN before a threshold is chosen or when ``whole`` is zero."""
        if math.isnan(self.threshold) or whole == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return part.double() / whole.double()

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
        for _, rows in volume_rows(volume_index, gt_mask.shape[0]):
            brain = brain_mask[rows].detach().cpu().numpy().astype(bool)
            flagged = (maps[rows].numpy() >= self.threshold) & brain
            lesion = gt_mask[rows].detach().cpu().numpy().astype(bool) & brain
            # Without a geometry the sizes are unknown: no lesion is counted, false clusters still are.
            where = geometry[rows.start] if geometry is not None else None
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
        return self._share(self.detected, self.lesions)


class LesionFalseClusters(NamedMetric, AnomalibMetric, _LesionWise):
    """False-positive clusters per healthy volume at the threshold (``lesion_FPclusters``; lower is better)."""

    default_fields = LESION_FIELDS
    metric_name = "lesion_FPclusters"
    higher_is_better = False

    def compute(self) -> torch.Tensor:
        return self._share(self.healthy_false_clusters, self.healthy_volumes)

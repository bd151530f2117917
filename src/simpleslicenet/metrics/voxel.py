"""Voxel-level metrics: brain voxels of all volumes pooled in memory-bounded histograms.

AUROC, average precision, Dice at the best threshold on the test data (an upper bound) and at a
threshold chosen on the validation split (the honest one), per-volume means, and the paper's
optimistic protocol (``paper_*``). DDP-safe: histogram counts are summed across processes after their
grids are aligned.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from anomalib.metrics import AnomalibMetric
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from simpleslicenet.metrics.histogram import (
    DEFAULT_NUM_BINS,
    ScoreHistogram,
    auroc_from_counts,
    average_precision_from_counts,
    common_grid,
    max_dice_from_counts,
    threshold_for_max_dice,
)
from simpleslicenet.metrics.named import EpochMetric, NamedMetric, no_entries
from simpleslicenet.metrics.volumetric import (
    PER_VOLUME_STATISTICS,
    VolumeVoxels,
    iter_volume_voxels,
    minmax_scale,
    per_volume_statistic,
)

__all__ = [
    "AtThreshold",
    "DiceThreshold",
    "PaperMeanDice",
    "PaperVoxelAUROC",
    "ValidationDiceThreshold",
    "shared_threshold",
    "VoxelAUPRC",
    "VoxelAUROC",
    "VoxelDiceAtThreshold",
    "VoxelMaxDice",
    "VoxelPerVolumeMean",
    "VOXEL_FIELDS",
]

VOXEL_FIELDS = ("anomaly_map", "gt_mask", "brain_mask", "volume_index")


@dataclass
class DiceThreshold:
    """A threshold chosen on the validation split, shared by reference with the test metrics.

    Args:
        value: Predict lesion where ``score >= value``; NaN until validation has run.
    """

    value: float = float("nan")


class _BrainVoxels(EpochMetric):
    """A metric fed the brain voxels of each volume of a batch (:func:`iter_volume_voxels`)."""

    def update(
        self,
        anomaly_map: torch.Tensor,
        gt_mask: torch.Tensor,
        brain_mask: torch.Tensor | None = None,
        volume_index: torch.Tensor | None = None,
    ) -> None:
        """Hand the brain voxels of every volume in the batch to :meth:`update_volumes`."""
        self.update_volumes(iter_volume_voxels(anomaly_map, gt_mask, brain_mask, volume_index))

    def update_volumes(self, volumes: list[VolumeVoxels]) -> None:
        """Take in the brain voxels of each volume of one batch."""
        raise NotImplementedError


class _VoxelHistogram(_BrainVoxels):
    """Histogram of brain-voxel scores of lesion and normal voxels over every volume seen.

    Args:
        num_bins: Bins of the adaptive histogram (see :mod:`simpleslicenet.metrics.histogram`).
        minmax_per_volume: Scale each volume's scores to ``[0, 1]`` first (the paper's protocol).
    """

    def __init__(self, num_bins: int = DEFAULT_NUM_BINS, minmax_per_volume: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_bins = int(num_bins)
        self.minmax_per_volume = minmax_per_volume
        self.add_state("positives", default=torch.zeros(self.num_bins, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("negatives", default=torch.zeros(self.num_bins, dtype=torch.long), dist_reduce_fx="sum")
        # [is_set, exponent, offset]; identical on every process once _sync_dist has aligned the grids.
        self.add_state("grid", default=torch.zeros(3, dtype=torch.long), dist_reduce_fx="max")

    def histogram(self) -> ScoreHistogram:
        """The counts so far as a :class:`ScoreHistogram`."""
        return ScoreHistogram.from_state(self.positives, self.negatives, self.grid)

    def _store(self, hist: ScoreHistogram) -> None:
        self.positives, self.negatives = hist.positives, hist.negatives
        self.grid = hist.grid_tensor().to(self.grid.device)

    def update_volumes(self, volumes: list[VolumeVoxels]) -> None:
        """Count the brain voxels of every volume in the batch."""
        hist = self.histogram()
        for voxels in volumes:
            if voxels.scores.numel() == 0:
                continue
            scores = minmax_scale(voxels.scores) if self.minmax_per_volume else voxels.scores
            hist.update(scores, voxels.labels)
        self._store(hist)

    def _sync_dist(self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any | None = None) -> None:  # noqa: ANN401
        """Bring every process's counts onto one common grid, then let torchmetrics sum them."""
        hist = self.histogram()
        summary = hist.grid_summary()
        local = torch.tensor(
            [0, 0, 0, 0] if summary is None else [1, *summary],
            dtype=torch.long,
            device=self.positives.device,
        )
        gathered = dist_sync_fn(local, group=process_group or self.process_group)
        summaries = [tuple(int(v) for v in g[1:]) if int(g[0]) == 1 else None for g in gathered]
        if any(s is not None for s in summaries):
            exponent, offset = common_grid(summaries, self.num_bins)
            hist.rebin(exponent, offset)
            self._store(hist)
        super()._sync_dist(dist_sync_fn, process_group)


class _VoxelAUROC(_VoxelHistogram):
    def compute(self) -> torch.Tensor:
        return torch.tensor(auroc_from_counts(self.positives, self.negatives), dtype=torch.float64)


class _VoxelAUPRC(_VoxelHistogram):
    def compute(self) -> torch.Tensor:
        return torch.tensor(average_precision_from_counts(self.positives, self.negatives), dtype=torch.float64)


class _VoxelMaxDice(_VoxelHistogram):
    def compute(self) -> torch.Tensor:
        return torch.tensor(max_dice_from_counts(self.positives, self.negatives), dtype=torch.float64)


class _ValidationDiceThreshold(_VoxelHistogram):
    def __init__(self, threshold: DiceThreshold | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold if threshold is not None else DiceThreshold()

    def compute(self) -> torch.Tensor:
        value = threshold_for_max_dice(self.histogram())
        self.threshold.value = value
        return torch.tensor(value, dtype=torch.float64)


def shared_threshold(threshold: float | DiceThreshold | _ValidationDiceThreshold) -> DiceThreshold:
    """The :class:`DiceThreshold` a test metric reads: the validation metric's own (shared by reference,
    so the test sees what validation chose), a given holder, or a fixed number."""
    if isinstance(threshold, _ValidationDiceThreshold):
        return threshold.threshold
    return threshold if isinstance(threshold, DiceThreshold) else DiceThreshold(float(threshold))


class AtThreshold(EpochMetric):
    """A metric of the prediction ``score >= threshold``, at a threshold shared with validation.

    Args:
        threshold: A number, a :class:`DiceThreshold` or the validation metric whose result to use.
    """

    def __init__(self, threshold: float | DiceThreshold | _ValidationDiceThreshold, **kwargs) -> None:
        super().__init__(**kwargs)
        # A plain attribute, not a submodule: the validation metric must not be registered twice.
        self._threshold = shared_threshold(threshold)

    @property
    def threshold(self) -> float:
        """The threshold in use (NaN until the validation split has chosen one)."""
        return self._threshold.value


class _VoxelDiceAtThreshold(AtThreshold, _BrainVoxels):
    """Exact Dice of ``score >= threshold`` over all brain voxels (streaming TP/FP/FN counts)."""

    def __init__(self, threshold: float | DiceThreshold | _ValidationDiceThreshold, **kwargs) -> None:
        super().__init__(threshold, **kwargs)
        self.add_state("true_pos", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("false_pos", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("false_neg", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update_volumes(self, volumes: list[VolumeVoxels]) -> None:
        """Count TP/FP/FN at the current threshold."""
        threshold = self.threshold
        if math.isnan(threshold):
            return  # nothing to count against; compute() reports NaN
        for voxels in volumes:
            predicted = voxels.scores >= threshold
            labels = voxels.labels
            self.true_pos += (predicted & labels).sum().to(self.true_pos.device)
            self.false_pos += (predicted & ~labels).sum().to(self.true_pos.device)
            self.false_neg += (~predicted & labels).sum().to(self.true_pos.device)

    def compute(self) -> torch.Tensor:
        if math.isnan(self.threshold):
            return torch.tensor(float("nan"), dtype=torch.float64)
        denominator = 2 * self.true_pos + self.false_pos + self.false_neg
        if denominator == 0:
            return torch.tensor(1.0, dtype=torch.float64)
        return 2 * self.true_pos.double() / denominator.double()


class _VoxelPerVolumeMean(_BrainVoxels):
    """Mean over lesion volumes of a per-volume voxel statistic.

    Args:
        statistic: One of :data:`~simpleslicenet.metrics.volumetric.PER_VOLUME_STATISTICS`.
        threshold: Needed by ``"dice_at_threshold"``: a number or a shared :class:`DiceThreshold`.
        num_bins: Bins of each per-volume histogram.
    """

    def __init__(
        self,
        statistic: str = "auroc",
        threshold: float | DiceThreshold | _ValidationDiceThreshold | None = None,
        num_bins: int = 4096,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if statistic not in PER_VOLUME_STATISTICS:
            msg = f"unknown per-volume statistic {statistic!r}; choose from {PER_VOLUME_STATISTICS}"
            raise ValueError(msg)
        if statistic == "dice_at_threshold" and threshold is None:
            msg = "statistic 'dice_at_threshold' needs a threshold"
            raise ValueError(msg)
        self.statistic = statistic
        self._threshold = None if threshold is None else shared_threshold(threshold)
        self.num_bins = num_bins
        self.add_state("volume_ids", default=[], dist_reduce_fx="cat")
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update_volumes(self, volumes: list[VolumeVoxels]) -> None:
        """Compute the statistic of every volume in the batch (a volume must arrive whole)."""
        threshold = self._threshold.value if self._threshold is not None else None
        for voxels in volumes:
            value = per_volume_statistic(voxels, self.statistic, threshold=threshold, num_bins=self.num_bins)
            self.volume_ids.append(torch.tensor([voxels.volume_index], dtype=torch.long))
            self.values.append(torch.tensor([value], dtype=torch.float64))

    def compute(self) -> torch.Tensor:
        if no_entries(self.values):
            return torch.tensor(float("nan"), dtype=torch.float64)
        ids, values = dim_zero_cat(self.volume_ids), dim_zero_cat(self.values)
        if ids.unique().numel() != ids.numel():
            msg = "a volume arrived split over several batches; per-volume metrics need whole volumes"
            raise ValueError(msg)
        return values.nanmean() if (~values.isnan()).any() else torch.tensor(float("nan"), dtype=torch.float64)


class VoxelAUROC(NamedMetric, AnomalibMetric, _VoxelAUROC):
    """Voxel AUROC over the brain voxels of all test volumes pooled (memory-bounded histogram).

    Args:
        fields: Batch fields; default ``anomaly_map, gt_mask, brain_mask, volume_index``.
        prefix: Put in front of the name ``voxel_AUROC``.
        strict: Raise when a field is missing (else skip the batch).
        num_bins: Histogram bins.
    """

    default_fields = VOXEL_FIELDS
    metric_name = "voxel_AUROC"


class VoxelAUPRC(NamedMetric, AnomalibMetric, _VoxelAUPRC):
    """Voxel average precision over pooled brain voxels (``voxel_AUPRC``). Arguments as :class:`VoxelAUROC`."""

    default_fields = VOXEL_FIELDS
    metric_name = "voxel_AUPRC"


class VoxelMaxDice(NamedMetric, AnomalibMetric, _VoxelMaxDice):
    """Dice at the best global threshold chosen on the test data itself (``voxel_maxDice``).

    An upper bound, not an honest estimate: report :class:`VoxelDiceAtThreshold` with a threshold
    chosen on the validation split beside it. Arguments as :class:`VoxelAUROC`.
    """

    default_fields = VOXEL_FIELDS
    metric_name = "voxel_maxDice"


class ValidationDiceThreshold(NamedMetric, AnomalibMetric, _ValidationDiceThreshold):
    """On the validation split: the threshold that maximises pooled voxel Dice (``voxel_diceThreshold``).

    Its ``compute()`` writes the threshold into :attr:`threshold` (a :class:`DiceThreshold`), which
    a :class:`VoxelDiceAtThreshold` built from this metric reads during testing.

    Args:
        threshold: Shared holder to fill; a new one when ``None``.
        **kwargs: As :class:`VoxelAUROC`.
    """

    default_fields = VOXEL_FIELDS
    metric_name = "voxel_diceThreshold"


class VoxelDiceAtThreshold(NamedMetric, AnomalibMetric, _VoxelDiceAtThreshold):
    """Exact pooled voxel Dice at a fixed threshold (``voxel_valDice``): the honest Dice.

    Args:
        threshold: A number, a :class:`DiceThreshold` or the :class:`ValidationDiceThreshold` metric
            whose validation result to use.
        **kwargs: ``fields``, ``prefix``, ``strict`` as :class:`VoxelAUROC`.
    """

    default_fields = VOXEL_FIELDS
    metric_name = "voxel_valDice"


class VoxelPerVolumeMean(NamedMetric, AnomalibMetric, _VoxelPerVolumeMean):
    """Mean over lesion volumes of a per-volume voxel statistic (``voxel_AUROC_perVolume`` …).

    Args:
        statistic: ``"auroc"``, ``"auprc"``, ``"dice_at_threshold"`` or ``"max_dice"``.
        threshold: For ``"dice_at_threshold"``.
        num_bins: Bins of each per-volume histogram.
        **kwargs: ``fields``, ``prefix``, ``strict`` as :class:`VoxelAUROC`.
    """

    default_fields = VOXEL_FIELDS
    _names = {
        "auroc": "voxel_AUROC_perVolume",
        "auprc": "voxel_AUPRC_perVolume",
        "dice_at_threshold": "voxel_valDice_perVolume",
        "max_dice": "voxel_maxDice_perVolume",
    }

    def __init__(self, statistic: str = "auroc", **kwargs) -> None:
        self.metric_name = self._names.get(statistic, f"voxel_{statistic}_perVolume")
        super().__init__(statistic=statistic, **kwargs)


class PaperVoxelAUROC(NamedMetric, AnomalibMetric, _VoxelAUROC):
    """Paper protocol: pooled voxel AUROC after min-max scaling each volume's map (``paper_voxel_AUROC``).

    Per-volume scaling uses each test volume's own extremes, which no deployed detector knows; it is
    reported only for comparison with the original numbers. Arguments as :class:`VoxelAUROC`.
    """

    default_fields = VOXEL_FIELDS
    metric_name = "paper_voxel_AUROC"
    fixed = {"minmax_per_volume": True}


class PaperMeanDice(NamedMetric, AnomalibMetric, _VoxelPerVolumeMean):
    """Paper protocol: mean over lesion volumes of each volume's best-threshold Dice (``paper_meanDice``).

    Every volume gets the threshold that suits it best, an oracle choice; reported only for
    comparison with the original numbers. Arguments as :class:`VoxelAUROC`.
    """

    default_fields = VOXEL_FIELDS
    metric_name = "paper_meanDice"
    fixed = {"statistic": "max_dice"}

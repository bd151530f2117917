"""Volumetric metrics as anomalib metrics: they update from :class:`~simpleslicenet.data.VolumeBatch` fields.

Each class pairs anomalib's :class:`~anomalib.metrics.AnomalibMetric` (which pulls ``fields`` from
the batch) with a torchmetrics core that takes plain tensors, so the classes work in an
:class:`~anomalib.metrics.Evaluator`, in DDP (histogram counts are summed across processes after
their grids are aligned) and on their own.

Names (``metric.name``, the key under which the Evaluator logs) follow one scheme:
``voxel_AUROC``, ``voxel_AUPRC``, ``voxel_maxDice``, ``voxel_valDice``, ``slice_AUROC``,
``volume_AUROC`` …; ``prefix`` is put in front (``prefix="test_"`` gives ``test_voxel_AUROC``).
Metrics of the original paper's optimistic protocol start with ``paper_``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from anomalib.metrics import AnomalibMetric, Evaluator
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from simpleslicenet.metrics.exact import exact_auroc, exact_average_precision
from simpleslicenet.metrics.histogram import (
    DEFAULT_NUM_BINS,
    ScoreHistogram,
    auroc_from_counts,
    average_precision_from_counts,
    common_grid,
    max_dice_from_counts,
    threshold_for_max_dice,
)
from simpleslicenet.metrics.volumetric import (
    PER_VOLUME_STATISTICS,
    _plain,
    iter_volume_voxels,
    minmax_scale,
    per_volume_statistic,
    volume_entries,
)

__all__ = [
    "DiceThreshold",
    "PaperMeanDice",
    "PaperVoxelAUROC",
    "SliceAUPRC",
    "SliceAUROC",
    "ValidationDiceThreshold",
    "VolumeAUPRC",
    "VolumeAUROC",
    "VoxelAUPRC",
    "VoxelAUROC",
    "VoxelDiceAtThreshold",
    "VoxelMaxDice",
    "VoxelPerVolumeMean",
    "default_volume_evaluator",
    "volume_test_metrics",
]

VOXEL_FIELDS = ("anomaly_map", "gt_mask", "brain_mask", "volume_index")


@dataclass
class DiceThreshold:
    """A threshold chosen on the validation split, shared by reference with the test metrics.

    Args:
        value: Predict lesion where ``score >= value``; NaN until validation has run.
    """

    value: float = float("nan")


# --------------------------------------------------------------------------- tensor cores


class _VoxelHistogram(Metric):
    """Histogram of brain-voxel scores of lesion and normal voxels over every volume seen.

    Args:
        num_bins: Bins of the adaptive histogram (see :mod:`simpleslicenet.metrics.histogram`).
        minmax_per_volume: Scale each volume's scores to ``[0, 1]`` first (the paper's protocol).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

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

    def update(
        self,
        anomaly_map: torch.Tensor,
        gt_mask: torch.Tensor,
        brain_mask: torch.Tensor | None = None,
        volume_index: torch.Tensor | None = None,
    ) -> None:
        """Count the brain voxels of every volume in the batch."""
        hist = self.histogram()
        for voxels in iter_volume_voxels(anomaly_map, gt_mask, brain_mask, volume_index):
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


class _VoxelDiceAtThreshold(Metric):
    """Exact Dice of ``score >= threshold`` over all brain voxels (streaming TP/FP/FN counts)."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, threshold: float | DiceThreshold | _ValidationDiceThreshold, **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(threshold, _ValidationDiceThreshold):
            threshold = threshold.threshold
        # A plain attribute, not a submodule: the validation metric must not be registered twice.
        self._threshold = threshold if isinstance(threshold, DiceThreshold) else DiceThreshold(float(threshold))
        self.add_state("true_pos", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("false_pos", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("false_neg", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @property
    def threshold(self) -> float:
        """The threshold in use (NaN until the validation split has chosen one)."""
        return self._threshold.value

    def update(
        self,
        anomaly_map: torch.Tensor,
        gt_mask: torch.Tensor,
        brain_mask: torch.Tensor | None = None,
        volume_index: torch.Tensor | None = None,
    ) -> None:
        """Count TP/FP/FN at the current threshold."""
        threshold = self.threshold
        if math.isnan(threshold):
            return  # nothing to count against; compute() reports NaN
        for voxels in iter_volume_voxels(anomaly_map, gt_mask, brain_mask, volume_index):
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


class _VoxelPerVolumeMean(Metric):
    """Mean over lesion volumes of a per-volume voxel statistic.

    Args:
        statistic: One of :data:`~simpleslicenet.metrics.volumetric.PER_VOLUME_STATISTICS`.
        threshold: Needed by ``"dice_at_threshold"``: a number or a shared :class:`DiceThreshold`.
        num_bins: Bins of each per-volume histogram.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

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
        if isinstance(threshold, _ValidationDiceThreshold):
            threshold = threshold.threshold
        if threshold is not None and not isinstance(threshold, DiceThreshold):
            threshold = DiceThreshold(float(threshold))
        self.statistic = statistic
        self._threshold = threshold
        self.num_bins = num_bins
        self.add_state("volume_ids", default=[], dist_reduce_fx="cat")
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(
        self,
        anomaly_map: torch.Tensor,
        gt_mask: torch.Tensor,
        brain_mask: torch.Tensor | None = None,
        volume_index: torch.Tensor | None = None,
    ) -> None:
        """Compute the statistic of every volume in the batch (a volume must arrive whole)."""
        threshold = self._threshold.value if self._threshold is not None else None
        for voxels in iter_volume_voxels(anomaly_map, gt_mask, brain_mask, volume_index):
            value = per_volume_statistic(voxels, self.statistic, threshold=threshold, num_bins=self.num_bins)
            self.volume_ids.append(torch.tensor([voxels.volume_index], dtype=torch.long))
            self.values.append(torch.tensor([value], dtype=torch.float64))

    def compute(self) -> torch.Tensor:
        if not self.values:
            return torch.tensor(float("nan"), dtype=torch.float64)
        ids, values = dim_zero_cat(self.volume_ids), dim_zero_cat(self.values)
        if ids.unique().numel() != ids.numel():
            msg = "a volume arrived split over several batches; per-volume metrics need whole volumes"
            raise ValueError(msg)
        return values.nanmean() if (~values.isnan()).any() else torch.tensor(float("nan"), dtype=torch.float64)


def _exact_statistic(statistic: str, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    function = exact_auroc if statistic == "auroc" else exact_average_precision
    return torch.tensor(function(scores, labels), dtype=torch.float64)


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
        if not self.scores:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return _exact_statistic(self.statistic, dim_zero_cat(self.scores), dim_zero_cat(self.labels))


class _VolumeScores(Metric):
    """Exact volume-level AUROC/AUPRC: one ``(volume_score, volume_label)`` per volume, grouped by ``volume_index``.

    Args:
        statistic: ``"auroc"`` or ``"auprc"``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, statistic: str = "auroc", **kwargs) -> None:
        super().__init__(**kwargs)
        self.statistic = statistic
        self.add_state("volume_ids", default=[], dist_reduce_fx="cat")
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

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

    def compute(self) -> torch.Tensor:
        if not self.scores:
            return torch.tensor(float("nan"), dtype=torch.float64)
        _, scores, labels = self.entries()
        return _exact_statistic(self.statistic, scores, labels)


def _first_occurrence(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique ids (sorted) and the position of each one's first occurrence."""
    unique_ids, inverse = torch.unique(ids, return_inverse=True)
    positions = torch.arange(ids.numel(), device=ids.device)
    first = torch.full((unique_ids.numel(),), ids.numel(), dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    return unique_ids, first


# --------------------------------------------------------------------------- anomalib metrics


class _Named:
    """Gives a metric its documented name (``prefix + metric_name``) instead of its class name."""

    metric_name: str

    def __init__(self, fields: Sequence[str] | None = None, prefix: str = "", strict: bool = True, **kwargs) -> None:
        super().__init__(fields=fields, prefix=prefix, strict=strict, **kwargs)
        self.name = prefix + self.metric_name


class VoxelAUROC(_Named, AnomalibMetric, _VoxelAUROC):
    """Voxel AUROC over the brain voxels of all test volumes pooled (memory-bounded histogram).

    Args:
        fields: Batch fields; default ``anomaly_map, gt_mask, brain_mask, volume_index``.
        prefix: Put in front of the name ``voxel_AUROC``.
        strict: Raise when a field is missing (else skip the batch).
        num_bins: Histogram bins.
    """

    default_fields = VOXEL_FIELDS
    metric_name = "voxel_AUROC"


class VoxelAUPRC(_Named, AnomalibMetric, _VoxelAUPRC):
    """Voxel average precision over pooled brain voxels (``voxel_AUPRC``). Arguments as :class:`VoxelAUROC`."""

    default_fields = VOXEL_FIELDS
    metric_name = "voxel_AUPRC"


class VoxelMaxDice(_Named, AnomalibMetric, _VoxelMaxDice):
    """Dice at the best global threshold chosen on the test data itself (``voxel_maxDice``).

    An upper bound, not an honest estimate: report :class:`VoxelDiceAtThreshold` with a threshold
    chosen on the validation split beside it. Arguments as :class:`VoxelAUROC`.
    """

    default_fields = VOXEL_FIELDS
    metric_name = "voxel_maxDice"


class ValidationDiceThreshold(_Named, AnomalibMetric, _ValidationDiceThreshold):
    """On the validation split: the threshold that maximises pooled voxel Dice (``voxel_diceThreshold``).

    Its ``compute()`` writes the threshold into :attr:`threshold` (a :class:`DiceThreshold`), which
    a :class:`VoxelDiceAtThreshold` built from this metric reads during testing.

    Args:
        threshold: Shared holder to fill; a new one when ``None``.
        **kwargs: As :class:`VoxelAUROC`.
    """

    default_fields = VOXEL_FIELDS
    metric_name = "voxel_diceThreshold"


class VoxelDiceAtThreshold(_Named, AnomalibMetric, _VoxelDiceAtThreshold):
    """Exact pooled voxel Dice at a fixed threshold (``voxel_valDice``): the honest Dice.

    Args:
        threshold: A number, a :class:`DiceThreshold` or the :class:`ValidationDiceThreshold` metric
            whose validation result to use.
        **kwargs: ``fields``, ``prefix``, ``strict`` as :class:`VoxelAUROC`.
    """

    default_fields = VOXEL_FIELDS
    metric_name = "voxel_valDice"


class VoxelPerVolumeMean(_Named, AnomalibMetric, _VoxelPerVolumeMean):
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


class PaperVoxelAUROC(_Named, AnomalibMetric, _VoxelAUROC):
    """Paper protocol: pooled voxel AUROC after min-max scaling each volume's map (``paper_voxel_AUROC``).

    Per-volume scaling uses each test volume's own extremes, which no deployed detector knows; it is
    reported only for comparison with the original numbers. Arguments as :class:`VoxelAUROC`.
    """

    default_fields = VOXEL_FIELDS
    metric_name = "paper_voxel_AUROC"

    def __init__(self, **kwargs) -> None:
        super().__init__(minmax_per_volume=True, **kwargs)


class PaperMeanDice(_Named, AnomalibMetric, _VoxelPerVolumeMean):
    """Paper protocol: mean over lesion volumes of each volume's best-threshold Dice (``paper_meanDice``).

    Every volume gets the threshold that suits it best, an oracle choice; reported only for
    comparison with the original numbers. Arguments as :class:`VoxelAUROC`.
    """

    default_fields = VOXEL_FIELDS
    metric_name = "paper_meanDice"

    def __init__(self, **kwargs) -> None:
        super().__init__(statistic="max_dice", **kwargs)


class SliceAUROC(_Named, AnomalibMetric, _SliceScores):
    """Slice AUROC of ``pred_score`` vs ``gt_label`` over slices holding brain (``slice_AUROC``)."""

    default_fields = ("pred_score", "gt_label", "brain_mask")
    metric_name = "slice_AUROC"

    def __init__(self, **kwargs) -> None:
        super().__init__(statistic="auroc", **kwargs)


class SliceAUPRC(_Named, AnomalibMetric, _SliceScores):
    """Slice average precision (``slice_AUPRC``)."""

    default_fields = ("pred_score", "gt_label", "brain_mask")
    metric_name = "slice_AUPRC"

    def __init__(self, **kwargs) -> None:
        super().__init__(statistic="auprc", **kwargs)


class VolumeAUROC(_Named, AnomalibMetric, _VolumeScores):
    """Volume AUROC of ``volume_score`` vs ``volume_label``, one entry per volume (``volume_AUROC``)."""

    default_fields = ("volume_score", "volume_label", "volume_index")
    metric_name = "volume_AUROC"

    def __init__(self, **kwargs) -> None:
        super().__init__(statistic="auroc", **kwargs)


class VolumeAUPRC(_Named, AnomalibMetric, _VolumeScores):
    """Volume average precision, one entry per volume (``volume_AUPRC``)."""

    default_fields = ("volume_score", "volume_label", "volume_index")
    metric_name = "volume_AUPRC"

    def __init__(self, **kwargs) -> None:
        super().__init__(statistic="auprc", **kwargs)


# --------------------------------------------------------------------------- factories


def volume_test_metrics(
    prefix: str = "",
    num_bins: int = DEFAULT_NUM_BINS,
    per_volume: bool = False,
    paper_protocol: bool = False,
    val_threshold: ValidationDiceThreshold | DiceThreshold | float | None = None,
) -> list[AnomalibMetric]:
    """The standard test metrics for volumes.

    ``voxel_AUROC``, ``voxel_AUPRC`` (brain voxels pooled), ``voxel_maxDice`` (best global threshold,
    an upper bound), ``slice_AUROC``, ``slice_AUPRC``, ``volume_AUROC``, ``volume_AUPRC``.

    Args:
        prefix: Put in front of every name.
        num_bins: Bins of the voxel histograms.
        per_volume: Add the per-volume means ``voxel_AUROC_perVolume``, ``voxel_AUPRC_perVolume``
            (and ``voxel_valDice_perVolume`` with ``val_threshold``).
        paper_protocol: Add ``paper_voxel_AUROC`` and ``paper_meanDice`` (the original, optimistic protocol).
        val_threshold: Add ``voxel_valDice`` at this threshold (usually a :class:`ValidationDiceThreshold`).
    """
    voxel = {"prefix": prefix, "strict": False}  # maps are absent for classification-only models
    metrics: list[AnomalibMetric] = [
        VoxelAUROC(num_bins=num_bins, **voxel),
        VoxelAUPRC(num_bins=num_bins, **voxel),
        VoxelMaxDice(num_bins=num_bins, **voxel),
    ]
    if val_threshold is not None:
        metrics.append(VoxelDiceAtThreshold(threshold=val_threshold, **voxel))
    metrics += [
        SliceAUROC(prefix=prefix),
        SliceAUPRC(prefix=prefix),
        VolumeAUROC(prefix=prefix),
        VolumeAUPRC(prefix=prefix),
    ]
    if per_volume:
        metrics += [VoxelPerVolumeMean("auroc", **voxel), VoxelPerVolumeMean("auprc", **voxel)]
        if val_threshold is not None:
            metrics.append(VoxelPerVolumeMean("dice_at_threshold", threshold=val_threshold, **voxel))
    if paper_protocol:
        metrics += [PaperVoxelAUROC(num_bins=num_bins, **voxel), PaperMeanDice(**voxel)]
    return metrics


def default_volume_evaluator(
    val_threshold: bool = True,
    per_volume: bool = False,
    paper_protocol: bool = False,
    num_bins: int = DEFAULT_NUM_BINS,
) -> Evaluator:
    """An anomalib :class:`~anomalib.metrics.Evaluator` with :func:`volume_test_metrics`.

    Args:
        val_threshold: Also choose the max-Dice threshold on the validation split
            (``voxel_diceThreshold``, a validation metric) and report the test Dice at it (``voxel_valDice``).
        per_volume: See :func:`volume_test_metrics`.
        paper_protocol: See :func:`volume_test_metrics`.
        num_bins: Bins of the voxel histograms.
    """
    val_metrics = []
    threshold = None
    if val_threshold:
        threshold = ValidationDiceThreshold(num_bins=num_bins, strict=False)
        val_metrics.append(threshold)
    test_metrics = volume_test_metrics(
        num_bins=num_bins,
        per_volume=per_volume,
        paper_protocol=paper_protocol,
        val_threshold=threshold,
    )
    return Evaluator(val_metrics=val_metrics, test_metrics=test_metrics)

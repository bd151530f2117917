"""Every volumetric metric at once, outside Lightning: ``update(batch)`` per volume, ``compute()`` at the end."""

from __future__ import annotations

import math

import torch

from simpleslicenet.metrics.exact import dice_at_threshold, exact_auroc, exact_average_precision
from simpleslicenet.metrics.histogram import (
    DEFAULT_NUM_BINS,
    ScoreHistogram,
    auroc_error_bound,
    auroc_from_counts,
    average_precision_from_counts,
    dice_at_threshold_from_histogram,
    max_dice_from_counts,
    threshold_for_max_dice,
)
from simpleslicenet.metrics.volumetric import _plain, iter_volume_voxels, minmax_scale, volume_entries

__all__ = ["VolumeMetricAccumulator"]


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


class VolumeMetricAccumulator:
    """Streams VolumeBatches and reports voxel, slice and volume metrics as plain floats.

    Memory stays bounded: pooled voxel scores live in fixed-size histograms, lesion volumes keep one
    small histogram each, slices and volumes keep one score each.

    Args:
        num_bins: Bins of the pooled voxel histograms.
        per_volume_bins: Bins of each lesion volume's histogram.
        val_threshold: Threshold chosen on the validation split, if already known: the test Dice at
            it is then counted exactly while streaming. One given only to :meth:`compute` is
            applied to the histograms (with an error bound).

    Example:
        >>> val = VolumeMetricAccumulator()
        >>> for batch in val_batches:  # doctest: +SKIP
        ...     val.update(batch)
        >>> test = VolumeMetricAccumulator(val_threshold=val.threshold_for_max_dice())  # doctest: +SKIP
        >>> for batch in test_batches:  # doctest: +SKIP
        ...     test.update(batch)
        >>> test.compute()["voxel_valDice"]  # doctest: +SKIP
    """

    def __init__(
        self,
        num_bins: int = DEFAULT_NUM_BINS,
        per_volume_bins: int = 4096,
        val_threshold: float | None = None,
    ) -> None:
        self.num_bins = num_bins
        self.per_volume_bins = per_volume_bins
        self.val_threshold = val_threshold
        self.voxels = ScoreHistogram(num_bins)
        self.paper_voxels = ScoreHistogram(num_bins)  # each volume min-max scaled first
        self.lesion_volumes: dict[int, ScoreHistogram] = {}
        self.volume_dice: dict[int, float] = {}  # exact Dice at val_threshold, lesion volumes
        self.counts = torch.zeros(3, dtype=torch.long)  # TP, FP, FN at val_threshold
        self.slice_scores: list[torch.Tensor] = []
        self.slice_labels: list[torch.Tensor] = []
        self.volumes: dict[int, tuple[float, int]] = {}
        self.seen_voxel_volumes: set[int] = set()

    def update(self, batch) -> None:  # noqa: ANN001 - a VolumeBatch (or any batch with its fields)
        """Add the predictions of a batch of whole volumes.

        Uses ``anomaly_map``/``gt_mask``/``brain_mask`` (voxel level), ``pred_score``/``gt_label``
        (slice level) and ``volume_score``/``volume_label`` (volume level), each when present.
        """
        volume_index = getattr(batch, "volume_index", None)
        brain_mask = getattr(batch, "brain_mask", None)
        if batch.anomaly_map is not None and batch.gt_mask is not None:
            self._update_voxels(batch.anomaly_map, batch.gt_mask, brain_mask, volume_index)
        if batch.pred_score is not None and batch.gt_label is not None:
            scores = _plain(batch.pred_score).reshape(-1).double().cpu()
            labels = _plain(batch.gt_label).reshape(-1).long().cpu()
            if brain_mask is not None:  # slices without brain are trivially normal: leave them out
                keep = _plain(brain_mask).reshape(scores.numel(), -1).any(dim=1).cpu()
                scores, labels = scores[keep], labels[keep]
            self.slice_scores.append(scores)
            self.slice_labels.append(labels)
        volume_score = getattr(batch, "volume_score", None)
        volume_label = getattr(batch, "volume_label", None)
        if volume_score is not None and volume_label is not None:
            ids, scores, labels = volume_entries(volume_index, volume_score, volume_label)
            for index, score, label in zip(ids.tolist(), scores.tolist(), labels.tolist(), strict=True):
                if index in self.volumes and self.volumes[index] != (score, label):
                    msg = f"volume {index} was scored differently in two batches"
                    raise ValueError(msg)
                self.volumes[index] = (score, label)

    def _update_voxels(self, anomaly_map, gt_mask, brain_mask, volume_index) -> None:  # noqa: ANN001
        for voxels in iter_volume_voxels(anomaly_map, gt_mask, brain_mask, volume_index):
            if voxels.volume_index in self.seen_voxel_volumes:
                msg = f"volume {voxels.volume_index} arrived twice or split over batches; send whole volumes"
                raise ValueError(msg)
            self.seen_voxel_volumes.add(voxels.volume_index)
            if voxels.scores.numel() == 0:
                continue
            self.voxels.update(voxels.scores, voxels.labels)
            self.paper_voxels.update(minmax_scale(voxels.scores), voxels.labels)
            if self.val_threshold is not None:
                predicted = voxels.scores >= self.val_threshold
                self.counts += torch.stack([
                    (predicted & voxels.labels).sum(),
                    (predicted & ~voxels.labels).sum(),
                    (~predicted & voxels.labels).sum(),
                ]).cpu()
            if voxels.has_lesion:
                hist = ScoreHistogram(self.per_volume_bins)
                hist.update(voxels.scores, voxels.labels)
                self.lesion_volumes[voxels.volume_index] = hist
                if self.val_threshold is not None:
                    self.volume_dice[voxels.volume_index] = dice_at_threshold(
                        voxels.scores,
                        voxels.labels,
                        self.val_threshold,
                    )

    def threshold_for_max_dice(self) -> float:
        """Threshold maximising pooled voxel Dice on the data seen (call it on the validation split)."""
        return threshold_for_max_dice(self.voxels)

    def compute(self, val_threshold: float | None = None) -> dict[str, float]:
        """All metrics as ``name -> value`` (NaN where undefined).

        Args:
            val_threshold: Threshold chosen on the validation split for ``voxel_valDice``; defaults to
                the one given at construction (exact). Another one is read off the histograms and
                comes with ``voxel_valDice_binError``.

        Returns:
            ``voxel_AUROC``, ``voxel_AUROC_binError`` (bound on the binning error), ``voxel_AUPRC``,
            ``voxel_maxDice`` and ``voxel_maxDice_threshold`` (best global threshold on this data: an
            upper bound), ``voxel_valDice`` (when a threshold is known), per-volume means over
            lesion volumes ``voxel_AUROC_perVolume``, ``voxel_AUPRC_perVolume``,
            ``voxel_valDice_perVolume``, ``slice_AUROC``, ``slice_AUPRC``, ``volume_AUROC``,
            ``volume_AUPRC``, the paper protocol ``paper_voxel_AUROC`` and ``paper_meanDice``, and
            the counts ``n_volumes``, ``n_lesion_volumes``, ``n_slices``.
        """
        pos, neg = self.voxels.positives, self.voxels.negatives
        out = {
            "voxel_AUROC": auroc_from_counts(pos, neg),
            "voxel_AUROC_binError": auroc_error_bound(pos, neg),
            "voxel_AUPRC": average_precision_from_counts(pos, neg),
            "voxel_maxDice": max_dice_from_counts(pos, neg),
            "voxel_maxDice_threshold": threshold_for_max_dice(self.voxels),
        }
        threshold = self.val_threshold if val_threshold is None else val_threshold
        if threshold is not None:
            if threshold == self.val_threshold:
                tp, fp, fn = (float(c) for c in self.counts)
                out["voxel_valDice"] = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
                per_volume = list(self.volume_dice.values())
            else:
                out["voxel_valDice"], out["voxel_valDice_binError"] = dice_at_threshold_from_histogram(
                    self.voxels,
                    threshold,
                )
                per_volume = [dice_at_threshold_from_histogram(h, threshold)[0] for h in self.lesion_volumes.values()]
            out["voxel_valDice_perVolume"] = _nanmean(per_volume)
        hists = list(self.lesion_volumes.values())
        out["voxel_AUROC_perVolume"] = _nanmean([auroc_from_counts(h.positives, h.negatives) for h in hists])
        out["voxel_AUPRC_perVolume"] = _nanmean([average_precision_from_counts(h.positives, h.negatives) for h in hists])
        if self.slice_scores:
            scores, labels = torch.cat(self.slice_scores), torch.cat(self.slice_labels)
            out["slice_AUROC"] = exact_auroc(scores, labels)
            out["slice_AUPRC"] = exact_average_precision(scores, labels)
        if self.volumes:
            scores = torch.tensor([s for s, _ in self.volumes.values()], dtype=torch.float64)
            labels = torch.tensor([label for _, label in self.volumes.values()])
            out["volume_AUROC"] = exact_auroc(scores, labels)
            out["volume_AUPRC"] = exact_average_precision(scores, labels)
        out["paper_voxel_AUROC"] = auroc_from_counts(self.paper_voxels.positives, self.paper_voxels.negatives)
        out["paper_meanDice"] = _nanmean([max_dice_from_counts(h.positives, h.negatives) for h in hists])
        out["n_volumes"] = float(max(len(self.seen_voxel_volumes), len(self.volumes)))
        out["n_lesion_volumes"] = float(len(self.lesion_volumes))
        out["n_slices"] = float(sum(s.numel() for s in self.slice_scores))
        return out

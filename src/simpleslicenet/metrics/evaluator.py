"""The volumetric test metrics as one anomalib :class:`~anomalib.metrics.Evaluator`: the only evaluation path.

``engine.validate`` picks the Dice threshold on the validation split, ``engine.test`` reports every
metric at that threshold; the benchmark sweep and the notebook use the same Evaluator through the
same Engine calls, so their numbers and ``anomalib test``'s are the same numbers.
"""

from __future__ import annotations

from anomalib.metrics import AnomalibMetric, Evaluator

from simpleslicenet.metrics.histogram import DEFAULT_NUM_BINS
from simpleslicenet.metrics.lesion import LesionDetection, LesionFalseClusters
from simpleslicenet.metrics.slice import SliceAUPRC, SliceAUROC
from simpleslicenet.metrics.volume import VolumeAUPRC, VolumeAUROC
from simpleslicenet.metrics import voxel

__all__ = ["default_volume_evaluator", "volume_test_metrics"]


def volume_test_metrics(
    prefix: str = "",
    num_bins: int = DEFAULT_NUM_BINS,
    per_volume: bool = False,
    paper_protocol: bool = False,
    val_threshold: voxel.ValidationDiceThreshold | voxel.DiceThreshold | float | None = None,
) -> list[AnomalibMetric]:
    """The standard test metrics for volumes.

    ``voxel_AUROC``, ``voxel_AUPRC`` (brain voxels pooled), ``voxel_maxDice`` (best global threshold,
    an upper bound), ``slice_AUROC``, ``slice_AUPRC``, ``volume_AUROC``, ``volume_AUPRC``; with a
    validation threshold also ``voxel_valDice``, ``lesion_detection`` (lesions of 1 ml or more found)
    and ``lesion_FPclusters`` (false clusters per healthy volume), see :mod:`.lesion`.

    Args:
        prefix: Put in front of every name.
        num_bins: Bins of the voxel histograms.
        per_volume: Add the per-volume means ``voxel_AUROC_perVolume``, ``voxel_AUPRC_perVolume``
            (and ``voxel_valDice_perVolume`` with ``val_threshold``).
        paper_protocol: Add ``paper_voxel_AUROC`` and ``paper_meanDice`` (the original, optimistic protocol).
        val_threshold: Add ``voxel_valDice`` at this threshold (usually a :class:`ValidationDiceThreshold`).
    """
    loose = {"prefix": prefix, "strict": False}  # maps are absent for classification-only models
    metrics: list[AnomalibMetric] = [
        voxel.VoxelAUROC(num_bins=num_bins, **loose),
        voxel.VoxelAUPRC(num_bins=num_bins, **loose),
        voxel.VoxelMaxDice(num_bins=num_bins, **loose),
    ]
    if val_threshold is not None:
        metrics.append(voxel.VoxelDiceAtThreshold(threshold=val_threshold, **loose))
        metrics += [LesionDetection(threshold=val_threshold, **loose), LesionFalseClusters(threshold=val_threshold, **loose)]
    metrics += [
        SliceAUROC(prefix=prefix),
        SliceAUPRC(prefix=prefix),
        VolumeAUROC(prefix=prefix),
        VolumeAUPRC(prefix=prefix),
    ]
    if per_volume:
        metrics += [voxel.VoxelPerVolumeMean("auroc", **loose), voxel.VoxelPerVolumeMean("auprc", **loose)]
        if val_threshold is not None:
            metrics.append(voxel.VoxelPerVolumeMean("dice_at_threshold", threshold=val_threshold, **loose))
    if paper_protocol:
        metrics += [voxel.PaperVoxelAUROC(num_bins=num_bins, **loose), voxel.PaperMeanDice(**loose)]
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
    # Validation slice AUROC is logged so a checkpoint can be chosen on it (the authors' protocol,
    # simpleslicenet.training.selection); it costs one score per slice.
    val_metrics: list[AnomalibMetric] = [SliceAUROC(prefix="val_")]
    threshold = None
    if val_threshold:
        threshold = voxel.ValidationDiceThreshold(num_bins=num_bins, strict=False)
        val_metrics.append(threshold)
    test_metrics = volume_test_metrics(
        num_bins=num_bins,
        per_volume=per_volume,
        paper_protocol=paper_protocol,
        val_threshold=threshold,
    )
    return Evaluator(val_metrics=val_metrics, test_metrics=test_metrics)

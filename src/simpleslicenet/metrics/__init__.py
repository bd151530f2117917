"""Honest volumetric metrics for 3D anomaly detection: voxel, slice and volume level.

Voxel metrics pool the brain voxels of all test volumes (AUROC, average precision, Dice) in
memory-bounded histograms (see :mod:`simpleslicenet.metrics.histogram` for the binning and its error
bound). Dice comes twice: ``voxel_maxDice`` at the best global threshold on the test data itself (an
upper bound) and ``voxel_valDice`` at a threshold chosen on the validation split (the honest one).
Slice metrics compare ``pred_score`` with ``gt_label``; volume metrics take one ``volume_score`` per
volume. The original paper's optimistic protocol (per-volume min-max before pooling, per-volume best
Dice) is available under ``paper_*`` names, for comparison only.

Example:
    >>> from simpleslicenet.metrics import default_volume_evaluator
    >>> evaluator = default_volume_evaluator(val_threshold=True)
    >>> sorted(m.name for m in evaluator.test_metrics)[:3]
    ['slice_AUPRC', 'slice_AUROC', 'volume_AUPRC']

Layout: one module per level (:mod:`.voxel`, :mod:`.slice`, :mod:`.volume`) and :mod:`.evaluator`, the
one Evaluator that ``engine.test``, the benchmark sweep and the notebook all use.
"""

from simpleslicenet.metrics.evaluator import (
    default_volume_evaluator,
    volume_test_metrics,
)
from simpleslicenet.metrics.exact import (
    dice_at_threshold,
    exact_auroc,
    exact_average_precision,
    exact_max_dice,
    exact_threshold_for_max_dice,
)
from simpleslicenet.metrics.histogram import (
    DEFAULT_NUM_BINS,
    ScoreHistogram,
    auroc_error_bound,
    auroc_from_counts,
    average_precision_from_counts,
    dice_at_threshold_from_histogram,
    dice_curve_from_counts,
    max_dice_from_counts,
    threshold_for_max_dice,
)
from simpleslicenet.metrics.slice import SliceAUPRC, SliceAUROC
from simpleslicenet.metrics.volume import VolumeAUPRC, VolumeAUROC
from simpleslicenet.metrics.volumetric import minmax_scale
from simpleslicenet.metrics.voxel import (
    DiceThreshold,
    PaperMeanDice,
    PaperVoxelAUROC,
    ValidationDiceThreshold,
    VoxelAUPRC,
    VoxelAUROC,
    VoxelDiceAtThreshold,
    VoxelMaxDice,
    VoxelPerVolumeMean,
)

__all__ = [
    "DEFAULT_NUM_BINS",
    "DiceThreshold",
    "PaperMeanDice",
    "PaperVoxelAUROC",
    "ScoreHistogram",
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
    "auroc_error_bound",
    "auroc_from_counts",
    "average_precision_from_counts",
    "default_volume_evaluator",
    "dice_at_threshold",
    "dice_at_threshold_from_histogram",
    "dice_curve_from_counts",
    "exact_auroc",
    "exact_average_precision",
    "exact_max_dice",
    "exact_threshold_for_max_dice",
    "max_dice_from_counts",
    "minmax_scale",
    "threshold_for_max_dice",
    "volume_test_metrics",
]

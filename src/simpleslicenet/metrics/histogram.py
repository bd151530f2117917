"""Memory-bounded score histograms and the curves computed from them.

Voxel-level curves over a whole test set do not fit in memory (100 volumes of 192×192×96 are 350 M
voxels), so the scores of positive and negative voxels are counted in a fixed number of bins and
every curve (ROC, precision-recall, Dice against threshold) is read off the cumulative counts.

Binning choice: anomaly scores have no a-priori range (log-likelihoods, reconstruction errors,
probabilities), so the bins adapt to the data without a first pass and without clamping. The bins
are the cells ``[k·2^e, (k+1)·2^e)`` of a power-of-two grid; a histogram keeps a window of
``num_bins`` consecutive cells that covers every score seen so far. When new scores fall outside
the window, the width is doubled until they fit and old cells are merged pairwise, which is exact
because cells of width ``2^(e+1)`` are unions of two cells of width ``2^e``. The final grid is the
finest power-of-two grid that covers all scores, whatever order they came in, so bin widths are at
most ``4 · (max - min) / num_bins``. Two histograms (two processes in DDP) are merged the same way.

Error bound: a threshold at a bin edge splits the scores exactly, so the binned curve is the exact
curve evaluated at the bin edges. Only ties inside a bin are unresolved: a positive/negative pair in
the same bin counts one half in the binned AUROC and 0 or 1 in the exact one, hence
``|AUROC_binned - AUROC_exact| <= 0.5 · sum_b pos_b · neg_b / (P · N)``, computed by
:func:`auroc_error_bound` from the histogram itself. The binned maximum Dice is attained at an exact
threshold (a bin edge), so it is a lower bound of the exact maximum Dice, and the exact threshold
returned by :func:`threshold_for_max_dice` reproduces it exactly on the data it was chosen on.
Limitation: a few extreme outliers widen the range and coarsen the bins for everyone else; the
bound above then grows and says so.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "DEFAULT_NUM_BINS",
    "ScoreHistogram",
    "auroc_error_bound",
    "auroc_from_counts",
    "average_precision_from_counts",
    "common_grid",
    "dice_at_threshold_from_histogram",
    "dice_curve_from_counts",
    "max_dice_from_counts",
    "threshold_for_max_dice",
]

DEFAULT_NUM_BINS = 16384

# Global bin indices are kept below 2**52 so they stay exact in float64 and fit int64.
_MAX_INDEX_BITS = 52


def _floor_index(scores: torch.Tensor, exponent: int) -> torch.Tensor:
    """Global cell index ``floor(score / 2^exponent)``.

    Exact in the scores' own float type: scaling by a power of two only shifts the exponent, and the
    result stays below ``2**52``. float32 is kept (half the memory traffic of float64) while the scale
    factor is a normal float32 number.
    """
    if scores.dtype != torch.float32 or abs(exponent) > 100:
        scores = scores.double()
    return torch.floor(scores * (2.0 ** -exponent)).long()


def _floor_div_pow2(index: int | torch.Tensor, shift: int) -> int | torch.Tensor:
    """Index of the coarser cell (``shift`` doublings of the width) that holds cell ``index``."""
    if isinstance(index, torch.Tensor):
        return torch.div(index, 2**shift, rounding_mode="floor")
    return index >> shift  # Python's shift on negative ints is a floor division too.


class ScoreHistogram:
    """Counts of positive and negative scores on an adaptive power-of-two grid.

    Args:
        num_bins: Number of bins of the window (memory is ``2 · num_bins`` int64 counts).
        device: Device of the count tensors.

    Example:
        >>> hist = ScoreHistogram(num_bins=1024)
        >>> hist.update(torch.tensor([0.1, 0.2, 0.9]), torch.tensor([0, 0, 1]))
        >>> round(auroc_from_counts(hist.positives, hist.negatives), 3)
        1.0
    """

    def __init__(self, num_bins: int = DEFAULT_NUM_BINS, device: torch.device | str | None = None) -> None:
        if num_bins < 2:
            msg = f"num_bins must be at least 2, got {num_bins}"
            raise ValueError(msg)
        self.num_bins = int(num_bins)
        self.positives = torch.zeros(self.num_bins, dtype=torch.long, device=device)
        self.negatives = torch.zeros(self.num_bins, dtype=torch.long, device=device)
        self.exponent: int | None = None  # cell width is 2**exponent; None until the first score
        self.offset = 0  # global index of bin 0

    @property
    def is_empty(self) -> bool:
        """Whether no score has been counted yet."""
        return self.exponent is None

    @property
    def bin_edges(self) -> torch.Tensor:
        """Lower edges of the bins (float64, ascending); a score ``s`` lies in bin ``b`` iff ``edge_b <= s < edge_b+1``."""
        if self.exponent is None:
            return torch.zeros(0, dtype=torch.float64)
        index = torch.arange(self.offset, self.offset + self.num_bins + 1, dtype=torch.float64)
        return torch.ldexp(index, torch.tensor(self.exponent, dtype=torch.float64))

    def occupied_range(self) -> tuple[int, int] | None:
        """Lowest and highest occupied global cell index, or ``None`` when empty."""
        if self.exponent is None:
            return None
        occupied = torch.nonzero(self.positives + self.negatives).flatten()
        if occupied.numel() == 0:
            return None
        return self.offset + int(occupied[0]), self.offset + int(occupied[-1])

    def rebin(self, exponent: int, offset: int) -> None:
        """Move the counts to a coarser (or equal) grid ``(exponent, offset)`` by merging whole cells."""
        if self.exponent is None:
            self.exponent, self.offset = exponent, offset
            return
        shift = exponent - self.exponent
        if shift < 0:
            msg = f"cannot refine bins (exponent {self.exponent} -> {exponent})"
            raise ValueError(msg)
        if shift == 0 and offset == self.offset:
            return
        global_index = torch.arange(self.num_bins, device=self.positives.device) + self.offset
        target = _floor_div_pow2(global_index, shift) - offset
        occupied = (self.positives + self.negatives) > 0
        if occupied.any() and (target[occupied].min() < 0 or target[occupied].max() >= self.num_bins):
            msg = "new grid does not cover the counted scores"
            raise ValueError(msg)
        target = target.clamp(0, self.num_bins - 1)  # empty cells only, they add zero
        self.positives = torch.zeros_like(self.positives).index_add_(0, target, self.positives)
        self.negatives = torch.zeros_like(self.negatives).index_add_(0, target, self.negatives)
        self.exponent, self.offset = exponent, offset

    def _initial_exponent(self, low: float, high: float) -> int:
        """Finest exponent worth trying for a first batch spanning ``[low, high]``."""
        magnitude = max(abs(low), abs(high))
        span = high - low
        if span > 0:
            exponent = math.floor(math.log2(span / self.num_bins)) - 1
        else:  # constant scores: any fine width works; the grid coarsens when others arrive
            exponent = (math.frexp(magnitude)[1] if magnitude > 0 else 0) - 40
        if magnitude > 0:  # keep global indices below 2**52
            exponent = max(exponent, math.frexp(magnitude)[1] - _MAX_INDEX_BITS)
        return exponent

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        """Count ``scores`` as positive where ``labels`` is true, else negative.

        Args:
            scores: Finite scores of any shape.
            labels: Boolean (or 0/1) labels of the same number of elements.

        Raises:
            ValueError: Non-finite scores or mismatched sizes.
        """
        scores = scores.reshape(-1)
        labels = labels.reshape(-1).bool()
        if scores.numel() != labels.numel():
            msg = f"{scores.numel()} scores but {labels.numel()} labels"
            raise ValueError(msg)
        if scores.numel() == 0:
            return
        if scores.dtype not in (torch.float32, torch.float64):
            scores = scores.float()
        scores = scores.to(self.positives.device)
        labels = labels.to(self.positives.device)
        low, high = float(scores.min()), float(scores.max())
        if not (math.isfinite(low) and math.isfinite(high)):
            msg = "anomaly scores contain NaN or infinite values"
            raise ValueError(msg)
        if self.exponent is None:
            exponent = self._initial_exponent(low, high)
            occupied = None
        else:
            exponent = self.exponent
            occupied = self.occupied_range()
        # Smallest exponent at which old and new cells fit one window.
        magnitude = max(abs(low), abs(high))
        if magnitude > 0:
            exponent = max(exponent, math.frexp(magnitude)[1] - _MAX_INDEX_BITS)
        while True:
            lowest = math.floor(math.ldexp(low, -exponent))
            highest = math.floor(math.ldexp(high, -exponent))
            if occupied is not None:
                shift = exponent - self.exponent
                lowest = min(lowest, _floor_div_pow2(occupied[0], shift))
                highest = max(highest, _floor_div_pow2(occupied[1], shift))
            if highest - lowest < self.num_bins:
                break
            exponent += 1
        self.rebin(exponent, lowest)
        index = _floor_index(scores, exponent) - lowest
        counts = torch.bincount(index + labels.long() * self.num_bins, minlength=2 * self.num_bins)
        self.negatives += counts[: self.num_bins]
        self.positives += counts[self.num_bins :]

    def merge(self, other: ScoreHistogram) -> None:
        """Add the counts of ``other`` (same ``num_bins``) into this histogram."""
        if other.num_bins != self.num_bins:
            msg = f"cannot merge histograms of {self.num_bins} and {other.num_bins} bins"
            raise ValueError(msg)
        if other.exponent is None:
            return
        if self.exponent is None:
            self.exponent, self.offset = other.exponent, other.offset
            self.positives, self.negatives = other.positives.clone(), other.negatives.clone()
            return
        exponent, offset = common_grid([self.grid_summary(), other.grid_summary()], self.num_bins)
        self.rebin(exponent, offset)
        incoming = ScoreHistogram(self.num_bins, device=self.positives.device)
        incoming.positives, incoming.negatives = other.positives.clone(), other.negatives.clone()
        incoming.exponent, incoming.offset = other.exponent, other.offset
        incoming.rebin(exponent, offset)
        self.positives += incoming.positives
        self.negatives += incoming.negatives

    def grid_summary(self) -> tuple[int, int, int] | None:
        """``(exponent, lowest, highest)`` occupied cells, the only facts needed to agree on a common grid."""
        occupied = self.occupied_range()
        if occupied is None:
            return None
        return self.exponent, occupied[0], occupied[1]

    def grid_tensor(self) -> torch.Tensor:
        """``[is_set, exponent, offset]`` as int64, the grid part of a metric state."""
        if self.exponent is None:
            return torch.zeros(3, dtype=torch.long, device=self.positives.device)
        return torch.tensor([1, self.exponent, self.offset], dtype=torch.long, device=self.positives.device)

    @classmethod
    def from_state(cls, positives: torch.Tensor, negatives: torch.Tensor, grid: torch.Tensor) -> ScoreHistogram:
        """Histogram viewing metric states (counts are shared, not copied)."""
        hist = cls(num_bins=positives.numel(), device=positives.device)
        hist.positives, hist.negatives = positives, negatives
        if int(grid[0]) == 1:
            hist.exponent, hist.offset = int(grid[1]), int(grid[2])
        return hist

    def threshold_for_max_dice(self) -> float:
        """Score threshold (predict lesion where ``score >= threshold``) that maximises Dice here."""
        return threshold_for_max_dice(self)


def common_grid(summaries: list[tuple[int, int, int] | None], num_bins: int) -> tuple[int, int]:
    """The finest grid ``(exponent, offset)`` that covers every histogram summarised by :meth:`ScoreHistogram.grid_summary`.

    Args:
        summaries: One ``(exponent, lowest, highest)`` per histogram, ``None`` for empty ones.
        num_bins: Window length shared by all histograms.

    Returns:
        ``(exponent, offset)``; every process computes the same answer from the same summaries.
    """
    present = [s for s in summaries if s is not None]
    if not present:
        msg = "all histograms are empty"
        raise ValueError(msg)
    exponent = max(s[0] for s in present)
    while True:
        lowest = min(_floor_div_pow2(s[1], exponent - s[0]) for s in present)
        highest = max(_floor_div_pow2(s[2], exponent - s[0]) for s in present)
        if highest - lowest < num_bins:
            return exponent, lowest
        exponent += 1


def _as_counts(positives: torch.Tensor, negatives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return positives.double().reshape(-1), negatives.double().reshape(-1)


def auroc_from_counts(positives: torch.Tensor, negatives: torch.Tensor) -> float:
    """Area under the ROC curve from per-bin counts (ascending score order); ties in a bin count one half.

    Args:
        positives: Positive count per bin.
        negatives: Negative count per bin.

    Returns:
        AUROC, or NaN when either class is absent.
    """
    pos, neg = _as_counts(positives, negatives)
    total_pos, total_neg = pos.sum(), neg.sum()
    if total_pos == 0 or total_neg == 0:
        return float("nan")
    positives_above = pos.flip(0).cumsum(0).flip(0) - pos  # positives strictly above each bin
    wins = (neg * (positives_above + 0.5 * pos)).sum()
    return float(wins / (total_pos * total_neg))


def auroc_error_bound(positives: torch.Tensor, negatives: torch.Tensor) -> float:
    """Largest possible gap between the binned and the exact AUROC: half the share of positive/negative pairs sharing a bin."""
    pos, neg = _as_counts(positives, negatives)
    total_pos, total_neg = pos.sum(), neg.sum()
    if total_pos == 0 or total_neg == 0:
        return float("nan")
    return float(0.5 * (pos * neg).sum() / (total_pos * total_neg))


def _cumulative_from_top(positives: torch.Tensor, negatives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """True and false positives when predicting ``bin >= b``, for each bin ``b``."""
    pos, neg = _as_counts(positives, negatives)
    return pos.flip(0).cumsum(0).flip(0), neg.flip(0).cumsum(0).flip(0)


def average_precision_from_counts(positives: torch.Tensor, negatives: torch.Tensor) -> float:
    """Average precision (area under the precision-recall step curve) from per-bin counts.

    ``AP = sum_b (recall_b - recall_{b+1}) · precision_b`` over thresholds at each bin edge, highest first:
    the usual step definition, with the scores of one bin treated as tied.

    Returns:
        AP, or NaN when there is no positive.
    """
    pos, _ = _as_counts(positives, negatives)
    total_pos = pos.sum()
    if total_pos == 0:
        return float("nan")
    true_pos, false_pos = _cumulative_from_top(positives, negatives)
    predicted = true_pos + false_pos
    precision = torch.where(predicted > 0, true_pos / predicted.clamp_min(1), torch.zeros_like(predicted))
    return float((pos * precision).sum() / total_pos)


def dice_curve_from_counts(positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Dice ``2TP / (2TP + FP + FN)`` when predicting ``bin >= b``, for each bin ``b`` (float64)."""
    pos, _ = _as_counts(positives, negatives)
    total_pos = pos.sum()
    true_pos, false_pos = _cumulative_from_top(positives, negatives)
    denominator = true_pos + false_pos + total_pos  # = 2TP + FP + FN
    return torch.where(denominator > 0, 2 * true_pos / denominator.clamp_min(1), torch.zeros_like(denominator))


def max_dice_from_counts(positives: torch.Tensor, negatives: torch.Tensor) -> float:
    """Best Dice over all bin-edge thresholds (the "best global threshold" upper bound); NaN without positives."""
    if positives.sum() == 0:
        return float("nan")
    return float(dice_curve_from_counts(positives, negatives).max())


def threshold_for_max_dice(hist: ScoreHistogram) -> float:
    """Threshold (predict lesion where ``score >= threshold``) that maximises Dice on ``hist``.

    Choose it on the validation split and apply it to the test split for an honest Dice. On the data
    of ``hist`` the threshold reproduces :func:`max_dice_from_counts` exactly, because it is a bin edge.

    Args:
        hist: Histogram of validation scores with lesion labels.

    Returns:
        The threshold, or NaN when ``hist`` holds no positive. Empty bins below the best occupied bin
        give the same split, so the threshold sits in the middle of that empty gap (the most margin
        on both sides for new data) rather than on the edge of the highest normal score.
    """
    if hist.is_empty or hist.positives.sum() == 0:
        return float("nan")
    dice = dice_curve_from_counts(hist.positives, hist.negatives)
    first = int(torch.argmax(dice))  # lowest maximiser
    last = first
    occupied = (hist.positives + hist.negatives) > 0
    while last + 1 < dice.numel() and not occupied[last]:  # an empty bin splits nothing
        last += 1
    edges = hist.bin_edges
    return float((edges[first] + edges[last]) / 2)


def dice_at_threshold_from_histogram(hist: ScoreHistogram, threshold: float) -> tuple[float, float]:
    """Dice of ``score >= threshold`` read from a histogram, with its error bound.

    Bins wholly above or below the threshold are split exactly; the one bin that straddles it is
    assumed uniformly filled. Use the streaming :class:`~simpleslicenet.metrics.VoxelDiceAtThreshold`
    (exact counts) when the threshold is known before the data arrive.

    Returns:
        ``(dice, bound)``: the estimate and the largest error the straddling bin can cause.
    """
    total_pos = float(hist.positives.sum())
    if hist.is_empty or threshold != threshold:
        return float("nan"), float("nan")
    edges = hist.bin_edges
    pos, neg = _as_counts(hist.positives, hist.negatives)
    index = int(torch.searchsorted(edges, torch.tensor([threshold], dtype=torch.float64), right=True)) - 1
    if index < 0:  # threshold below every bin: everything predicted
        above_pos, above_neg, part_pos, part_neg, fraction = pos.sum(), neg.sum(), 0.0, 0.0, 0.0
    elif index >= hist.num_bins:  # above every bin: nothing predicted
        above_pos = above_neg = torch.zeros((), dtype=torch.float64)
        part_pos, part_neg, fraction = 0.0, 0.0, 0.0
    else:
        above_pos, above_neg = pos[index + 1 :].sum(), neg[index + 1 :].sum()
        part_pos, part_neg = float(pos[index]), float(neg[index])
        width = float(edges[index + 1] - edges[index])
        fraction = float(edges[index + 1] - threshold) / width

    def dice(tp: float, fp: float) -> float:
        denominator = tp + fp + total_pos
        return 1.0 if denominator == 0 else 2 * tp / denominator

    low = dice(float(above_pos), float(above_neg))
    high = dice(float(above_pos) + part_pos, float(above_neg) + part_neg)
    estimate = dice(float(above_pos) + fraction * part_pos, float(above_neg) + fraction * part_neg)
    partial = [dice(float(above_pos) + a, float(above_neg) + b) for a in (0, part_pos) for b in (0, part_neg)]
    return estimate, max(abs(v - estimate) for v in [low, high, *partial])

"""Exact, sort-based reference metrics (no scikit-learn, no binning).

They hold every score in memory, so they serve small data: slice and volume level metrics, and the
tests that check the memory-bounded histogram versions against them. Ties are handled the usual way:
a threshold never separates equal scores.
"""

from __future__ import annotations

import torch

__all__ = [
    "dice_at_threshold",
    "exact_auroc",
    "exact_average_precision",
    "exact_max_dice",
    "exact_statistic",
    "exact_threshold_for_max_dice",
]


def _flat(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.as_tensor(scores).reshape(-1).double()
    labels = torch.as_tensor(labels).reshape(-1).bool()
    if scores.numel() != labels.numel():
        msg = f"{scores.numel()} scores but {labels.numel()} labels"
        raise ValueError(msg)
    if not torch.isfinite(scores).all():
        msg = "scores contain NaN or infinite values"
        raise ValueError(msg)
    return scores, labels


def exact_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """AUROC by the Mann-Whitney rank sum with average ranks for ties.

    Args:
        scores: Scores, any shape.
        labels: Binary labels, same number of elements.

    Returns:
        AUROC, or NaN when either class is absent.
    """
    scores, labels = _flat(scores, labels)
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    sorted_scores, order = torch.sort(scores)
    # Average rank (1-based) of each group of tied scores.
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average_rank = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(scores)
    ranks[order] = average_rank[inverse]
    rank_sum = ranks[labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _operating_points(
    scores: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """Distinct thresholds (descending), true and false positives of ``score >= threshold``, and the
    number of positives; ``None`` without positives."""
    scores, labels = _flat(scores, labels)
    n_pos = int(labels.sum())
    if n_pos == 0:
        return None
    sorted_scores, order = torch.sort(scores, descending=True)
    sorted_labels = labels[order].double()
    true_pos = sorted_labels.cumsum(0)
    false_pos = (1 - sorted_labels).cumsum(0)
    # Keep the last position of each run of equal scores: a threshold takes all ties together.
    last_of_run = torch.ones_like(sorted_scores, dtype=torch.bool)
    last_of_run[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    return sorted_scores[last_of_run], true_pos[last_of_run], false_pos[last_of_run], n_pos


def exact_average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Average precision ``sum_k (R_k - R_{k-1}) P_k`` over distinct thresholds; NaN without positives."""
    points = _operating_points(scores, labels)
    if points is None:
        return float("nan")
    _, true_pos, false_pos, n_pos = points
    precision = true_pos / (true_pos + false_pos)
    recall = true_pos / n_pos
    recall_step = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((recall_step * precision).sum())


def _dice_curve(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Distinct thresholds (descending) and the Dice of ``score >= threshold``; ``None`` without positives."""
    points = _operating_points(scores, labels)
    if points is None:
        return None
    thresholds, true_pos, false_pos, n_pos = points
    return thresholds, 2 * true_pos / (true_pos + false_pos + n_pos)


def exact_max_dice(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Best Dice over every threshold ``score >= t``; NaN without positives."""
    curve = _dice_curve(scores, labels)
    return float("nan") if curve is None else float(curve[1].max())


def exact_threshold_for_max_dice(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Score ``t`` such that predicting ``score >= t`` gives :func:`exact_max_dice`; NaN without positives."""
    curve = _dice_curve(scores, labels)
    return float("nan") if curve is None else float(curve[0][int(torch.argmax(curve[1]))])


def dice_at_threshold(scores: torch.Tensor, labels: torch.Tensor, threshold: float) -> float:
    """Dice of the prediction ``score >= threshold`` against ``labels``.

    Returns:
        Dice; 1.0 when both prediction and labels are empty, NaN when ``threshold`` is NaN.
    """
    scores, labels = _flat(scores, labels)
    if threshold != threshold:  # NaN threshold: nothing was chosen
        return float("nan")
    predicted = scores >= threshold
    true_pos = (predicted & labels).sum().double()
    denominator = predicted.sum() + labels.sum()
    if denominator == 0:
        return 1.0
    return float(2 * true_pos / denominator)


def exact_statistic(statistic: str, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``"auroc"`` or ``"auprc"`` of ``scores`` against ``labels`` as a float64 scalar tensor."""
    function = exact_auroc if statistic == "auroc" else exact_average_precision
    return torch.tensor(function(scores, labels), dtype=torch.float64)

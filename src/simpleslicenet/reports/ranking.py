"""The one order in which scans are listed, most suspicious first.

``scores.csv`` of ``simpleslicenet predict``, the BIDS App's group table and its group report all rank
scans with :func:`ranking_key`: smallest volume p-value first, scans without one (no calibration, or a
value that is not finite) after every scan with one; then highest volume score, scans without one last;
then name, so equal scans keep one order from run to run.
"""

from __future__ import annotations

import math

__all__ = ["finite_or_none", "ranking_key"]


def finite_or_none(value: object) -> float | None:
    """``value`` as a float, or ``None`` when it is missing or not finite (NaN, infinity)."""
    if value is None:
        return None
    value = float(value)  # type: ignore[arg-type]
    return value if math.isfinite(value) else None


def ranking_key(volume_pvalue: float | None, volume_score: float | None, name: str) -> tuple:
    """Sort key of one scan: sorting by it ascending lists the most suspicious scan first.

    Args:
        volume_pvalue: The scan's volume p-value, or ``None`` without a calibration.
        volume_score: The scan's volume score, or ``None``.
        name: The scan's name (breaks ties).

    Returns:
        A tuple comparable with every other scan's key.

    Example:
        >>> scans = [("b", 0.5, 2.0), ("a", None, 9.0), ("c", 0.5, 3.0)]
        >>> [name for name, p, score in sorted(scans, key=lambda s: ranking_key(s[1], s[2], s[0]))]
        ['c', 'b', 'a']
    """
    p, score = finite_or_none(volume_pvalue), finite_or_none(volume_score)
    return (p is None, p if p is not None else 0.0, score is None, -score if score is not None else 0.0, str(name))

"""The cohort's HTML report: scans ranked by volume p-value, each linked to its page, a P–P plot.

Scans are ranked most suspicious first, in the order of ``scores.csv``
(:func:`~simpleslicenet.reports.ranking.ranking_key`). The table sorts by any column when its header is
clicked; failed scans follow in their own table with their error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from simpleslicenet.reports import figures
from simpleslicenet.reports.markup import render
from simpleslicenet.reports.ranking import finite_or_none, ranking_key

__all__ = ["rank_rows", "render_group_report"]


def rank_rows(rows: Sequence[Mapping]) -> list[Mapping]:
    """The rows that did not fail, most suspicious first (:func:`~simpleslicenet.reports.ranking.ranking_key`)."""
    return sorted(
        (row for row in rows if row.get("status", "ok") != "failed"),
        key=lambda row: ranking_key(row.get("volume_pvalue"), row.get("volume_score"), str(row.get("name", ""))),
    )


def render_group_report(
    rows: Sequence[Mapping],
    calibration_pvalues: Sequence[float] | None,
    provenance: Mapping,
    title: str = "Group report",
) -> str:
    """The HTML page of a cohort (a complete, self-contained document).

    Args:
        rows: One per scan: ``name``, ``subject``, ``session``, ``href`` (relative link to its page, or
            ``None``), ``volume_score``, ``volume_pvalue``, ``clusters`` (a count), ``flagged_ml``,
            ``group``, ``status`` (``"ok"`` or ``"failed"``) and ``error``.
        calibration_pvalues: Leave-one-out volume p-values of the calibration scans, drawn for
            reference in the P–P plot; ``None``: not drawn.
        provenance: What made the outputs (model and its SHA-256, calibration, settings, software).
        title: The page's heading.

    Returns:
        The page's HTML.
    """
    ranked = rank_rows(rows)
    failed = [row for row in rows if row.get("status", "ok") == "failed"]
    pvalues = [finite_or_none(row.get("volume_pvalue")) for row in ranked]
    have_p = [p for p in pvalues if p is not None]
    picture = figures.pp_plot(have_p, calibration_pvalues) if have_p else None
    return render(
        "group.html",
        title=title,
        rows=ranked,
        failed=failed,
        picture=picture,
        n_scans=len(ranked),
        n_failed=len(failed),
        n_calibration=None if calibration_pvalues is None else len(calibration_pvalues),
        provenance=dict(provenance),
        groups=sorted({str(row.get("group") or "") for row in ranked} - {""}),
    )

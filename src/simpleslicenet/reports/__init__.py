"""Self-contained HTML reports: one page per scan, one per cohort, one per benchmark sweep.

Pages are rendered from Jinja2 templates shipped with the package (``reports/templates``), with the
pictures drawn by matplotlib and embedded as PNG data URIs, the styles and the table-sorting script
inline: a page is one file that opens anywhere, with no network. Every number on a page carries its
exact value in a ``data-value`` attribute (:mod:`simpleslicenet.reports.markup`).

Example:
    >>> from simpleslicenet.reports import render_group_report
    >>> html = render_group_report([{"name": "sub-01_T2w", "href": "sub-01_T2w.html", "volume_score": 1.5,
    ...     "volume_pvalue": 0.2, "status": "ok"}], None, {"model": "model.xml"})
    >>> 'data-value="0.2"' in html
    True
"""

from __future__ import annotations

from simpleslicenet.reports.group import rank_rows, render_group_report
from simpleslicenet.reports.ranking import ranking_key
from simpleslicenet.reports.subject import cluster_records, grid_affine, map_peak, render_subject_report
from simpleslicenet.reports.sweep import render_sweep_report
from simpleslicenet.reports.tables import Cell, ReportSection, Table

__all__ = [
    "Cell",
    "ReportSection",
    "Table",
    "cluster_records",
    "grid_affine",
    "map_peak",
    "rank_rows",
    "ranking_key",
    "render_group_report",
    "render_subject_report",
    "render_sweep_report",
]

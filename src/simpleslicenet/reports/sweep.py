"""The benchmark sweep's report as one HTML page: the tables of ``results.md`` and the figures embedded.

The sweep builds each table once (:class:`~simpleslicenet.reports.tables.Table`) and writes it both as
markdown and, here, as HTML whose cells carry their numbers in ``data-value``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from simpleslicenet.reports import figures
from simpleslicenet.reports.markup import render
from simpleslicenet.reports.tables import ReportSection

__all__ = ["render_sweep_report"]


def render_sweep_report(
    title: str,
    sections: Sequence[ReportSection],
    pictures: Sequence[tuple[str, str | Path]] = (),
    command: str | None = None,
    failures: Sequence[Mapping] | None = None,
) -> str:
    """The HTML page of a benchmark sweep (a complete, self-contained document).

    Args:
        title: The sweep's name.
        sections: Headings, paragraphs and tables, in order (as in ``results.md``).
        pictures: ``(caption, PNG path)`` of each figure; embedded, missing files left out.
        command: The command that produced the sweep.
        failures: Failed runs: ``dataset``, ``label``, ``seed``, ``error``, ``log``.

    Returns:
        The page's HTML.
    """
    embedded = [(caption, figures.png_file_uri(path)) for caption, path in pictures if Path(path).is_file()]
    return render(
        "sweep.html", title=title, sections=list(sections), pictures=embedded, command=command, failures=list(failures or [])
    )

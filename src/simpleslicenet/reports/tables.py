"""Tables built once and written twice: as markdown (``results.md``) and as HTML (``report.html``).

A :class:`Cell` keeps the number it shows beside its text: the markdown writes the text alone, the HTML
page writes the text and carries the exact number in a ``data-value`` attribute.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Cell", "ReportSection", "Table"]


@dataclass(frozen=True)
class Cell:
    """One table cell.

    Args:
        text: What the cell shows, e.g. ``"0.812 ± 0.010"``.
        value: The number it stands for (a mean, a share), or ``None`` for text and empty cells.
        bold: Best of its column within its group.
    """

    text: str
    value: float | None = None
    bold: bool = False

    def markdown(self) -> str:
        """The cell's markdown: its text, in bold when best."""
        return f"**{self.text}**" if self.bold else self.text


@dataclass(frozen=True)
class Table:
    """A header and rows of cells.

    Args:
        header: Column names.
        rows: One list of cells per row, as long as the header.
        fields: Optional machine name of each column (the HTML's ``data-field``); default the header.
    """

    header: Sequence[str]
    rows: Sequence[Sequence[Cell]]
    fields: Sequence[str] | None = None

    def to_markdown(self) -> str:
        """A markdown pipe table ending with a newline."""
        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(cell.markdown() for cell in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def field_names(self) -> list[str]:
        """The ``data-field`` of each column."""
        return list(self.fields) if self.fields is not None else list(self.header)


@dataclass(frozen=True)
class ReportSection:
    """A heading, a paragraph and a table of a report written both as markdown and as HTML.

    Args:
        heading: Section heading (``None``: the report's first table, under its title).
        text: Paragraph(s) before the table (markdown-free plain text).
        table: The table, if any.
        after: Paragraph after the table.
    """

    heading: str | None = None
    text: str = ""
    table: Table | None = None
    after: str = ""

    def to_markdown(self) -> str:
        """The section as markdown (``## heading``, text, table, text after it)."""
        parts = [f"\n## {self.heading}\n" if self.heading else "", f"\n{self.text}\n\n" if self.text else ""]
        parts += [self.table.to_markdown() if self.table is not None else "", f"\n{self.after}\n" if self.after else ""]
        return "".join(parts)

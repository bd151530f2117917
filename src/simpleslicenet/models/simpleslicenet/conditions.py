"""The flow's conditions kept factored: one code table per grid axis and each row's place on each axis.

A cell's condition is the concatenation of its column's, its row's and (with a depth code) its depth
cell's sinusoidal codes, so a grid of ``n·h·w`` cells has only ``w + h + n`` distinct codes. Each
coupling's subnet multiplies ``[passive half, condition]`` by one weight matrix; split by columns, the
condition's share is ``Σ_axis (table_axis @ W_axisᵀ)[place on axis]``: a small product per table and a
gather per row, instead of a product over every row's copy of the codes (which also spares the backward
pass the gradient of the codes). :meth:`PositionCodes.dense` gives the rows as the flow sees them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

__all__ = ["PositionCodes"]


@dataclass(frozen=True)
class PositionCodes:
    """Conditions of ``N`` rows: ``cat([tables[a][index[:, a]] for each axis a], dim=1)``.

    Args:
        tables: One code table ``[size_a, width_a]`` per axis, in the order of the condition's parts.
        index: ``[N, len(tables)]`` each row's place on each axis.
    """

    tables: tuple[torch.Tensor, ...]
    index: torch.Tensor

    @classmethod
    def of_rows(cls, rows: torch.Tensor) -> PositionCodes:
        """Conditions given row by row ``[N, P]``: one table, every row its own entry."""
        return cls((rows,), torch.arange(rows.shape[0], device=rows.device)[:, None])

    @classmethod
    def on_grid(cls, tables: Sequence[torch.Tensor], shape: Sequence[int], axes: Sequence[int | None]) -> PositionCodes:
        """Every cell of a grid of ``shape`` in row-major order.

        Args:
            tables: The code tables, in the order of the condition's parts.
            shape: The grid's size along each dimension, slowest first.
            axes: For each grid dimension, the table that runs along it (``None``: the code does not change along it).
        """
        device = tables[0].device
        places = torch.meshgrid(*(torch.arange(size, device=device) for size in shape), indexing="ij")
        by_table = [places[list(axes).index(axis)].flatten() for axis in range(len(tables))]
        return cls(tuple(tables), torch.stack(by_table, dim=1))

    def __len__(self) -> int:
        return self.index.shape[0]

    def select(self, rows: torch.Tensor) -> PositionCodes:
        """The conditions of ``rows`` (indices or a boolean mask), in that order."""
        return PositionCodes(self.tables, self.index[rows])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PositionCodes:
        """The same conditions with the tables on ``device`` and of ``dtype``."""
        tables = tuple(table.to(device=device, dtype=dtype) for table in self.tables)
        return PositionCodes(tables, self.index if device is None else self.index.to(device))

    def dense(self) -> torch.Tensor:
        """The conditions row by row ``[N, P]``."""
        return torch.cat([table.index_select(0, self.index[:, axis]) for axis, table in enumerate(self.tables)], dim=1)

    def project(self, weight: torch.Tensor) -> torch.Tensor:
        """``dense() @ weightᵀ`` ``[N, out]`` for ``weight [out, P]``, one small product per table."""
        parts = weight.split([table.shape[1] for table in self.tables], dim=1)
        projected = None
        for axis, (table, part) in enumerate(zip(self.tables, parts, strict=True)):
            term = F.linear(table, part).index_select(0, self.index[:, axis])
            projected = term if projected is None else projected + term
        return projected

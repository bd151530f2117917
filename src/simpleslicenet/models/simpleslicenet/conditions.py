"""The flow's conditions kept factored: a few code tables over the grid and each row's entry in each.

A cell's condition is the concatenation of its in-plane code (its column's and its row's sinusoidal
codes) and, with a depth code, its depth cell's, so a grid of ``n·h·w`` cells has only ``h·w + n``
distinct codes. Each coupling's subnet multiplies ``[passive half, condition]`` by one weight matrix;
split by columns, the condition's share is ``Σ_table (table @ W_tableᵀ)[row's entry]``: a small product
per table and a gather per row, instead of a product over every row's copy of the codes (which also
spares the backward pass the gradient of the codes). :meth:`PositionCodes.dense` gives the rows as the
flow sees them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

__all__ = ["PositionCodes"]


@dataclass(frozen=True)
class PositionCodes:
    """Conditions of ``N`` rows: ``cat([tables[t][index[:, t]] for each table t], dim=1)``.

    Args:
        tables: One code table ``[entries_t, width_t]`` per part of the condition, in its order (a table may
            run along several grid dimensions, see :meth:`on_grid`).
        index: ``[N, len(tables)]`` each row's entry in each table.
        grid: For the cells of a whole grid in row-major order (:meth:`on_grid`): the grid's size along the
            dimensions no table runs along (-1 elsewhere), and each table's entries laid out on the grid's
            dimensions (size 1 where the table does not change); :meth:`project` then adds the tables'
            products by broadcasting instead of gathering a copy per row.
    """

    tables: tuple[torch.Tensor, ...]
    index: torch.Tensor
    grid: tuple[tuple[int, ...], tuple[tuple[int, ...], ...]] | None = None

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
            axes: For each grid dimension, the table that runs along it (``None``: the code does not change
                along it). A table that runs along several dimensions has an entry per combination of
                places on them, in row-major order.
        """
        device = tables[0].device
        places = torch.meshgrid(*(torch.arange(size, device=device) for size in shape), indexing="ij")
        # Per table: each cell's entry, and its sizes for broadcasting, -1 wherever the table's own length
        # decides (when exported with a dynamic depth, the depth table's length and the grid's are equal
        # but not provably so).
        by_table, layouts = [], []
        for table in range(len(tables)):
            dims = [dimension for dimension, axis in enumerate(axes) if axis == table]
            entry = torch.zeros_like(places[0])
            for dimension in dims:
                entry = entry * shape[dimension] + places[dimension]
            by_table.append(entry.flatten())
            layouts.append(tuple((-1 if dimension == dims[0] else size) if dimension in dims else 1 for dimension, size in enumerate(shape)))
        repeated = tuple(size if axis is None else -1 for size, axis in zip(shape, axes, strict=True))
        return cls(tuple(tables), torch.stack(by_table, dim=1), (repeated, tuple(layouts)))

    def __len__(self) -> int:
        return self.index.shape[0]

    def select(self, rows: torch.Tensor) -> PositionCodes:
        """The conditions of ``rows`` (indices or a boolean mask), in that order."""
        return PositionCodes(self.tables, self.index[rows])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PositionCodes:
        """The same conditions with the tables on ``device`` and of ``dtype``."""
        tables = tuple(table.to(device=device, dtype=dtype) for table in self.tables)
        return PositionCodes(tables, self.index if device is None else self.index.to(device), self.grid)

    def dense(self) -> torch.Tensor:
        """The conditions row by row ``[N, P]``."""
        return torch.cat([table.index_select(0, self.index[:, axis]) for axis, table in enumerate(self.tables)], dim=1)

    def project(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``dense() @ weightᵀ + bias`` ``[N, out]`` for ``weight [out, P]``, one small product per table."""
        parts = weight.split([table.shape[1] for table in self.tables], dim=1)
        projected = None
        for axis, (table, part) in enumerate(zip(self.tables, parts, strict=True)):
            # The bias joins the first table's product: one row per entry instead of one per cell.
            term = F.linear(table, part, bias if axis == 0 else None)
            if self.grid is None:
                term = term.index_select(0, self.index[:, axis])
            else:
                term = term.view(*self.grid[1][axis], weight.shape[0])
            projected = term if projected is None else projected + term
        if self.grid is None:
            return projected
        return projected.expand(*self.grid[0], -1).reshape(-1, weight.shape[0])

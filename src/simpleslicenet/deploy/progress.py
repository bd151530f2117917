"""The progress bar of a scan loop, or no tqdm object at all when no bar is shown.

tqdm takes its class lock for every instance, a disabled one too, and that lock is shared with forked
processes: one killed while holding it would block every later bar of the process that forked it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

__all__ = ["progress_rows"]

Row = TypeVar("Row")


def progress_rows(rows: Iterable[Row], show: bool, **options) -> Iterable[Row]:
    """``rows`` under a tqdm bar made with ``options`` when ``show``, else ``rows`` themselves."""
    return tqdm(rows, **options) if show else rows

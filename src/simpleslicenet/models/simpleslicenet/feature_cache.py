"""Encoder features of the training and validation volumes, computed in the first epoch and read back after.

The slice encoder is frozen and volumes are not augmented, so each epoch would recompute the same
features: only the flow learns. :class:`FeatureCache` keeps, in host memory for one fit and within a
bound in bytes, each training volume's :class:`~.torch_model.TrainingCells` (raw feature rows of its
brain cells) and each validation volume's depth cells. Volumes that no longer fit run the encoder every
epoch, as without the cache; the model is the same either way, since the cache returns exactly what
the encoder gave.

An entry is found by its volume (dataset index and file) under a context of everything else that shapes
the features (the settings that build the model, the datamodule's preprocessing): a new context
empties the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable

import torch

from .torch_model import TrainingCells

__all__ = ["FeatureCache"]

Features = TrainingCells | torch.Tensor

logger = logging.getLogger(__name__)


class FeatureCache:
    """Features by volume (tensors or :class:`~.torch_model.TrainingCells`), in host memory, ``max_bytes`` in all.

    Args:
        max_bytes: The bound; ``0`` keeps nothing.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            msg = f"the feature cache bound must be >= 0 bytes, got {max_bytes}"
            raise ValueError(msg)
        self.max_bytes = int(max_bytes)
        self.context: Hashable = None
        self.nbytes = 0
        self._entries: dict[Hashable, Features] = {}
        self._refused: set[Hashable] = set()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every entry (and the memory they hold)."""
        self._entries.clear()
        self._refused.clear()
        self.nbytes = 0

    def bind(self, context: Hashable) -> None:
        """Serve entries made under ``context`` only: another context than the last empties the cache."""
        if context != self.context:
            self.clear()
            self.context = context

    def get(self, key: Hashable, device: torch.device | str) -> Features | None:
        """The volume's features on ``device``, or ``None`` if they are not kept."""
        cells = self._entries.get(key)
        return None if cells is None else cells.to(device)

    def put(self, key: Hashable, cells: Features) -> None:
        """Keep a host copy of ``cells`` if it fits within the bound (logged once a fit when one does not)."""
        if key in self._entries or key in self._refused:
            return
        if self.nbytes + cells.nbytes > self.max_bytes:
            if self.max_bytes and not self._refused:
                logger.info(
                    "feature cache full at %d volumes (%.2f of %.2f GB): the other volumes run the encoder every epoch",
                    len(self._entries),
                    self.nbytes / 1e9,
                    self.max_bytes / 1e9,
                )
            self._refused.add(key)
            return
        self._entries[key] = cells.to("cpu")
        self.nbytes += cells.nbytes

"""Lightning callbacks the sweep adds to ``engine.test``: inference timing and one example picture."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback

from simpleslicenet.metrics.calibrated import volume_maps
from simpleslicenet.preview import draw_preview

__all__ = ["InferenceTimer", "ExampleDrawer"]


def _synchronise(module: Any) -> None:  # noqa: ANN401
    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


def _volume_count(batch: Any) -> int:  # noqa: ANN401
    return len(batch.volumes()) if hasattr(batch, "volumes") else 1


class InferenceTimer(Callback):
    """Wall seconds per volume of every test batch, from batch start to batch end (synchronised).

    The span covers what a deployed model does per volume: pre-processing, the model, the shared
    scoring step and post-processing. The first batch pays for lazy initialisation; use :attr:`steady`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self._start = 0.0

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001, D102
        del trainer, batch, batch_idx, dataloader_idx
        _synchronise(pl_module)
        self._start = time.perf_counter()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001, D102
        del trainer, outputs, batch_idx, dataloader_idx
        _synchronise(pl_module)
        self.seconds.append((time.perf_counter() - self._start) / max(1, _volume_count(batch)))

    @property
    def steady(self) -> float:
        """Median seconds per volume, without the first batch when there are several."""
        timed = sorted(self.seconds[1:] or self.seconds)
        return timed[len(timed) // 2] if timed else float("nan")


class ExampleDrawer(Callback):
    """Draws the first test volume with a lesion (:func:`~simpleslicenet.preview.draw_preview`): the slices
    where its lesion is largest and its map peaks, the region above the validation threshold, the true outline."""

    def __init__(self, path: str | Path, title: str) -> None:
        super().__init__()
        self.path = Path(path)
        self.title = title
        self.drawn = False

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001, D102
        del trainer, batch, batch_idx, dataloader_idx
        if self.drawn or outputs is None or outputs.gt_mask is None or not outputs.gt_mask.any():
            return
        threshold = getattr(pl_module, "dice_threshold", None)
        for amap, brain, _score, part in volume_maps([outputs]):
            lesion = part.gt_mask.cpu().numpy().astype(bool).reshape(brain.shape)
            if not lesion.any():
                continue
            flagged = (amap >= threshold) & brain if threshold is not None and math.isfinite(threshold) else None
            image = part.image[:, 0].float().cpu().numpy()
            draw_preview(image, amap, self.path, brain=brain, lesion=lesion, flagged=flagged, title=self.title, n_slices=3)
            self.drawn = True
            return

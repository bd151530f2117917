"""Lightning callbacks the sweep adds to ``engine.test``: inference timing and one example picture."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback

from simpleslicenet.atomic import atomic_path

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
    """Draws the first test volume with a lesion: its largest-lesion slice, the map and the true outline."""

    def __init__(self, path: str | Path, title: str) -> None:
        super().__init__()
        self.path = Path(path)
        self.title = title
        self.drawn = False

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001, D102
        del trainer, pl_module, batch, batch_idx, dataloader_idx
        if self.drawn or outputs is None or outputs.gt_mask is None or not outputs.gt_mask.any():
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        area = outputs.gt_mask.flatten(1).sum(1)
        row = int(area.argmax())
        image = outputs.image[row, 0].float().cpu().numpy()
        amap = outputs.anomaly_map[row].float().cpu().numpy()
        mask = outputs.gt_mask[row].float().cpu().numpy()
        fig, axes = plt.subplots(1, 2, figsize=(6, 3.2))
        for ax in axes:
            ax.imshow(image, cmap="gray", origin="lower")
            ax.contour(mask, levels=[0.5], colors="lime", linewidths=0.8, origin="lower")
            ax.axis("off")
        axes[1].imshow(amap, cmap="jet", alpha=0.5, origin="lower")
        axes[0].set_title("scan + lesion outline", fontsize=8)
        axes[1].set_title(f"{self.title}: anomaly map", fontsize=8)
        fig.tight_layout()
        try:
            with atomic_path(self.path) as tmp:
                fig.savefig(tmp, dpi=110)
        finally:
            plt.close(fig)
        self.drawn = True

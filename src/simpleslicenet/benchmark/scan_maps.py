"""Every scan's map, brain and lesion of a re-tested run, by split: what the re-testing scripts score.

Attached to :func:`~simpleslicenet.benchmark.single_run.retest_run`, :class:`ScanMaps` keeps each
validation, calibration (predicted) and test volume as ``[D, H, W]`` arrays on the model grid;
:func:`location_statistics` describes a set of such arrays location by location.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import Callback

from simpleslicenet.benchmark.single_run import retest_run
from simpleslicenet.metrics.calibrated import volume_maps

__all__ = ["ScanMaps", "location_statistics", "retest_with_calibration"]


class ScanMaps(Callback):
    """``scans[split]``: one record per volume of the validation, calibration and test splits.

    A record holds ``index`` (the volume index), ``label`` (1 when a lesion lies on the model grid),
    ``map``, ``brain`` and ``lesion`` (the lesion inside the brain), ``voxel_ml`` and ``volume_score``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scans: dict[str, list[dict]] = {"validation": [], "calibration": [], "test": []}

    def _keep(self, split: str, outputs) -> None:  # noqa: ANN001
        for amap, brain, volume_score, part in volume_maps([outputs]):
            lesion = np.zeros_like(brain)  # predicted calibration volumes carry no mask: healthy by construction
            if part.gt_mask is not None:
                lesion = part.gt_mask.detach().cpu().numpy().astype(bool).reshape(brain.shape) & brain
            self.scans[split].append({
                "index": int(part.volume_index[0]),
                "label": int(part.volume_label[0]) if part.volume_label is not None else 0,
                "map": amap, "brain": brain, "lesion": lesion,
                "voxel_ml": part.geometry[0].voxel_ml if part.geometry else math.nan,
                "volume_score": volume_score,
            })  # fmt: skip

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001, D102
        self._keep("validation", outputs)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001, D102
        self._keep("calibration", outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001, D102
        self._keep("test", outputs)


def retest_with_calibration(record: str | Path) -> tuple[ScanMaps, Any]:
    """A run's validation, calibration and test scans through its checkpoint: ``(scans, engine)``.

    Raises:
        ValueError: The run's datamodule holds no calibration scans.
    """
    maps = ScanMaps()
    engine = retest_run(record, [maps], validate=True, calibration=True)
    if not maps.scans["calibration"]:
        msg = f"{record}: the run's datamodule holds no calibration scans (calibration_fraction)"
        raise ValueError(msg)
    return maps, engine


def location_statistics(arrays: list[np.ndarray], brains: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(covered, mean, spread)`` at each location of the grid, over the scans whose brain holds it.

    ``spread`` is the sample standard deviation; ``covered`` marks the locations that at least half of
    the brains (and two) hold, where the mean and spread mean something.
    """
    values, inside = np.stack(arrays).astype(np.float64), np.stack(brains)
    count = inside.sum(0)
    covered = count >= max(2, len(arrays) // 2)
    mean = np.where(inside, values, 0).sum(0) / np.maximum(count, 1)
    spread = np.sqrt(np.where(inside, (values - mean) ** 2, 0).sum(0) / np.maximum(count - 1, 1))
    return covered, mean, spread

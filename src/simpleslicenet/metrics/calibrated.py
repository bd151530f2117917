"""Test metrics of the label-free outputs: FDR masks and volume p-values from a healthy calibration split.

:func:`calibrate_model` scores a datamodule's calibration volumes (healthy, held out of training) with
the model and builds a :class:`~simpleslicenet.calibration.ConformalCalibration`;
:class:`CalibratedEvaluation` then scores every test volume against it, with no lesion label involved:

* ``fdr<q>_Dice``: Dice of the masks at false discovery rate ``q`` over all brain voxels (the
  counterpart of ``voxel_valDice``, whose threshold needs labelled lesion scans);
* ``fdr<q>_lesion_detection`` / ``fdr<q>_FPclusters``: lesion-wise, as :mod:`simpleslicenet.metrics.lesion`;
* ``fdr<q>_healthy_flagged``: share of healthy test volumes with any flagged voxel (the guarantee asks
  this to stay near or below ``q``);
* ``fdr<q>_lesion_vols_found``: share of lesion test volumes with a flagged voxel on the lesion, whatever
  its size, and ``fdr<q>_found_<family>`` the same for each lesion family of the test data (the phantom's);
* ``volume_p_KS``: Kolmogorov–Smirnov distance of the healthy test volumes' volume p-values from uniform
  (on the p-values' own grid ``k / (n + 1)``, :func:`ks_uniform`);
  ``volume_p05_TPR`` / ``volume_p05_FPR``: share of lesion / healthy volumes with volume p-value <= 0.05.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from lightning.pytorch import Callback

from simpleslicenet.calibration import ConformalCalibration
from simpleslicenet.clusters import count_lesions
from simpleslicenet.metrics.breakdown import lesion_families

__all__ = ["FOUND_IN_FAMILY", "CalibratedEvaluation", "calibrate_model", "ks_uniform", "volume_maps"]

# ``fdr<q>_`` + this + the family: the metric of one lesion family's volumes found (the report reads it back).
FOUND_IN_FAMILY = "found_"


def volume_maps(batches: Iterable[Any]) -> Iterator[tuple[np.ndarray, np.ndarray, float, Any]]:
    """``(map, brain, volume_score, part)`` of every volume of predicted :class:`VolumeBatch` es."""
    for batch in batches:
        if batch is None or batch.anomaly_map is None or batch.brain_mask is None:
            continue
        for _index, rows in batch.volumes():
            part = batch.rows(rows)
            amap = part.anomaly_map.detach().float().cpu().numpy().reshape(part.brain_mask.shape)
            brain = part.brain_mask.detach().cpu().numpy().astype(bool)
            yield amap, brain, float(part.volume_score[0]), part


def calibrate_model(engine: Any, model: Any, dataloader: Any, ckpt_path: str | None = None) -> ConformalCalibration:  # noqa: ANN401
    """Calibration from the model's maps of the (healthy) volumes of ``dataloader``, via ``engine.predict``.

    Raises:
        CalibrationError: The loader holds no volume.
    """
    batches = engine.predict(model=model, dataloaders=dataloader, ckpt_path=ckpt_path, return_predictions=True) or []
    maps, volume_scores = [], []
    for amap, brain, volume_score, _part in volume_maps(batches):
        maps.append(amap[brain])
        volume_scores.append(volume_score)
    return ConformalCalibration.from_scores(maps, volume_scores)


class CalibratedEvaluation(Callback):
    """Lightning callback: the label-free metrics of every test volume (see the module docstring).

    Args:
        calibration: The model's calibration; ``None`` until set (then nothing is measured).
        levels: False discovery rates of the masks.
        min_lesion_ml: Smallest lesion counted by the lesion-wise detection.
    """

    def __init__(
        self,
        calibration: ConformalCalibration | None = None,
        levels: tuple[float, ...] = (0.05, 0.1),
        min_lesion_ml: float = 1.0,
    ) -> None:
        super().__init__()
        self.calibration = calibration
        self.levels = tuple(float(q) for q in levels)
        self.min_lesion_ml = float(min_lesion_ml)
        self._reset()

    def _reset(self) -> None:
        zeros = dict.fromkeys(("tp", "fp", "fn", "lesions", "detected", "false_clusters", "healthy_flagged"), 0)
        self._counts = {q: dict(zeros) for q in self.levels}
        self._pvalues: dict[int, list[float]] = {0: [], 1: []}
        # Per level, per metric name ("lesion_vols_found", "found_<family>"): [lesion volumes, those with a flagged lesion voxel].
        self._found: dict[float, dict[str, list[int]]] = {q: {} for q in self.levels}
        self._families: dict[int, str] = {}

    def on_test_start(self, trainer, pl_module) -> None:  # noqa: ANN001, D102
        del pl_module
        self._reset()
        self._families = lesion_families(trainer)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001, D102
        del trainer, pl_module, batch, batch_idx, dataloader_idx
        if self.calibration is None or outputs is None or outputs.volume_label is None:
            return
        for amap, brain, volume_score, part in volume_maps([outputs]):
            label = int(part.volume_label[0])
            self._pvalues[label].append(self.calibration.volume_pvalue(volume_score))
            lesion = part.gt_mask.detach().cpu().numpy().astype(bool).reshape(brain.shape) & brain
            voxel_ml = part.geometry[0].voxel_ml if part.geometry is not None and part.geometry[0] is not None else math.nan
            pvalues = self.calibration.voxel_pvalues(amap[brain])
            for q, counts in self._counts.items():
                flagged = np.zeros(brain.shape, dtype=bool)
                flagged[brain] = self.calibration.flag(pvalues, q)
                counts["tp"] += int((flagged & lesion).sum())
                counts["fp"] += int((flagged & ~lesion).sum())
                counts["fn"] += int((~flagged & lesion).sum())
                lesions, found, false_clusters = count_lesions(flagged, lesion, voxel_ml, self.min_lesion_ml)
                counts["lesions"] += lesions
                counts["detected"] += found
                if label == 0:
                    counts["false_clusters"] += false_clusters
                    counts["healthy_flagged"] += int(flagged.any())
                    continue
                family = self._families.get(int(part.volume_index[0])) if part.volume_index is not None else None
                for group in ("lesion_vols_found", f"{FOUND_IN_FAMILY}{family}") if family else ("lesion_vols_found",):
                    tally = self._found[q].setdefault(group, [0, 0])
                    tally[0] += 1
                    tally[1] += int((flagged & lesion).any())

    def results(self) -> dict[str, float]:
        """The metrics (NaN where undefined, e.g. no healthy test volume); empty without a calibration."""
        if self.calibration is None:
            return {}
        healthy, lesion = np.asarray(self._pvalues[0]), np.asarray(self._pvalues[1])

        def share(values: np.ndarray, condition: np.ndarray) -> float:
            return float(condition.mean()) if values.size else math.nan

        results: dict[str, float] = {
            "calibration_volumes": float(self.calibration.n_scans),
            "healthy_volumes": float(healthy.size),
        }
        for q, c in self._counts.items():
            tag = f"fdr{round(q * 100):02d}"
            results[f"{tag}_level"] = self.calibration.fdr_level(q)
            denominator = 2 * c["tp"] + c["fp"] + c["fn"]
            results[f"{tag}_Dice"] = 2 * c["tp"] / denominator if denominator else 1.0
            results[f"{tag}_lesion_detection"] = c["detected"] / c["lesions"] if c["lesions"] else math.nan
            results[f"{tag}_FPclusters"] = c["false_clusters"] / healthy.size if healthy.size else math.nan
            results[f"{tag}_healthy_flagged"] = c["healthy_flagged"] / healthy.size if healthy.size else math.nan
            for group, (volumes, found) in self._found[q].items():
                results[f"{tag}_{group}"] = found / volumes
        results["volume_p_KS"] = ks_uniform(healthy, self.calibration.n_scans)
        results["volume_p05_TPR"] = share(lesion, lesion <= 0.05)
        results["volume_p05_FPR"] = share(healthy, healthy <= 0.05)
        return results

    def volume_pvalues(self) -> dict[str, list[float]]:
        """Every test volume's volume p-value, ``{"healthy": [...], "lesion": [...]}`` (to pool over runs)."""
        return {"healthy": list(self._pvalues[0]), "lesion": list(self._pvalues[1])}


def ks_uniform(pvalues: np.ndarray, n_calibration: int | None = None) -> float:
    """Kolmogorov–Smirnov distance between the distribution of ``pvalues`` and the uniform.

    Conformal volume p-values of ``n_calibration`` scans take only the values ``k / (n + 1)``; with that
    given, the distance is taken at those values (the uniform law such p-values follow exactly), so the
    grain itself (up to ``1 / (n + 1)``) does not count as a departure.
    """
    p = np.sort(np.asarray(pvalues, dtype=float))
    if p.size == 0:
        return math.nan
    if n_calibration is None:
        from scipy import stats

        return float(stats.kstest(p, "uniform").statistic)
    grid = np.arange(1, n_calibration + 2) / (n_calibration + 1)
    empirical = np.searchsorted(p, grid * (1 + 1e-12), side="right") / p.size
    return float(np.max(np.abs(empirical - grid)))

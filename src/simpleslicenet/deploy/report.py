"""What a ``predict`` batch reports: one record per scan, ``scores.json`` and ``scores.csv``.

``scores.json`` holds the model, the mask settings, every scan's record and the scans that failed,
in strict JSON (never NaN or Infinity). ``scores.csv`` ranks the scans, most suspicious first, as the
BIDS App's group table does (:func:`~simpleslicenet.reports.ranking.ranking_key`): smallest volume
p-value (with a calibration), then highest volume score, then name; with the number and sizes of each
scan's flagged clusters. Failed scans follow with their error.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from simpleslicenet.calibration import ConformalCalibration
from simpleslicenet.clusters import cluster_sizes_ml
from simpleslicenet.reports.ranking import ranking_key

__all__ = ["PredictionReport", "SUMMARY_FILES"]

SUMMARY_FILES = ("scores.json", "scores.csv")
_CSV_COLUMNS = ["rank", "scan", "volume_pvalue", "volume_score", "max_slice_score", "clusters",
                "cluster_sizes_ml", "flagged_ml", "map_path", "error"]  # fmt: skip


@dataclass
class PredictionReport:
    """What one ``predict`` batch did.

    Args:
        output: The output folder.
        scans: One record per predicted scan: ``scan``, ``volume_score``, ``slice_scores``, ``map_path``;
            with a calibration ``volume_pvalue`` and ``pvalue_map_path``; with a mask ``mask_path``,
            ``clusters`` and ``cluster_sizes_ml`` (largest first); with previews ``preview_path``.
        failed: One record per skipped scan: ``scan`` and ``error``.
    """

    output: Path
    scans: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """``True`` if no scan failed."""
        return not self.failed

    def add_scan(
        self,
        scan: str | Path,
        prediction: Any,  # noqa: ANN401 - a VolumePrediction
        mask: np.ndarray | None,
        calibration: ConformalCalibration | None,
        paths: dict[str, Path],
    ) -> dict[str, Any]:
        """Record one predicted scan.

        Args:
            scan: The scan file.
            prediction: Its prediction.
            mask: Its model-grid mask, if one was made (its clusters are reported).
            calibration: The calibration, if any (gives the volume p-value).
            paths: Its files, as :func:`~simpleslicenet.scan_outputs.output_paths` names them.

        Returns:
            The record, as listed in ``scores.json``.
        """
        record: dict[str, Any] = {
            "scan": str(scan),
            "volume_score": prediction.volume_score,
            "slice_scores": [float(s) for s in prediction.slice_scores],
        }
        if calibration is not None:
            record["volume_pvalue"] = calibration.volume_pvalue(prediction.volume_score)
        if mask is not None:
            sizes = cluster_sizes_ml(mask, prediction.geometry.voxel_ml)
            record["clusters"] = len(sizes)
            record["cluster_sizes_ml"] = [round(float(v), 4) for v in sizes]
        record.update({f"{key}_path": str(self.output / path.name) for key, path in paths.items()})
        self.scans.append(record)
        return record

    def add_failure(self, scan: str | Path, error: Exception) -> None:
        """Record a scan that was skipped."""
        self.failed.append({"scan": str(scan), "error": str(error)})

    def ranked(self) -> list[dict[str, Any]]:
        """Scan records, most suspicious first (:func:`~simpleslicenet.reports.ranking.ranking_key`).

        Smallest volume p-value (when calibrated; a scan without one follows those with one), then highest
        volume score, then name.
        """
        return sorted(self.scans, key=lambda r: ranking_key(r.get("volume_pvalue"), r["volume_score"], r["scan"]))

    def summaries(self, model: object, settings: dict[str, Any]) -> dict[str, str]:
        """The texts of :data:`SUMMARY_FILES`.

        Raises:
            ValueError: A record holds NaN or Infinity (the batch fails rather than write invalid JSON).
        """
        document = {"model": str(model), **settings, "scans": self.scans, "failed": self.failed}
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(_CSV_COLUMNS)
        for rank, record in enumerate(self.ranked(), start=1):
            sizes = record.get("cluster_sizes_ml")
            writer.writerow([
                rank, record["scan"], record.get("volume_pvalue", ""), record["volume_score"], max(record["slice_scores"]),
                record.get("clusters", ""), "" if sizes is None else ";".join(f"{v:.2f}" for v in sizes),
                "" if sizes is None else f"{sum(sizes):.2f}", record["map_path"], "",
            ])  # fmt: skip
        for record in self.failed:
            writer.writerow(["", record["scan"], "", "", "", "", "", "", "", record["error"]])
        return {"scores.json": json.dumps(document, indent=2, allow_nan=False), "scores.csv": buffer.getvalue()}

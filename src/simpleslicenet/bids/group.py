"""``simpleslicenet bids BIDS_DIR OUTPUT_DIR group``: the cohort's table and report, from whatever finished.

Reads the record of every scan the participant level finished (its map's sidecar) and the scans it
listed as failed (its manifest), and writes ``group_scores.tsv`` (one row per scan, most suspicious
first: smallest volume p-value, then highest volume score; failed scans last), its JSON sidecar
describing the columns, and ``group_report.html`` (:func:`simpleslicenet.reports.render_group_report`)
with relative links to each scan's page.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from simpleslicenet.atomic import atomic_write_json, atomic_write_text
from simpleslicenet.bids.derivatives import GROUP_REPORT, GROUP_TABLE, RECORD_KEY
from simpleslicenet.bids.participant import open_manifest
from simpleslicenet.calibration import ConformalCalibration
from simpleslicenet.data.bids import BidsDataset, BidsError
from simpleslicenet.reports import rank_rows, render_group_report

__all__ = ["COLUMNS", "read_records", "run_group"]

# Column -> description (the TSV's JSON sidecar).
COLUMNS = {
    "scan": "Name of the source scan (its file name without extension)",
    "subject": "Participant label (without sub-)",
    "session": "Session label (without ses-), empty without sessions",
    "group": "The participant's group in participants.tsv, empty without that column",
    "volume_score": "Volume anomaly score of the scan (model units; higher is more anomalous)",
    "volume_pvalue": "Conformal p-value of the volume score against the healthy calibration scans",
    "clusters": "Number of clusters of flagged voxels (26-connected)",
    "flagged_ml": "Volume of the flagged voxels in millilitres",
    "map": "The anomaly map, relative to this folder",
    "report": "The scan's HTML report, relative to this folder",
    "status": "ok, or failed (the scan could not be predicted)",
    "error": "Why the scan failed",
}
_UNITS = {"flagged_ml": "ml"}


def read_records(output: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of every finished scan of ``output`` (the ``SimpleSliceNet`` block of each map's sidecar)."""
    records = []
    for path in sorted(Path(output).glob("sub-*/**/anat/*.json")):
        try:
            content = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(content, dict) and isinstance(content.get(RECORD_KEY), dict):
            records.append(content[RECORD_KEY])
    return records


def _groups(bids_dir: str | os.PathLike) -> dict[str, str]:
    try:
        participants = BidsDataset(bids_dir, lesion_masks=None).participants
    except BidsError:
        return {}
    if "group" not in participants.columns:
        return {}
    return {str(label): str(value) for label, value in participants["group"].items()}


def _calibration_pvalues(path: str | os.PathLike | None) -> list[float] | None:
    """Leave-one-out volume p-values of the calibration scans (each against the others)."""
    if path is None or not Path(path).is_file():
        return None
    scores = ConformalCalibration.load(path).volume_scores
    return [float((scores >= score).sum() / scores.size) for score in scores]


def run_group(
    bids_dir: str | os.PathLike,
    output: str | os.PathLike,
    calibration: str | os.PathLike | None = None,
) -> Path:
    """Write ``group_scores.tsv``, its sidecar and ``group_report.html`` into ``output``.

    Args:
        bids_dir: The BIDS dataset (its ``participants.tsv`` gives each scan's group).
        output: The participant level's derivatives folder.
        calibration: Calibration file whose scans are drawn for reference; default the one the
            participant level used, when it is still there.

    Returns:
        The group report.

    Raises:
        FileNotFoundError: ``output`` holds no participant-level output.
        CalibrationError: An unusable calibration file.
    """
    output = Path(output)
    records = read_records(output)
    manifest = open_manifest(output) if output.is_dir() else None
    if not records and not (manifest and manifest.scans):
        msg = f"{output}: holds no participant-level output; run simpleslicenet bids ... participant first"
        raise FileNotFoundError(msg)
    groups = _groups(bids_dir)
    rows: list[dict[str, Any]] = []
    finished = set()
    for record in records:
        finished.add(record["scan"])
        files = record.get("files", {})
        clusters = record.get("clusters")
        rows.append({
            "name": record["scan"],
            "subject": record["subject"],
            "session": record.get("session"),
            "group": groups.get(record["subject"], ""),
            "volume_score": record["volume_score"],
            "volume_pvalue": record.get("volume_pvalue"),
            "clusters": None if files.get("mask") is None else len(clusters or []),
            "flagged_ml": record.get("flagged_ml"),
            "map": files.get("map"),
            "href": files.get("report"),
            "status": "ok",
            "error": "",
        })  # fmt: skip
    for name, entry in sorted((manifest.scans if manifest else {}).items()):
        if name in finished or entry.get("complete") or "error" not in entry:
            continue
        subject = name.split("_", 1)[0].removeprefix("sub-")
        session = next((part[4:] for part in name.split("_") if part.startswith("ses-")), None)
        rows.append({
            "name": name, "subject": subject, "session": session, "group": groups.get(subject, ""),
            "volume_score": None, "volume_pvalue": None, "clusters": None, "flagged_ml": None,
            "map": None, "href": None, "status": "failed", "error": entry["error"],
        })  # fmt: skip
    ranked = [*rank_rows(rows), *(row for row in rows if row["status"] == "failed")]
    atomic_write_text(output / GROUP_TABLE, _table(ranked))
    sidecar = {column: {"Description": text} | ({"Units": _UNITS[column]} if column in _UNITS else {})
               for column, text in COLUMNS.items()}  # fmt: skip
    atomic_write_json((output / GROUP_TABLE).with_suffix(".json"), sidecar)

    if calibration is None:
        used = next((r["calibration"]["path"] for r in records if r.get("calibration")), None)
        calibration = used
    first = records[0] if records else {}
    provenance = {
        "bids_dir": str(Path(bids_dir).resolve()),
        "output": str(output.resolve()),
        "model": first.get("model", {}).get("path"),
        "model_sha256": first.get("model", {}).get("sha256"),
        "calibration": None if calibration is None else str(calibration),
        "fdr": first.get("fdr"),
        "threshold": first.get("threshold"),
        "scans": len(records),
        "failed": len(rows) - len(records),
        "software": first.get("software"),
    }
    page = render_group_report(ranked, _calibration_pvalues(calibration), provenance)
    return atomic_write_text(output / GROUP_REPORT, page)


def _table(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        values = {**row, "scan": row["name"], "report": row["href"]}
        # BIDS tabular files write a missing value as n/a.
        writer.writerow(["n/a" if values[column] in (None, "") else values[column] for column in COLUMNS])
    return buffer.getvalue()

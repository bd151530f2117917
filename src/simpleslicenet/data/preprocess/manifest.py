"""The record that makes a preprocessing batch resumable: ``preprocess_manifest.json`` in the output folder.

For every output scan name it keeps the input it came from (path, and size and modification time of
every input file: the scan, its masks, or each file of a DICOM series), the settings used, the
version of the processing steps, and the files written with their sizes. A scan counts as finished
only if all of that still matches: the same input files unchanged, the same settings and steps,
every output present with its recorded size. So a changed input, a changed setting, or a deleted or
truncated output redoes the scan, while existing files alone never prove anything.

An entry is marked incomplete while its scan is being (re)done; the files it names stay known as
this batch's own, so a scan that failed half-way can be redone later without ``overwrite``.
The manifest is rewritten atomically after every scan. One batch at a time per output folder.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from simpleslicenet.atomic import atomic_write_text
from simpleslicenet.data.nifti import VolumeError
from simpleslicenet.data.preprocess.scan import PIPELINE_VERSION

__all__ = ["MANIFEST_NAME", "Manifest", "file_fingerprint"]

MANIFEST_NAME = "preprocess_manifest.json"
FORMAT_VERSION = 1


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Absolute path, size and modification time (ns) of a file."""
    path = Path(path).resolve()
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class Manifest:
    """The manifest of one output folder (see the module notes).

    Args:
        folder: The output folder.
        name: The manifest's file name in ``folder`` (another batch job keeps its own).
        pipeline_version: Version of the steps that made the outputs: a finished scan of another
            version is redone.

    Raises:
        VolumeError: The manifest exists but is not one this package wrote (unreadable or another format).
    """

    def __init__(
        self, folder: str | os.PathLike, name: str = MANIFEST_NAME, pipeline_version: object = PIPELINE_VERSION
    ) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.pipeline_version = pipeline_version
        self.scans: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                record = json.loads(self.path.read_text())
            except (OSError, ValueError) as error:
                raise VolumeError(self.path, f"unreadable manifest ({error}); delete it to redo every scan") from error
            if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION:
                raise VolumeError(self.path, f"not a batch manifest of format {FORMAT_VERSION}")
            self.scans = dict(record.get("scans", {}))

    def save(self) -> Path:
        """Write the manifest atomically."""
        record = {"format": FORMAT_VERSION, "scans": dict(sorted(self.scans.items()))}
        return atomic_write_text(self.path, json.dumps(record, indent=1) + "\n")

    def owned(self, name: str) -> set[Path]:
        """Files this batch wrote (or was writing) for ``name``, finished or not."""
        entry = self.scans.get(name, {})
        return {self.folder / rel for rel in entry.get("owned", [])}

    def is_current(self, name: str, inputs: list[dict[str, Any]], settings: dict[str, Any]) -> bool:
        """Whether ``name`` was finished from exactly these input files and settings, outputs intact."""
        entry = self.scans.get(name)
        if not entry or not entry.get("complete"):
            return False
        if entry.get("inputs") != inputs or entry.get("settings") != settings:
            return False
        if entry.get("pipeline_version") != self.pipeline_version:
            return False
        for output in entry.get("outputs", {}).values():
            path = self.folder / output["path"]
            if not path.is_file() or path.stat().st_size != output["size"]:
                return False
        return True

    def start(self, name: str, source: str, planned: list[Path]) -> None:
        """Mark ``name`` as being redone; ``planned`` are the files it will write."""
        owned = {str(p.relative_to(self.folder)) for p in planned} | set(self.scans.get(name, {}).get("owned", []))
        self.scans[name] = {"complete": False, "source": source, "owned": sorted(owned)}

    def fail(self, name: str, error: str) -> None:
        """Record why ``name`` failed (it stays incomplete)."""
        self.scans.setdefault(name, {"complete": False, "owned": []})["error"] = error

    def finish(
        self,
        name: str,
        source: str,
        inputs: list[dict[str, Any]],
        settings: dict[str, Any],
        outputs: dict[str, Path],
        quality: dict[str, Any],
        seconds: float,
    ) -> list[Path]:
        """Record a finished scan; returns files it owned before but no longer writes (to delete)."""
        before = self.owned(name)
        written = {
            kind: {"path": str(path.relative_to(self.folder)), "size": path.stat().st_size}
            for kind, path in outputs.items()
        }
        self.scans[name] = {
            "complete": True,
            "source": source,
            "inputs": inputs,
            "settings": settings,
            "pipeline_version": self.pipeline_version,
            "outputs": written,
            "owned": sorted(item["path"] for item in written.values()),
            "quality": quality,
            "seconds": round(seconds, 2),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        return sorted(before - set(outputs.values()))

"""The BIDS derivatives dataset the BIDS App writes: file names, ``dataset_description.json`` and sidecars.

Per scan, in ``sub-XX/[ses-YY/]anat/`` and named after its source file's entities (with ``space-`` when the
scan read was a registered derivative):

* ``<source>_desc-anomaly_<suffix>.nii.gz``: the anomaly map (voxel scores, the scan's grid and affine);
  its sidecar holds the scan's whole record under :data:`RECORD_KEY` (model, calibration, scores, clusters);
* ``<source>_desc-pvalue_<suffix>.nii.gz``: voxel p-values, with a calibration;
* ``<source>_desc-anomaly_mask.nii.gz``: the flagged voxels (FDR or score threshold);
* ``sub-XX/<source>.html``: the scan's report page.

The continuous maps take the contrast's suffix with a ``desc-`` entity, the one derivative name of a
scalar anatomical volume the BIDS validator accepts (there is no statistical-map suffix for ``anat``);
it requires ``SkullStripped`` in their sidecars. Reports, the group table and the batch manifest are not
BIDS files and are listed in ``.bidsignore``. With that, ``bids-validator`` reports no error.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from simpleslicenet._version import __version__
from simpleslicenet.data.bids import (
    BIDS_ENTITY_ORDER,
    BidsScan,
    bids_uri,
    parse_bids_name,
    sidecar_path,
    write_derivatives_description,
)

__all__ = [
    "BIDSIGNORE",
    "GROUP_REPORT",
    "GROUP_TABLE",
    "MANIFEST_NAME",
    "MAP_DESC",
    "PIPELINE_NAME",
    "PVALUE_DESC",
    "RECORD_KEY",
    "ScanNames",
    "sidecars",
    "software_versions",
    "write_dataset_files",
]

PIPELINE_NAME = "simpleslicenet"
# Key of the scan's record in its map's sidecar.
RECORD_KEY = "SimpleSliceNet"
MAP_DESC = "anomaly"
PVALUE_DESC = "pvalue"
MANIFEST_NAME = "simpleslicenet_manifest.json"
GROUP_TABLE = "group_scores.tsv"
GROUP_REPORT = "group_report.html"
# Files of the output folder that are not BIDS files (reports, the group table, the manifest).
BIDSIGNORE = ("*.html", "group_scores.*", MANIFEST_NAME)

_README = """# Anomaly maps by simpleslicenet

A BIDS derivatives dataset written by `simpleslicenet bids BIDS_DIR OUTPUT_DIR participant`: per scan
an anomaly map (`*_desc-anomaly_<suffix>.nii.gz`), with a calibration a voxel p-value map
(`*_desc-pvalue_<suffix>.nii.gz`), a mask of flagged voxels (`*_desc-anomaly_mask.nii.gz`) and an HTML
report (`sub-*/*.html`). The map's JSON sidecar holds the scan's record under "SimpleSliceNet".
`simpleslicenet bids BIDS_DIR OUTPUT_DIR group` adds `group_scores.tsv` and `group_report.html`.
"""


def software_versions() -> dict[str, str | None]:
    """Versions of the package and of what computes its numbers (``None``: not installed)."""

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {
        "simpleslicenet": __version__,
        "torch": version("torch"),
        "openvino": version("openvino"),
        "anomalib": version("anomalib"),
        "numpy": version("numpy"),
        "nibabel": version("nibabel"),
        "python": platform.python_version(),
    }


def write_dataset_files(output: Path, bids_root: str | os.PathLike) -> dict[str, Any]:
    """Write ``dataset_description.json``, ``README.md`` and ``.bidsignore`` of the output folder (atomically).

    Returns:
        The dataset description written (:func:`~simpleslicenet.data.bids.write_derivatives_description`).

    Raises:
        FileExistsError: ``output`` holds another pipeline's dataset description.
    """
    return write_derivatives_description(
        output,
        "simpleslicenet anomaly maps",
        __version__,
        bids_root,
        "Unsupervised anomaly maps of brain MRI, p-values and FDR masks",
        pipeline=PIPELINE_NAME,
        readme=_README,
        bidsignore=BIDSIGNORE,
        code_url="https://pypi.org/project/simpleslicenet/",
    )


class ScanNames:
    """Where one scan's derivatives go, relative to the output folder.

    Args:
        scan: The scan.
    """

    def __init__(self, scan: BidsScan) -> None:
        self.scan = scan
        derived = scan.image_path != scan.source_path  # a preprocessed scan: its maps are in its space
        entities, _suffix = parse_bids_name(scan.image_path, BIDS_ENTITY_ORDER) if derived else ({}, "")
        self.space = entities.get("space")
        self.folder = scan.derivative_folder()
        self.map = self.folder / scan.derivative_name(MAP_DESC, scan.suffix, space=self.space)
        self.pvalue_map = self.folder / scan.derivative_name(PVALUE_DESC, scan.suffix, space=self.space)
        self.mask = self.folder / scan.derivative_name(MAP_DESC, "mask", space=self.space)
        self.report = Path(f"sub-{scan.subject}") / f"{scan.name}.html"

    def all_files(self) -> list[Path]:
        """Every file the scan can have, whatever the options (what a redo replaces)."""
        maps = [self.map, self.pvalue_map, self.mask]
        return [*maps, *(sidecar_path(path) for path in maps), self.report]

    def file_names(self) -> dict[str, str]:
        """Names for :class:`~simpleslicenet.scan_outputs.ScanOutputs` (``file_names``)."""
        return {"map": self.map.name, "pvalue_map": self.pvalue_map.name, "mask": self.mask.name}


def sidecars(
    names: ScanNames,
    bids_root: str | os.PathLike,
    record: dict[str, Any],
    skull_stripped: bool,
) -> dict[Path, dict[str, Any]]:
    """The sidecars of one scan's files (relative path -> content), for the files its record lists."""
    raw = bids_uri(names.scan.source_path, bids_root)
    map_uri = f"bids::{names.map.as_posix()}"
    content: dict[Path, dict[str, Any]] = {
        sidecar_path(names.map): {
            "Description": "Voxel anomaly scores of the model (higher is more anomalous), on the scan's grid",
            "Sources": [raw],
            "SkullStripped": skull_stripped,
            RECORD_KEY: record,
        }
    }
    if record["files"].get("pvalue_map"):
        content[sidecar_path(names.pvalue_map)] = {
            "Description": "Conformal voxel p-values of the anomaly scores against healthy calibration scans "
            "(1 outside the brain)",
            "Sources": [map_uri, raw],
            "SkullStripped": skull_stripped,
        }
    if record["files"].get("mask"):
        rule = (
            f"voxels passing Benjamini-Hochberg at false discovery rate {record['fdr']}"
            if record["fdr"] is not None
            else f"voxels scoring at least {record['threshold']}"
        )
        content[sidecar_path(names.mask)] = {
            "Description": f"Flagged voxels: {rule}, inside the brain",
            "Type": "ROI",
            "Sources": [map_uri, raw],
            "RawSources": [raw],
            "SpatialReference": raw,
        }
    return content

"""One scan's HTML report: mosaic, views through the hottest cluster, clusters, scores, provenance.

The page is one self-contained file (pictures as PNG data URIs, inline CSS and script, no network), so
it opens from a file share or an e-mail. Its numbers come from the scan's record, the ``SimpleSliceNet``
block of the BIDS sidecar, and carry their exact values (:mod:`simpleslicenet.reports.markup`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from simpleslicenet.clusters import cluster_table
from simpleslicenet.data.geometry import VolumeGeometry
from simpleslicenet.reports import figures
from simpleslicenet.reports.markup import render

__all__ = ["cluster_records", "grid_affine", "map_peak", "render_subject_report"]


def grid_affine(geometry: VolumeGeometry) -> np.ndarray:
    """Affine from a model-grid voxel index ``(x, y, z)`` = ``(w, h, d)`` to world (or template) mm.

    The model grid is the canonical (RAS) array cut at ``crop_start``, so its affine is the canonical
    affine shifted by that start.
    """
    shift = np.eye(4)
    shift[:3, 3] = geometry.crop_start
    return np.asarray(geometry.canonical_affine, dtype=float) @ shift


def cluster_records(
    mask: np.ndarray, score_map: np.ndarray, pvalue_map: np.ndarray | None, geometry: VolumeGeometry
) -> list[dict]:
    """The flagged clusters as a scan's record lists them: largest first, each peak in mm and as a voxel of the map file.

    Args:
        mask: Flagged voxels on the model grid ``[D, H, W]``.
        score_map: Voxel scores on the model grid.
        pvalue_map: Voxel p-values on the model grid, if calibrated.
        geometry: Where the model grid sits in the scan (its world and file coordinates).
    """
    to_world = grid_affine(geometry)
    to_file = np.linalg.inv(np.asarray(geometry.affine, dtype=np.float64))
    records = []
    for cluster in cluster_table(mask, score_map, geometry.voxel_ml, pvalue_map):
        d, h, w = cluster["peak_index"]
        peak_mm = (to_world @ np.array([w, h, d, 1.0]))[:3]
        peak_voxel = np.rint(to_file @ np.array([*peak_mm, 1.0]))[:3].astype(int)
        records.append({
            "id": cluster["id"],
            # Rounded as predict's scores.json rounds cluster sizes, so the two agree.
            "size_ml": round(cluster["size_ml"], 4),
            "voxels": cluster["voxels"],
            "peak_score": cluster["peak_score"],
            "peak_pvalue": cluster["peak_pvalue"],
            "peak_voxel": [int(v) for v in peak_voxel],
            "peak_mm": [round(float(v), 2) for v in peak_mm],
        })  # fmt: skip
    return records


def map_peak(score_map: np.ndarray, brain: np.ndarray, flagged: np.ndarray | None = None) -> tuple[int, int, int]:
    """``(d, h, w)`` of the highest score among the flagged voxels (the hottest cluster's peak), else in the brain."""
    region = flagged if flagged is not None and np.any(flagged) else brain
    if not np.any(region):
        region = np.ones(score_map.shape, dtype=bool)
    masked = np.where(region & np.isfinite(score_map), score_map, -np.inf)
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(masked)), score_map.shape))


def _world(affine: np.ndarray | None, peak: tuple[int, int, int]) -> list[float] | None:
    if affine is None:
        return None
    d, h, w = peak
    return [float(v) for v in (np.asarray(affine, dtype=float) @ np.array([w, h, d, 1.0]))[:3]]


def render_subject_report(
    record: dict,
    image: np.ndarray | None,
    brain: np.ndarray | None,
    score_map: np.ndarray,
    pvalue_map: np.ndarray | None,
    mask: np.ndarray | None,
    affine: np.ndarray | None,
    calibration_scores: Sequence[float] | None,
    lesion: np.ndarray | None = None,
    n_slices: int = 12,
) -> str:
    """The HTML page of one scan (a complete, self-contained document).

    Args:
        record: The scan's record (the sidecar's ``SimpleSliceNet`` block): ``scan``, ``volume_score``,
            ``volume_pvalue``, ``clusters``, ``model``, ``calibration``, ``preprocessing``, ``software``, ...
        image: The scan on the model grid ``[D, H, W]`` (what the model saw); ``None``: the map alone.
        brain: Brain mask on that grid; the overlay covers it only (``None``: everywhere).
        score_map: Voxel scores on that grid.
        pvalue_map: Voxel p-values on that grid, if calibrated (the smallest inside the brain is shown).
        mask: Flagged voxels (FDR or threshold mask), outlined; the views go through its hottest voxel.
        affine: Model-grid voxel ``(x, y, z)`` = ``(w, h, d)`` index to mm (:func:`grid_affine`); sets
            the views' aspect and the peak's coordinates.
        calibration_scores: Volume scores of the calibration scans (where this scan falls among them).
        lesion: True lesion mask, if known (outlined in green).
        n_slices: Axial slices in the mosaic.

    Returns:
        The page's HTML.

    Raises:
        ValueError: An array is not on ``score_map``'s grid.
    """
    score_map = np.asarray(score_map, dtype=np.float32)
    shape = score_map.shape
    arrays = {"image": image, "brain": brain, "pvalue_map": pvalue_map, "mask": mask, "lesion": lesion}
    for name, array in arrays.items():
        if array is not None and np.shape(array) != shape:
            msg = f"{record.get('scan', 'scan')}: {name} of shape {np.shape(array)} is not on the map's grid {shape}"
            raise ValueError(msg)
    brain = np.ones(shape, dtype=bool) if brain is None else np.asarray(brain, dtype=bool)
    image = np.zeros(shape, dtype=np.float32) if image is None else np.asarray(image, dtype=np.float32)
    mask = None if mask is None else np.asarray(mask, dtype=bool)
    lesion = None if lesion is None else np.asarray(lesion, dtype=bool)
    spacing = figures.voxel_spacing(affine)

    slices = figures.mosaic_slices(brain, n_slices)
    peak = map_peak(score_map, brain, mask)
    clusters = list(record.get("clusters") or [])
    hottest = max(clusters, key=lambda c: c.get("peak_score", -np.inf)) if clusters and mask is not None and mask.any() else None
    floor, top = figures.map_range(score_map, brain)
    inside = brain if brain.any() else np.ones(shape, dtype=bool)
    smallest_p = float(np.nanmin(np.asarray(pvalue_map)[inside])) if pvalue_map is not None else None
    scores = None if calibration_scores is None else [float(s) for s in calibration_scores]
    volume_score = record.get("volume_score")
    at_least = None
    if scores and volume_score is not None:
        at_least = int(np.sum(np.asarray(scores) >= float(volume_score)))

    pictures = {
        "mosaic": figures.mosaic(image, score_map, brain, mask, lesion, spacing, slices),
        "views": figures.orthogonal_views(image, score_map, brain, mask, lesion, spacing, peak),
        "calibration": figures.calibration_strip(scores, volume_score) if scores else None,
        "slices": figures.slice_profile(record["slice_scores"], slices) if record.get("slice_scores") else None,
    }
    return render(
        "subject.html",
        record=record,
        title=str(record.get("scan", "scan")),
        pictures=pictures,
        clusters=clusters,
        hottest=hottest,
        peak=peak,
        peak_mm=_world(affine, peak),
        slices=slices,
        floor=floor,
        top=top,
        percentile=figures.OVERLAY_PERCENTILE,
        smallest_p=smallest_p,
        n_calibration=len(scores) if scores else None,
        at_least=at_least,
        lesion=lesion is not None,
        outlined=mask is not None,
        space=record.get("space"),
    )

"""Connected components of flagged voxels and of lesion masks (26-connected, ``scipy.ndimage.label``).

One definition of a cluster for everything that counts them: the lesion-wise test metrics, the
per-scan report of ``simpleslicenet predict`` and the cluster table (sizes and peaks) of the BIDS App.
Imports no anomalib, so deployment stays light.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["CONNECTIVITY", "cluster_sizes_ml", "cluster_table", "count_lesions", "lesion_components"]

# 26-connectivity: voxels touching by a face, an edge or a corner belong to one component.
CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def cluster_sizes_ml(flagged: np.ndarray, voxel_ml: float) -> np.ndarray:
    """Sizes in millilitres of the clusters of ``flagged`` ``[D, H, W]``, largest first."""
    clusters, n_clusters = ndimage.label(flagged, structure=CONNECTIVITY)
    if n_clusters == 0:
        return np.zeros(0)
    sizes = np.bincount(clusters.ravel(), minlength=n_clusters + 1)[1:] * float(voxel_ml)
    return np.sort(sizes)[::-1]


def cluster_table(
    flagged: np.ndarray,
    scores: np.ndarray,
    voxel_ml: float,
    pvalues: np.ndarray | None = None,
) -> list[dict]:
    """One record per cluster of ``flagged`` ``[D, H, W]``, largest first (the order of :func:`cluster_sizes_ml`).

    Args:
        flagged: Boolean map of flagged voxels.
        scores: Voxel scores, same shape (the peak is the cluster's highest score).
        voxel_ml: Volume of one voxel in millilitres.
        pvalues: Voxel p-values, same shape, if any.

    Returns:
        ``{"id", "size_ml", "voxels", "peak_score", "peak_pvalue", "peak_index"}`` per cluster: ``id`` counts
        from 1 in this order, ``peak_index`` is the peak voxel's ``[d, h, w]`` and ``peak_pvalue`` is
        ``None`` without ``pvalues``. Equal sizes keep the order of their first voxel.
    """
    clusters, n_clusters = ndimage.label(flagged, structure=CONNECTIVITY)
    if n_clusters == 0:
        return []
    labels = np.arange(1, n_clusters + 1)
    counts = np.bincount(clusters.ravel(), minlength=n_clusters + 1)[1:]
    peaks = ndimage.maximum_position(np.asarray(scores), clusters, labels)
    table = []
    for rank, index in enumerate(np.argsort(-counts, kind="stable"), start=1):
        peak = tuple(int(v) for v in peaks[index])
        table.append(
            {
                "id": rank,
                "size_ml": float(counts[index] * float(voxel_ml)),
                "voxels": int(counts[index]),
                "peak_score": float(np.asarray(scores)[peak]),
                "peak_pvalue": None if pvalues is None else float(np.asarray(pvalues)[peak]),
                "peak_index": list(peak),
            }
        )
    return table


def lesion_components(
    flagged: np.ndarray,
    lesion: np.ndarray,
    voxel_ml: float,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Per true lesion its size in ml and whether it was found; and the number of false clusters.

    A true lesion counts as found when at least one flagged voxel falls on it; a flagged cluster that
    touches no lesion is a false-positive cluster.

    Args:
        flagged: Boolean map of flagged voxels ``[D, H, W]``.
        lesion: Boolean lesion mask, same shape.
        voxel_ml: Volume of one voxel in millilitres.

    Returns:
        ``(sizes_ml, detected, false_clusters)`` with one entry of ``sizes_ml``/``detected`` per lesion.
    """
    flagged, lesion = np.asarray(flagged, dtype=bool), np.asarray(lesion, dtype=bool)
    lesions, n_lesions = ndimage.label(lesion, structure=CONNECTIVITY)
    clusters, n_clusters = ndimage.label(flagged, structure=CONNECTIVITY)
    # Counts per label over the voxels that matter (scipy's per-label maximum sorts the whole volume).
    sizes = np.bincount(lesions.ravel(), minlength=n_lesions + 1)[1:] * voxel_ml
    detected = np.bincount(lesions[flagged], minlength=n_lesions + 1)[1:] > 0
    touching = np.count_nonzero(np.bincount(clusters[lesion], minlength=n_clusters + 1)[1:])
    return np.asarray(sizes, dtype=float), np.asarray(detected, dtype=bool), int(n_clusters - touching)


def count_lesions(flagged: np.ndarray, lesion: np.ndarray, voxel_ml: float, min_lesion_ml: float) -> tuple[int, int, int]:
    """``(lesions, found, false_clusters)`` of one volume, counting lesions of at least ``min_lesion_ml``.

    A NaN ``voxel_ml`` (size unknown) counts no lesion; false clusters are counted all the same.
    """
    sizes, detected, false_clusters = lesion_components(flagged, lesion, voxel_ml)
    large = sizes >= min_lesion_ml
    return int(large.sum()), int(detected[large].sum()), false_clusters

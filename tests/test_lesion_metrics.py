"""Lesion-wise detection: found lesions by size and false-positive clusters per healthy volume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simpleslicenet.clusters import count_lesions
from simpleslicenet.data.batch import VolumeBatch
from simpleslicenet.data.geometry import VolumeGeometry
from simpleslicenet.metrics.lesion import LesionDetection, LesionFalseClusters, lesion_components

SHAPE = (12, 16, 16)  # D, H, W


def _cube(volume: np.ndarray, corner: tuple[int, int, int], size: int) -> None:
    z, y, x = corner
    volume[z : z + size, y : y + size, x : x + size] = True


def test_components_count_found_lesions_and_false_clusters() -> None:
    lesion = np.zeros(SHAPE, dtype=bool)
    _cube(lesion, (1, 1, 1), 4)  # 64 voxels
    _cube(lesion, (7, 10, 10), 2)  # 8 voxels
    flagged = np.zeros(SHAPE, dtype=bool)
    flagged[2, 2, 2] = True  # one voxel on the large lesion: found
    _cube(flagged, (8, 1, 12), 2)  # touches no lesion: a false cluster
    flagged[11, 15, 0] = True  # a second false cluster (corners do not touch the first)
    sizes, detected, false_clusters = lesion_components(flagged, lesion, voxel_ml=0.008)  # 2 mm voxels
    assert sizes.tolist() == pytest.approx([0.512, 0.064])
    assert detected.tolist() == [True, False]
    assert false_clusters == 2
    assert count_lesions(flagged, lesion, 0.008, min_lesion_ml=0.1) == (1, 1, 2)  # the small lesion is not counted
    assert count_lesions(flagged, lesion, 0.008, min_lesion_ml=0.05) == (2, 1, 2)
    assert count_lesions(flagged, lesion, float("nan"), min_lesion_ml=0.05) == (0, 0, 2)  # sizes unknown
    # 26-connectivity: cubes touching only by an edge are one lesion.
    touching = np.zeros(SHAPE, dtype=bool)
    _cube(touching, (0, 0, 0), 2)
    _cube(touching, (2, 2, 0), 2)
    assert len(lesion_components(np.zeros(SHAPE, dtype=bool), touching, 1.0)[0]) == 1


def _batch(maps: list[np.ndarray], lesions: list[np.ndarray], spacing_mm: float = 2.0) -> VolumeBatch:
    geometry = VolumeGeometry(
        original_shape=SHAPE[::-1], affine=np.diag([spacing_mm] * 3 + [1.0]), canonical_affine=np.diag([spacing_mm] * 3 + [1.0])
    )
    depth = SHAPE[0]
    return VolumeBatch(
        image=torch.zeros(depth * len(maps), 3, *SHAPE[1:]),
        gt_mask=torch.from_numpy(np.concatenate(lesions)),
        anomaly_map=torch.from_numpy(np.concatenate(maps)).float(),
        brain_mask=torch.ones(depth * len(maps), *SHAPE[1:], dtype=torch.bool),
        volume_index=torch.arange(len(maps)).repeat_interleave(depth),
        geometry=[geometry] * (depth * len(maps)),
    )


def test_metrics_pool_lesions_and_average_false_clusters_over_healthy_volumes() -> None:
    big = np.zeros(SHAPE, dtype=bool)
    _cube(big, (1, 1, 1), 6)  # 216 voxels of 8 mm³: 1.728 ml, counted
    _cube(big, (9, 12, 12), 2)  # 0.064 ml: below 1 ml, not counted
    lesion_map = big.astype(float) * 0.9
    healthy = np.zeros(SHAPE, dtype=bool)
    healthy_map = np.zeros(SHAPE)
    _cube(healthy_map, (0, 0, 0), 2)
    healthy_map[healthy_map > 0] = 0.8
    _cube(healthy_map, (6, 8, 8), 2)  # two separate hot spots: two false clusters
    healthy_map[healthy_map == 1] = 0.7
    batch = _batch([lesion_map, healthy_map, np.zeros(SHAPE)], [big, healthy, healthy])
    detection, clusters = LesionDetection(threshold=0.5), LesionFalseClusters(threshold=0.5)
    detection.update(batch)
    clusters.update(batch)
    assert detection.compute().item() == 1.0  # the one lesion of at least 1 ml is found
    assert clusters.compute().item() == 1.0  # two clusters over two healthy volumes
    stricter = LesionDetection(threshold=0.95)
    stricter.update(batch)
    assert stricter.compute().item() == 0.0
    unset = LesionDetection(threshold=float("nan"))
    unset.update(batch)
    assert np.isnan(unset.compute().item())


def test_components_agree_with_per_label_sums_and_maxima_on_random_maps() -> None:
    from scipy import ndimage

    from simpleslicenet.clusters import CONNECTIVITY

    rng = np.random.default_rng(0)
    for _ in range(5):
        lesion = ndimage.binary_dilation(rng.random(SHAPE) > 0.97)
        flagged = ndimage.binary_dilation(rng.random(SHAPE) > 0.98)
        sizes, detected, false_clusters = lesion_components(flagged, lesion, voxel_ml=1.0)
        lesions, n_lesions = ndimage.label(lesion, structure=CONNECTIVITY)
        clusters, n_clusters = ndimage.label(flagged, structure=CONNECTIVITY)
        assert n_lesions > 1 and n_clusters > 1
        labels, cluster_labels = np.arange(1, n_lesions + 1), np.arange(1, n_clusters + 1)
        assert sizes.tolist() == ndimage.sum_labels(lesion, lesions, labels).tolist()
        assert detected.tolist() == ndimage.maximum(flagged, lesions, labels).astype(bool).tolist()
        assert false_clusters == int((ndimage.maximum(lesion, clusters, cluster_labels) == 0).sum())

"""Lesion-wise counts and global Dice cross-checked against panoptica, the BraTS lesion-wise metrics library.

panoptica pins numpy < 2.3, pandas < 3 and rich < 14, older than this stack, so it is not a dependency of the
package: the README's test command installs it without its pins, and this test also shows that it runs here.
It matches a flagged cluster to at most one lesion, where ``simpleslicenet.clusters`` lets one cluster find
every lesion it touches (the BraTS 2023 counting); the two agree wherever no cluster bridges two lesions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from simpleslicenet.clusters import CONNECTIVITY, lesion_components
from simpleslicenet.metrics.exact import dice_at_threshold

panoptica = pytest.importorskip("panoptica")


@pytest.fixture(scope="module")
def evaluator():
    from panoptica import ConnectedComponentsInstanceApproximator, InputType, NaiveThresholdMatching, Panoptica_Evaluator
    from panoptica.metrics import Metric

    # Any overlap matches (IoU strictly above 0) and several clusters may match one lesion: "found" as here.
    matcher = NaiveThresholdMatching(
        matching_metric=Metric.IOU, matching_threshold=0.0, strict_threshold=True, allow_many_to_one=True
    )
    return Panoptica_Evaluator(
        expected_input=InputType.SEMANTIC,
        instance_approximator=ConnectedComponentsInstanceApproximator(),
        instance_matcher=matcher,
    )


def _balls(rng: np.random.Generator, shape: tuple[int, int, int], count: int, radii: tuple[int, int]) -> np.ndarray:
    grid = np.indices(shape)
    mask = np.zeros(shape, dtype=bool)
    for _ in range(count):
        centre = rng.integers(0, shape, size=3)[:, None, None, None]
        radius = rng.uniform(*radii)
        mask |= ((grid - centre) ** 2).sum(axis=0) <= radius**2
    return mask


def _bridges(flagged: np.ndarray, lesion: np.ndarray) -> bool:
    """Whether some flagged cluster touches two or more lesions."""
    lesions, _ = ndimage.label(lesion, structure=CONNECTIVITY)
    clusters, n_clusters = ndimage.label(flagged, structure=CONNECTIVITY)
    return any(len(np.unique(lesions[(clusters == c) & lesion])) > 1 for c in range(1, n_clusters + 1))


def _panoptica(evaluator, flagged: np.ndarray, lesion: np.ndarray):
    return evaluator.evaluate(flagged.astype(np.uint8), lesion.astype(np.uint8), verbose=False)["ungrouped"]


def test_found_lesions_false_clusters_and_dice_agree_with_panoptica(evaluator) -> None:
    agreed = 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        shape = (20, 24, 24)
        lesion = _balls(rng, shape, count=int(rng.integers(1, 6)), radii=(1.0, 3.5))
        # Flags: part of each lesion region, shifted, plus small clusters of healthy tissue.
        shifted = np.roll(lesion, shift=tuple(rng.integers(-2, 3, size=3)), axis=(0, 1, 2))
        flagged = (shifted & (rng.random(shape) < 0.7)) | _balls(rng, shape, int(rng.integers(0, 5)), (0.5, 2.0))
        if _bridges(flagged, lesion):
            continue
        agreed += 1
        sizes, detected, false_clusters = lesion_components(flagged, lesion, voxel_ml=0.008)
        result = _panoptica(evaluator, flagged, lesion)
        assert result.n_ref_instances == len(sizes), seed
        assert result.tp == int(detected.sum()), seed
        assert result.fn == int((~detected).sum()), seed
        assert result.fp == false_clusters, seed
        ours = dice_at_threshold(torch.from_numpy(flagged.astype(np.float32)), torch.from_numpy(lesion), 0.5)
        assert ours == pytest.approx(float(result.global_bin_dsc), abs=1e-12), seed
    # The comparison is not empty: most draws have no bridging cluster.
    assert agreed >= 20


def test_a_cluster_bridging_two_lesions_finds_both_here_and_one_in_panoptica(evaluator) -> None:
    lesion = np.zeros((12, 16, 16), dtype=bool)
    lesion[2:6, 2:6, 2:6] = True
    lesion[2:6, 9:13, 2:6] = True
    flagged = np.zeros_like(lesion)
    flagged[3, 4:11, 3] = True
    _, detected, false_clusters = lesion_components(flagged, lesion, voxel_ml=0.008)
    result = _panoptica(evaluator, flagged, lesion)
    assert detected.tolist() == [True, True] and false_clusters == 0
    assert (result.tp, result.fn, result.fp) == (1, 1, 0)

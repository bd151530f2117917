"""The cluster-level scan scores of ``benchmarks/scan_scores.py`` on a map whose clusters are known."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_benchmark

scan_scores_module = load_benchmark("scan_scores")


def test_cluster_scores_sum_the_excess_of_each_cluster_inside_the_brain() -> None:
    scores = np.zeros((10, 10, 10))
    brain = np.zeros(scores.shape, dtype=bool)
    brain[:, :, :8] = True
    scores[1:3, 1:3, 1:3] = 2.0  # 8 voxels, excess 1.5 each over u = 0.5
    scores[6, 6, 6] = 4.0  # one voxel, excess 3.5
    scores[5, 5, 9] = 9.0  # outside the brain: never counted
    result = scan_scores_module.scan_scores(scores, brain, voxel_ml=0.1, thresholds={0.99: 0.5})
    assert result["max"] == 4.0
    assert result["brain mass, u = q0.99"] == pytest.approx(8 * 1.5 + 3.5)
    assert result["largest cluster mass, u = q0.99"] == pytest.approx(12.0)
    assert result["largest cluster ml, u = q0.99"] == pytest.approx(0.8)
    assert result["clusters >= 0.1 ml, u = q0.99"] == 2
    # The top 0.1% of 800 brain voxels is the hottest one.
    assert result["top 0.1%"] == 4.0


def test_a_map_below_the_threshold_has_no_cluster() -> None:
    scores = np.full((4, 4, 4), 0.2)
    brain = np.ones(scores.shape, dtype=bool)
    result = scan_scores_module.scan_scores(scores, brain, voxel_ml=1.0, thresholds={0.999: 1.0})
    assert result["brain mass, u = q0.999"] == 0.0
    assert result["largest cluster mass, u = q0.999"] == 0.0
    assert result["clusters >= 0.1 ml, u = q0.999"] == 0

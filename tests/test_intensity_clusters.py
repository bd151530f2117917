"""The intensity channel and the conformal cluster control of ``benchmarks/intensity_clusters.py``."""

from __future__ import annotations

import numpy as np
from conftest import load_benchmark

intensity_clusters = load_benchmark("intensity_clusters")


def _training(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[list[np.ndarray], np.ndarray]:
    brain = np.zeros(shape, dtype=bool)
    brain[2:-2, 3:-3, 3:-3] = True
    anatomy = np.linspace(0.2, 0.8, shape[2])[None, None, :] * np.ones(shape)
    return [anatomy + rng.normal(0, 0.02, shape) for _ in range(12)], brain


def test_smooth_offsets_do_not_count_and_a_small_focus_does() -> None:
    rng = np.random.default_rng(0)
    images, brain = _training(rng, (16, 24, 24))
    norm = intensity_clusters.IntensityNorm(images, [brain] * len(images))
    mean = norm.mean.copy()
    # An offset is the scan's own smooth part: it leaves nothing; a gentle ramp (bias field) little.
    assert norm.channel(mean + 0.1, brain).max() < 1e-3
    assert norm.channel(mean + 0.02 * np.linspace(-1, 1, 24)[None, :, None], brain).max() < 0.5
    # A focus of radius 1.5 voxels (19 voxels), seven training spreads bright, stands out where it is,
    # above anything a new healthy scan reaches.
    ball = (np.indices(mean.shape) - np.array([8, 12, 12])[:, None, None, None]) ** 2
    focus = ball.sum(0) <= 1.5**2
    z = norm.channel(mean + 0.2 * focus, brain)
    assert focus[np.unravel_index(np.argmax(z), z.shape)] and z.max() > 3
    healthy = norm.channel(np.linspace(0.2, 0.8, 24) * np.ones(mean.shape) + rng.normal(0, 0.02, mean.shape), brain)
    assert healthy.max() < z.max() / 2
    assert (z[~brain] == 0).all()


def test_cluster_masses_sum_the_excess_of_each_cluster() -> None:
    z = np.zeros((6, 6, 6), dtype=np.float32)
    z[1, 1, 1:3] = 3.0  # one cluster of two voxels
    z[4, 4, 4] = 5.0  # and one of one voxel
    labels, masses = intensity_clusters.cluster_masses(z, 2.0)
    assert sorted(masses.tolist()) == [2.0, 3.0] and labels.max() == 2


def test_the_critical_mass_is_the_conformal_order_statistic() -> None:
    statistics = [float(v) for v in range(1, 21)]  # 20 calibration scans
    assert intensity_clusters.critical_mass(statistics, 0.05) == 20.0  # ceil(21 * 0.95) = 20
    assert intensity_clusters.critical_mass(statistics, 0.2) == 17.0  # ceil(21 * 0.8) = 17
    assert intensity_clusters.critical_mass(statistics, 0.025) == float("inf")  # 20 scans cannot promise 1/40
    # Exchangeable healthy scans: the next one exceeds the critical value at most alpha of the time.
    rng = np.random.default_rng(1)
    exceed = [rng.random() > intensity_clusters.critical_mass(list(rng.random(20)), 0.2) for _ in range(4000)]
    assert np.mean(exceed) <= 0.2 + 3 * np.sqrt(0.2 * 0.8 / 4000)

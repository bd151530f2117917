"""``benchmarks/site_calibration.py`` decides from sorted scores exactly as the package's FDR masks do."""

from __future__ import annotations

import numpy as np
from conftest import load_benchmark
from scipy import ndimage

from simpleslicenet.calibration import ConformalCalibration

site_calibration = load_benchmark("site_calibration")


def _field(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return ndimage.gaussian_filter(rng.normal(size=shape), 1.5)


def test_sorted_score_decisions_equal_the_fdr_masks() -> None:
    rng = np.random.default_rng(3)
    shape = (12, 14, 10)
    brain = np.zeros(shape, dtype=bool)
    brain[2:10, 2:12, 1:9] = True
    healthy = [_field(rng, shape) for _ in range(24)]
    calibration = ConformalCalibration.from_scores([h[brain] for h in healthy], [h[brain].max() for h in healthy])
    outcomes = set()
    for case in range(40):
        amap = _field(rng, shape)
        lesion = np.zeros(shape, dtype=bool)
        if case % 2:
            lesion[4:7, 5:8, 3:6] = True
            amap[lesion] += rng.uniform(0.0, 1.5)  # from invisible to obvious
        scan = {"scores": -np.sort(-amap[brain]), "lesion_max": float(amap[lesion].max()) if lesion.any() else None}
        for q in (0.05, 0.1):
            mask = calibration.fdr_mask(amap, brain, q)
            decided = site_calibration.flags(calibration, scan, q)
            assert decided == (bool(mask.any()), bool(mask[lesion].any()))
            outcomes.add(decided)
    # Both decisions were met: scans flagged with and without a lesion voxel, and scans left alone.
    assert {(False, False), (True, True)} <= outcomes


def test_too_few_calibration_scans_flag_nothing() -> None:
    rng = np.random.default_rng(4)
    brain = np.ones((6, 6, 6), dtype=bool)
    healthy = [_field(rng, brain.shape) for _ in range(5)]
    calibration = ConformalCalibration.from_scores([h.ravel() for h in healthy], [h.max() for h in healthy])
    amap = np.full(brain.shape, 100.0)
    scan = {"scores": amap.ravel(), "lesion_max": 100.0}
    assert site_calibration.flags(calibration, scan, 0.05) == (False, False)

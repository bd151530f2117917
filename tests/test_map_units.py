"""The map units of ``benchmarks/map_units.py``."""

from __future__ import annotations

import numpy as np
from conftest import load_benchmark

map_units = load_benchmark("map_units")


def test_scan_z_removes_a_scans_offset_and_scale() -> None:
    rng = np.random.default_rng(0)
    brain = np.zeros((6, 8, 8), dtype=bool)
    brain[1:5, 1:7, 1:7] = True
    amap = rng.normal(size=brain.shape).astype(np.float32)
    scan, shifted = {"map": amap, "brain": brain}, {"map": 3.0 * amap + 5.0, "brain": brain}
    np.testing.assert_allclose(map_units.in_unit("scan z", shifted, None)[brain], map_units.in_unit("scan z", scan, None)[brain], atol=1e-5)


def test_location_z_is_calibrations_mean_and_spread_per_location() -> None:
    rng = np.random.default_rng(1)
    brain = np.ones((4, 5, 5), dtype=bool)
    base = rng.normal(size=brain.shape)
    scans = [{"map": (base + rng.normal(scale=0.5, size=brain.shape)).astype(np.float32), "brain": brain} for _ in range(8)]
    norm = map_units.LocationNorm(scans)
    maps = np.stack([s["map"] for s in scans]).astype(np.float64)
    np.testing.assert_allclose(norm.mean, maps.mean(0), atol=1e-9)
    # The spread is each location's sample deviation, floored at their median over the brain.
    spread = maps.std(0, ddof=1)
    np.testing.assert_allclose(norm.std, np.maximum(spread, np.median(spread)), atol=1e-9)
    z = map_units.in_unit("location z", {"map": base.astype(np.float32), "brain": brain}, norm)
    np.testing.assert_allclose(z, (base - norm.mean) / norm.std, atol=1e-5)

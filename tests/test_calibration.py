"""Label-free outputs: conformal p-values, Benjamini–Hochberg masks, calibration files, predict and previews."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from simpleslicenet.calibration import CalibrationError, ConformalCalibration, benjamini_hochberg
from simpleslicenet.clusters import CONNECTIVITY
from simpleslicenet.metrics.calibrated import ks_uniform
from simpleslicenet.preview import choose_slices, draw_preview


_PATTERN = ndimage.gaussian_filter(np.random.default_rng(99).normal(size=(12, 16, 16)), 2)
_PATTERN /= _PATTERN.std()


def _fields(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` exchangeable 'healthy maps': smooth noise over a fixed spatial pattern (hot regions vary
    more) with a per-scan offset, as real maps have places that run high and scans that run high."""
    noise = ndimage.gaussian_filter(rng.normal(size=(n, *_PATTERN.shape)), (0, 1.5, 1.5, 1.5))
    noise *= (1 + 0.5 * (_PATTERN > 1.5)) / noise.std()
    return 3 * _PATTERN + noise + rng.normal(scale=0.3, size=(n, 1, 1, 1))


def test_voxel_pvalues_are_conservative_and_tight() -> None:
    rng = np.random.default_rng(0)
    scans = [rng.normal(size=20_000).round(2) for _ in range(5)]  # ties on purpose
    calibration = ConformalCalibration.from_scores(scans, [s.max() for s in scans])
    pooled = np.concatenate(scans)
    queries = np.concatenate([rng.normal(scale=1.5, size=3000), pooled[:500], [pooled.max() + 1, pooled.min() - 1]])
    exact = (1 + (pooled[None, :] >= queries[:, None]).sum(1)) / (pooled.size + 1)
    p = calibration.voxel_pvalues(queries).astype(float)
    assert np.all(p >= exact - 1e-7)  # never smaller than the exact conformal p-value
    assert np.all(p <= exact * 1.0101 + 1e-7)  # rounded up by at most 1%
    assert p[-2] == pytest.approx(calibration.smallest_voxel_pvalue) and p[-1] == 1.0
    order = np.argsort(queries)
    assert np.all(np.diff(p[order]) <= 1e-9)  # higher score, smaller p-value
    assert calibration.volume_pvalue(1e9) == pytest.approx(1 / 6) and calibration.volume_pvalue(-1e9) == 1.0


def test_benjamini_hochberg_matches_its_definition() -> None:
    rng = np.random.default_rng(1)
    for trial in range(50):
        p = rng.uniform(size=200) ** rng.uniform(1, 6)
        q = (0.05, 0.1, 0.2)[trial % 3]
        ordered = np.sort(p)
        passing = [k for k in range(1, p.size + 1) if ordered[k - 1] <= q * k / p.size]
        expected = p <= ordered[passing[-1] - 1] if passing else np.zeros(p.size, dtype=bool)
        np.testing.assert_array_equal(benjamini_hochberg(p, q), expected)
    with pytest.raises(ValueError, match="false discovery rate"):
        benjamini_hochberg(p, 1.5)


@pytest.mark.parametrize("q", [0.05, 0.1])
def test_healthy_scans_are_flagged_at_most_at_the_asked_rate(q: float) -> None:
    """Over calibration draws (the conformal guarantee is marginal), the share of healthy scans with any
    flagged voxel, and with volume p-value <= q, stays within q + 2 standard errors; volume p are uniform."""
    flagged, volume_flagged, volume_p = [], [], []
    for draw in range(40):
        rng = np.random.default_rng(draw)
        calibration_maps, test_maps = _fields(rng, 20), _fields(rng, 50)
        brain = np.ones(calibration_maps.shape[1:], dtype=bool)
        calibration = ConformalCalibration.from_scores(list(calibration_maps), [m.max() for m in calibration_maps])
        assert 0 < calibration.fdr_level(q) <= q
        flagged.append(np.mean([calibration.fdr_mask(m, brain, q).any() for m in test_maps]))
        p = np.array([calibration.volume_pvalue(m.max()) for m in test_maps])
        volume_flagged.append(np.mean(p <= q))
        volume_p.append(p)
    for shares in (np.array(flagged), np.array(volume_flagged)):
        error = shares.std(ddof=1) / np.sqrt(shares.size)  # draws are independent; scans within one are not
        assert shares.mean() <= q + 2 * error, f"{shares.mean():.3f} of healthy scans flagged at {q}"
    # Volume p-values of 20 calibration scans take the values k/21, each with probability 1/21: at every
    # k/21 the share of p-values <= k/21, averaged over draws, is k/21 within 3 standard errors of the draws.
    grid = np.arange(1, 22) / 21
    shares = np.array([[np.mean(p <= g + 1e-12) for g in grid] for p in volume_p])
    error = shares.std(axis=0, ddof=1) / np.sqrt(len(volume_p))
    assert np.all(np.abs(shares.mean(axis=0) - grid) <= 3 * error + 1e-9)
    pooled = np.concatenate(volume_p)
    assert ks_uniform(pooled, 20) < ks_uniform(pooled)  # on the grid, the grain is not counted as a departure

    # A real anomaly is found: a blob scoring above every healthy voxel.
    lesion = np.zeros(brain.shape, dtype=bool)
    lesion[4:8, 5:10, 5:10] = True
    found = calibration.fdr_mask(np.where(lesion, calibration_maps.max() + 1, test_maps[0]), brain, q)
    assert (found & lesion).sum() > 0.8 * lesion.sum() and (found & ~lesion).sum() < lesion.sum()


def test_too_few_calibration_scans_flag_nothing() -> None:
    rng = np.random.default_rng(0)
    maps = _fields(rng, 10)
    calibration = ConformalCalibration.from_scores(list(maps), [m.max() for m in maps])
    assert calibration.fdr_level(0.05) == 0 and 0 < calibration.fdr_level(0.2) <= 0.2  # 19 scans needed for 0.05
    assert not calibration.fdr_mask(maps[0] + 100, np.ones(maps.shape[1:], dtype=bool), 0.05).any()


def test_calibration_files_round_trip_and_bad_ones_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    calibration = ConformalCalibration.from_scores([rng.normal(size=5000) for _ in range(3)], [1.0, 2.0, 3.0])
    path = calibration.save(tmp_path / "calibration.json")
    loaded = ConformalCalibration.load(path)
    queries = rng.normal(size=100)
    np.testing.assert_array_equal(loaded.voxel_pvalues(queries), calibration.voxel_pvalues(queries))
    record = json.loads(path.read_text())
    broken = {
        "nan": path.read_text().replace(str(record["voxel_scores"][0]), "NaN", 1),
        "unordered": json.dumps({**record, "voxel_scores": record["voxel_scores"][::-1]}),
        "counts": json.dumps({**record, "voxel_at_least": [record["n_voxels"] + 1] * len(record["voxel_at_least"])}),
        "extra": json.dumps({**record, "code": "import os"}),
        "format": json.dumps({**record, "format": "pickle"}),
        "text": "not json at all",
        "scans": json.dumps({**record, "n_scans": 4}),
    }
    for name, text in broken.items():
        bad = tmp_path / f"{name}.json"
        bad.write_text(text)
        with pytest.raises(CalibrationError, match=str(bad.name)):
            ConformalCalibration.load(bad)
    with pytest.raises(CalibrationError, match="does not exist"):
        ConformalCalibration.load(tmp_path / "missing.json")
    with pytest.raises(CalibrationError, match="at least one healthy scan"):
        ConformalCalibration.from_scores([], [])


def test_preview_shows_the_lesion_and_the_map_peak(phantom_datamodule, tmp_path: Path) -> None:  # noqa: ANN001
    dataset = phantom_datamodule.test_data
    item = next(dataset[i] for i in range(len(dataset)) if dataset[i].gt_mask.any())
    lesion = item.gt_mask.numpy().astype(bool)
    brain = item.brain_mask.numpy().astype(bool)
    image = item.image[:, 0].numpy()
    # A map that peaks away from the lesion, as a poor model's would.
    amap = np.random.default_rng(0).normal(size=lesion.shape).astype(np.float32)
    largest = int(lesion.reshape(lesion.shape[0], -1).sum(1).argmax())
    candidates = [z for z in range(lesion.shape[0]) if brain[z].sum() > 20 and not lesion[z].any()]
    far = max(candidates, key=lambda z: abs(z - largest))
    amap[far][brain[far]] += 10
    amap[~brain] = -100  # the background's lowest score must not set the colour scale
    slices = draw_preview(image, amap, tmp_path / "preview.png", brain=brain, lesion=lesion, flagged=amap > 5)
    assert (tmp_path / "preview.png").stat().st_size > 5000
    assert any(lesion[z].any() for z in slices), "the preview must show the lesion"
    assert largest in slices
    assert far in slices and len(set(slices)) == len(slices) == 4
    # Without a lesion mask the map's peak still shows.
    assert far in [z for z, _ in choose_slices(amap, brain, None, 3)]


def test_calibration_split_is_held_out_healthy_training_volumes(phantom_root: Path) -> None:
    from conftest import PHANTOM_KWARGS

    from simpleslicenet.data.datamodules.phantom import BrainPhantom

    def splits(fraction: float):  # noqa: ANN202
        datamodule = BrainPhantom(root=phantom_root, target_shape=(32, 32, 16), progress=False,
                                  calibration_fraction=fraction, **PHANTOM_KWARGS)  # fmt: skip
        datamodule.setup()
        return datamodule

    plain, held_out = splits(0.0), splits(0.5)
    train = set(plain.train_data.samples["volume_id"])
    calibration = set(held_out.calibration_data.samples["volume_id"])
    assert len(plain.calibration_data) == 0 and len(calibration) == 2
    assert calibration <= train and calibration.isdisjoint(held_out.train_data.samples["volume_id"])
    assert (held_out.calibration_data.samples["label_index"] == 0).all()
    assert set(held_out.test_data.samples["volume_id"]) == set(plain.test_data.samples["volume_id"])
    assert calibration == set(splits(0.5).calibration_data.samples["volume_id"])  # seeded


def test_calibrate_then_predict_with_fdr(trained_simpleslicenet, phantom_root: Path, tmp_path: Path) -> None:  # noqa: ANN001
    from simpleslicenet.cli import main

    _model, _engine, checkpoint = trained_simpleslicenet
    manifest = json.loads((phantom_root / "manifest.json").read_text())
    folders = {"healthy": tmp_path / "healthy", "lesion": tmp_path / "lesion"}
    for folder in folders.values():
        folder.mkdir()
    for subject in manifest["subjects"]:
        image = phantom_root / subject["files"]["image"]
        (folders[subject["label"]] / image.name).symlink_to(image)
    calibration_file = tmp_path / "calibration.json"
    # Mechanics only: the tiny phantom has no healthy scan left beside the training ones to calibrate on.
    main(["calibrate", "--model", str(checkpoint), "--input", str(folders["healthy"]), "--output", str(calibration_file)])
    calibration = ConformalCalibration.load(calibration_file)
    assert calibration.n_scans == 6
    out = tmp_path / "out"
    main(["predict", "--model", str(checkpoint), "--input", str(folders["lesion"]), "--output", str(out),
          "--calibration", str(calibration_file), "--fdr", "0.3", "--previews"])  # fmt: skip
    scores = json.loads((out / "scores.json").read_text())
    assert scores["fdr"] == 0.3 and 0 < scores["fdr_level"] <= 0.3 and len(scores["scans"]) == 4
    for record in scores["scans"]:
        p = nib.load(record["pvalue_map_path"]).get_fdata()
        mask = nib.load(record["mask_path"]).get_fdata().astype(bool)
        assert p.min() >= calibration.smallest_voxel_pvalue * 0.999 and p.max() <= 1.0
        if mask.any():
            # The BH mask is the set of voxels up to a p-value cut-off, and that cut-off is at most q.
            cut = p[mask].max()
            assert cut <= scores["fdr_level"] and not ((p <= cut) & ~mask & (p < 1)).any()
        labels, n = ndimage.label(mask, structure=CONNECTIVITY)
        assert record["clusters"] == n == len(record["cluster_sizes_ml"])
        assert Path(record["preview_path"]).stat().st_size > 5000
        assert 0 < record["volume_pvalue"] <= 1
    with (out / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    pvalues = [float(row["volume_pvalue"]) for row in rows]
    assert [int(row["rank"]) for row in rows] == [1, 2, 3, 4] and pvalues == sorted(pvalues)

    # A calibration of another model is refused, and so is --fdr without a calibration.
    other = json.loads(calibration_file.read_text())
    other["model_sha256"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    refusals = {
        "another model": ["--calibration", str(tmp_path / "other.json")],
        "needs a calibration": ["--fdr", "0.05"],
        "6 calibration scans cannot give a mask at FDR 0.05": ["--calibration", str(calibration_file), "--fdr", "0.05"],
    }
    for reason, extra in refusals.items():
        with pytest.raises(SystemExit, match=reason):
            main(["predict", "--model", str(checkpoint), "--input", str(folders["lesion"]), "--output",
                  str(tmp_path / "refused"), *extra])  # fmt: skip
    assert not (tmp_path / "refused").exists()

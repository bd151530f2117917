"""The benchmark sweep on a tiny grid: one command, a CSV, a table, plots, and resuming."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import PHANTOM_KWARGS, TINY_SIMPLESLICENET, children_running, load_benchmark

pytestmark = pytest.mark.slow


def test_sweep_writes_report_and_resumes(phantom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from simpleslicenet.benchmark import load_sweep, run_sweep

    monkeypatch.chdir(tmp_path)  # an output folder relative to the working folder, as the shipped sweeps have
    config = {
        "name": "tiny",
        "output": "out",
        "seeds": [0],
        "trainer": {"accelerator": "cpu", "max_epochs": 1},
        "datasets": {
            "phantom": {
                "class_path": "BrainPhantom",
                "init_args": {
                    "root": str(phantom_root),
                    "target_shape": [32, 32, 16],
                    "progress": False,
                    "calibration_fraction": 0.5,  # 2 of the 4 healthy training volumes
                    **PHANTOM_KWARGS,
                },
            }
        },
        "models": {"SimpleSliceNet": {"init_args": TINY_SIMPLESLICENET}, "AE3D": {"init_args": {"sigma": 1.0}}},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert [run.label for run in load_sweep(path).runs] == ["SimpleSliceNet", "AE3D"]

    results = run_sweep(path)
    assert len(results) == 2, sorted(p.name for p in (tmp_path / "out" / "runs").iterdir())
    frame = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(frame["label"]) == ["SimpleSliceNet", "AE3D"]
    for column in ("voxel_AUPRC", "voxel_valDice", "volume_AUROC", "inference_seconds_per_volume", "peak_ram_mb"):
        assert frame[column].notna().all(), column
    assert (frame["peak_ram_mb"] > 100).all() and (frame["parameters"] > 0).all()
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| phantom | SimpleSliceNet |" in table and "| phantom | AE3D |" in table
    assert (tmp_path / "out" / "accuracy_vs_time.png").stat().st_size > 0
    # Every run also reports its metrics by lesion family and size, and the report tables them.
    assert results[0]["breakdown"]["family: tumour"]["lesion_volumes"] > 0
    assert "## By lesion family and lesion size" in table and "| phantom · family: tumour | SimpleSliceNet |" in table
    assert (tmp_path / "out" / "breakdown.png").stat().st_size > 0
    # And its label-free outputs: p-values against the held-out healthy training volumes.
    from simpleslicenet.calibration import ConformalCalibration

    assert all(r["n_train_volumes"] == 2 and r["calibrated"]["calibration_volumes"] == 2 for r in results)
    assert ConformalCalibration.load(tmp_path / "out" / "runs" / results[0]["run_id"] / "calibration.json").n_scans == 2
    assert frame["fdr05_Dice"].between(0, 1).all() and frame["volume_p_KS"].between(0, 1).all()
    assert "## Label-free outputs" in table and "Dice @ FDR 0.05" in table
    # Lesion volumes found at FDR 0.05, overall and by family: the families' shares pool to the overall one.
    calibrated, families = results[0]["calibrated"], results[0]["breakdown"]
    counts = {key.removeprefix("family: "): row["lesion_volumes"] for key, row in families.items() if key.startswith("family: ")}
    assert counts and all(f"fdr05_found_{family}" in calibrated for family in counts)
    pooled = sum(calibrated[f"fdr05_found_{family}"] * n for family, n in counts.items()) / sum(counts.values())
    assert calibrated["fdr05_lesion_vols_found"] == pytest.approx(pooled)
    assert "tumour vols found @ FDR 0.05" in table
    # Each run keeps its training curve.
    for result in results:
        curve = pd.read_csv(tmp_path / "out" / "runs" / result["run_id"] / "metrics.csv")
        losses = [column for column in curve.columns if column.startswith("train_loss")]
        assert losses and curve[losses].notna().any(axis=None), list(curve.columns)

    # The sweep's numbers are anomalib's: testing the run's checkpoint with the Engine, as `anomalib test
    # --ckpt_path` does, gives the same metrics (the validation threshold travels in the checkpoint).
    from anomalib.engine import Engine

    from simpleslicenet.benchmark.single_run import load_datamodule
    from simpleslicenet.models.registry import get_model_class

    ssn = results[0]
    checkpoint = tmp_path / "out" / "runs" / ssn["run_id"] / ssn["checkpoint"]
    datamodule = load_datamodule(ssn["dataset_class"], {**ssn["dataset_args"], "seed": ssn["seed"]})
    engine = Engine(accelerator="cpu", default_root_dir=tmp_path / "retest", logger=False, enable_progress_bar=False)
    model = get_model_class("SimpleSliceNet")(visualizer=False, **ssn["model_args"])
    [retested] = engine.test(model, datamodule=datamodule, ckpt_path=checkpoint)
    assert set(retested) == set(ssn["metrics"])
    for name, value in ssn["metrics"].items():
        assert retested[name] == pytest.approx(value, abs=1e-9, nan_ok=True), name

    # benchmarks/lesions_found.py tests the run again and reproduces its recorded lesion counts (or refuses).
    lesions_found = load_benchmark("lesions_found")
    [counted] = lesions_found.main([str(tmp_path / "out"), "--output", str(tmp_path / "lesions_found.json")])["runs"]
    assert counted["false_clusters_per_healthy_scan"] == pytest.approx(ssn["metrics"]["lesion_FPclusters"])
    half, one = counted["found"]["0.5"]["all"], counted["found"]["1.0"]["all"]
    assert one[0] / one[1] == pytest.approx(ssn["metrics"]["lesion_detection"]) and half[1] >= one[1] > 0
    assert sum(counted["found"]["1.0"][family][1] for family in lesions_found.FAMILIES) == one[1]
    # And at a false discovery rate with the run's calibration, reproducing the recorded label-free counts.
    [at_fdr] = lesions_found.main([str(tmp_path / "out"), "--fdr", "0.05", "--output", str(tmp_path / "fdr.json")])["runs"]
    assert at_fdr["false_clusters_per_healthy_scan"] == pytest.approx(ssn["calibrated"]["fdr05_FPclusters"])
    one = at_fdr["found"]["1.0"]["all"]
    assert one[0] / one[1] == pytest.approx(ssn["calibrated"]["fdr05_lesion_detection"])
    # benchmarks/map_units.py scores the run's maps in three units; its "nats" maps reproduce the run's (or it refuses).
    arguments = [str(tmp_path / "out"), "--val-sizes", "1", "--draws", "3", "--output", str(tmp_path / "map_units.json")]
    [units] = load_benchmark("map_units").main(arguments)["runs"]
    assert units["scans"]["calibration"] == 2 and units["scans"]["test"] == ssn["n_test_volumes"]
    assert units["units"]["nats"]["volume_auroc"] == pytest.approx(ssn["metrics"]["volume_AUROC"])
    for figures in units["units"].values():
        assert 0 <= figures["dice_at_val_threshold"] <= figures["max_dice"] <= 1
    # Thresholds from fewer validation scans (here one lesion scan a draw) never beat the best test threshold.
    [gaps] = units["dice_gap_from_k_validation_scans"].values()
    assert gaps and all(gap >= -1e-12 for gap in gaps)
    # benchmarks/intensity_clusters.py reproduces the run's volume AUROC from the same maps (or refuses); with
    # two calibration scans no critical mass exists at 0.05, so the channel flags nothing.
    arguments = [str(tmp_path / "out"), "--output", str(tmp_path / "intensity.json")]
    [channel] = load_benchmark("intensity_clusters").main(arguments)["runs"]
    assert channel["critical_mass"] == channel["critical_peak"] == float("inf")
    assert channel["counts"]["channel clusters 0.05"]["scans healthy"][0] == channel["counts"]["channel peaks 0.05"]["scans healthy"][0] == 0
    flagged, healthy = channel["counts"]["flow FDR 0.05"]["scans healthy"]  # the run's own FDR masks, counted again
    assert flagged / healthy == pytest.approx(ssn["calibrated"]["fdr05_healthy_flagged"])

    # A second call finds both results and redoes nothing.
    logs = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "runs").glob("*.log")}
    again = run_sweep(path)
    assert [r["run_id"] for r in again] == [r["run_id"] for r in results]
    assert {p: p.stat().st_mtime_ns for p in logs} == logs


def test_sweep_config_errors_name_the_file(tmp_path: Path) -> None:
    from simpleslicenet.benchmark import load_sweep

    path = tmp_path / "empty.yaml"
    path.write_text("name: nothing\n")
    with pytest.raises(ValueError, match="empty.yaml"):
        load_sweep(path)


def test_stopping_a_sweep_stops_its_running_child(phantom_root: Path, tmp_path: Path) -> None:
    """SIGTERM to ``simpleslicenet benchmark`` ends the run it started too: no orphan trains on."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    config = {
        "name": "stopped",
        "output": str(tmp_path / "out"),
        "seeds": [0],
        "trainer": {"accelerator": "cpu", "max_epochs": 50},
        "datasets": {
            "phantom": {
                "class_path": "BrainPhantom",
                "init_args": {"root": str(phantom_root), "target_shape": [32, 32, 16], "progress": False, **PHANTOM_KWARGS},
            }
        },
        "models": {"AE3D": {"init_args": {"sigma": 1.0}}},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    parent = subprocess.Popen(
        [sys.executable, "-m", "simpleslicenet.cli", "benchmark", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        children: list[psutil.Process] = []
        while not children and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.2)
            children = children_running(parent.pid, "simpleslicenet.benchmark.single_run")
        assert children, "the sweep started no run"
        parent.send_signal(signal.SIGTERM)
        status = parent.wait(timeout=60)
        _, alive = psutil.wait_procs(children, timeout=5)
        for child in alive:
            child.kill()
        assert not alive, f"left running: {[child.pid for child in alive]}"
        assert status == 128 + signal.SIGTERM  # the sweep ends as the signal's default action would
    finally:
        if parent.poll() is None:
            parent.kill()


def test_a_configured_entry_gets_its_configuration_alone(tmp_path: Path) -> None:
    """An entry's ``config`` is the model's whole configuration; without one, the registered configuration applies."""
    from simpleslicenet.benchmark import load_sweep
    from simpleslicenet.benchmark.single_run import get_model_class
    from simpleslicenet.models.registry import model_defaults

    path = tmp_path / "sweep.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "datasets": {"phantom": {"class_path": "BrainPhantom"}},
                "models": {
                    "configured": {"name": "SimpleSliceNet", "config": "simpleslicenet_phantom.yaml"},
                    "registered": {"name": "SimpleSliceNet", "init_args": {"flow_blocks": 2}},
                },
            }
        )
    )
    configured, registered = load_sweep(path).runs
    assert "variant" not in configured.model_args and configured.model_args["smoothing_sigma"] == 3.0
    model = get_model_class("SimpleSliceNet")(visualizer=False, **{**configured.model_args, "backbone_weights": "random"})
    assert (model.settings.variant, model.settings.loss, model.settings.depth_stride) == ("package", "triplet", 1)
    defaults = {key: list(value) if isinstance(value, tuple) else value for key, value in model_defaults("SimpleSliceNet").items()}
    assert registered.model_args == {**defaults, "flow_blocks": 2} and registered.model_args["variant"] == "paper"

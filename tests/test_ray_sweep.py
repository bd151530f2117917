"""The sweep on Ray: a two-run sweep as Ray tasks on a local Ray instance (CPU), gathered as the local runner does.

The outputs are treated as not shared (as on a cluster), so each run works in a scratch folder on its
worker and its result, log and small files come back; the local executor reproduces a Ray run's
metrics exactly, and a second call resumes without running anything.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import yaml
from conftest import PHANTOM_KWARGS

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")


@pytest.fixture
def local_ray(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """A local Ray instance with one CPU (runs one at a time on a small machine), shut down afterwards.

    Runs started here and on the Ray worker both use one thread, so their float sums agree bit for bit.
    """
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    for sig, handler in handlers.items():  # ray.init replaced them; later tests rely on the defaults
        signal.signal(sig, handler)


def _sweep_file(tmp_path: Path, phantom_root: Path, executor: object) -> Path:
    config = {
        "name": "tiny_ray",
        "output": str(tmp_path / "out"),
        "seeds": [0, 1],
        "trainer": {"accelerator": "cpu", "max_epochs": 1},
        "executor": executor,
        "datasets": {
            "phantom": {
                "class_path": "BrainPhantom",
                "init_args": {"root": str(phantom_root), "target_shape": [32, 32, 16], "progress": False, **PHANTOM_KWARGS},
            }
        },
        "models": {"AE3D": {"init_args": {"sigma": 1.0, "widths": [4, 8]}}},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_two_run_sweep_on_local_ray(phantom_root: Path, tmp_path: Path, local_ray: None) -> None:
    from simpleslicenet.benchmark import load_sweep, run_sweep

    path = _sweep_file(tmp_path, phantom_root, {"kind": "ray", "num_cpus": 1, "shared_output": False})
    sweep = load_sweep(path)
    assert sweep.executor.kind == "ray" and not sweep.executor.outputs_shared()
    runs_dir = tmp_path / "out" / "runs"

    results = run_sweep(path)
    assert [r["seed"] for r in results] == [0, 1]
    for result in results:
        run_id = result["run_id"]
        assert json.loads((runs_dir / f"{run_id}.json").read_text()) == result
        assert (runs_dir / f"{run_id}.log").stat().st_size > 0  # the shipped log
        if result["example"]:
            assert (runs_dir / run_id / result["example"]).stat().st_size > 0  # a shipped small file
        assert 0.0 <= result["metrics"]["voxel_AUROC"] <= 1.0
    assert "| phantom | AE3D |" in (tmp_path / "out" / "results.md").read_text()

    # The local executor runs the same spec to the same numbers: Ray changes where, not what.
    first = results[0]
    (runs_dir / f"{first['run_id']}.json").unlink()
    local_path = _sweep_file(tmp_path, phantom_root, "local")
    again = run_sweep(local_path)
    assert [r["run_id"] for r in again] == [r["run_id"] for r in results]  # the executor is not in the run id
    for name, value in first["metrics"].items():
        assert again[0]["metrics"][name] == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True), name

    # Everything finished: a Ray sweep resumes without running (or rewriting) anything.
    stamps = {p: p.stat().st_mtime_ns for p in runs_dir.glob("*.json")}
    resumed = run_sweep(path)
    assert [r["run_id"] for r in resumed] == [r["run_id"] for r in results]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_executor_section_is_checked(tmp_path: Path, phantom_root: Path) -> None:
    from simpleslicenet.benchmark import load_sweep

    with pytest.raises(ValueError, match="unknown executor settings"):
        load_sweep(_sweep_file(tmp_path, phantom_root, {"kind": "ray", "gpus": 1}))
    with pytest.raises(ValueError, match="unknown executor 'slurm'"):
        load_sweep(_sweep_file(tmp_path, phantom_root, "slurm"))
    assert load_sweep(_sweep_file(tmp_path, phantom_root, None)).executor.kind == "local"

"""Where a sweep's runs execute: one child process per run on this machine, or Ray tasks on a cluster.

Either way a run is the same thing: ``python -m simpleslicenet.benchmark.single_run SPEC RESULT`` in a
fresh process (:func:`run_in_process`), so its peak memory is its own and no state leaks between runs.
The runner alone decides what is finished (a run's result file exists), so a sweep resumes the same way
whichever executor produced its results, and the default stays the local executor.

The ``executor`` section of a sweep file::

    executor: local          # the default: runs one after another on this machine

    executor:
      kind: ray
      address: auto          # the Ray cluster to join (``ray start --head`` on one node, ``ray start
                             # --address ...`` on the others); omitted: a local Ray instance is started
      num_cpus: 4            # what each run asks Ray for; runs wait until a node has it free
      num_gpus: 1
      memory_mb: 16000
      shared_output: false   # the output folder is not at the same path on every node: each run
                             # works in a scratch folder there and its result, log and small files
                             # (under 16 MB each) come back to this machine; checkpoints stay behind

``shared_output`` defaults to true for a local Ray instance and false when joining a cluster. Every
node needs this package installed (the same version), and the datasets at the paths the sweep names.
The settings and the Ray plumbing are :mod:`simpleslicenet.executors`, shared with the BIDS App.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from simpleslicenet.atomic import atomic_write_text, stops_with_this_process
from simpleslicenet.executors import (
    EXECUTORS,
    MAX_SHIPPED_FILE_BYTES,
    ExecutorSettings,
    folder_files,
    ray_results,
    ray_session,
    ray_task_options,
    store_files,
)

__all__ = [
    "EXECUTORS",
    "MAX_SHIPPED_FILE_BYTES",
    "ExecutorSettings",
    "RunOutcome",
    "execute_runs",
    "ray_run",
    "run_in_process",
    "stops_with_this_process",
]


@dataclass
class RunOutcome:
    """What came back from one run.

    Args:
        exit_code: The run process's exit status (``None`` if it never ran, e.g. a lost Ray worker).
        result: Its result record, or ``None`` when it failed.
        error: Why it failed, for the report.
    """

    exit_code: int | None
    result: dict | None
    error: str | None = None


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # PatchCore's coreset loop grows glibc's heap without bound on CPU unless large blocks are mmapped;
    # the setting must be in place before the child process starts.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(8 << 20))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_in_process(spec: dict, runs_dir: Path) -> int:
    """Run one spec in a fresh Python process; ``runs_dir`` receives its spec, log, result and run folder.

    Args:
        spec: A :class:`~simpleslicenet.benchmark.config.RunSpec` as a dict.
        runs_dir: Folder of ``<run_id>.spec.json``, ``<run_id>.log``, ``<run_id>.json`` and ``<run_id>/``.

    Returns:
        The process's exit status.
    """
    run_id = spec["run_id"]
    spec_path = runs_dir / f"{run_id}.spec.json"
    atomic_write_text(spec_path, json.dumps(spec, indent=2))
    with (runs_dir / f"{run_id}.log").open("w") as log, stops_with_this_process() as children:
        child = subprocess.Popen(
            [sys.executable, "-m", "simpleslicenet.benchmark.single_run", str(spec_path), str(runs_dir / f"{run_id}.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_child_env(),
        )
        children.append(child)
        return child.wait()


def _outcome(spec: dict, runs_dir: Path, exit_code: int | None) -> RunOutcome:
    result_path = runs_dir / f"{spec['run_id']}.json"
    if exit_code == 0 and result_path.exists():
        return RunOutcome(exit_code, json.loads(result_path.read_text()))
    return RunOutcome(exit_code, None, f"exit code {exit_code}; see {runs_dir / (spec['run_id'] + '.log')}")


def ray_run(spec: dict, runs_dir: str | None) -> dict[str, Any]:
    """The body of one Ray task: run the spec in a child process on the worker.

    Args:
        spec: The run's spec.
        runs_dir: The sweep's runs folder when outputs are shared; ``None``: a scratch folder on the
            worker, whose result, log and small files are returned.

    Returns:
        ``exit_code``, plus ``result`` (JSON text), ``log`` (text) and ``files`` (relative path → bytes
        of the run folder's files up to :data:`MAX_SHIPPED_FILE_BYTES`) when outputs are not shared.
    """
    if runs_dir is not None:
        return {"exit_code": run_in_process(spec, Path(runs_dir))}
    scratch = Path(tempfile.mkdtemp(prefix="simpleslicenet-run-"))
    try:
        exit_code = run_in_process(spec, scratch)
        run_id = spec["run_id"]
        result_path = scratch / f"{run_id}.json"
        return {
            "exit_code": exit_code,
            "result": result_path.read_text() if result_path.exists() else None,
            "log": (scratch / f"{run_id}.log").read_text(errors="replace"),
            "files": folder_files(scratch / run_id, MAX_SHIPPED_FILE_BYTES),
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _store_shipped(spec: dict, runs_dir: Path, shipped: dict[str, Any]) -> int | None:
    """Write a run's shipped log and files into ``runs_dir``, and its result last (it marks the run finished)."""
    run_id = spec["run_id"]
    atomic_write_text(runs_dir / f"{run_id}.log", shipped["log"])
    store_files(runs_dir / run_id, shipped["files"])
    if shipped["exit_code"] == 0 and shipped["result"] is not None:
        atomic_write_text(runs_dir / f"{run_id}.json", shipped["result"])
    return shipped["exit_code"]


def _execute_local(specs: Sequence[dict], runs_dir: Path) -> Iterator[tuple[dict, RunOutcome]]:
    for spec in specs:
        yield spec, _outcome(spec, runs_dir, run_in_process(spec, runs_dir))


def _execute_ray(specs: Sequence[dict], runs_dir: Path, settings: ExecutorSettings) -> Iterator[tuple[dict, RunOutcome]]:
    with ray_session(settings) as ray:
        shared = settings.outputs_shared()
        task = ray.remote(ray_run).options(**ray_task_options(settings))
        pending = {task.remote(spec, str(runs_dir.resolve()) if shared else None): spec for spec in specs}
        for spec, returned, error in ray_results(pending):
            if error is not None:
                yield spec, RunOutcome(None, None, error)
                continue
            exit_code = returned["exit_code"] if shared else _store_shipped(spec, runs_dir, returned)
            yield spec, _outcome(spec, runs_dir, exit_code)


def execute_runs(
    specs: Sequence[Any], runs_dir: Path, settings: ExecutorSettings
) -> Iterator[tuple[Any, RunOutcome]]:
    """Run every spec with the chosen executor and yield ``(spec, outcome)`` as each finishes.

    Args:
        specs: :class:`~simpleslicenet.benchmark.config.RunSpec` objects to run (not yet finished).
        runs_dir: The sweep's runs folder.
        settings: The executor.

    Raises:
        ImportError: ``ray`` is asked for but not installed.
    """
    by_id = {spec.run_id: spec for spec in specs}
    records = [asdict(spec) for spec in specs]
    if not records:
        return
    outcomes = _execute_local(records, runs_dir) if settings.kind == "local" else _execute_ray(records, runs_dir, settings)
    for record, outcome in outcomes:
        yield by_id[record["run_id"]], outcome

"""Run a sweep: every run in its own process, results kept as they finish, resumable.

Runs execute one after another on this machine by default, or as Ray tasks on a cluster (the sweep
file's ``executor`` section, or ``ray_address``; see :mod:`simpleslicenet.benchmark.executors`).
Either way a run is finished when its result file exists, so an interrupted sweep resumes where it
stopped, whichever executor produced the results so far.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from simpleslicenet.benchmark.config import load_sweep
from simpleslicenet.benchmark.executors import execute_runs
from simpleslicenet.benchmark.report import write_report

__all__ = ["run_sweep"]


def run_sweep(
    config: str | Path,
    output: str | Path | None = None,
    resume: bool = True,
    ray_address: str | None = None,
) -> list[dict]:
    """Run every (dataset, model, seed) of a sweep file and write the report.

    Args:
        config: Sweep YAML (see :mod:`simpleslicenet.benchmark.config`).
        output: Results folder; default from the file.
        resume: Skip runs whose result file exists (an interrupted sweep picks up where it stopped).
        ray_address: Run on this Ray cluster (``"auto"``, ``"ray://host:10001"``) whatever the file's
            ``executor`` says, with its resources per run if it names Ray.

    Returns:
        The result records of all runs, finished before or now, in the sweep's order. Failed runs are
        recorded with their error and the log file to read; they are retried on the next call.

    Raises:
        ImportError: Ray is asked for but not installed.
    """
    sweep = load_sweep(config, output)
    executor = sweep.executor
    if ray_address is not None:
        executor = dataclasses.replace(executor, kind="ray", address=ray_address)
    runs_dir = sweep.output / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    finished: dict[str, dict] = {}
    pending = []
    for spec in sweep.runs:
        result_path = runs_dir / f"{spec.run_id}.json"
        if resume and result_path.exists():
            finished[spec.run_id] = json.loads(result_path.read_text())
        else:
            result_path.unlink(missing_ok=True)  # a failed rerun must not leave an old result to be resumed
            pending.append(spec)
    failures = []
    progress = tqdm(total=len(sweep.runs), initial=len(finished), desc=sweep.name, unit="run")
    for spec, outcome in execute_runs(pending, runs_dir, executor):
        progress.update()
        progress.set_postfix_str(f"{spec.dataset} {spec.label} seed {spec.seed}")
        if outcome.result is None:
            failures.append({**asdict(spec), "error": outcome.error, "log": str(runs_dir / f"{spec.run_id}.log")})
            tqdm.write(f"run {spec.run_id} failed ({outcome.error})")
            continue
        finished[spec.run_id] = outcome.result
    progress.close()
    results = [finished[spec.run_id] for spec in sweep.runs if spec.run_id in finished]
    write_report(results, sweep.output, title=sweep.name, failures=failures, command=f"simpleslicenet benchmark {config}")
    return results

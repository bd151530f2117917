"""Run a sweep: every run in its own process, results kept as they finish, resumable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from simpleslicenet.benchmark.config import load_sweep
from simpleslicenet.benchmark.report import write_report

__all__ = ["run_sweep"]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # PatchCore's coreset loop grows glibc's heap without bound on CPU unless large blocks are mmapped;
    # the setting must be in place before the child process starts.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(8 << 20))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_sweep(config: str | Path, output: str | Path | None = None, resume: bool = True) -> list[dict]:
    """Run every (dataset, model, seed) of a sweep file and write the report.

    Args:
        config: Sweep YAML (see :mod:`simpleslicenet.benchmark.config`).
        output: Results folder; default from the file.
        resume: Skip runs whose result file exists (an interrupted sweep picks up where it stopped).

    Returns:
        The result records of all runs, finished before or now. Failed runs are recorded with their
        error and the log file to read; they are retried on the next call.
    """
    sweep = load_sweep(config, output)
    runs_dir = sweep.output / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    results, failures = [], []
    progress = tqdm(sweep.runs, desc=sweep.name, unit="run")
    for spec in progress:
        result_path = runs_dir / f"{spec.run_id}.json"
        progress.set_postfix_str(f"{spec.dataset} {spec.label} seed {spec.seed}")
        if resume and result_path.exists():
            results.append(json.loads(result_path.read_text()))
            continue
        result_path.unlink(missing_ok=True)  # a failed rerun must not leave an old result to be resumed
        spec_path = runs_dir / f"{spec.run_id}.spec.json"
        spec_path.write_text(json.dumps(asdict(spec), indent=2))
        log_path = runs_dir / f"{spec.run_id}.log"
        with log_path.open("w") as log:
            code = subprocess.call(
                [sys.executable, "-m", "simpleslicenet.benchmark.single_run", str(spec_path), str(result_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_child_env(),
            )
        if code != 0 or not result_path.exists():
            failures.append({**asdict(spec), "error": f"exit code {code}", "log": str(log_path)})
            tqdm.write(f"run {spec.run_id} failed (exit {code}); see {log_path}")
            continue
        results.append(json.loads(result_path.read_text()))
    write_report(results, sweep.output, title=sweep.name, failures=failures, command=f"simpleslicenet benchmark {config}")
    return results

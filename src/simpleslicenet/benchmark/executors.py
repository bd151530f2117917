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
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from simpleslicenet.atomic import atomic_path, atomic_write_text
from simpleslicenet.choices import check_choice

__all__ = ["EXECUTORS", "ExecutorSettings", "RunOutcome", "execute_runs", "ray_run", "run_in_process", "stops_with_this_process"]

EXECUTORS = ("local", "ray")
# Files of a run folder bigger than this stay on the worker when outputs are not shared (checkpoints).
MAX_SHIPPED_FILE_BYTES = 16 << 20
_SETTINGS_KEYS = ("kind", "address", "num_cpus", "num_gpus", "memory_mb", "shared_output")


@dataclass(frozen=True)
class ExecutorSettings:
    """How a sweep's runs are executed (the ``executor`` section of a sweep file).

    Args:
        kind: ``"local"`` (one child process per run, one after another) or ``"ray"``.
        address: Ray cluster address (``"auto"``, ``"ray://host:10001"``); ``None`` starts a local
            instance (or uses the one this process already started).
        num_cpus: CPUs each run asks Ray for.
        num_gpus: GPUs each run asks Ray for (Ray sets ``CUDA_VISIBLE_DEVICES`` for the run).
        memory_mb: Memory each run asks Ray for; ``None``: no reservation.
        shared_output: Whether the output folder is at the same path on every node; ``None``: true
            for a local instance, false when joining a cluster.

    Raises:
        ValueError: An unknown kind or a negative resource.
    """

    kind: str = "local"
    address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory_mb: int | None = None
    shared_output: bool | None = None

    def __post_init__(self) -> None:
        check_choice("executor", self.kind, EXECUTORS)
        for name in ("num_cpus", "num_gpus", "memory_mb"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int | float) or isinstance(value, bool) or value < 0):
                msg = f"executor {name} must be a non-negative number, got {value!r}"
                raise ValueError(msg)

    @classmethod
    def parse(cls, section: object, source: str | os.PathLike) -> ExecutorSettings:
        """Settings from a sweep file's ``executor`` section (absent, a kind, or a mapping).

        Raises:
            ValueError: A malformed section (the message names ``source``).
        """
        if section is None:
            return cls()
        if isinstance(section, str):
            section = {"kind": section}
        if not isinstance(section, dict):
            msg = f"{source}: 'executor' must be a kind ({', '.join(EXECUTORS)}) or a mapping, got {section!r}"
            raise ValueError(msg)  # noqa: TRY004 - every malformed sweep file is a ValueError (see load_sweep)
        unknown = sorted(set(section) - set(_SETTINGS_KEYS))
        if unknown:
            msg = f"{source}: unknown executor settings {unknown}; known: {list(_SETTINGS_KEYS)}"
            raise ValueError(msg)
        try:
            return cls(**section)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from error

    def outputs_shared(self) -> bool:
        """Whether runs write straight into the sweep's output folder."""
        return self.address is None if self.shared_output is None else bool(self.shared_output)


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


# Seconds a run's process has to end after the sweep asks it to stop, before it is killed.
CHILD_GRACE_S = 30.0


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


@contextmanager
def stops_with_this_process(grace_s: float = CHILD_GRACE_S) -> Iterator[list[subprocess.Popen]]:
    """While inside, a SIGTERM to this process (or any exception, Ctrl+C included) stops the children too.

    Yields the list to append each started child to. Without it a stopped sweep leaves its running child
    behind as an orphan that trains on. Each child still running gets SIGTERM and ``grace_s`` seconds to
    end, then SIGKILL; this process then exits with status 128 + 15, as the signal's default action would
    have it. The handler is in place before a child starts and until every child has ended.

    Args:
        grace_s: Seconds a child has to end after SIGTERM.
    """

    def stop(signum: int, frame: object) -> None:
        del frame
        raise SystemExit(128 + signum)

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if in_main_thread else None
    children: list[subprocess.Popen] = []
    try:
        yield children
    finally:
        try:
            for child in children:
                if child.poll() is None:
                    child.terminate()
                    try:
                        child.wait(timeout=grace_s)
                    except subprocess.TimeoutExpired:
                        child.kill()
                        child.wait()
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


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
        result_path, run_folder = scratch / f"{run_id}.json", scratch / run_id
        files = {}
        if run_folder.is_dir():
            for path in sorted(run_folder.rglob("*")):
                if path.is_file() and path.stat().st_size <= MAX_SHIPPED_FILE_BYTES:
                    files[str(path.relative_to(run_folder))] = path.read_bytes()
        return {
            "exit_code": exit_code,
            "result": result_path.read_text() if result_path.exists() else None,
            "log": (scratch / f"{run_id}.log").read_text(errors="replace"),
            "files": files,
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _store_shipped(spec: dict, runs_dir: Path, shipped: dict[str, Any]) -> int | None:
    """Write a run's shipped log and files into ``runs_dir``, and its result last (it marks the run finished)."""
    run_id = spec["run_id"]
    atomic_write_text(runs_dir / f"{run_id}.log", shipped["log"])
    for relative, data in shipped["files"].items():
        with atomic_path(runs_dir / run_id / relative) as tmp:
            tmp.write_bytes(data)
    if shipped["exit_code"] == 0 and shipped["result"] is not None:
        atomic_write_text(runs_dir / f"{run_id}.json", shipped["result"])
    return shipped["exit_code"]


def _execute_local(specs: Sequence[dict], runs_dir: Path) -> Iterator[tuple[dict, RunOutcome]]:
    for spec in specs:
        yield spec, _outcome(spec, runs_dir, run_in_process(spec, runs_dir))


def _signal_handlers() -> dict[int, Any]:
    """The process's SIGTERM/SIGINT handlers (``ray.init`` replaces them and ``ray.shutdown`` does not undo it)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore_signal_handlers(handlers: dict[int, Any]) -> None:
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def _execute_ray(specs: Sequence[dict], runs_dir: Path, settings: ExecutorSettings) -> Iterator[tuple[dict, RunOutcome]]:
    try:
        import ray
    except ImportError as error:
        msg = "executor 'ray' needs the ray package: pip install 'simpleslicenet[ray]'"
        raise ImportError(msg) from error
    started = not ray.is_initialized()
    handlers = _signal_handlers()
    if started:
        ray.init(address=settings.address, include_dashboard=False, log_to_driver=False)
    try:
        shared = settings.outputs_shared()
        options: dict[str, Any] = {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus, "max_retries": 0}
        if settings.memory_mb is not None:
            options["memory"] = int(settings.memory_mb) << 20
        task = ray.remote(ray_run).options(**options)
        pending = {task.remote(spec, str(runs_dir.resolve()) if shared else None): spec for spec in specs}
        while pending:
            [done], _ = ray.wait(list(pending), num_returns=1)
            spec = pending.pop(done)
            try:
                returned = ray.get(done)
            except Exception as error:  # noqa: BLE001 - a lost worker or a failed task is a result to report
                yield spec, RunOutcome(None, None, f"Ray task failed: {type(error).__name__}: {error}")
                continue
            exit_code = returned["exit_code"] if shared else _store_shipped(spec, runs_dir, returned)
            yield spec, _outcome(spec, runs_dir, exit_code)
    finally:
        if started:
            ray.shutdown()
        _restore_signal_handlers(handlers)


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

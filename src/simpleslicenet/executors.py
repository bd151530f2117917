"""Where independent pieces of work execute: on this machine, or as Ray tasks on a cluster.

The benchmark sweep (:mod:`simpleslicenet.benchmark.executors`: one run per task) and the BIDS App's
participant level (:mod:`simpleslicenet.bids.participant`: one subject per task) share what is here:

* :class:`ExecutorSettings`: the executor and the resources each task asks for.
* :func:`ray_session`: Ray started (or joined) for the duration of a block, and stopped again when this
  process started it, with this process's signal handlers as they were before.
* :func:`ray_task_options` and :func:`ray_results`: one task per piece of work, results as they finish,
  a failed task reported as a result rather than raised.
* :func:`folder_files` and :func:`store_files`: a task's output files, shipped back to this machine
  when the output folder is not at the same path on every node.

Ray itself is imported only when it is used; every node needs this package installed (the same version).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simpleslicenet.atomic import atomic_path
from simpleslicenet.choices import check_choice

__all__ = [
    "EXECUTORS",
    "MAX_SHIPPED_FILE_BYTES",
    "ExecutorSettings",
    "folder_files",
    "ray_results",
    "ray_session",
    "ray_task_options",
    "store_files",
]

EXECUTORS = ("local", "ray")
# Files of a run folder bigger than this stay on the worker when outputs are not shared (checkpoints).
MAX_SHIPPED_FILE_BYTES = 16 << 20
_SETTINGS_KEYS = ("kind", "address", "num_cpus", "num_gpus", "memory_mb", "shared_output")


@dataclass(frozen=True)
class ExecutorSettings:
    """How pieces of work are executed (a sweep file's ``executor`` section, the BIDS App's ``--executor``).

    Args:
        kind: ``"local"`` (processes on this machine) or ``"ray"``.
        address: Ray cluster address (``"auto"``, ``"ray://host:10001"``); ``None`` starts a local
            instance (or uses the one this process already started).
        num_cpus: CPUs each task asks Ray for.
        num_gpus: GPUs each task asks Ray for (Ray sets ``CUDA_VISIBLE_DEVICES`` for the task).
        memory_mb: Memory each task asks Ray for; ``None``: no reservation.
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
        """Whether tasks write straight into the output folder (else they ship their files back)."""
        return self.address is None if self.shared_output is None else bool(self.shared_output)


def _signal_handlers() -> dict[int, Any]:
    """The process's SIGTERM/SIGINT handlers (``ray.init`` replaces them and ``ray.shutdown`` does not undo it)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore_signal_handlers(handlers: dict[int, Any]) -> None:
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@contextmanager
def ray_session(settings: ExecutorSettings) -> Iterator[Any]:
    """Ray, initialised for the block: joined at ``settings.address``, or a local instance.

    A Ray this process already initialised is used as it is and left running; one started here is shut
    down at the end (which ends its worker processes), and the signal handlers ``ray.init`` replaced are
    put back, whether the block ends normally, with an error or on a signal. Inside the block a SIGTERM
    ends it with ``SystemExit(143)`` (the status the signal's default action gives), as Ctrl-C would.

    Yields:
        The ``ray`` module.

    Raises:
        ImportError: ``ray`` is not installed (the message says how to install it).
    """
    try:
        import ray
    except ImportError as error:
        msg = "executor 'ray' needs the ray package: pip install 'simpleslicenet[ray]'"
        raise ImportError(msg) from error
    started = not ray.is_initialized()
    handlers = _signal_handlers()
    stopped: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        stopped.append(signum)
        raise SystemExit(128 + signum)

    try:
        if started:
            ray.init(address=settings.address, include_dashboard=False, log_to_driver=False)
        if handlers:  # a SIGTERM stops the block as Ctrl-C would: pending tasks are cancelled
            signal.signal(signal.SIGTERM, stop)
        try:
            yield ray
        except BaseException as error:
            # Inside ray.wait the signal's SystemExit comes back as Ray's own SystemExit(1): say it was the signal.
            if stopped and not (isinstance(error, SystemExit) and error.code == 128 + stopped[0]):
                raise SystemExit(128 + stopped[0]) from error
            raise
    finally:
        if started:
            ray.shutdown()
        _restore_signal_handlers(handlers)


def ray_task_options(settings: ExecutorSettings) -> dict[str, Any]:
    """``.options(...)`` of one task: its resources, and no retry (a failed task is reported, not rerun)."""
    options: dict[str, Any] = {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus, "max_retries": 0}
    if settings.memory_mb is not None:
        options["memory"] = int(settings.memory_mb) << 20
    return options


def ray_results(pending: dict[Any, Any]) -> Iterator[tuple[Any, Any, str | None]]:
    """Wait on submitted tasks and yield ``(key, value, error)`` for each as it finishes.

    Args:
        pending: Object reference of each submitted task -> what it stands for (emptied as they finish).

    Yields:
        The task's key, its return value (``None`` if it failed), and why it failed (``None`` if it did
        not): a lost worker or an exception in the task is a result to report, not an exception here.
        Tasks still pending when the caller stops iterating (an error, a signal) are cancelled.
    """
    import ray

    try:
        while pending:
            [done], _ = ray.wait(list(pending), num_returns=1)
            key = pending.pop(done)
            try:
                value = ray.get(done)
            except Exception as error:  # noqa: BLE001 - a lost worker or a failed task is a result to report
                yield key, None, f"Ray task failed: {type(error).__name__}: {error}"
                continue
            yield key, value, None
    finally:
        for reference in pending:
            # Not forced: the task sees KeyboardInterrupt, so what it started and staged is cleaned up.
            ray.cancel(reference, force=False)


def folder_files(folder: str | os.PathLike, max_bytes: int | None = MAX_SHIPPED_FILE_BYTES) -> dict[str, bytes]:
    """Every file below ``folder`` as ``relative POSIX path -> bytes`` (what a task ships back).

    Args:
        folder: The folder (absent: nothing).
        max_bytes: Files bigger than this are left out; ``None``: none is.
    """
    folder = Path(folder)
    files = {}
    if folder.is_dir():
        for path in sorted(folder.rglob("*")):
            if path.is_file() and (max_bytes is None or path.stat().st_size <= max_bytes):
                files[path.relative_to(folder).as_posix()] = path.read_bytes()
    return files


def store_files(folder: str | os.PathLike, files: dict[str, bytes]) -> None:
    """Write shipped files (from :func:`folder_files`) below ``folder``, each atomically.

    Raises:
        ValueError: A path that would land outside ``folder`` (absolute, or with ``..``).
    """
    folder = Path(folder)
    for relative, data in files.items():
        parts = Path(relative).parts
        if Path(relative).is_absolute() or ".." in parts:
            msg = f"{folder}: refusing a shipped file outside the folder: {relative!r}"
            raise ValueError(msg)
        with atomic_path(folder / relative) as tmp:
            tmp.write_bytes(data)

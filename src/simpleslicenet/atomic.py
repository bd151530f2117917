"""The one way this package writes files: build under a temporary name, then rename into place.

A reader (or a crash) therefore sees either the old file or the complete new one, never half of it,
and no temporary file is left behind when writing fails. Whole folders (a ``predict`` batch, an
exported model) are built the same way in :func:`staged_directory`: a hidden staging folder beside
the target that replaces it as a whole once complete, removed when anything fails or the process is
interrupted (Ctrl-C or SIGTERM), and cleaned up by the next run if the process was killed.
Child processes started under :func:`stops_with_this_process` end with their parent (a sweep's
runs, the BIDS App's workers): a stopped parent leaves no orphan working on.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> atomic_write_text(folder / "scores.json", "{}")
    PosixPath('...scores.json')
    >>> with atomic_path(folder / "figure.png") as tmp:  # doctest: +SKIP
    ...     fig.savefig(tmp)
    >>> with staged_directory(folder / "maps", "predict") as staging:  # doctest: +SKIP
    ...     (staging / "scores.json").write_text("{}")
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "TEMP_PREFIX",
    "abandoned_paths",
    "atomic_path",
    "atomic_write_json",
    "atomic_write_text",
    "leave_stop_signals_to_the_main_thread",
    "recover_directory",
    "replace_directory",
    "signals_deferred",
    "staged_directory",
    "stops_with_this_process",
    "terminate_unwinds",
]

# Temporary names start with this, so listings (and the dataset naming rule) skip them as hidden files.
TEMP_PREFIX = ".tmp-"


def _suffix_of(path: Path) -> str:
    # Keep the full extension (.nii.gz, .png): writers such as nibabel and matplotlib choose the
    # format from it.
    return ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix


@contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    Args:
        path: Final destination (its folder is created).
        overwrite: If false, refuse when ``path`` already exists.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false (nothing is written).
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{uuid.uuid4().hex}{_suffix_of(path)}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text)
    return path


def atomic_write_json(path: str | os.PathLike, data: object, overwrite: bool = True) -> Path:
    """Write ``data`` as indented, strict JSON (never NaN or Infinity) to ``path`` atomically; returns ``path``.

    Raises:
        ValueError: ``data`` holds NaN or an infinite number (nothing is written).
        TypeError: ``data`` holds something JSON cannot represent (nothing is written).
    """
    return atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n", overwrite=overwrite)


# Seconds a child process has to end after this process asks it to stop, before it is killed.
CHILD_GRACE_S = 30.0

# renameat2(2) flag: swap two existing paths in one step (Linux 3.15+, on ext4, xfs, btrfs, tmpfs...).
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths atomically; False where the system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # a C library without renameat2 (glibc < 2.28, musl < 1.2.?)
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _backup_prefix(target: Path) -> str:
    return f"{TEMP_PREFIX}{target.name}.previous."


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def abandoned_paths(folder: Path, prefix: str) -> list[Path]:
    """Entries of ``folder`` named ``<prefix><pid>-...`` whose process is gone (left by a killed run)."""
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        pid = path.name[len(prefix) :].split("-", 1)[0] if path.name.startswith(prefix) else ""
        if pid.isdigit() and not _process_alive(int(pid)):
            found.append(path)
    return found


def replace_directory(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move a completely built folder ``staging`` onto ``target``; ``target`` is never missing or half-made.

    Where the file system can, the two folders are exchanged in one atomic step and the old one (now
    at ``staging``) is deleted. Elsewhere ``target`` is renamed aside under a name carrying this
    process's id, ``staging`` renamed into its place, and the old folder deleted; if the second rename
    fails the old folder is put back, and if the process is killed in between,
    :func:`recover_directory` (run before the next write) puts it back.
    """
    staging, target = Path(staging), Path(target)
    if target.exists() and _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)
        return target
    backup = target.with_name(f"{_backup_prefix(target)}{os.getpid()}-{uuid.uuid4().hex}")
    had_target = target.exists()
    if had_target:
        target.rename(backup)
    try:
        staging.rename(target)
    except BaseException:
        if had_target:
            backup.rename(target)
        raise
    if had_target:
        shutil.rmtree(backup, ignore_errors=True)
    return target


def recover_directory(target: str | os.PathLike) -> None:
    """Finish what a killed :func:`replace_directory` left: restore or delete its set-aside folder.

    A set-aside folder whose process is gone is put back when ``target`` is missing (the swap was cut
    between its two renames: the old folder is the last complete one) and deleted otherwise.
    """
    target = Path(target)
    for path in abandoned_paths(target.parent, _backup_prefix(target)):
        if target.exists():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.rename(target)


@contextmanager
def terminate_unwinds() -> Iterator[None]:
    """While active, SIGTERM raises ``SystemExit`` (as Ctrl-C raises ``KeyboardInterrupt``), so cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_on_terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_on_terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def leave_stop_signals_to_the_main_thread() -> None:
    """Block SIGINT and SIGTERM in the calling worker thread (a pool's ``initializer``).

    The kernel then delivers them to the main thread, where Python runs their handlers anyway: a worker
    deep in a C call (compressing a map) is never interrupted, and :func:`signals_deferred` holds them
    back for the whole process.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for a step that must not be cut in half (a swap, a cleanup)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a held signal is delivered here


@contextmanager
def staged_directory(target: str | os.PathLike, tag: str) -> Iterator[Path]:
    """Build a folder under a hidden name beside ``target``; on success it replaces ``target`` as a whole.

    Before the staging folder is made, what killed runs left beside ``target`` is cleaned up (their
    staging folders with this ``tag``, and a set-aside folder, see :func:`recover_directory`). The block
    runs with SIGTERM unwinding like Ctrl-C (:func:`terminate_unwinds`). When it completes, the staging
    folder replaces ``target`` (:func:`replace_directory`, with signals held back); when it fails or is
    interrupted, ``target`` stays exactly as it was and the staging folder is removed. Whatever writes
    into the staging folder (a thread, a child process) must be finished before the block ends.

    Args:
        target: The folder to build (its parent is created).
        tag: Names the staging folders of one kind of job (``".tmp-<target>.<tag>-<pid>-..."``).

    Yields:
        The empty staging folder.
    """
    target = Path(target)
    if target.name in {"", ".", ".."}:
        target = target.resolve()  # the staging folder is named after the target
    prefix = f"{TEMP_PREFIX}{target.name}.{tag}-"
    with terminate_unwinds():
        target.parent.mkdir(parents=True, exist_ok=True)
        recover_directory(target)
        for path in abandoned_paths(target.parent, prefix):
            shutil.rmtree(path, ignore_errors=True)
        staging = target.parent / f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            staging.mkdir()
            yield staging
            with signals_deferred():
                replace_directory(staging, target)
        finally:
            with signals_deferred():  # a second Ctrl-C must not cut the cleanup short
                shutil.rmtree(staging, ignore_errors=True)  # nothing left after a success: it became the target


@contextmanager
def stops_with_this_process(grace_s: float = CHILD_GRACE_S) -> Iterator[list[subprocess.Popen]]:
    """While inside, a SIGTERM to this process (or any exception, Ctrl+C included) stops the children too.

    Yields the list to append each started child to. Without it a stopped sweep or BIDS run leaves its running
    children behind as orphans that work on. Each child still running gets SIGTERM and ``grace_s`` seconds to
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

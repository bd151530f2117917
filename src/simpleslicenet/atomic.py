"""The one way this package writes files: build under a temporary name, then rename into place.

A reader (or a crash) therefore sees either the old file or the complete new one, never half of it,
and no temporary file is left behind when writing fails.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> atomic_write_text(folder / "scores.json", "{}")
    PosixPath('...scores.json')
    >>> with atomic_path(folder / "figure.png") as tmp:  # doctest: +SKIP
    ...     fig.savefig(tmp)
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_text", "replace_directory", "TEMP_PREFIX"]

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


def replace_directory(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move a completely built folder ``staging`` onto ``target``, keeping the old one until it succeeds.

    ``target`` is renamed aside, ``staging`` renamed into its place, and only then is the old folder
    deleted; if the second rename fails the old folder is put back.
    """
    staging, target = Path(staging), Path(target)
    backup = target.with_name(f"{TEMP_PREFIX}{target.name}.previous.{uuid.uuid4().hex}")
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

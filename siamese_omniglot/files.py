"""Atomic file writes (a reader, or a process killed midway, sees the old file or the new one, whole), and folders
made for work that may fail, removed again when it does."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

TEMPORARY_SUFFIX = ".tmp"  # of atomic_write's hidden temporary files, ".<name>.<random><suffix>"


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", suffix: str = TEMPORARY_SUFFIX) -> Iterator[IO]:
    """Open a hidden temporary file beside ``path`` for writing; on success it is flushed, fsynced, made
    world-readable and renamed onto ``path``; on any failure it is removed and ``path`` is left as it was.

    ``handle.name`` is the temporary file's path, for writers that take a path rather than a file.

    Raises:
        OSError: the file cannot be created or written (a full disk, a read-only folder).
    """
    path = Path(path)
    tmp = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed below, before the rename)
        mode, dir=path.parent, prefix=f".{path.name}.", suffix=suffix, delete=False
    )
    try:
        with tmp:
            yield tmp
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp.name, 0o644)  # NamedTemporaryFile's 0600 would hide the file from other users
        os.replace(tmp.name, path)
    except BaseException:
        Path(tmp.name).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files of :func:`atomic_write` to ``path`` that a killed process left behind.

    Call it only where no other process writes ``path`` at the same time (a run resuming in its own folder).
    """
    for stale in path.parent.glob(f".{path.name}.*{TEMPORARY_SUFFIX}"):
        stale.unlink(missing_ok=True)


def make_folders(path: Path) -> list[Path]:
    """Make ``path`` and its missing parents; returns the folders made, innermost first, for :func:`remove_empty`.

    Raises:
        OSError: a folder cannot be made; none made here is left behind.
    """
    made = [folder for folder in (path, *path.parents) if not folder.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        remove_empty(made)
        raise
    return made


def remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` in order, stopping at the first that is not empty (or cannot be removed)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return

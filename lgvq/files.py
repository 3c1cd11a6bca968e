"""Atomic file writes: the one place lgvq and its benchmarks write a file that must never be
left half-done (checkpoints, text caches, metrics, reports, plots, result tables).

A write goes to a temporary file in the target's folder, is flushed to disk, given the mode the
umask allows (``mkstemp`` alone would leave it 0600), and renamed over the target with
``os.replace``; the folder is then synced so the rename itself survives a crash. A kill at any
moment leaves either the old file or the new one, never a partial one, and never a stray
temporary (it is removed when the writer fails).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["append_csv_row", "atomic_path", "atomic_write", "set_aside", "truncate_csv_rows"]


def _umask_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file (0o666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_file(path: str) -> None:
    with open(path, "rb") as stream:
        os.fsync(stream.fileno())


def _fsync_folder(folder: str) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot open or sync a folder
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path`` for a writer that wants a file name (safetensors'
    ``save_file``, matplotlib's ``savefig``); on a clean exit it replaces ``path`` atomically.

    Parent folders are created. If the body raises (or the process is interrupted), the
    temporary is removed and ``path`` is left as it was.
    """
    target = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(target)}.",
                                         suffix=".tmp")
    os.close(handle)
    try:
        yield temporary
        _fsync_file(temporary)
        os.chmod(temporary, _umask_mode())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_folder(folder)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically; returns the path."""
    with atomic_path(path) as temporary:
        mode, encoding = ("wb", None) if isinstance(data, bytes) else ("w", "utf-8")
        with open(temporary, mode, encoding=encoding, newline="" if encoding else None) as f:
            f.write(data)
    return Path(path)


def truncate_csv_rows(path: str | os.PathLike, last_step: int) -> None:
    """Keep only the rows of a metrics CSV with step <= last_step (a resumed run redoes the
    rest); the file is rewritten atomically, or removed when no row is left."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    kept = [row for row in rows if int(row["step"]) <= last_step]
    if not kept:
        path.unlink()
        return
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(kept[0]))
    writer.writeheader()
    writer.writerows(kept)
    atomic_write(path, text.getvalue())


def append_csv_row(path: str | os.PathLike, row: dict) -> None:
    """Append one row and sync it to disk (a log grows by appends; only its truncation on
    resume rewrites the file, atomically)."""
    path = Path(path)
    new = not path.exists()
    with open(path, "a", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
        stream.flush()
        os.fsync(stream.fileno())


def set_aside(folder: str | os.PathLike) -> Path:
    """Rename ``folder`` to ``<folder>.previous-N`` (the first N free) and return the new path:
    a run that must not be continued or overwritten keeps its results beside the new one."""
    folder = Path(folder)
    number = 1
    while folder.with_name(f"{folder.name}.previous-{number}").exists():
        number += 1
    target = folder.with_name(f"{folder.name}.previous-{number}")
    folder.rename(target)
    return target


"""Atomic file writes, shared by every script (torch-free, so prepare_shards.py and fake_celeba.py can use it).

A file is written to a temporary name beside its target, fsynced, renamed over the target (atomic on POSIX) and the
folder fsynced: a reader, or a run killed at any moment, sees the old file or the complete new one, never a part.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO, Callable


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside `folder` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], Any], *, tmp: Path | None = None,
                 durable: bool = True, before_replace: Callable[[], Any] | None = None) -> Path:
    """Write `data` (bytes, or a function that writes to the open file) to `path` atomically; returns the path.

    tmp: the temporary name (default ".NAME.tmp-PID" beside `path`; a caller that recognises its own leftovers after a
    kill passes its own). durable=False skips both fsyncs (the rename is still atomic; a power cut may lose the file).
    before_replace: called once the temporary file is complete, just before the rename (a test hook for kills).
    The folder is created if needed; a failure leaves no temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tmp) if tmp is not None else path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                data(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Atomic file writes: write to a temporary file next to the destination, then ``os.replace`` it into place, so a
reader (a serving app reloading weights, a datastore watcher) sees the old file or the complete new one, never a
partial write."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path"]


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary file name in ``path``'s folder to write to; on success it is synced and renamed to
    ``path``, on any error deleted (the previous ``path`` stays as it was).

    Args:
        path: the destination (its folder is created).
        suffix: the temporary file's suffix (writers that pick a format from the extension need the real one).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

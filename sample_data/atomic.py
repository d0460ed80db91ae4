"""Atomic file writes: write next to the destination (same file system), then ``os.replace``.

A reader (or MONAI Label's datastore watcher) therefore sees either the old file or the complete new one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import SimpleITK as sitk

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_image"]

# mkstemp creates files readable by the owner only; give the final file the permissions open() would.
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def atomic_write_image(image: sitk.Image, path: Path, staging_dir: Path) -> None:
    """Write ``image`` to ``path`` through a file in ``staging_dir``.

    SimpleITK picks the writer from the file name, so the temporary file keeps the real extension; it lives in
    ``staging_dir`` (a hidden folder on the same file system) so that no half-written ``*.nii.gz`` ever appears
    in a folder a datastore scans.
    """
    path = Path(path)
    staging_dir = Path(staging_dir)
    staging_dir.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="partial-", suffix="-" + path.name, dir=staging_dir)
    os.close(fd)
    try:
        sitk.WriteImage(image, tmp, True)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

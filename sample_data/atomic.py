# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Sample-data files written through the project's atomic writer (:mod:`atomic_io`, standard library only, so
``sample_data`` still imports no torch).

A reader (or MONAI Label's datastore watcher) therefore sees either the old file or the complete new one, and files
get the mode ``open()`` would give them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from atomic_io import atomic_path, atomic_write_bytes, new_dir_mode

__all__ = ["DIR_MODE", "atomic_write_bytes", "atomic_write_image", "atomic_write_json"]

# the mode os.mkdir would give (folders made by tempfile.mkdtemp are owner-only)
DIR_MODE = new_dir_mode()


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def atomic_write_image(image: sitk.Image, path: Path, staging_dir: Path) -> None:
    """Write ``image`` to ``path`` through a file in ``staging_dir``.

    SimpleITK picks the writer from the file name, so the temporary file keeps the real extension; it lives in
    ``staging_dir`` (a hidden folder on the same file system) so that no half-written ``*.nii.gz`` ever appears
    in a folder a datastore scans.
    """
    with atomic_path(path, suffix="-" + Path(path).name, staging_dir=staging_dir) as tmp:
        sitk.WriteImage(image, tmp, True)

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Private copies of the sample liver datastore, for the tests and the benchmarks (the server writes into its
datastore: it must never be the user's ``.data/datastore/liver``)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["copy_sample_datastore"]

_PRISTINE: Path | None = None


def _pristine_sample_datastore() -> Path:
    """The sample liver datastore built afresh by this test process into a temporary folder (once; ~3 s), never
    ``.data/datastore/liver``, which ``make serve`` users write labels and images into."""
    global _PRISTINE
    if _PRISTINE is None or not _PRISTINE.is_dir():
        import atexit

        from sample_data import build_datastore

        root = Path(tempfile.mkdtemp(prefix="medattn_pristine_datastore_"))
        atexit.register(shutil.rmtree, root, True)
        _PRISTINE = Path(build_datastore(("liver",), root / "liver").path)
    return _PRISTINE


def copy_sample_datastore(destination: str | os.PathLike, images: Sequence[str] | None = None) -> Path:
    """Copy the sample liver datastore (built by :mod:`sample_data` from the fetched sample data into a private
    temporary folder, not the user's ``.data/datastore/liver``) to ``destination``.

    Args:
        destination: new folder (must not exist or be empty).
        images: image ids to keep (default all); their ``labels/final`` files come along.

    Returns:
        the copy, ready to pass as ``--studies``.
    """
    source = _pristine_sample_datastore()
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    (destination / "labels" / "final").mkdir(parents=True, exist_ok=True)
    for image in sorted(source.glob("*.nii.gz")):
        image_id = image.name[: -len(".nii.gz")]
        if images is not None and image_id not in images:
            continue
        shutil.copy2(image, destination / image.name)
        label = source / "labels" / "final" / image.name
        if label.exists():
            shutil.copy2(label, destination / "labels" / "final" / image.name)
    notes = source / "datastore_notes.json"
    if notes.exists():
        shutil.copy2(notes, destination / notes.name)
    return destination

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Atomic file writes shared by every package of the project (standard library only: no torch, no numpy).

>>> with atomic_path("weights.pt") as tmp:
...     torch.save(state, tmp)                   # readers see the old file or the complete new one
>>> atomic_write_text("stats.json", json.dumps(stats))
"""

from atomic_io.writer import (
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    current_umask,
    fsync_directory,
    new_dir_mode,
    new_file_mode,
)

__all__ = [
    "atomic_open",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "current_umask",
    "fsync_directory",
    "new_dir_mode",
    "new_file_mode",
]

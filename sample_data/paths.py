# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Where the sample-data cache lives."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATA_DIR_ENV", "REPO_ROOT", "default_data_dir", "resolve_data_dir"]

DATA_DIR_ENV = "MEDATTN_DATA_DIR"
REPO_ROOT = Path(__file__).resolve().parent.parent


def default_data_dir() -> Path:
    """``$MEDATTN_DATA_DIR`` if set, else ``<repo>/.data`` (git-ignored)."""
    configured = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(configured).expanduser().resolve() if configured else REPO_ROOT / ".data"


def resolve_data_dir(data_dir: Path | str | None) -> Path:
    return Path(data_dir).expanduser().resolve() if data_dir is not None else default_data_dir()

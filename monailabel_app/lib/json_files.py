# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Small JSON files written atomically (stats, card caches)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

__all__ = ["atomic_write_json", "read_json"]


def atomic_write_json(path: str, payload: dict[str, Any]) -> None:
    """Write JSON to a temporary file in the same folder, then ``os.replace`` it into place."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, default=str)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: str) -> dict[str, Any]:
    """The JSON object in ``path``; ``{}`` when missing or unreadable."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as handle:
            value = json.load(handle)
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Small JSON files written atomically (stats, card caches)."""

from __future__ import annotations

import json
import os
from typing import Any

from atomic_io import atomic_write_text

__all__ = ["atomic_write_json", "read_json"]


def atomic_write_json(path: str, payload: dict[str, Any]) -> None:
    """Write JSON through the project's atomic writer (:mod:`atomic_io`); values JSON cannot hold become strings."""
    atomic_write_text(path, json.dumps(payload, indent=2, default=str))


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

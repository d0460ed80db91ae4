# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Tables keyed by module type, looked up along the class hierarchy (a subclass inherits its base's entry)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

__all__ = ["lookup_by_type"]

Entry = TypeVar("Entry")


def lookup_by_type(table: Mapping[type, Entry], obj: object) -> Entry | None:
    """The entry of the nearest class of ``obj``'s method resolution order that ``table`` has, None when none."""
    for cls in type(obj).__mro__:
        if cls in table:
            return table[cls]
    return None

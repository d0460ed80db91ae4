# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Checks of constructor arguments that many networks and layers share, so their errors read the same."""

from __future__ import annotations

__all__ = ["SUPPORTED_SPATIAL_DIMS", "check_spatial_dims"]

SUPPORTED_SPATIAL_DIMS = (2, 3)


def check_spatial_dims(spatial_dims: int) -> int:
    """``spatial_dims`` when it is 2 or 3 (images or volumes); a ValueError naming the bad value otherwise."""
    if spatial_dims not in SUPPORTED_SPATIAL_DIMS:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
    return spatial_dims

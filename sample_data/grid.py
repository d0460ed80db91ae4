# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Voxel-grid helpers: compare image geometries and find one volume's voxels inside another."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

__all__ = ["grid_of", "same_grid", "require_same_grid", "find_slab"]


def grid_of(image: sitk.Image) -> dict:
    """Size (x, y, z), spacing (mm), origin (mm, LPS) and direction cosines of ``image``, as plain lists."""
    return {
        "size": list(image.GetSize()),
        "spacing": [float(v) for v in image.GetSpacing()],
        "origin": [float(v) for v in image.GetOrigin()],
        "direction": [float(v) for v in image.GetDirection()],
    }


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-5) -> bool:
    """True if both images have the same size and (within ``tolerance``) spacing, origin and direction."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=tolerance)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=tolerance)
        and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=tolerance)
    )


def require_same_grid(image: sitk.Image, label: sitk.Image, what: str) -> None:
    if not same_grid(image, label, tolerance=1e-3):
        raise ValueError(f"{what}: label grid {grid_of(label)} differs from image grid {grid_of(image)}")


def find_slab(large: np.ndarray, small: np.ndarray) -> tuple[int, int] | None:
    """Find ``small`` as a contiguous slab of ``large`` with identical values.

    Args:
        large: array of shape (D0, D1, D2).
        small: array equal in all but one axis, where it is no longer than ``large``.

    Returns:
        ``(axis, start)`` such that ``np.take(large, range(start, start + n), axis) == small`` exactly, or None.
    """
    if large.ndim != small.ndim:
        return None
    for axis in range(large.ndim):
        others_equal = all(large.shape[a] == small.shape[a] for a in range(large.ndim) if a != axis)
        if not others_equal or small.shape[axis] > large.shape[axis]:
            continue
        count = small.shape[axis]
        first = np.take(small, 0, axis=axis)
        for start in range(large.shape[axis] - count + 1):
            if not np.array_equal(np.take(large, start, axis=axis), first):
                continue
            if np.array_equal(np.take(large, range(start, start + count), axis=axis), small):
                return axis, start
    return None

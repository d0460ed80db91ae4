# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Assertions on images read back from the server: arrays and their physical grids (SimpleITK)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

__all__ = ["read_array", "assert_same_grid"]


def read_array(path: str | Path) -> tuple[np.ndarray, sitk.Image]:
    """``(array in (z, y, x) order, the SimpleITK image)`` of an image file."""
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def assert_same_grid(a: sitk.Image, b: sitk.Image, origin_atol: float = 1e-4) -> None:
    """Same size, spacing, origin (to ``origin_atol`` mm) and direction."""
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=origin_atol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-6)

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Over/under-segmentation overlay: where a prediction agrees with, exceeds or misses a reference.

Comparison map values (the same as the server's ``reference`` inference answer, docs/server_api.md):

=====  ==========================================  ======
value  meaning                                     colour
=====  ==========================================  ======
0      background in both                          -
1      agreement (prediction and reference)        white
2      over-segmentation (prediction only)         green
3      under-segmentation (reference only)         red
=====  ==========================================  ======

Pure numpy; the panel turns :attr:`OverUnderOverlay.segments` into segments of a segmentation node.
Arrays are indexed like ``slicer.util.arrayFromVolume`` (K, J, I), so pass the spacing in that same
axis order: ``tuple(reversed(volumeNode.GetSpacing()))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

__all__ = [
    "BACKGROUND",
    "AGREEMENT",
    "OVER_SEGMENTATION",
    "UNDER_SEGMENTATION",
    "SEGMENT_STYLES",
    "OverlaySegment",
    "OverUnderOverlay",
    "binary_mask",
    "comparison_map",
    "dice_coefficient",
    "voxel_volume_ml",
    "overlay_from_masks",
    "overlay_from_comparison_map",
]

BACKGROUND = 0
AGREEMENT = 1
OVER_SEGMENTATION = 2
UNDER_SEGMENTATION = 3

#: value -> (segment name, RGB colour in [0, 1])
SEGMENT_STYLES: Dict[int, Tuple[str, Tuple[float, float, float]]] = {
    AGREEMENT: ("Agreement", (1.0, 1.0, 1.0)),
    OVER_SEGMENTATION: ("Over-segmentation", (0.0, 1.0, 0.0)),
    UNDER_SEGMENTATION: ("Under-segmentation", (1.0, 0.0, 0.0)),
}


@dataclass
class OverlaySegment:
    """One coloured segment of the overlay.

    Attributes:
        name: "Agreement", "Over-segmentation" or "Under-segmentation".
        value: its value in the comparison map (1, 2, 3).
        color: RGB in [0, 1].
        voxels: number of voxels.
        volume_ml: volume in millilitres.
    """

    name: str
    value: int
    color: Tuple[float, float, float]
    voxels: int
    volume_ml: float

    def mask(self, comparison: np.ndarray) -> np.ndarray:
        """Binary uint8 mask of this segment in ``comparison`` (same shape)."""
        return (np.asarray(comparison) == self.value).astype(np.uint8)


@dataclass
class OverUnderOverlay:
    """Comparison of a prediction with a reference.

    Attributes:
        comparison: uint8 comparison map (values 0..3), shape of the inputs.
        spacing_mm: voxel spacing in the array's axis order.
        segments: Agreement, Over-segmentation, Under-segmentation (always all three, in that order).
        dice: Dice coefficient of prediction and reference (1.0 when both are empty).
        reference: what the prediction was compared with (for the panel's text).
        server_figures: the server's ``comparison`` JSON when the map came from the server.
    """

    comparison: np.ndarray
    spacing_mm: Tuple[float, ...]
    segments: List[OverlaySegment]
    dice: float
    reference: str = ""
    server_figures: Dict[str, Any] = field(default_factory=dict)

    def segment(self, value: int) -> OverlaySegment:
        for segment in self.segments:
            if segment.value == value:
                return segment
        raise KeyError(f"No overlay segment with value {value}")

    @property
    def voxel_ml(self) -> float:
        return voxel_volume_ml(self.spacing_mm)

    @property
    def agreement_ml(self) -> float:
        return self.segment(AGREEMENT).volume_ml

    @property
    def over_ml(self) -> float:
        return self.segment(OVER_SEGMENTATION).volume_ml

    @property
    def under_ml(self) -> float:
        return self.segment(UNDER_SEGMENTATION).volume_ml

    @property
    def prediction_ml(self) -> float:
        return self.agreement_ml + self.over_ml

    @property
    def reference_ml(self) -> float:
        return self.agreement_ml + self.under_ml

    def summary(self) -> Dict[str, Any]:
        """The figures in the server's ``comparison`` field layout."""
        return {
            "reference": self.reference,
            "dice": self.dice,
            "agreement_voxels": self.segment(AGREEMENT).voxels,
            "over_voxels": self.segment(OVER_SEGMENTATION).voxels,
            "under_voxels": self.segment(UNDER_SEGMENTATION).voxels,
            "agreement_ml": self.agreement_ml,
            "over_ml": self.over_ml,
            "under_ml": self.under_ml,
            "voxel_ml": self.voxel_ml,
        }


def voxel_volume_ml(spacing_mm: Sequence[float]) -> float:
    """Volume of one voxel in ml (1 ml = 1000 mm^3).

    Raises:
        ValueError: when a spacing is not a positive finite number.
    """
    values = [float(s) for s in spacing_mm]
    if not values or any(not math.isfinite(s) or s <= 0 for s in values):
        raise ValueError(f"Voxel spacing must be positive finite numbers (mm), got {tuple(spacing_mm)}")
    return float(np.prod(values)) / 1000.0


def binary_mask(label_map: np.ndarray, label: Optional[int] = None, name: str = "label map") -> np.ndarray:
    """Boolean mask of ``label`` in ``label_map`` (any non-zero voxel when ``label`` is None).

    Raises:
        ValueError: when the map holds NaN or is empty.
    """
    array = np.asarray(label_map)
    if array.size == 0:
        raise ValueError(f"The {name} is empty (shape {array.shape})")
    if array.dtype.kind == "f" and np.isnan(array).any():
        raise ValueError(f"The {name} contains NaN values")
    if label is None:
        return array != 0
    return array == label


def dice_coefficient(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two boolean masks: 2|P and R| / (|P| + |R|); 1.0 when both are empty."""
    p = np.asarray(prediction, dtype=bool)
    r = np.asarray(reference, dtype=bool)
    if p.shape != r.shape:
        raise ValueError(f"Masks differ in shape: prediction {p.shape}, reference {r.shape}")
    total = int(p.sum()) + int(r.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, r).sum()) / total


def comparison_map(prediction_mask: np.ndarray, reference_mask: np.ndarray) -> np.ndarray:
    """uint8 map: 1 where both are set, 2 prediction only, 3 reference only, 0 elsewhere."""
    p = np.asarray(prediction_mask, dtype=bool)
    r = np.asarray(reference_mask, dtype=bool)
    if p.shape != r.shape:
        raise ValueError(f"Prediction {p.shape} and reference {r.shape} differ in shape")
    result = np.zeros(p.shape, dtype=np.uint8)
    result[p & r] = AGREEMENT
    result[p & ~r] = OVER_SEGMENTATION
    result[~p & r] = UNDER_SEGMENTATION
    return result


def overlay_from_masks(
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing_mm: Sequence[float],
    prediction_label: Optional[int] = None,
    reference_label: Optional[int] = None,
    reference_name: str = "",
) -> OverUnderOverlay:
    """Overlay from a prediction and a reference label map on the same grid.

    Args:
        prediction: label map (any integer or float dtype), shape (K, J, I) or (H, W).
        reference: label map of the same shape.
        spacing_mm: voxel spacing in the arrays' axis order.
        prediction_label, reference_label: the label value to compare (any non-zero when None).
        reference_name: shown in the panel ("segment 'liver'", "final label"...).
    """
    p = binary_mask(prediction, prediction_label, "prediction")
    r = binary_mask(reference, reference_label, "reference")
    if p.shape != r.shape:
        raise ValueError(f"Prediction {p.shape} and reference {r.shape} are not on the same grid")
    _check_spacing(spacing_mm, p.ndim)
    return _build(comparison_map(p, r), spacing_mm, dice_coefficient(p, r), reference_name, {})


def overlay_from_comparison_map(
    comparison: np.ndarray,
    spacing_mm: Sequence[float],
    reference_name: str = "",
    server_figures: Optional[Dict[str, Any]] = None,
) -> OverUnderOverlay:
    """Overlay from a comparison map (values 0..3), e.g. the server's ``reference`` answer.

    The Dice is recomputed from the map (2A / (2A + O + U)); the server's figures are kept alongside.

    Raises:
        ValueError: when the map holds values other than 0, 1, 2, 3.
    """
    array = np.asarray(comparison)
    if array.size == 0:
        raise ValueError(f"The comparison map is empty (shape {array.shape})")
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise ValueError("The comparison map contains NaN or infinite values")
        rounded = np.rint(array)
        if not np.allclose(array, rounded, atol=1e-3):
            raise ValueError("The comparison map holds non-integer values; expected 0, 1, 2, 3")
        array = rounded
    values = np.unique(array)
    unexpected = [v for v in values.tolist() if v not in (0, 1, 2, 3)]
    if unexpected:
        raise ValueError(f"The comparison map holds values {unexpected[:10]}; expected only 0, 1, 2, 3")
    _check_spacing(spacing_mm, array.ndim)
    cmap = array.astype(np.uint8)
    agreement = int((cmap == AGREEMENT).sum())
    over = int((cmap == OVER_SEGMENTATION).sum())
    under = int((cmap == UNDER_SEGMENTATION).sum())
    denominator = 2 * agreement + over + under
    dice = 1.0 if denominator == 0 else 2.0 * agreement / denominator
    return _build(cmap, spacing_mm, dice, reference_name, dict(server_figures or {}))


def _check_spacing(spacing_mm: Sequence[float], ndim: int) -> None:
    if len(tuple(spacing_mm)) != ndim:
        raise ValueError(f"Spacing {tuple(spacing_mm)} has {len(tuple(spacing_mm))} values for a {ndim}-D array")
    voxel_volume_ml(spacing_mm)


def _build(
    cmap: np.ndarray, spacing_mm: Sequence[float], dice: float, reference_name: str, server_figures: Dict[str, Any]
) -> OverUnderOverlay:
    voxel_ml = voxel_volume_ml(spacing_mm)
    counts = np.bincount(cmap.ravel(), minlength=4)
    segments = [
        OverlaySegment(
            name=SEGMENT_STYLES[value][0],
            value=value,
            color=SEGMENT_STYLES[value][1],
            voxels=int(counts[value]),
            volume_ml=float(counts[value]) * voxel_ml,
        )
        for value in (AGREEMENT, OVER_SEGMENTATION, UNDER_SEGMENTATION)
    ]
    return OverUnderOverlay(
        comparison=cmap,
        spacing_mm=tuple(float(s) for s in spacing_mm),
        segments=segments,
        dice=float(dice),
        reference=reference_name,
        server_figures=server_figures,
    )

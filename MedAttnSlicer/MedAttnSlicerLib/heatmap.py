# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Explanation (saliency) maps of classifiers as heat-map overlays.

The server answers a classification with a float map on the input image's grid (RISE, Grad-CAM,
attention rollout or class attention; request param ``explain``) that is non-zero only on the
classified axial slice. The panel shows it over the image as a heat map: this module turns the raw
float map into values in [0, 1] on the voxels where it is defined, then into indices of a cold-to-hot
colour table whose entry 0 (not explained) is transparent; the widget copies both into a volume and a
colour node. Pure numpy.

Arrays are indexed like ``slicer.util.arrayFromVolume`` and ``SimpleITK.GetArrayFromImage``: (K, J, I),
the reverse of the image's index axes (I, J, K).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

__all__ = [
    "EXPLANATION_METHODS",
    "EXPLANATION_TITLES",
    "DEFAULT_EXPLANATION",
    "HeatMap",
    "explanation_key",
    "explanation_title",
    "explanation_methods",
    "default_explanation",
    "axial_index_axis",
    "axial_array_axis",
    "heat_map_from_saliency",
    "heat_map_colors",
    "heat_map_indices",
]

#: The ``explain`` values of the server contract (docs/server_api.md), in the order the panel lists them.
EXPLANATION_METHODS: Tuple[str, ...] = ("rise", "grad_cam", "attention_rollout", "class_attention")
EXPLANATION_TITLES: Dict[str, str] = {
    "rise": "RISE (random masks)",
    "grad_cam": "Grad-CAM",
    "attention_rollout": "Attention rollout",
    "class_attention": "Class attention",
}
#: What a server that does not list explanations computes.
DEFAULT_EXPLANATION = "rise"

# Anchors of the cold-to-hot ramp (blue, cyan, green, yellow, red), like Slicer's ColdToHotRainbow.
_RAMP_ANCHORS = np.array(
    [
        [0.0, 0.0, 0.0, 1.0],
        [0.25, 0.0, 1.0, 1.0],
        [0.5, 0.0, 1.0, 0.0],
        [0.75, 1.0, 1.0, 0.0],
        [1.0, 1.0, 0.0, 0.0],
    ]
)


def explanation_key(name: Any) -> str:
    """Canonical method key: ``"RISE"`` -> ``"rise"``, ``"Grad-CAM"`` -> ``"grad_cam"``."""
    return "_".join(str(name or "").strip().lower().replace("-", " ").replace("_", " ").split())


def explanation_title(name: Any) -> str:
    """Text for the method picker ("Grad-CAM"); unknown methods keep their own name."""
    key = explanation_key(name)
    return EXPLANATION_TITLES.get(key, str(name))


def explanation_methods(model_entry: Optional[Dict[str, Any]]) -> List[str]:
    """Explanation methods a classifier offers: ``/info/`` ``models[name]["explanations"]``, else ``["rise"]``.

    Args:
        model_entry: the model's ``/info/`` entry (a dict; None for none).

    Raises:
        ValueError: when ``explanations`` is present but not a list of names.
    """
    listed = (model_entry or {}).get("explanations")
    if listed is None:
        return [DEFAULT_EXPLANATION]
    if isinstance(listed, str) or not isinstance(listed, (list, tuple)):
        raise ValueError(f"'explanations' must be a list of method names, got {listed!r}")
    methods: List[str] = []
    for name in listed:
        key = explanation_key(name)
        if not key:
            raise ValueError(f"'explanations' holds an empty method name: {listed!r}")
        if key not in methods:
            methods.append(key)
    return methods or [DEFAULT_EXPLANATION]


def default_explanation(model_entry: Optional[Dict[str, Any]]) -> str:
    """The model's ``default_explanation`` when it is one of its methods, else its first method."""
    methods = explanation_methods(model_entry)
    wanted = explanation_key((model_entry or {}).get("default_explanation"))
    return wanted if wanted in methods else methods[0]


def axial_index_axis(direction: Sequence[float]) -> int:
    """Image index axis (0 = I, 1 = J, 2 = K) most aligned with superior-inferior.

    This is the axis the server's classification ``slice`` counts along. ``direction`` is the 3x3
    direction matrix (9 values, row-major; columns are the index axes), in LPS (ITK, SimpleITK) or RAS
    (Slicer's IJK-to-RAS without spacing) alike: both share the superior axis.

    Raises:
        ValueError: when ``direction`` is not 9 finite numbers with non-zero columns.
    """
    matrix = np.asarray(direction, dtype=np.float64)
    if matrix.size != 9 or not np.isfinite(matrix).all():
        raise ValueError(f"A direction must be 9 finite numbers (3x3), got {tuple(np.ravel(direction))}")
    matrix = matrix.reshape(3, 3)
    norms = np.linalg.norm(matrix, axis=0)
    if np.any(norms == 0):
        raise ValueError(f"Direction {tuple(matrix.ravel())} has a zero column")
    return int(np.argmax(np.abs(matrix[2] / norms)))


def axial_array_axis(direction: Sequence[float]) -> int:
    """The (K, J, I) array axis of :func:`axial_index_axis` (index axis 2 -> array axis 0)."""
    return 2 - axial_index_axis(direction)


@dataclass
class HeatMap:
    """A saliency map ready to show as a heat map.

    Attributes:
        values: float32 in [0, 1], the raw map rescaled over the voxels where it is defined (0 elsewhere);
            same shape as the raw map.
        shown: boolean mask of the voxels to draw (where the map is defined); the others stay transparent.
        low, high: the raw values mapped to 0 and 1.
        method: explanation method key ("rise", "grad_cam", ...).
        array_axis, slice_index: where the map is defined: the array axis and index of its slice, or None
            when it is not confined to one slice (2D images, or a map spread over several slices).
        peak: array index of the maximum, for jumping the views there.
    """

    values: np.ndarray
    shown: np.ndarray
    low: float
    high: float
    method: str
    array_axis: Optional[int]
    slice_index: Optional[int]
    peak: Tuple[int, ...]

    @property
    def title(self) -> str:
        return explanation_title(self.method)

    def slice_values(self) -> np.ndarray:
        """The 2D heat map of the classified slice (the whole map when it is 2D or not confined)."""
        if self.array_axis is None or self.slice_index is None:
            return self.values
        return np.take(self.values, self.slice_index, axis=self.array_axis)


def heat_map_from_saliency(
    saliency: np.ndarray,
    method: str = DEFAULT_EXPLANATION,
    direction: Optional[Sequence[float]] = None,
    slice_index: Optional[int] = None,
    clip_percentiles: Tuple[float, float] = (0.0, 100.0),
) -> HeatMap:
    """Rescale a raw saliency map to [0, 1] over the voxels where it is defined.

    The server writes the map on the whole input grid and zeros outside the classified slice. For a volume,
    pass the image ``direction`` and the result's ``slice``: the map is then read on that slice (along
    :func:`axial_array_axis`) and must be zero elsewhere. Without them, every non-zero voxel is defined
    (a 2D map: every voxel).

    Args:
        saliency: float map, shape (K, J, I) or (H, W).
        method: the explanation method the server used (``saliency`` of the result).
        direction: the image's 3x3 direction matrix (9 values), for volumes.
        slice_index: the classified slice along the axial index axis (the result's ``slice``).
        clip_percentiles: raw values below/above these percentiles of the defined voxels saturate; (0, 100)
            keeps the full range.

    Raises:
        ValueError: for an empty map, NaN/Inf, a slice outside the volume, non-zero values off that slice, or
            a map that is constant zero.
    """
    raw = np.asarray(saliency, dtype=np.float64)
    if raw.size == 0:
        raise ValueError(f"The saliency map is empty (shape {raw.shape})")
    if not np.isfinite(raw).all():
        raise ValueError("The saliency map contains NaN or infinite values")
    lower_pct, upper_pct = (float(p) for p in clip_percentiles)
    if not 0.0 <= lower_pct < upper_pct <= 100.0:
        raise ValueError(f"clip_percentiles must satisfy 0 <= low < high <= 100, got {clip_percentiles}")

    array_axis: Optional[int] = None
    if raw.ndim == 3 and slice_index is not None:
        if direction is None:
            raise ValueError("A volume's saliency slice needs the image direction to find the axial axis")
        array_axis = axial_array_axis(direction)
        depth = raw.shape[array_axis]
        if not 0 <= int(slice_index) < depth:
            raise ValueError(f"Saliency slice {slice_index} is outside the volume's {depth} axial slices")
        slice_index = int(slice_index)
        defined = np.zeros(raw.shape, dtype=bool)
        index: List[Any] = [slice(None)] * raw.ndim
        index[array_axis] = slice_index
        defined[tuple(index)] = True
        stray = np.abs(raw[~defined]).max() if (~defined).any() else 0.0
        if stray > 0:
            raise ValueError(
                f"The saliency map is non-zero off the classified slice {slice_index} (array axis {array_axis}); "
                "is the slice counted along another axis?"
            )
    elif raw.ndim == 3:
        defined = raw != 0
        slices = np.flatnonzero(defined.any(axis=(1, 2)))
        if slices.size == 1:  # confined to one slice of the K axis: report it
            array_axis, slice_index = 0, int(slices[0])
    else:
        defined = np.ones(raw.shape, dtype=bool)
        slice_index = None
    if not defined.any() or not np.any(raw[defined] != 0):
        raise ValueError("The saliency map is zero everywhere: nothing to show")

    inside = raw[defined]
    low = float(np.percentile(inside, lower_pct)) if lower_pct > 0 else float(inside.min())
    high = float(np.percentile(inside, upper_pct)) if upper_pct < 100 else float(inside.max())
    values = np.zeros(raw.shape, dtype=np.float32)
    if high > low:
        values[defined] = np.clip((inside - low) / (high - low), 0.0, 1.0)
    else:  # a flat map: show it evenly at the top of the scale
        values[defined] = 1.0
    peak = tuple(int(i) for i in np.unravel_index(int(np.argmax(np.where(defined, raw, -np.inf))), raw.shape))
    return HeatMap(
        values=values,
        shown=defined,
        low=low,
        high=high,
        method=explanation_key(method) or DEFAULT_EXPLANATION,
        array_axis=array_axis,
        slice_index=slice_index,
        peak=peak,
    )


def heat_map_colors(count: int = 256, transparent_first: bool = True) -> np.ndarray:
    """Cold-to-hot colour table: (count, 4) RGBA floats in [0, 1], blue (low) -> red (high).

    With ``transparent_first`` entry 0 is fully transparent: the widget stores "not explained" voxels as 0
    and defined voxels as 1..count-1.

    Raises:
        ValueError: for fewer than 3 entries.
    """
    count = int(count)
    if count < 3:
        raise ValueError(f"A heat-map colour table needs at least 3 entries, got {count}")
    first = 1 if transparent_first else 0
    positions = np.linspace(0.0, 1.0, count - first)
    table = np.ones((count, 4), dtype=np.float64)
    for channel in range(3):
        table[first:, channel] = np.interp(positions, _RAMP_ANCHORS[:, 0], _RAMP_ANCHORS[:, channel + 1])
    if transparent_first:
        table[0] = (0.0, 0.0, 0.0, 0.0)
    return table


def heat_map_indices(heat_map: HeatMap, count: int = 256) -> np.ndarray:
    """Colour-table indices of a heat map: 0 where nothing is shown, 1..count-1 for values 0..1.

    The widget puts this into a volume displayed with :func:`heat_map_colors` (entry 0 transparent), so only
    the explained voxels are drawn over the image.
    """
    count = int(count)
    if count < 3:
        raise ValueError(f"A heat-map colour table needs at least 3 entries, got {count}")
    dtype = np.uint8 if count <= 256 else np.uint16
    indices = np.zeros(heat_map.values.shape, dtype=dtype)
    scaled = 1 + np.rint(heat_map.values[heat_map.shown] * (count - 2))
    indices[heat_map.shown] = scaled.astype(dtype)
    return indices

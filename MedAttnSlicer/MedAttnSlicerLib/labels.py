# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Label values <-> named segments, the bridge between server label maps and Slicer segments.

A MONAI Label model lists its labels either as a list of names (values 1, 2, ...) or as a
``{name: value}`` dict. The panel shows each value of a returned label map as a named, coloured
segment, and sends an edited segmentation back as one label map using the model's values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

__all__ = ["LabelSegment", "label_values", "segment_color", "split_label_map", "compose_label_map"]

# Distinct colours for predicted organs; the overlay's white/green/red are deliberately absent.
_PALETTE: Tuple[Tuple[float, float, float], ...] = (
    (0.87, 0.51, 0.35),  # liver brown-orange
    (0.35, 0.55, 0.90),
    (0.93, 0.80, 0.30),
    (0.65, 0.40, 0.80),
    (0.30, 0.75, 0.75),
    (0.90, 0.45, 0.65),
    (0.55, 0.70, 0.35),
    (0.60, 0.60, 0.60),
)


@dataclass
class LabelSegment:
    """One label value found in a label map.

    Attributes:
        name: the model's label name ("Label 7" when the model does not name the value).
        value: the label value.
        color: RGB in [0, 1].
        voxels: number of voxels with this value.
    """

    name: str
    value: int
    color: Tuple[float, float, float]
    voxels: int


def label_values(labels: Any) -> Dict[str, int]:
    """Normalise a model's ``labels`` (list of names or ``{name: value}``) to ``{name: value}``.

    Background (value 0 or the name "background") is left out.

    Raises:
        ValueError: for values that are not positive integers or a value used twice.
    """
    if labels is None:
        return {}
    if isinstance(labels, dict):
        items = list(labels.items())
    elif isinstance(labels, (list, tuple)):
        items = [(name, index + 1) for index, name in enumerate(labels)]
    else:
        raise ValueError(f"Model labels must be a list or a dict, got {type(labels).__name__}")
    result: Dict[str, int] = {}
    for name, value in items:
        try:
            number = int(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"Label '{name}' has a non-integer value {value!r}") from error
        if number == 0 or str(name).lower() == "background":
            continue
        if number < 0:
            raise ValueError(f"Label '{name}' has a negative value {number}")
        if number in result.values():
            raise ValueError(f"Label value {number} is used by more than one label name")
        result[str(name)] = number
    return result


def segment_color(index: int) -> Tuple[float, float, float]:
    """Colour for the ``index``-th segment (cycles through a fixed palette)."""
    return _PALETTE[int(index) % len(_PALETTE)]


def split_label_map(label_map: np.ndarray, labels: Any = None, include_absent: bool = False) -> List[LabelSegment]:
    """The non-zero values present in ``label_map`` with names from the model's ``labels``.

    With ``include_absent`` every label of the model is listed, with 0 voxels when absent, so an
    annotator always finds a segment to paint into. Segments are ordered by value.

    Raises:
        ValueError: when the map holds non-integer or NaN values.
    """
    array = np.asarray(label_map)
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise ValueError("The label map contains NaN or infinite values")
        if not np.array_equal(array, np.rint(array)):
            raise ValueError("The label map holds non-integer values; is this a probability or saliency map?")
    elif array.dtype.kind not in "iub":
        raise ValueError(f"The label map has a non-numeric dtype {array.dtype}")
    names = {value: name for name, value in label_values(labels).items()}
    values, counts = np.unique(array.astype(np.int64), return_counts=True)
    present = {int(v): int(c) for v, c in zip(values, counts) if v != 0}
    wanted = sorted(set(present) | (set(names) if include_absent else set()))
    return [
        LabelSegment(
            name=names.get(value, f"Label {value}"),
            value=value,
            color=segment_color(value - 1),
            voxels=present.get(value, 0),
        )
        for value in wanted
    ]


def compose_label_map(
    masks: Sequence[Tuple[str, np.ndarray]], labels: Any = None, dtype: Optional[np.dtype] = None
) -> np.ndarray:
    """One label map from named binary masks, using the model's label values for known names.

    Names are matched case-insensitively; unknown names get the next values above the model's.
    Where masks overlap, the later mask wins (like painting segments in order).

    Args:
        masks: (segment name, mask) pairs, all of the same shape.
        labels: the model's ``labels``.
        dtype: output dtype (uint8 up to 255 labels, else uint16, when omitted).

    Raises:
        ValueError: for no masks or masks of different shapes.
    """
    if not masks:
        raise ValueError("No segments to export: the segmentation is empty")
    known = {name.lower(): value for name, value in label_values(labels).items()}
    shape = np.asarray(masks[0][1]).shape
    next_value = max(known.values(), default=0) + 1
    assigned: List[Tuple[int, np.ndarray]] = []
    for name, mask in masks:
        array = np.asarray(mask)
        if array.shape != shape:
            raise ValueError(f"Segment '{name}' has shape {array.shape}, expected {shape}")
        value = known.get(str(name).lower())
        if value is None:
            value = next_value
            next_value += 1
        assigned.append((value, array != 0))
    top = max(value for value, _ in assigned)
    out_dtype = dtype or (np.uint8 if top <= 255 else np.uint16)
    result = np.zeros(shape, dtype=out_dtype)
    for value, mask in assigned:
        result[mask] = value
    return result

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Quality floors for serving: a bundled model whose measured held-out quality is below its family's floor
(``quality_floor`` of its :mod:`networks.registry` entry) is not loaded by default (``--conf models all`` still
loads it) and ``/info`` marks it experimental, with its figure.

The figures come from ``model/bundled_weights.json``, written by ``make weights`` / ``make requantize``
(:mod:`monailabel_app.train_bundled`): held-out quality on ``example_ct_dicom``, another patient than the training
images, against TotalSegmentator's labels (model outputs, not manual ground truth).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from networks.registry import FAMILIES

__all__ = ["bundled_quality", "below_floor"]

logger = logging.getLogger(__name__)


def _bundled_report(bundled_dir: str) -> dict[str, Any]:
    path = os.path.join(bundled_dir, "bundled_weights.json")
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError) as err:
        logger.warning(f"no bundled quality figures ({path}: {err}); every model counts as above its floor")
        return {}


def bundled_quality(family: str, bundled_dir: str) -> dict[str, Any] | None:
    """The measured held-out quality of a family's bundled weights and its floor, for ``/info``; None for a family
    without a floor (or not registered) or without figures.

    Returns:
        ``{"metric", "values": {precision: value}, "worst", "floor", "experimental", "measured_on", "labels_are"}``.
    """
    entry = FAMILIES.get(family)
    floor = entry.quality_floor if entry is not None else None
    report = _bundled_report(bundled_dir)
    held_out = (report.get("families", {}).get(family) or {}).get("held_out") or {}
    if floor is None or not held_out:
        return None
    values: dict[str, float] = {}
    for figures in held_out.values():  # {image: {precision: {metric: value}}}; the worst image counts
        for precision, numbers in figures.items():
            if floor.metric in numbers:
                values[precision] = min(values.get(precision, 1.0), float(numbers[floor.metric]))
    if not values:
        return None
    worst = min(values.values())
    return {
        "metric": floor.what,
        "values": values,
        "worst": worst,
        "floor": floor.value,
        "experimental": worst < floor.value,
        "measured_on": ", ".join(sorted(held_out)) + " (held out: another patient than the training images)",
        "labels_are": report.get("labels_are", "TotalSegmentator model outputs, not manual ground truth"),
    }


def below_floor(family: str, bundled_dir: str) -> bool:
    """Whether a family's bundled weights measured below its floor (then it is served only on request)."""
    quality = bundled_quality(family, bundled_dir)
    return bool(quality and quality["experimental"])

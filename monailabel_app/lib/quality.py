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


# the figure a family without a floor reports (a floor names its own metric)
_TASK_METRIC = {
    "segmentation": ("dice", "held-out Dice"),
    "classification": ("f1", "held-out organ-presence F1 (pooled over classes and slices)"),
}


def bundled_quality(family: str, bundled_dir: str) -> dict[str, Any] | None:
    """The measured held-out quality of a family's bundled weights, with its interval and floor, for ``/info`` and
    the Slicer panel; None for an unregistered family or one without figures.

    Returns:
        ``{"metric", "values": {precision: value}, "intervals": {precision: [low, high]}, "interval", "worst",
        "floor" (None: no floor), "experimental", "measured_on", "labels_are"}``: per precision the worst held-out
        image counts, with that image's bootstrap 95 % interval over its slices.
    """
    entry = FAMILIES.get(family)
    if entry is None:
        return None
    floor = entry.quality_floor
    metric, what = (floor.metric, floor.what) if floor is not None else _TASK_METRIC[entry.task]
    report = _bundled_report(bundled_dir)
    held_out = (report.get("families", {}).get(family) or {}).get("held_out") or {}
    values: dict[str, float] = {}
    intervals: dict[str, list[float]] = {}
    for figures in held_out.values():  # {image: {precision: {metric: value}}}; the worst image counts
        for precision, numbers in figures.items():
            if metric in numbers and float(numbers[metric]) < values.get(precision, 2.0):
                values[precision] = float(numbers[metric])
                interval = numbers.get(f"{metric}_interval")
                if interval:
                    intervals[precision] = [float(v) for v in interval]
                else:
                    intervals.pop(precision, None)
    if not values:
        return None
    worst = min(values.values())
    return {
        "metric": what,
        "values": values,
        "intervals": intervals,
        "interval": "bootstrap 95 % over the slices of the held-out image (not over patients: one held-out patient)",
        "worst": worst,
        "floor": floor.value if floor is not None else None,
        "experimental": floor is not None and worst < floor.value,
        "measured_on": ", ".join(sorted(held_out)) + " (held out: another patient than the training images)",
        "labels_are": report.get("labels_are", "TotalSegmentator model outputs, not manual ground truth"),
    }


def below_floor(family: str, bundled_dir: str) -> bool:
    """Whether a family's bundled weights measured below its floor (then it is served only on request)."""
    quality = bundled_quality(family, bundled_dir)
    return bool(quality and quality["experimental"])

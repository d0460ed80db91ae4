# Copyright MedAttnSlicer contributors. Apache-2.0.
"""``python -m monailabel_app.model_table``: the README's table of the bundled models, from ``bundled_weights.json``.

Per family: held-out quality of FP32 and INT8 with their bootstrap 95 % intervals, INT8 vs FP32 agreement on the
held-out image, the range of its recipe's leave-one-volume-out figures (``train_bundled --leave-one-out``), and whether
``make serve`` serves it by default (its quality floor, :mod:`monailabel_app.lib.quality`).
``tests/test_model_table.py`` checks that the README shows exactly this table, so the figures live in one place.
"""

from __future__ import annotations

import json
import os
from typing import Any

from monailabel_app.lib.quality import bundled_quality
from networks.registry import FAMILIES

__all__ = ["BUNDLED_DIR", "model_table"]

BUNDLED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")


def _figure(numbers: dict[str, Any] | None, metric: str) -> str:
    if not numbers or metric not in numbers:
        return "-"
    text = f"{float(numbers[metric]):.3f}"
    interval = numbers.get(f"{metric}_interval")
    return text + (f" ({float(interval[0]):.3f}-{float(interval[1]):.3f})" if interval else "")


def _agreement(int8: dict[str, Any] | None) -> str:
    agreement = (int8 or {}).get("agreement_with_fp32") or {}
    if "dice" in agreement:
        return "Dice " + _figure(agreement, "dice")
    if "decisions" in agreement:
        return f"{float(agreement['decisions']):.2f} of decisions"
    return "-"


def _leave_one_out(figures: dict[str, Any] | None) -> str:
    """``min-max`` of the FP32 figure over the folds, with the volume of each end, or ``-`` when not measured."""
    if not figures or "fp32" not in figures.get("summary", {}):
        return "-"
    metric, folds = figures["metric"], figures["folds"]
    by_value = sorted(folds, key=lambda volume: float(folds[volume]["fp32"][metric]))
    low, high = by_value[0], by_value[-1]
    return (
        f"{float(folds[low]['fp32'][metric]):.3f} ({low})-{float(folds[high]['fp32'][metric]):.3f} ({high}), "
        f"{len(folds)} folds"
    )


def model_table(bundled_dir: str = BUNDLED_DIR) -> str:
    """The markdown table (one row per family with held-out figures, in registry order)."""
    with open(os.path.join(bundled_dir, "bundled_weights.json")) as handle:
        report = json.load(handle)
    rows = [
        "| Family | Task, held-out metric | FP32 (95 % CI) | INT8 (95 % CI) | INT8 vs FP32 (held out) "
        "| Leave-one-volume-out FP32, worst-best | Served by default |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for family, entry in FAMILIES.items():
        quality = bundled_quality(family, bundled_dir)
        reported = (report.get("families") or {}).get(family) or {}
        held_out = reported.get("held_out") or {}
        if quality is None or not held_out:
            continue
        metric = "dice" if entry.task == "segmentation" else "f1"
        worst = min(held_out, key=lambda image: min(float(p.get(metric, 2.0)) for p in held_out[image].values()))
        figures = held_out[worst]
        floor = quality["floor"]
        served = "yes" if not quality["experimental"] else f"no: below its floor {floor:.2f} (`--conf models all`)"
        if served == "yes" and floor is not None:
            served = f"yes (floor {floor:.2f})"
        rows.append(
            f"| {family} | {entry.task}, {'Dice' if metric == 'dice' else 'F1'} on {worst} "
            f"| {_figure(figures.get('fp32'), metric)} | {_figure(figures.get('int8'), metric)} "
            f"| {_agreement(figures.get('int8'))} | {_leave_one_out(reported.get('leave_one_volume_out'))} "
            f"| {served} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(model_table())

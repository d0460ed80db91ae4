# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Text for the panel: model picker entries, figures, probability tables, training and errors.

Everything returns plain strings or rows of strings, so the widget only copies them into labels,
combo boxes and table cells.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Dict, List, Optional, Tuple

from .errors import (
    MedAttnClientError,
    OperationCancelled,
    ServerError,
    ServerTimeout,
    ServerUnavailable,
    TrainingFailed,
)
from .heatmap import HeatMap
from .model_card import ModelCard
from .overlay import OverUnderOverlay

__all__ = [
    "format_count",
    "format_bytes",
    "format_energy",
    "format_ml",
    "model_picker_text",
    "model_card_text",
    "quality_lines",
    "probability_rows",
    "comparison_text",
    "comparison_rows",
    "training_fraction",
    "training_text",
    "saliency_text",
    "scores_by_image",
    "score_rows",
    "score_headers",
    "score_summary_text",
    "table_rows_text",
    "app_status_text",
    "error_text",
]

_NA = "n/a"


def format_count(value: Optional[float]) -> str:
    """1234 -> '1.23 k', 7971298 -> '7.97 M'."""
    if value is None:
        return _NA
    return _scaled(float(value), ((1e9, "G"), (1e6, "M"), (1e3, "k")), "")


def format_bytes(value: Optional[float]) -> str:
    """Binary units: 8409088 -> '8.02 MiB'."""
    if value is None:
        return _NA
    number = float(value)
    if number < 0:
        raise ValueError(f"A size cannot be negative: {value}")
    return _scaled(number, ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")), " B")


def _scaled(number: float, units: Sequence[Tuple[float, str]], unscaled_suffix: str) -> str:
    """``number`` in the largest of ``units`` ((limit, suffix), largest first) it reaches, else as a whole number."""
    for limit, suffix in units:
        if abs(number) >= limit:
            return f"{number / limit:.2f} {suffix}"
    return f"{number:.0f}{unscaled_suffix}"


def format_energy(joules: Optional[float]) -> str:
    """0.35 -> '0.350 J' ... 0.0123 -> '12.3 mJ', 4.2e-6 -> '4.20 uJ'."""
    if joules is None:
        return _NA
    value = float(joules)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"Energy must be a non-negative finite number, got {joules}")
    if value == 0 or value >= 0.1:
        return f"{value:.3g} J" if value < 1000 else f"{value:.0f} J"
    if value >= 1e-4:
        return f"{value * 1e3:.3g} mJ"
    return f"{value * 1e6:.3g} uJ"


def format_ml(value: Optional[float]) -> str:
    if value is None:
        return _NA
    return f"{float(value):.2f} ml"


def model_picker_text(card: ModelCard) -> str:
    """One combo-box line: 'sadnn_seg_int8 | INT8 | 7.97 M params | 8.02 MiB | 0.350 J/pass'."""
    precision = card.precision.upper() if card.precision else "?"
    pieces = [card.name, precision, f"{format_count(card.params)} params"]
    pieces.append(format_bytes(card.size_bytes))
    energy = card.energy_j
    pieces.append(f"{format_energy(energy)}/pass" if energy is not None else "energy n/a")
    text = " | ".join(pieces)
    if card.experimental:
        text += "  (experimental)"
    return text + "  (default)" if card.default else text


def model_card_text(card: ModelCard) -> str:
    """Multi-line card under the picker, including the INT8 vs FP32 saving when both figures exist."""
    lines = [f"{card.name}: {card.task or 'model'}, {card.precision.upper() or 'precision unknown'}"]
    if card.description:
        lines.append(card.description)
    lines.append(f"Parameters: {format_count(card.params)}   MACs/pass: {format_count(card.macs)}")
    lines.append(
        f"Size: FP32 {format_bytes(card.fp32_size_bytes)}, INT8 {format_bytes(card.int8_size_bytes)}"
        + _ratio_text(card.fp32_size_bytes, card.int8_size_bytes, "smaller")
    )
    lines.append(
        f"Energy/pass: FP32 {format_energy(card.energy_fp32_j)}, INT8 {format_energy(card.energy_int8_j)}"
        + _ratio_text(card.energy_fp32_j, card.energy_int8_j, "less")
    )
    if card.input_shape:
        lines.append("Figures for input " + "x".join(str(s) for s in card.input_shape))
    if card.twin:
        lines.append(f"Twin in the other precision: {card.twin}")
    lines.extend(quality_lines(card))
    return "\n".join(lines)


def quality_lines(card: ModelCard) -> List[str]:
    """The measured held-out quality of the bundled weights: per precision the figure and its interval, the floor,
    what it was measured on; a warning first when the model is below its floor. Empty when the server gives none."""
    quality = card.quality
    if not quality or not isinstance(quality.get("values"), Mapping):
        return []
    intervals = quality.get("intervals") if isinstance(quality.get("intervals"), Mapping) else {}
    figures = []
    for precision, value in sorted(quality["values"].items()):
        text = f"{precision.upper()} {float(value):.3f}"
        interval = intervals.get(precision)
        if interval and len(interval) == 2:
            text += f" (95 % CI {float(interval[0]):.3f}-{float(interval[1]):.3f})"
        figures.append(text)
    lines = []
    floor = quality.get("floor")
    if card.experimental:
        lines.append(f"EXPERIMENTAL: measured below its quality floor ({_number(floor)}); check every result.")
    metric = str(quality.get("metric") or "held-out quality")
    lines.append(f"{metric[:1].upper()}{metric[1:]}: " + ", ".join(figures))
    lines.append(
        f"Floor: {_number(floor) if floor is not None else 'none'}; measured on {quality.get('measured_on', _NA)}"
    )
    if quality.get("labels_are"):
        lines.append(f"Reference labels: {quality['labels_are']}")
    return lines


def _number(value: Any) -> str:
    try:
        return f"{float(value):.2f}"
    except (TypeError, ValueError):
        return _NA


def _ratio_text(fp32: Optional[float], int8: Optional[float], word: str) -> str:
    if fp32 is None or int8 is None or float(int8) <= 0:
        return ""
    return f" (INT8 {float(fp32) / float(int8):.1f}x {word})"


def probability_rows(probabilities: Mapping[str, Any], threshold: float = 0.5) -> List[Tuple[str, str, str]]:
    """(class, '87.3 %', 'yes'/'no') rows, most probable first.

    Raises:
        ValueError: when a probability is not a number in [0, 1].
    """
    if not isinstance(probabilities, Mapping):
        raise ValueError(f"Probabilities must be a {{class: probability}} mapping, got {type(probabilities).__name__}")
    checked = []
    for name, value in probabilities.items():
        try:
            number = float(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"Probability of '{name}' is not a number: {value!r}") from error
        if not math.isfinite(number) or number < 0 or number > 1:
            raise ValueError(f"Probability of '{name}' is outside [0, 1]: {value!r}")
        checked.append((str(name), number))
    checked.sort(key=lambda item: (-item[1], item[0]))
    return [(name, f"{100 * p:.1f} %", "yes" if p >= threshold else "no") for name, p in checked]


def comparison_text(overlay: OverUnderOverlay) -> str:
    """'Dice 0.873 vs final label | over 12.34 ml | under 4.50 ml | agreement 101.20 ml'."""
    reference = f" vs {overlay.reference}" if overlay.reference else ""
    return (
        f"Dice {overlay.dice:.3f}{reference} | over {format_ml(overlay.over_ml)} | "
        f"under {format_ml(overlay.under_ml)} | agreement {format_ml(overlay.agreement_ml)}"
    )


def comparison_rows(overlay: OverUnderOverlay) -> List[Tuple[str, Tuple[float, float, float], str, str]]:
    """(segment name, colour, voxels, volume) rows for the figures table."""
    return [(s.name, s.color, str(s.voxels), format_ml(s.volume_ml)) for s in overlay.segments]


#: train_stats ``metric_name`` -> words (the classifier's metric is the F1 of its presence decisions).
_METRIC_NAMES = {
    "val_mean_dice": "validation Dice",
    "train_mean_dice": "training Dice",
    "val_f1": "validation F1",
    "train_f1": "training F1",
}


def saliency_text(heat_map: HeatMap, params: Optional[Mapping[str, Any]] = None) -> str:
    """'Grad-CAM of liver, slice 7: blue 0.512 .. red 0.934' for the line under the heat map."""
    params = params or {}
    explained = params.get("saliency_class")
    text = heat_map.title + (f" of {explained}" if explained not in (None, "") else "")
    if heat_map.slice_index is not None:
        text += f", slice {heat_map.slice_index}"
    return f"{text}: blue {heat_map.low:.3g} .. red {heat_map.high:.3g}"


def training_fraction(stats: Optional[Mapping[str, Any]]) -> Optional[float]:
    """epoch / total_epochs from a ``train_stats`` entry, or None when unknown."""
    if not stats:
        return None
    epoch, total = stats.get("epoch"), stats.get("total_epochs")
    try:
        epoch_f, total_f = float(epoch), float(total)
    except (TypeError, ValueError):
        return None
    if total_f <= 0:
        return None
    return min(1.0, max(0.0, epoch_f / total_f))


def training_text(task: str, status: Optional[str], stats: Optional[Mapping[str, Any]]) -> str:
    """'sadnn_seg: RUNNING, epoch 3/10, best validation Dice 0.812'."""
    pieces = [f"{task}: {status or 'starting'}"]
    if stats:
        if stats.get("epoch") is not None:
            total = stats.get("total_epochs")
            pieces.append(f"epoch {stats['epoch']}/{total}" if total else f"epoch {stats['epoch']}")
        best = stats.get("best_metric")
        if isinstance(best, (int, float)) and math.isfinite(float(best)):
            metric = stats.get("metric_name")
            pieces.append(f"best {_METRIC_NAMES.get(metric or 'val_mean_dice', metric)} {float(best):.3f}")
    return ", ".join(pieces)


def scores_by_image(datastore: Mapping[str, Any], method: str) -> Dict[str, Any]:
    """The stored figures ``info["scores"][method]`` of every image that has them.

    Args:
        datastore: ``GET /datastore/?output=all`` (what :func:`~MedAttnSlicerLib.workflows.run_scoring`
            returns).
        method: scoring method name (``over_under``, ``int8_agreement``...).

    Returns:
        ``{image_id: figures}`` in image-id order; images without that score are left out.

    Raises:
        ValueError: when the listing has no ``objects`` (it was requested with another ``output``).
    """
    objects = datastore.get("objects") if isinstance(datastore, Mapping) else None
    if not isinstance(objects, Mapping):
        raise ValueError("Datastore listing has no 'objects'; request it with output=all")
    found: Dict[str, Any] = {}
    for image_id in sorted(objects):
        info = ((objects[image_id] or {}).get("image") or {}).get("info") or {}
        score = (info.get("scores") or {}).get(method)
        if score is not None:
            found[str(image_id)] = score
    return found


def score_rows(datastore: Mapping[str, Any], method: str) -> List[Tuple[str, ...]]:
    """Per-image table rows of ``scores.<method>`` from ``GET /datastore/?output=all``.

    ``over_under`` rows: (image, Dice, over ml, under ml); ``int8_agreement`` rows: (image, Dice, INT8-only
    voxels, FP32-only voxels); other methods: (image, Dice) or (image, value). Columns match
    :func:`score_headers`. Images without that score are left out.
    """
    rows: List[Tuple[str, ...]] = []
    for image_id, score in scores_by_image(datastore, method).items():
        if isinstance(score, Mapping):
            dice = _fmt_number(score.get("dice"), 3)
            if method == "over_under":
                rows.append((image_id, dice, format_ml(score.get("over_ml")), format_ml(score.get("under_ml"))))
            elif method == "int8_agreement":
                rows.append(
                    (image_id, dice, _fmt_count(score.get("over_voxels")), _fmt_count(score.get("under_voxels")))
                )
            else:
                rows.append((image_id, dice))
        else:
            rows.append((image_id, _fmt_number(score, 3)))
    return rows


def score_headers(method: str) -> List[str]:
    """Column titles of :func:`score_rows` for ``method``."""
    if method == "over_under":
        return ["Image", "Dice", "Over", "Under"]
    if method == "int8_agreement":
        return ["Image", "Dice", "INT8-only voxels", "FP32-only voxels"]
    return ["Image", "Dice"]


def score_summary_text(datastore: Mapping[str, Any], method: str) -> str:
    """One line for the panel under the scores table: 'over_under: 2 images, mean Dice 0.873 (0.801 .. 0.945)'."""
    scores = scores_by_image(datastore, method)
    values = []
    for score in scores.values():
        value = score.get("dice") if isinstance(score, Mapping) else score
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            values.append(number)
    count = len(scores)
    text = f"{method}: {count} image{'' if count == 1 else 's'}"
    if not values:
        return text + (", no Dice figures" if count else " scored")
    mean = sum(values) / len(values)
    text += f", mean Dice {mean:.3f}"
    return text + (f" ({min(values):.3f} .. {max(values):.3f})" if len(values) > 1 else "")


def app_status_text(info: Mapping[str, Any]) -> str:
    """'MedAttnSlicer 0.1.0 | 6 models | 12 images, 3 labelled'."""
    name = info.get("name") or "MONAI Label app"
    version = info.get("version") or ""
    models = info.get("models") or {}
    datastore = info.get("datastore") or {}
    text = f"{name} {version}".strip() + f" | {len(models)} models"
    if datastore:
        text += f" | {datastore.get('total', '?')} images, {datastore.get('completed', '?')} labelled"
    return text


def error_text(error: BaseException) -> str:
    """A readable one-paragraph message for any failure the panel shows."""
    if isinstance(error, (ServerUnavailable, ServerTimeout, TrainingFailed, OperationCancelled)):
        return str(error)
    if isinstance(error, ServerError):
        advice = ""
        if error.status == 404:
            advice = " (unknown image, label, model, strategy or method?)"
        elif error.status == 429:
            advice = " (a task of this kind is already running; stop it or wait)"
        elif error.status >= 500:
            advice = " (see the server log for the cause)"
        return f"The server answered {error.status}: {error.detail}{advice}"
    if isinstance(error, MedAttnClientError):
        return str(error)
    if isinstance(error, (ValueError, FileNotFoundError)):
        return str(error) or type(error).__name__
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _fmt_number(value: Any, digits: int) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return _NA
    return f"{number:.{digits}f}" if math.isfinite(number) else _NA


def _fmt_count(value: Any) -> str:
    try:
        return str(int(value))
    except (TypeError, ValueError):
        return _NA


def table_rows_text(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text table (for logs and the module test's output)."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)

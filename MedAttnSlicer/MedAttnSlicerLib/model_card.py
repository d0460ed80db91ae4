# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Model cards: what ``GET /info/`` says about each model, in a typed form for the panel.

MedAttnSlicer's app adds ``precision``, ``twin``, ``default`` and ``model_card`` to MONAI Label's
model entries (docs/server_api.md). Other MONAI Label apps omit them; every field is then optional.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, TypeVar

from .heatmap import default_explanation, explanation_methods

__all__ = ["ModelCard", "model_cards", "default_model", "SEGMENTATION", "CLASSIFICATION"]

Number = TypeVar("Number", int, float)

SEGMENTATION = "segmentation"
CLASSIFICATION = "classification"


@dataclass
class ModelCard:
    """One model of the app.

    Attributes:
        name: model name used in ``/infer/{name}``.
        task: MONAI Label ``type`` ("segmentation", "classification", ...).
        precision: "int8", "fp32" or "" when the app does not say.
        twin: the same network in the other precision, if any.
        default: the app's preferred model.
        labels: the model's labels (list of names or {name: value}).
        description: free text.
        dimension: 2 or 3.
        params: number of parameters.
        macs: multiply-accumulates per forward pass of ``input_shape``.
        fp32_size_bytes, int8_size_bytes: artifact sizes.
        energy_fp32_j, energy_int8_j: estimated energy per forward pass (J).
        input_shape: the shape the figures refer to.
        explanations: classifiers' saliency methods (``explain`` values; ``["rise"]`` when the app lists none),
            empty for other models.
        default_explanation: the method to preselect (``""`` for non-classifiers).
        quality: the measured held-out quality of the bundled weights (``/info``'s ``quality``: ``metric``,
            ``values`` and ``intervals`` per precision, ``floor``, ``measured_on``, ``labels_are``), None if unknown.
        experimental: below its family's quality floor (served only with ``--conf models all``).
    """

    name: str
    task: str = ""
    precision: str = ""
    twin: Optional[str] = None
    default: bool = False
    labels: Any = None
    description: str = ""
    dimension: Optional[int] = None
    params: Optional[int] = None
    macs: Optional[int] = None
    fp32_size_bytes: Optional[int] = None
    int8_size_bytes: Optional[int] = None
    energy_fp32_j: Optional[float] = None
    energy_int8_j: Optional[float] = None
    input_shape: Optional[List[int]] = None
    explanations: List[str] = field(default_factory=list)
    default_explanation: str = ""
    quality: Optional[Dict[str, Any]] = None
    experimental: bool = False
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_info(cls, name: str, entry: Dict[str, Any]) -> ModelCard:
        """Build from one ``info()["models"][name]`` entry.

        Raises:
            ValueError: when the entry is not a dict or a figure is not a number.
        """
        if not isinstance(entry, dict):
            raise ValueError(f"Model '{name}' has an info entry of type {type(entry).__name__}, expected a dict")
        card = entry.get("model_card") or {}
        if not isinstance(card, dict):
            raise ValueError(f"Model '{name}': model_card must be a dict, got {type(card).__name__}")
        precision = str(entry.get("precision") or card.get("precision") or "").lower()
        quality = entry.get("quality")
        if quality is not None and not isinstance(quality, dict):
            raise ValueError(f"Model '{name}': quality must be a dict, got {type(quality).__name__}")
        task = str(entry.get("type") or "")
        try:
            explanations = explanation_methods(entry) if task == CLASSIFICATION else []
            default_method = default_explanation(entry) if task == CLASSIFICATION else ""
        except ValueError as error:
            raise ValueError(f"Model '{name}': {error}") from error
        return cls(
            name=str(name),
            task=task,
            precision=precision,
            twin=entry.get("twin") or None,
            default=bool(entry.get("default", False)),
            labels=entry.get("labels"),
            description=str(entry.get("description") or ""),
            dimension=_optional_number(entry.get("dimension"), name, "dimension", int),
            params=_optional_number(card.get("params"), name, "params", int),
            macs=_optional_number(card.get("macs"), name, "macs", int),
            fp32_size_bytes=_optional_number(card.get("fp32_size_bytes"), name, "fp32_size_bytes", int),
            int8_size_bytes=_optional_number(card.get("int8_size_bytes"), name, "int8_size_bytes", int),
            energy_fp32_j=_optional_number(card.get("energy_fp32_j"), name, "energy_fp32_j", float),
            energy_int8_j=_optional_number(card.get("energy_int8_j"), name, "energy_int8_j", float),
            input_shape=list(card["input_shape"]) if card.get("input_shape") else None,
            explanations=explanations,
            default_explanation=default_method,
            quality=quality,
            experimental=bool(entry.get("experimental", False)),
            raw=dict(entry),
        )

    @property
    def is_int8(self) -> bool:
        return self.precision == "int8"

    @property
    def size_bytes(self) -> Optional[int]:
        """Artifact size at this model's own precision."""
        return self.int8_size_bytes if self.is_int8 else self.fp32_size_bytes

    @property
    def energy_j(self) -> Optional[float]:
        """Energy estimate per forward pass at this model's own precision."""
        return self.energy_int8_j if self.is_int8 else self.energy_fp32_j


def model_cards(info: Dict[str, Any], task: Optional[str] = None) -> List[ModelCard]:
    """Cards of every model in ``info`` (optionally only one task), the default model first."""
    models = info.get("models") if isinstance(info, dict) else None
    if not isinstance(models, dict):
        raise ValueError("Server info has no 'models' dict; is this a MONAI Label server?")
    cards = [ModelCard.from_info(name, entry) for name, entry in models.items()]
    if task is not None:
        cards = [card for card in cards if card.task == task]
    return sorted(cards, key=lambda card: not card.default)  # stable: server order otherwise


def default_model(cards: Sequence[ModelCard], task: Optional[str] = None) -> Optional[ModelCard]:
    """The app's default model of ``task``, else the first INT8 one, else the first one."""
    candidates = [card for card in cards if task is None or card.task == task]
    for predicate in (lambda c: c.default, lambda c: c.is_int8, lambda c: True):
        for card in candidates:
            if predicate(card):
                return card
    return None


def _optional_number(value: Any, model: str, key: str, kind: Callable[[Any], Number]) -> Optional[Number]:
    """``kind(value)`` (``int`` or ``float``), None for None; a ValueError naming the model and the key otherwise."""
    if value is None:
        return None
    try:
        return kind(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"Model '{model}': {key} must be a number, got {value!r}") from error

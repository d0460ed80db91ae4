# Copyright MedAttnSlicer contributors. Apache-2.0.
"""The app's ``--conf`` options (``monailabel start_server ... --conf key value``), parsed once."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from monailabel_app.lib.serving import SERVING_CONF_HELP
from networks.registry import FAMILIES, SERVED_MODELS, LiveMapping

__all__ = ["AppConfig", "parse_labels", "default_model_dir", "MODEL_NAMES", "FAMILY_OF", "CONF_HELP"]

logger = logging.getLogger(__name__)

# served model name -> (family, precision), and -> family: live views of the model-family registry
MODEL_NAMES: Mapping[str, tuple[str, str]] = SERVED_MODELS
FAMILY_OF: Mapping[str, str] = LiveMapping(lambda: {name: family for name, (family, _) in SERVED_MODELS.items()})

CONF_HELP = {
    "models": "'default' (every model whose bundled weights meet their quality floor, lib/quality.py), 'all' (also "
    "those below it, marked experimental in /info, and families shipped without weights, to be trained on the "
    "server) or a comma list of families ("
    + ", ".join(dict.fromkeys(FAMILY_OF.values()))
    + ") and/or model names ("
    + ", ".join(MODEL_NAMES)
    + ")",
    "labels": "segmentation labels and their datastore values: 'liver' (default), 'liver,spleen' (values 1, 2), "
    "'liver=5,spleen=1', or a JSON object",
    "model_dir": "folder for what the server writes: trained weights, training runs, model-card cache (default "
    "$MEDATTN_DATA_DIR/trained, i.e. <repo>/.data/trained, git-ignored); bundled weights stay in <app>/model",
    "modality": "'auto' (default: CT when the image holds air below -500 HU), 'ct' or 'mr'",
    "preload": "'true' to load every network at start-up (default false: on first use, warmed up in the background)",
    "batch_size": "slices per network call (default 16)",
    "rise_masks": "RISE masks per explanation map (default 256)",
    "threads": "torch CPU threads (default: torch's choice)",
    "pacs_modalities": "with a DICOMweb --studies URL: modalities listed and accepted, e.g. 'CT' or 'CT,MR' (default: "
    "those of --conf modality: CT and MR for auto)",
    "auto_update_scoring": "'true' to rerun every scoring method after training/active learning (default false)",
    **SERVING_CONF_HELP,
}


def parse_labels(text: str | dict | None) -> dict[str, int]:
    """``{label name: datastore value}`` from ``--conf labels``.

    Accepts ``"liver"``, ``"liver,spleen"`` (values 1, 2, ...), ``"liver=5,spleen=1"`` or a JSON object.

    Raises:
        ValueError: empty names, duplicate names or values, values outside 1..255.
    """
    if text is None or (isinstance(text, str) and not text.strip()):
        return {"liver": 1}
    if isinstance(text, dict):
        labels = {str(k): int(v) for k, v in text.items()}
    elif text.strip().startswith("{"):
        labels = {str(k): int(v) for k, v in json.loads(text).items()}
    else:
        labels = {}
        for index, item in enumerate(part.strip() for part in text.split(",")):
            if not item:
                raise ValueError(f"empty label name in --conf labels {text!r}.")
            if "=" in item:
                name, value = (s.strip() for s in item.split("=", 1))
                labels[name] = int(value)
            else:
                labels[item] = index + 1
    labels.pop("background", None)
    if not labels:
        raise ValueError(f"--conf labels {text!r} names no label.")
    if len(set(labels.values())) != len(labels):
        raise ValueError(f"--conf labels {text!r} gives two labels the same value.")
    if any(not 1 <= v <= 255 for v in labels.values()):
        raise ValueError(f"--conf labels {text!r}: label values must be 1..255 (0 is background).")
    return labels


def default_model_dir() -> str:
    """Where the server writes by default (trained weights, ``runs/``, ``.model_cards.json``): ``trained`` in the
    sample-data cache (``$MEDATTN_DATA_DIR``, default ``<repo>/.data``), outside the source tree and git-ignored."""
    from sample_data.paths import default_data_dir

    return str(default_data_dir() / "trained")


def _flag(value: Any, default: bool) -> bool:
    if value is None or value == "":
        return default
    return str(value).strip().lower() in ("1", "true", "yes", "on")


@dataclass
class AppConfig:
    """Parsed ``--conf`` options; see :data:`CONF_HELP`."""

    app_dir: str
    models: list[str]
    labels: dict[str, int]
    bundled_dir: str
    model_dir: str
    modality: str = "auto"
    preload: bool = False
    batch_size: int = 16
    rise_masks: int = 256
    threads: int | None = None
    auto_update_scoring: bool = False
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_conf(cls, app_dir: str, conf: dict[str, Any] | None) -> AppConfig:
        conf = dict(conf or {})
        unknown = sorted(set(conf) - set(CONF_HELP) - {"server_mode", "auth_token"})
        if unknown:
            logger.warning(f"ignoring unknown --conf option(s) {unknown}; known: {sorted(CONF_HELP)}")
        bundled = os.path.join(app_dir, "model")
        models = cls._select_models(conf.get("models") or "default", bundled)
        modality = str(conf.get("modality") or "auto").lower()
        if modality not in ("auto", "ct", "mr"):
            raise ValueError(f"--conf modality must be auto, ct or mr, got {modality!r}.")
        model_dir = conf.get("model_dir") or default_model_dir()
        legacy = os.path.join(bundled, "trained")
        if not conf.get("model_dir") and os.path.isdir(legacy) and any(f.endswith(".pt") for f in os.listdir(legacy)):
            logger.warning(
                f"{legacy} holds weights trained by an earlier version; they are no longer served by default "
                f"(trained weights now go to {model_dir}): move them there or pass --conf model_dir {legacy}"
            )
        threads = conf.get("threads")
        return cls(
            app_dir=app_dir,
            models=models,
            labels=parse_labels(conf.get("labels")),
            bundled_dir=os.path.realpath(bundled),
            model_dir=os.path.realpath(os.path.expanduser(model_dir)),
            modality=modality,
            preload=_flag(conf.get("preload"), False),
            batch_size=int(conf.get("batch_size") or 16),
            rise_masks=int(conf.get("rise_masks") or 256),
            threads=int(threads) if threads else None,
            auto_update_scoring=_flag(conf.get("auto_update_scoring"), False),
            raw=conf,
        )

    @staticmethod
    def _select_models(text: str, bundled_dir: str) -> list[str]:
        from monailabel_app.lib.quality import below_floor

        families = sorted(set(FAMILY_OF.values()))
        selected: list[str] = []
        for item in (part.strip() for part in str(text).split(",")):
            if not item:
                continue
            if item == "default":
                experimental = {f for f in families if below_floor(f, bundled_dir)}
                if experimental:
                    logger.info(
                        f"not serving {sorted(experimental)} by default: their bundled weights measured below the "
                        "quality floor (--conf models all serves them, marked experimental)"
                    )
                unshipped = {f for f in families if not FAMILIES[f].bundled}
                names = [n for n in MODEL_NAMES if FAMILY_OF[n] not in experimental | unshipped]
            elif item == "all":
                names = list(MODEL_NAMES)
            elif item in MODEL_NAMES:
                names = [item]
            elif item in families:
                names = [n for n, f in FAMILY_OF.items() if f == item]
            else:
                raise ValueError(
                    f"--conf models: unknown model {item!r}; use 'all', families {families} "
                    f"or models {list(MODEL_NAMES)}."
                )
            selected += [n for n in names if n not in selected]
        if not selected:
            raise ValueError(f"--conf models {text!r} selects no model.")
        return selected

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Model cards shown in ``/info`` (parameters, MACs, FP32/INT8 size, energy per forward pass, precision), computed
once per weights version and cached in memory and on disk."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from monailabel_app.lib.json_files import atomic_write_json, read_json
from monailabel_app.lib.model_store import ModelFiles, read_app_metadata
from monailabel_app.lib.preprocess import Preprocessing

__all__ = ["ModelCards", "CARD_FIELDS"]

logger = logging.getLogger(__name__)

CARD_FIELDS = (
    "name",
    "params",
    "macs",
    "fp32_size_bytes",
    "int8_size_bytes",
    "energy_fp32_j",
    "energy_int8_j",
    "precision",
    "input_shape",
)


def _stat(path: str | None) -> list | None:
    if not path or not os.path.isfile(path):
        return None
    st = os.stat(path)
    return [os.path.realpath(path), st.st_mtime_ns, st.st_size]


class ModelCards:
    """Cards of served models keyed by the files they describe.

    Args:
        cache_path: JSON file holding computed cards across restarts.
    """

    def __init__(self, cache_path: str) -> None:
        self.cache_path = cache_path
        self._lock = threading.Lock()
        self._cards: dict[str, dict[str, Any]] = read_json(cache_path)

    @staticmethod
    def key(name: str, files: ModelFiles, precision: str, has_int8: bool) -> str:
        parts = [name, precision, _stat(files.current("fp32")), _stat(files.current("int8")) if has_int8 else None]
        return repr(parts)

    def get(self, name: str, files: ModelFiles, precision: str, has_int8: bool) -> dict[str, Any] | None:
        """The card of ``name`` for the current files, computing it when missing (None without an FP32 file)."""
        key = self.key(name, files, precision, has_int8)
        cached = self._cards.get(name)
        if cached and cached.get("key") == key:
            return cached["card"]
        with self._lock:
            cached = self._cards.get(name)
            if cached and cached.get("key") == key:
                return cached["card"]
            card = self._compute(name, files, precision, has_int8)
            if card is None:
                return None
            self._cards[name] = {"key": key, "card": card}
            try:
                atomic_write_json(self.cache_path, self._cards)
            except OSError as err:  # a read-only model folder only costs recomputation at the next start
                logger.warning(f"cannot cache model cards in {self.cache_path}: {err}")
            return card

    @staticmethod
    def _compute(name: str, files: ModelFiles, precision: str, has_int8: bool) -> dict[str, Any] | None:
        from networks.checkpoint import load_checkpoint
        from networks.model_card import model_card

        fp32 = files.current("fp32")
        if not fp32:
            return None
        model, metadata = load_checkpoint(fp32)
        prep = Preprocessing.from_dict(read_app_metadata(fp32).get("preprocess"))
        input_shape = [1, int(getattr(model, "in_channels", 1)), *prep.roi_size]
        int8 = files.current("int8") if has_int8 else None
        # the INT8 recipe the artifact was made with (older artifacts have none): its float layers and why
        recipe = (read_app_metadata(int8).get("int8_recipe") or {}) if int8 else {}
        keep_float = list((recipe.get("quantize_options") or {}).get("keep_float") or [])
        card = model_card(
            model,
            input_shape,
            name=name,
            int8_artifact_path=int8,
            precision=precision,
            int8_keep_float=keep_float,
        )
        card = {k: v for k, v in card.items()}
        if int8:
            card["int8_kept_float"] = keep_float
            card["int8_recipe"] = recipe.get("why") or "defaults"
        card["factory_name"] = metadata.get("factory_name")
        card["weights"] = os.path.basename(fp32) if precision == "fp32" or not int8 else os.path.basename(int8)
        missing = [f for f in CARD_FIELDS if f not in card]
        if missing:
            raise KeyError(f"networks.model_card.model_card returned no {missing}")
        return card

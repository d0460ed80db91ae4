# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Active learning for quantised models: the next image is the one where the INT8 network and its FP32 twin
disagree most (lowest Dice between their segmentations), so annotators review what quantisation may have hurt."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from monailabel_app.lib.activelearning.candidates import candidate_images, store_score
from monailabel_app.lib.comparison import comparison_figures
from monailabel_app.lib.infers.segmentation import SegmentationInfer

__all__ = ["Int8Disagreement", "int8_fp32_agreement"]

logger = logging.getLogger(__name__)


def int8_fp32_agreement(
    int8_task: SegmentationInfer, fp32_task: SegmentationInfer, image_path: str, max_slices: int | None = None
) -> dict[str, Any]:
    """Dice and over/under voxel counts of the INT8 segmentation against the FP32 one, on the network grid.

    Returns:
        comparison figures (``dice``, ``over_voxels`` = INT8 only, ``under_voxels`` = FP32 only, ...) plus the two
        model versions.
    """
    p_int8, info_int8 = int8_task.predict_working_grid(image_path, max_slices=max_slices)
    p_fp32, info_fp32 = fp32_task.predict_working_grid(image_path, max_slices=max_slices)
    fg_int8 = torch.argmax(p_int8, dim=0) > 0
    fg_fp32 = torch.argmax(p_fp32, dim=0) > 0
    figures = comparison_figures(fg_int8, fg_fp32, voxel_ml=0.0)
    for key in ("voxel_ml", "over_ml", "under_ml", "agreement_ml", "prediction_ml", "reference_ml"):
        figures.pop(key)
    figures.update(
        {
            "int8_model": int8_task.name,
            "fp32_model": fp32_task.name,
            "int8_version": info_int8.get("model_version"),
            "fp32_version": info_fp32.get("model_version"),
            "grid": "network working grid",
        }
    )
    return figures


class Int8Disagreement(Strategy):
    """Next image = the lowest INT8-vs-FP32 Dice among the candidates (unlabeled by default).

    Request parameters: ``images`` (``"unlabeled"``, ``"labeled"`` or ``"all"``), ``max_slices`` (default: all).
    Figures are stored as ``scores.int8_agreement`` and reused while both model files are unchanged.
    """

    def __init__(self, int8_task: SegmentationInfer, fp32_task: SegmentationInfer) -> None:
        super().__init__(f"Lowest Dice between {int8_task.name} and {fp32_task.name}: review what INT8 may have hurt")
        self.int8_task = int8_task
        self.fp32_task = fp32_task

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        images = candidate_images(request, datastore)
        if not images:
            return None
        max_slices = request.get("max_slices")
        max_slices = int(max_slices) if max_slices else None
        versions = (self.int8_task.load()[1].get("_version"), self.fp32_task.load()[1].get("_version"))
        dice: dict[str, float] = {}
        for image_id in images:
            cached = (datastore.get_image_info(image_id).get("scores") or {}).get("int8_agreement") or {}
            if (cached.get("int8_version"), cached.get("fp32_version")) == versions and cached.get(
                "max_slices"
            ) == max_slices:
                dice[image_id] = float(cached["dice"])
                continue
            figures = int8_fp32_agreement(self.int8_task, self.fp32_task, datastore.get_image_uri(image_id), max_slices)
            figures.update({"max_slices": max_slices, "ts": int(time.time())})
            store_score(datastore, image_id, "int8_agreement", figures)
            dice[image_id] = figures["dice"]
        worst = min(dice, key=lambda k: (dice[k], k))
        logger.info(f"INT8 disagreement: selected {worst} (Dice {dice[worst]:.4f}) of {len(dice)}")
        return {"id": worst, "dice": dice[worst], "candidates": dice}

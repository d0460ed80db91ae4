# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Scoring: Dice between each INT8 segmentation model and its FP32 twin on every image, stored per image."""

from __future__ import annotations

import logging
import time
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from monailabel_app.lib.activelearning.candidates import store_score
from monailabel_app.lib.activelearning.int8_disagreement import int8_fp32_agreement

__all__ = ["Int8AgreementScoring"]

logger = logging.getLogger(__name__)


class Int8AgreementScoring(ScoringMethod):
    """Store ``scores.int8_agreement`` (Dice, INT8-only and FP32-only voxel counts) for every image.

    Request parameters: ``max_slices`` (axial slices per volume, default all).
    """

    def __init__(self, int8_task: Any, fp32_task: Any) -> None:
        super().__init__(f"Dice between {int8_task.name} and {fp32_task.name} on every image")
        self.int8_task = int8_task
        self.fp32_task = fp32_task

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        max_slices = request.get("max_slices")
        max_slices = int(max_slices) if max_slices else None
        result: dict[str, Any] = {}
        for image_id in sorted(datastore.list_images()):
            figures = int8_fp32_agreement(self.int8_task, self.fp32_task, datastore.get_image_uri(image_id), max_slices)
            figures.update({"max_slices": max_slices, "ts": int(time.time())})
            store_score(datastore, image_id, "int8_agreement", figures)
            result[image_id] = figures
            logger.info(f"int8_agreement {image_id}: Dice {figures['dice']:.4f}")
        return result

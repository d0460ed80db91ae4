# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Active learning by test-time-augmentation uncertainty of the current segmentation model."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from monailabel_app.lib.activelearning.candidates import candidate_images, store_score
from monailabel_app.lib.infers.segmentation import SegmentationInfer

__all__ = ["TTAUncertainty", "tta_uncertainty"]

logger = logging.getLogger(__name__)

# (flipped spatial axes, intensity scale) of each test-time variant; the identity comes first
TTA_VARIANTS: tuple[tuple[tuple[int, ...], float], ...] = (
    ((), 1.0),
    ((0,), 1.0),
    ((1,), 1.0),
    ((0, 1), 1.0),
    ((), 0.95),
    ((), 1.05),
)


def tta_uncertainty(task: SegmentationInfer, image_path: str, max_slices: int = 24) -> dict[str, Any]:
    """Mean variance of the foreground probability over the test-time variants, taken over the voxels any variant
    calls foreground (0 when none does).

    Returns:
        ``{"score", "foreground_voxels", "variants", "model_version", "slices"}``.
    """
    probabilities = []
    info: dict[str, Any] = {}
    for flips, scale in TTA_VARIANTS:
        p, info = task.predict_working_grid(image_path, flip_axes=flips, intensity_scale=scale, max_slices=max_slices)
        probabilities.append(p[1:].sum(dim=0))  # foreground probability (any class)
    stacked = torch.stack(probabilities)
    region = (stacked > 0.5).any(dim=0)
    n = int(region.sum())
    score = float(stacked.var(dim=0, unbiased=False)[region].mean()) if n else 0.0
    return {
        "score": score,
        "foreground_voxels": n,
        "variants": len(TTA_VARIANTS),
        "model_version": info.get("model_version"),
        "slices": len(info["slices"]) if info.get("slices") else None,
    }


class TTAUncertainty(Strategy):
    """Next image = the unlabeled one whose segmentation varies most under flips and intensity scaling.

    Request parameters: ``images`` (``"unlabeled"`` default, or ``"all"``), ``max_slices`` (axial slices used per
    volume, default 24). Scores are stored under the image info ``scores.tta_uncertainty`` and reused while the
    model file is unchanged.
    """

    def __init__(self, task: SegmentationInfer) -> None:
        super().__init__(f"Test-time-augmentation uncertainty of {task.name} (flips, intensity scaling)")
        self.task = task

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        images = candidate_images(request, datastore)
        if not images:
            return None
        max_slices = int(request.get("max_slices", 24))
        version = self.task.load()[1].get("_version")
        scores: dict[str, float] = {}
        for image_id in images:
            cached = (datastore.get_image_info(image_id).get("scores") or {}).get("tta_uncertainty") or {}
            if cached.get("model_version") == version and cached.get("max_slices") == max_slices:
                scores[image_id] = float(cached["score"])
                continue
            figures = tta_uncertainty(self.task, datastore.get_image_uri(image_id), max_slices)
            figures.update({"model": self.task.name, "max_slices": max_slices, "ts": int(time.time())})
            store_score(datastore, image_id, "tta_uncertainty", figures)
            scores[image_id] = figures["score"]
        best = max(scores, key=lambda k: (scores[k], k))
        logger.info(f"TTA uncertainty: selected {best} ({scores[best]:.4g}) of {len(scores)}")
        return {"id": best, "score": scores[best], "candidates": scores}

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Scoring: over/under-segmentation of the default segmentation model against each image's ``final`` label,
stored per image so the Slicer panel and active learning can use it."""

from __future__ import annotations

import logging
import time
from typing import Any

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.scoring import ScoringMethod

from monailabel_app.lib.activelearning.candidates import store_score
from monailabel_app.lib.errors import NotFoundError

__all__ = ["OverUnderScoring"]

logger = logging.getLogger(__name__)


class OverUnderScoring(ScoringMethod):
    """For every image with a ``final`` label: segment it, compare with the label, store the figures as
    ``scores.over_under`` (``dice``, ``over_ml``, ``under_ml``, voxel counts, ``model``, ``model_version``).

    Request parameters: ``model`` (a segmentation model name; default the app's default), ``reference`` tag
    (default ``final``).

    Args:
        tasks: the app's segmentation infer tasks by name.
        default: name used when the request names none.
    """

    def __init__(self, tasks: dict[str, Any], default: str) -> None:
        super().__init__(f"Over/under-segmentation of a model (default {default}) against each final label")
        self.tasks = tasks
        self.default = default

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        name = request.get("model") or self.default
        task = self.tasks.get(name)
        if task is None:
            raise NotFoundError(f"scoring over_under: no segmentation model {name!r} (models: {sorted(self.tasks)}).")
        tag = request.get("reference") or DefaultLabelTag.FINAL.value
        result: dict[str, Any] = {}
        for image_id in sorted(datastore.list_images()):
            label_uri = datastore.get_label_uri(image_id, tag)
            if not label_uri:
                continue
            _, data = task(
                {
                    "image": datastore.get_image_uri(image_id),
                    "reference_path": label_uri,
                    "reference_name": tag,
                    "skip_writer": True,
                    "logging": "WARNING",
                }
            )
            figures = dict(data["result"]["comparison"])
            figures.update({"model": name, "model_version": data["_metadata"].get("_version"), "ts": int(time.time())})
            store_score(datastore, image_id, "over_under", figures)
            result[image_id] = figures
            logger.info(f"over_under {image_id}: Dice {figures['dice']:.4f}")
        return result

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Segmentation families: infer tasks (slice-by-slice or native 3D) and the segmentation train task."""

from __future__ import annotations

from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from monailabel_app.lib.configs.base import FamilyConfig
from monailabel_app.lib.infers.segmentation import SegmentationInfer
from monailabel_app.lib.trainers.segmentation import SegmentationTrain

__all__ = ["SegmentationConfig"]


class SegmentationConfig(FamilyConfig):
    """A segmentation family; those whose registry entry has ``server_training`` get a ``/train/<family>`` task."""

    def make_infer(self, name: str, precision: str) -> InferTask:
        return SegmentationInfer(
            self.served_model(name, precision),
            batch_size=self.app_config.batch_size,
        )

    def trainer(self) -> TrainTask | None:
        if not self.spec.server_training:
            return None
        return SegmentationTrain(self.spec, self.files, self.app_config.labels, self.cache)

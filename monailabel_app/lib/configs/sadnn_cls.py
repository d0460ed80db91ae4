# Copyright MedAttnSlicer contributors. Apache-2.0.
"""SaDNN-cls: per-slice multi-label organ presence with RISE saliency, FP32 and INT8; trainable
(``/train/sadnn_cls``)."""

from __future__ import annotations

from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from monailabel_app.lib.configs.base import FamilyConfig
from monailabel_app.lib.infers.classification import ClassificationInfer
from monailabel_app.lib.trainers.classification import ClassificationTrain


class SaDNNCls(FamilyConfig):
    family = "sadnn_cls"

    def make_infer(self, name: str, precision: str) -> InferTask:
        return ClassificationInfer(
            name,
            self.spec,
            self.files,
            precision,
            self.cache,
            self.app_config.labels,
            twin=self.twin_of(precision),
            default=False,
            modality=self.app_config.modality,
            rise_masks=self.app_config.rise_masks,
        )

    def trainer(self) -> TrainTask | None:
        return ClassificationTrain(self.spec, self.files, self.app_config.labels, self.cache)

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Classification families: per-slice multi-label organ presence with explanation maps, FP32 and INT8; trainable
(``/train/<family>``, when the registry entry has ``server_training``) from the datastore's label maps."""

from __future__ import annotations

from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from monailabel_app.lib.configs.base import FamilyConfig
from monailabel_app.lib.explanations import check_explanations
from monailabel_app.lib.infers.classification import ClassificationInfer
from monailabel_app.lib.trainers.classification import ClassificationTrain

__all__ = ["ClassificationConfig"]


class ClassificationConfig(FamilyConfig):
    """A classification family; its registry entry names the explanations that apply to the network (request names
    of :mod:`monailabel_app.lib.explanations`, shown in ``/info``) and the default one."""

    def make_infer(self, name: str, precision: str) -> InferTask:
        default = self.spec.default_explanation or self.spec.explanations[0]
        return ClassificationInfer(
            self.served_model(name, precision),
            rise_masks=self.app_config.rise_masks,
            explanations=check_explanations(self.spec.explanations, default),
            default_explanation=default,
        )

    def trainer(self) -> TrainTask | None:
        if not self.spec.server_training:
            return None
        return ClassificationTrain(self.spec, self.files, self.app_config.labels, self.cache)

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Classification families: per-slice multi-label organ presence with explanation maps, FP32 and INT8; each is
trainable (``/train/<family>``) from the datastore's label maps."""

from __future__ import annotations

from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from monailabel_app.lib.configs.base import FamilyConfig
from monailabel_app.lib.explanations import check_explanations
from monailabel_app.lib.infers.classification import ClassificationInfer
from monailabel_app.lib.trainers.classification import ClassificationTrain

__all__ = ["ClassificationConfig"]


class ClassificationConfig(FamilyConfig):
    """A classification family.

    Subclasses set ``family``, ``explanations`` (the request names of :mod:`monailabel_app.lib.explanations` that
    apply to the network, shown in ``/info``) and ``default_explanation``.
    """

    explanations: tuple[str, ...] = ("rise",)
    default_explanation: str = "rise"

    def make_infer(self, name: str, precision: str) -> InferTask:
        return ClassificationInfer(
            **self.infer_arguments(name, precision),
            rise_masks=self.app_config.rise_masks,
            explanations=check_explanations(self.explanations, self.default_explanation),
            default_explanation=self.default_explanation,
        )

    def trainer(self) -> TrainTask | None:
        return ClassificationTrain(self.spec, self.files, self.app_config.labels, self.cache)

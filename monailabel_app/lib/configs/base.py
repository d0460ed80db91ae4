# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Shared ``TaskConfig`` of a served network family: its FP32/INT8 infer tasks and (if trainable) its train task."""

from __future__ import annotations

import logging
from abc import abstractmethod
from typing import Any

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from monailabel_app.lib.app_config import MODEL_NAMES, AppConfig
from monailabel_app.lib.infers.base import ServedModel
from monailabel_app.lib.model_store import MODEL_SPECS, ModelFiles, ModelSpec, NetworkCache

__all__ = ["FamilyConfig"]

logger = logging.getLogger(__name__)


class FamilyConfig(TaskConfig):
    """Configuration of one network family; ``init``'s ``name`` is the family (:mod:`networks.registry`).

    ``init`` takes, beyond MONAI Label's arguments, ``app_config`` (:class:`AppConfig`) and ``cache``
    (:class:`NetworkCache` shared by all infer tasks).
    """

    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs: Any) -> None:
        super().init(name, model_dir, conf, planner, **kwargs)
        self.family = name
        self.app_config: AppConfig = kwargs["app_config"]
        self.cache: NetworkCache = kwargs["cache"]
        self.spec: ModelSpec = MODEL_SPECS[self.family]
        self.files = ModelFiles(self.family, self.app_config.bundled_dir, self.app_config.model_dir)
        self.labels = dict(self.app_config.labels)
        self.path = self.files.paths("fp32")

    def model_names(self) -> dict[str, str]:
        """``{precision: served name}`` of this family's models selected by ``--conf models``."""
        return {
            precision: name
            for name, (family, precision) in MODEL_NAMES.items()
            if family == self.family and name in self.app_config.models
        }

    def twin_of(self, precision: str) -> str | None:
        other = {"int8": "fp32", "fp32": "int8"}[precision]
        return self.model_names().get(other)

    def infer(self) -> dict[str, InferTask]:
        tasks: dict[str, InferTask] = {}
        for precision, name in self.model_names().items():
            tasks[name] = self.make_infer(name, precision)
        return tasks

    def served_model(self, name: str, precision: str) -> ServedModel:
        """What every family's infer task takes about the network it serves as ``name``."""
        return ServedModel(
            name=name,
            spec=self.spec,
            files=self.files,
            precision=precision,
            cache=self.cache,
            app_labels=self.app_config.labels,
            twin=self.twin_of(precision),
            default=False,
            modality=self.app_config.modality,
        )

    @abstractmethod
    def make_infer(self, name: str, precision: str) -> InferTask:
        """The infer task serving this family's ``precision`` network as ``name``."""

    def trainer(self) -> TrainTask | None:
        return None

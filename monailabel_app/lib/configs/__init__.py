# Copyright MedAttnSlicer contributors. Apache-2.0.
"""TaskConfigs of the served network families, by family name: one config class per task, configured by the
family's :mod:`networks.registry` entry (a family registered later appears here too)."""

from __future__ import annotations

from collections.abc import Mapping

from monailabel_app.lib.configs.base import FamilyConfig
from monailabel_app.lib.configs.classification import ClassificationConfig
from monailabel_app.lib.configs.segmentation import SegmentationConfig
from networks.registry import FAMILIES, LiveMapping

CONFIG_OF_TASK: dict[str, type[FamilyConfig]] = {
    "segmentation": SegmentationConfig,
    "classification": ClassificationConfig,
}

CONFIGS: Mapping[str, type[FamilyConfig]] = LiveMapping(
    lambda: {name: CONFIG_OF_TASK[family.task] for name, family in FAMILIES.items()}
)
"""Family name -> its TaskConfig class (instantiate it and ``init(family, ...)``)."""

__all__ = ["CONFIGS", "CONFIG_OF_TASK", "FamilyConfig", "ClassificationConfig", "SegmentationConfig"]

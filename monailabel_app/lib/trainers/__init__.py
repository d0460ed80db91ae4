# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Train tasks (MONAI Label BasicTrainTask) that re-quantise and publish atomically after every run, in one process
or data-parallel over ``torchrun`` ranks (:mod:`.data_parallel`, :mod:`.distributed`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from monailabel_app.lib.trainers.classification import ClassificationTrain
    from monailabel_app.lib.trainers.segmentation import SegmentationTrain

__all__ = ["ClassificationTrain", "SegmentationTrain"]


def __getattr__(name: str) -> Any:
    # imported on first use: the launcher-side helpers (.distributed) must not pay for MONAI and MONAI Label
    if name == "ClassificationTrain":
        from monailabel_app.lib.trainers.classification import ClassificationTrain

        return ClassificationTrain
    if name == "SegmentationTrain":
        from monailabel_app.lib.trainers.segmentation import SegmentationTrain

        return SegmentationTrain
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Train tasks (MONAI Label BasicTrainTask) that re-quantise and publish atomically after every run."""

from monailabel_app.lib.trainers.classification import ClassificationTrain
from monailabel_app.lib.trainers.segmentation import SegmentationTrain

__all__ = ["ClassificationTrain", "SegmentationTrain"]

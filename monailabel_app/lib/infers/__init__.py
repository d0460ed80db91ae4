# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Infer tasks: segmentation (slice-by-slice / 3D, over/under maps) and classification (probabilities + RISE)."""

from monailabel_app.lib.infers.classification import ClassificationInfer
from monailabel_app.lib.infers.segmentation import SegmentationInfer

__all__ = ["ClassificationInfer", "SegmentationInfer"]

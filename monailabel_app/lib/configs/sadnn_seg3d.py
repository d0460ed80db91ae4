# Copyright MedAttnSlicer contributors. Apache-2.0.
"""SaDNN-seg 3D variant: 3x3x3 local self-attention on whole volumes (sliding window), FP32."""

from monailabel_app.lib.configs.segmentation import SegmentationConfig


class SaDNNSeg3D(SegmentationConfig):
    family = "sadnn_seg3d"

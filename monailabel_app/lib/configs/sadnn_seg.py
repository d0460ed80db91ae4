# Copyright MedAttnSlicer contributors. Apache-2.0.
"""SaDNN-seg: the 2D self-attentive U-net, FP32 and INT8, applied slice by slice; trainable (``/train/sadnn_seg``)."""

from monailabel_app.lib.configs.segmentation import SegmentationConfig


class SaDNNSeg(SegmentationConfig):
    family = "sadnn_seg"
    trainable = True

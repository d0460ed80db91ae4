# Copyright MedAttnSlicer contributors. Apache-2.0.
"""MONAI BasicUNet baseline, FP32 and INT8, applied slice by slice (bundled weights; not trained by the server)."""

from monailabel_app.lib.configs.segmentation import SegmentationConfig


class UNetSeg(SegmentationConfig):
    family = "unet_seg"

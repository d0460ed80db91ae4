# Copyright MedAttnSlicer contributors. Apache-2.0.
"""HCT (attention-convolution ResNet-22): Grad-CAM by default. Its linear (Performer) attention never forms the
token-by-token attention matrix, so there is no attention map to roll out."""

from monailabel_app.lib.configs.classification import ClassificationConfig


class HCTCls(ClassificationConfig):
    family = "hct_cls"
    explanations = ("grad_cam", "rise")
    default_explanation = "grad_cam"

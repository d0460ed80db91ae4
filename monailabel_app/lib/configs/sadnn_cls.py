# Copyright MedAttnSlicer contributors. Apache-2.0.
"""SaDNN-cls: the local self-attention classifier; RISE by default, Grad-CAM on its last attention block."""

from monailabel_app.lib.configs.classification import ClassificationConfig


class SaDNNCls(ClassificationConfig):
    family = "sadnn_cls"
    explanations = ("rise", "grad_cam")
    default_explanation = "rise"

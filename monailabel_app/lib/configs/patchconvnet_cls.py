# Copyright MedAttnSlicer contributors. Apache-2.0.
"""PatchConvNet: its class-attention map (the class token's attention over the patches) by default."""

from monailabel_app.lib.configs.classification import ClassificationConfig


class PatchConvNetCls(ClassificationConfig):
    family = "patchconvnet_cls"
    explanations = ("class_attention", "grad_cam", "rise")
    default_explanation = "class_attention"

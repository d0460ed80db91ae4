# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Efficient Scopeformer (CNN backbones + re-attention ViT): Grad-CAM on the backbone projections by default;
attention rollout too, since the served network uses patch tokens (the baseline token configuration)."""

from monailabel_app.lib.configs.classification import ClassificationConfig


class ScopeformerCls(ClassificationConfig):
    family = "scopeformer_cls"
    explanations = ("grad_cam", "attention_rollout", "rise")
    default_explanation = "grad_cam"

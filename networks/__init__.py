# Copyright MedAttnSlicer contributors. Apache-2.0.
"""MedAttnSlicer networks: self-attentive medical-imaging models and their baselines (torch + MONAI only)."""

from .blocks import LocalSelfAttention, LocalSelfAttentionBlock, local_attention_torch, register_attention_backend
from .factory import create_model, list_models, register_model
from .nets import HCT, PatchConvNet, SaDNNCls, SaDNNSeg, Scopeformer, resnet18_baseline, unet_baseline

__all__ = [
    "HCT",
    "PatchConvNet",
    "Scopeformer",
    "LocalSelfAttention",
    "LocalSelfAttentionBlock",
    "SaDNNCls",
    "SaDNNSeg",
    "create_model",
    "list_models",
    "local_attention_torch",
    "register_attention_backend",
    "register_model",
    "resnet18_baseline",
    "unet_baseline",
]

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""The project's networks."""

from .baselines import resnet18_baseline, unet_baseline
from .hct import HCT, HCT_ATTENTIONS
from .patchconvnet import PatchConvNet
from .sadnn_cls import SaDNNCls
from .sadnn_seg import SaDNNSeg
from .scopeformer import SCOPEFORMER_BACKBONES, SCOPEFORMER_MODES, Scopeformer, hu_windows, weighted_multilabel_log_loss

__all__ = [
    "HCT",
    "HCT_ATTENTIONS",
    "PatchConvNet",
    "SCOPEFORMER_BACKBONES",
    "SCOPEFORMER_MODES",
    "SaDNNCls",
    "SaDNNSeg",
    "Scopeformer",
    "hu_windows",
    "resnet18_baseline",
    "unet_baseline",
    "weighted_multilabel_log_loss",
]

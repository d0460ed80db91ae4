# Copyright MedAttnSlicer contributors. Apache-2.0.
"""TaskConfigs of the served network families, by family name."""

from monailabel_app.lib.configs.hct_cls import HCTCls
from monailabel_app.lib.configs.patchconvnet_cls import PatchConvNetCls
from monailabel_app.lib.configs.sadnn_cls import SaDNNCls
from monailabel_app.lib.configs.sadnn_seg import SaDNNSeg
from monailabel_app.lib.configs.sadnn_seg3d import SaDNNSeg3D
from monailabel_app.lib.configs.scopeformer_cls import ScopeformerCls
from monailabel_app.lib.configs.unet_seg import UNetSeg

CONFIGS = {c.family: c for c in (SaDNNSeg, UNetSeg, SaDNNCls, HCTCls, ScopeformerCls, PatchConvNetCls, SaDNNSeg3D)}

__all__ = ["CONFIGS", "SaDNNSeg", "UNetSeg", "SaDNNCls", "HCTCls", "ScopeformerCls", "PatchConvNetCls", "SaDNNSeg3D"]

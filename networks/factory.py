# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Uniform, timm-like construction of the project's networks by name.

    >>> from networks.factory import create_model, list_models
    >>> net = create_model("sadnn_seg_small", out_channels=3)

A registered constructor takes keyword arguments only and returns an ``nn.Module``; ``create_model`` passes the
overrides through, so every constructor argument of the network can be changed by name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from networks.nets.baselines import resnet18_baseline, unet_baseline
from networks.nets.hct import HCT
from networks.nets.patchconvnet import PatchConvNet
from networks.nets.sadnn_cls import SaDNNCls
from networks.nets.sadnn_seg import SaDNNSeg
from networks.nets.scopeformer import Scopeformer

__all__ = ["create_model", "list_models", "register_model"]

ModelConstructor = Callable[..., nn.Module]
_C = TypeVar("_C", bound=ModelConstructor)

_MODELS: dict[str, ModelConstructor] = {}


def register_model(name: str, overwrite: bool = False) -> Callable[[_C], _C]:
    """Decorator registering ``fn`` as the constructor of model ``name``; returns ``fn`` unchanged.

    Raises ValueError when ``name`` is already registered, unless ``overwrite`` is True.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}.")

    def decorator(fn: _C) -> _C:
        if not callable(fn):
            raise ValueError(f"the constructor registered as {name!r} must be callable, got {type(fn).__name__}.")
        if name in _MODELS and not overwrite:
            raise ValueError(f"model {name!r} is already registered; pass overwrite=True to replace it.")
        _MODELS[name] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_MODELS)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build the registered model ``name`` with its defaults, replaced by ``overrides`` (constructor keywords)."""
    constructor = _MODELS.get(name)
    if constructor is None:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}.")
    try:
        inspect.signature(constructor).bind(**overrides)
    except TypeError as err:
        raise ValueError(f"invalid arguments for model {name!r}: {err}.") from err
    return constructor(**overrides)


def _with_defaults(target: Callable[..., nn.Module], doc: str, **defaults: Any) -> ModelConstructor:
    """A keyword-only constructor calling ``target`` with ``defaults`` updated by the caller's overrides.

    It carries ``target``'s signature (with the new defaults), so ``create_model`` can reject unknown keywords by
    name before building anything, and callers can introspect the arguments.
    """
    signature = inspect.signature(target)
    unknown = set(defaults) - set(signature.parameters)
    if unknown:
        raise ValueError(f"{target.__name__} has no argument(s) {sorted(unknown)}.")

    def constructor(**overrides: Any) -> nn.Module:
        return target(**{**defaults, **overrides})

    constructor.__signature__ = signature.replace(  # type: ignore[attr-defined]
        return_annotation=target if isinstance(target, type) else signature.return_annotation,
        parameters=[
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY, default=defaults.get(name, p.default))
            for name, p in signature.parameters.items()
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ]
        + [p for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD],
    )
    constructor.__doc__ = doc
    constructor.__name__ = constructor.__qualname__ = f"{target.__name__}_constructor"
    return constructor


register_model("sadnn_seg")(
    _with_defaults(
        SaDNNSeg,
        "SaDNN-seg as in the paper: 2D, 1 -> 2 channels, features (64, 128, 256, 512, 512), 7,971,298 parameters.",
    )
)
register_model("sadnn_seg_small")(
    _with_defaults(
        SaDNNSeg,
        "SaDNN-seg narrowed 8x (features (8, 16, 32, 64, 64), last layer 4 wide; ~0.13M parameters), trainable on a "
        "2-core CPU at 128 x 128 or 256 x 256.",
        features=(8, 16, 32, 64, 64),
    )
)
register_model("sadnn_cls")(
    _with_defaults(SaDNNCls, "SaDNN-cls as in the paper: 1 x 512 x 512 input, 14 classes, 4,563,102 parameters.")
)
register_model("sadnn_cls_small")(
    _with_defaults(
        SaDNNCls,
        "SaDNN-cls for 1 x 128 x 128 input on a CPU: channels 8, 8p, 16, 16p, 32, 32p, 32p, 32p (five pools "
        "128 -> 4), FC 512 -> 256 -> 64 -> classes.",
        channels=(8, 8, 16, 16, 32, 32, 32, 32),
        pools=(False, True, False, True, False, True, True, True),
        fc=(256, 64),
        img_size=128,
    )
)
register_model("unet_baseline")(
    _with_defaults(unet_baseline, "MONAI BasicUNet baseline (non-trainable upsampling, no transposed convolutions).")
)
register_model("resnet18_baseline")(
    _with_defaults(resnet18_baseline, "MONAI ResNet-18 classification baseline (14 classes by default).")
)


# HCT (Taha et al.): pre-activation ResNet-22 with attention-convolution blocks in stages 4-5.
register_model("hct")(
    _with_defaults(HCT, "HCT with Performer FAVOR+ (softmax kernel), 2 classes: 1,737,010 parameters.")
)
register_model("hct_performer_relu")(
    _with_defaults(
        HCT, "HCT with Performer FAVOR+ (ReLU kernel), the paper's best variant.", attention="performer_relu"
    )
)
register_model("hct_nystrom")(_with_defaults(HCT, "HCT with Nystromformer attention.", attention="nystrom"))
register_model("gmic_resnet22")(
    _with_defaults(
        HCT, "All-convolution pre-activation ResNet-22 (GMIC baseline): 2,800,050 parameters.", attention_stages=()
    )
)
register_model("hct_small")(
    _with_defaults(
        HCT,
        "HCT narrowed for CPU training: channels (8, 8, 16, 16, 32), 4 heads.",
        channels=(8, 8, 16, 16, 32),
        heads=4,
    )
)
# Efficient Scopeformer (Barhoumi & Rasool): MONAI CNN backbones + 1x1 projections + re-attention ViT.
register_model("scopeformer")(
    _with_defaults(
        Scopeformer, "Efficient Scopeformer: DenseNet-121, EfficientNet-B0, ResNet-18 backbones, 8 layers, d 384."
    )
)
# the transformer of both CPU-sized Scopeformers: d 64, 2 layers, 4 heads, MLP 256, 4 x 4 grid
_SCOPEFORMER_CPU_TRANSFORMER = {"dim": 64, "depth": 2, "heads": 4, "mlp_dim": 256, "grid": 4}
register_model("scopeformer_small")(
    _with_defaults(
        Scopeformer,
        "Scopeformer for CPU: ResNet-10 + EfficientNet-B0 backbones, d 64, 2 layers, 4 heads, 4 x 4 grid.",
        backbones=("resnet10", "efficientnet-b0"),
        **_SCOPEFORMER_CPU_TRANSFORMER,
    )
)
register_model("scopeformer_tiny")(
    _with_defaults(
        Scopeformer,
        "Scopeformer small enough to bundle and train on a 2-core CPU: ResNet-10 + ResNet-18 backbones at 1/8 width "
        "(MONAI widen_factor), baseline tokens (4 x 4 patches + CLS, so attention rollout applies), d 64, 2 layers, "
        "4 heads; ~0.36M parameters.",
        backbones=("resnet10", "resnet18"),
        backbone_width=0.125,
        mode="baseline",
        **_SCOPEFORMER_CPU_TRANSFORMER,
    )
)
# PatchConvNet (Touvron et al.): convolutional trunk with class-attention pooling.
register_model("patchconvnet_s60")(
    _with_defaults(PatchConvNet, "PatchConvNet S60: d 384, 60 blocks, 1000 classes, 25,231,096 parameters.")
)
register_model("patchconvnet_small")(
    _with_defaults(PatchConvNet, "PatchConvNet for CPU: d 64, 6 blocks, 2 classes.", dim=64, depth=6, out_channels=2)
)

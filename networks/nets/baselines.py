# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Convolutional baselines for SaDNN, taken from MONAI as configured constructors (not reimplemented)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monai.networks.nets import BasicUNet, ResNet, resnet18

__all__ = ["resnet18_baseline", "unet_baseline"]


def unet_baseline(
    spatial_dims: int = 2,
    in_channels: int = 1,
    out_channels: int = 2,
    features: Sequence[int] = (16, 32, 64, 128, 256, 16),
    upsample: str = "nontrainable",
    norm: str | tuple = "batch",
    act: str | tuple = ("relu", {"inplace": True}),
    dropout: float = 0.0,
) -> BasicUNet:
    """Segmentation baseline: MONAI ``BasicUNet`` (two 3x3 convs per level, four 2x max-pools).

    It upsamples with ``upsample="nontrainable"`` (1x1 pre-conv + bilinear/trilinear interpolation) instead of
    transposed convolutions, because eager/FX INT8 ``ConvTranspose`` gives wrong outputs on x86 (fbgemm/onednn),
    and uses BatchNorm + ReLU, which fold into INT8 convolutions, instead of MONAI's InstanceNorm + LeakyReLU.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (classes; logits).
        features: BasicUNet's six widths (five levels, then the last decoder level).
        upsample: ``"nontrainable"`` (default), ``"pixelshuffle"`` or ``"deconv"`` (transposed convs).
        norm: normalisation of every conv (MONAI ``Norm`` name or (name, args)).
        act: activation of every conv (MONAI ``Act`` name or (name, args)).
        dropout: dropout ratio in every conv block.

    Shapes:
        ``(B, in_channels, *spatial) -> (B, out_channels, *spatial)``; spatial sizes divisible by 16.
    """
    features = tuple(int(f) for f in features)
    if len(features) != 6:
        raise ValueError(f"features must have the six BasicUNet widths, got {features!r}.")
    return BasicUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        features=features,
        act=act,
        norm=norm,
        dropout=dropout,
        upsample=upsample,
    )


def resnet18_baseline(spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 14, **kwargs: Any) -> ResNet:
    """Classification baseline: MONAI ``resnet18`` (randomly initialised), logits for ``out_channels`` classes.

    The stem is the usual 7x7 convolution with stride 2 (MONAI's default is stride 1, which costs 4x the compute on
    chest X-rays); override with ``conv1_t_stride=1``. Other keyword arguments go to ``monai.networks.nets.ResNet``.

    Shapes:
        ``(B, in_channels, *spatial) -> (B, out_channels)``.
    """
    kwargs.setdefault("conv1_t_stride", 2)
    return resnet18(
        pretrained=False, spatial_dims=spatial_dims, n_input_channels=in_channels, num_classes=out_channels, **kwargs
    )

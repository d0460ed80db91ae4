# Copyright MedAttnSlicer contributors. Apache-2.0.
"""PatchConvNet (Touvron et al., "Augmenting Convolutional networks with attention-based aggregation", 2021).

A convolutional patch stem, a columnar trunk of residual convolution blocks at constant resolution, and a single
class-attention block that pools the patch tokens; its attention row is a built-in saliency map.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import ChannelSELayer, Convolution
from monai.networks.layers import Conv, DropPath
from torch import nn

from networks.arguments import check_spatial_dims
from networks.blocks.class_attention import ClassAttentionBlock

__all__ = ["PatchConvNet", "PatchConvBlock", "ChannelsFirstLayerNorm", "patch_conv_stem"]


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a channels-first tensor.

    An ``nn.LayerNorm`` module applied to the tensor with channels moved last (the LayerNorm module, unlike
    ``F.layer_norm``, also has a quantised implementation).

    Args:
        channels: number of channels ``C``.
        eps: LayerNorm epsilon.

    Shapes:
        ``(B, C, *S) -> (B, C, *S)``.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


def patch_conv_stem(spatial_dims: int, in_channels: int, dim: int) -> nn.Sequential:
    """Four 3x3 stride-2 convolutions without bias, ``in -> dim/8 -> dim/4 -> dim/2 -> dim``, GELU between.

    Shapes:
        ``(B, in_channels, *S) -> (B, dim, *S / 16)``.
    """
    if dim % 8 != 0:
        raise ValueError(f"dim must be divisible by 8 for the stem widths, got {dim}.")
    widths = (in_channels, dim // 8, dim // 4, dim // 2, dim)
    layers = [
        Convolution(
            spatial_dims, cin, cout, strides=2, kernel_size=3, act="GELU", norm=None, bias=False, conv_only=(i == 3)
        )
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:]))
    ]
    return nn.Sequential(*layers)


class PatchConvBlock(nn.Module):
    """PatchConvNet trunk block: ``x + gamma * F(LN(x))``.

    ``F`` = 1x1 conv -> GELU -> depthwise 3x3 conv -> GELU -> squeeze-excite (MONAI ``ChannelSELayer``,
    reduction 4) -> 1x1 conv (convolutions with bias); LayerNorm over channels, eps 1e-6; ``gamma`` a per-channel
    layer scale initialised to ``layer_scale_init``.

    Args:
        spatial_dims: 2 or 3.
        dim: channels.
        layer_scale_init: initial layer-scale value.
        drop_path: stochastic-depth probability of the residual branch.

    Shapes:
        ``(B, dim, *S) -> (B, dim, *S)``.
    """

    def __init__(self, spatial_dims: int, dim: int, layer_scale_init: float = 1e-4, drop_path: float = 0.0) -> None:
        super().__init__()
        conv_type = Conv[Conv.CONV, spatial_dims]
        self.norm = ChannelsFirstLayerNorm(dim, eps=1e-6)
        self.branch = nn.Sequential(
            conv_type(dim, dim, 1),
            nn.GELU(),
            conv_type(dim, dim, 3, padding=1, groups=dim),
            nn.GELU(),
            ChannelSELayer(spatial_dims, dim, r=4, acti_type_1="relu", acti_type_2="sigmoid"),
            conv_type(dim, dim, 1),
        )
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gamma.reshape(1, -1, *([1] * (x.ndim - 2)))
        return x + self.drop_path(scale * self.branch(self.norm(x)))


class PatchConvNet(nn.Module):
    """PatchConvNet classifier: conv stem, ``depth`` PatchConvBlocks, one class-attention block, LN, linear head.

    Defaults give PatchConvNet-S60 (``dim=384``, ``depth=60``): 25,231,096 parameters at 1000 classes (stem
    872,208; 374,880 per block; aggregation block 1,479,936; class token + final LayerNorm 1,152; head 385,000).
    Smaller variants come from ``dim``/``depth`` (B60: 768/60, S120: 384/120, ...).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: number of classes.
        dim: trunk width (divisible by 8).
        depth: number of trunk blocks.
        mlp_ratio: MLP width ratio of the class-attention block.
        layer_scale_init: initial layer-scale value of trunk and aggregation.
        heads: class-attention heads (the paper uses 1).
        dropout: dropout of the class-attention block and before the head.
        drop_path_rate: largest stochastic-depth probability (linearly increasing over the trunk).

    Shapes:
        ``(B, in_channels, *S) -> (B, out_channels)`` with a token grid of ``S / 16`` (224 -> 14 x 14); with
        ``return_attention=True`` also the attention map ``(B, *S / 16)``.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 1000,
        dim: int = 384,
        depth: int = 60,
        mlp_ratio: float = 3.0,
        layer_scale_init: float = 1e-4,
        heads: int = 1,
        dropout: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        if depth < 0:
            raise ValueError(f"depth must be non-negative, got {depth}.")
        if not 0.0 <= drop_path_rate <= 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1], got {drop_path_rate}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.dim = dim
        self.stem = patch_conv_stem(spatial_dims, in_channels, dim)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*(PatchConvBlock(spatial_dims, dim, layer_scale_init, rate) for rate in rates))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.aggregation = ClassAttentionBlock(dim, heads, mlp_ratio, layer_scale_init, qkv_bias=True, dropout=dropout)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.drop_head = nn.Dropout(dropout)
        self.head = nn.Linear(dim, out_channels)

        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x: images ``(B, in_channels, *S)``.
            return_attention: also return the class-attention map over the token grid.

        Returns:
            logits ``(B, out_channels)``; with ``return_attention`` also the map ``(B, *S / 16)``: the class token's
            attention over the patch tokens (the class-token entry dropped, renormalised to sum to 1 per image,
            averaged over heads when there are several).
        """
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape (B, {self.in_channels}, {', '.join(['*'] * self.spatial_dims)}), "
                f"got {tuple(x.shape)}."
            )
        features = self.blocks(self.stem(x))  # (B, C, *grid)
        grid = features.shape[2:]
        tokens = features.flatten(2).transpose(1, 2)  # (B, N, C)
        cls, weights = self.aggregation(tokens, self.cls_token.expand(tokens.shape[0], -1, -1))
        logits = self.head(self.drop_head(self.norm(cls[:, 0])))
        if not return_attention:
            return logits
        patch_weights = weights[:, :, 1:].mean(dim=1)  # (B, N)
        patch_weights = patch_weights / patch_weights.sum(dim=-1, keepdim=True)
        return logits, patch_weights.reshape(tokens.shape[0], *grid)

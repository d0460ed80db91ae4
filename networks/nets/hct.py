# Copyright MedAttnSlicer contributors. Apache-2.0.
"""HCT: the hybrid convolution-transformer of Taha et al., "Deep is a Luxury We Don't Have" (MICCAI 2022).

GMIC's pre-activation ResNet-22 in which the stages listed in ``attention_stages`` use Attention-Convolution (AC)
blocks: the first 3x3 convolution of each block is replaced by a linear-complexity multi-head self-attention
over all pixels (voxels) of the feature map, so high-resolution mammograms get a global receptive field.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers import Conv, Norm, Pool
from torch import nn

from networks.arguments import check_spatial_dims
from networks.blocks.nystrom_attention import NystromAttention
from networks.blocks.performer_attention import PerformerAttention

__all__ = ["HCT", "HCT_ATTENTIONS", "PreActBasicBlock", "AttentionConvBlock", "MultiheadSelfAttention"]

HCT_ATTENTIONS = ("performer_softmax", "performer_relu", "nystrom", "softmax")


class MultiheadSelfAttention(nn.Module):
    """Exact softmax multi-head self-attention on tokens (``torch.nn.MultiheadAttention``), the quadratic reference.

    Args:
        dim: token dimension ``C``; must be divisible by ``heads``.
        heads: number of attention heads.
        dropout: dropout probability on the attention weights (training only).

    Shapes:
        input ``(B, N, C)`` -> output ``(B, N, C)``.
    """

    def __init__(self, dim: int, heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}).")
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, bias=True, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


def _token_attention(
    kind: str,
    dim: int,
    heads: int,
    dropout: float,
    num_features: int | None,
    num_landmarks: int,
    pinv_iterations: int,
) -> nn.Module:
    if kind == "performer_softmax":
        return PerformerAttention(dim, heads, kernel="softmax", num_features=num_features, dropout=dropout)
    if kind == "performer_relu":
        return PerformerAttention(dim, heads, kernel="relu", num_features=num_features, dropout=dropout)
    if kind == "nystrom":
        return NystromAttention(
            dim, heads, num_landmarks=num_landmarks, pinv_iterations=pinv_iterations, dropout=dropout
        )
    if kind == "softmax":
        return MultiheadSelfAttention(dim, heads, dropout=dropout)
    raise ValueError(f"attention must be one of {HCT_ATTENTIONS}, got {kind!r}.")


class _PreActivationBlock(nn.Module):
    """What GMIC's pre-activation blocks share: ``a = ReLU(BN1(x))`` and a residual that is ``x``, or
    ``conv1x1_stride(a)`` (no bias) when ``downsample`` is set. Subclasses add their layers after ``__init__`` and
    end with ``self.relu`` and ``self.downsample = self._residual_projection(...)``, in the order the blocks always
    created them (the seeded initial weights stay the same)."""

    relu: nn.Module
    downsample: nn.Module | None

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int, downsample: bool) -> None:
        super().__init__()
        if not downsample and (stride != 1 or in_channels != out_channels):
            raise ValueError("a block that changes stride or width needs downsample=True.")
        self.bn1 = Norm[Norm.BATCH, spatial_dims](in_channels)

    @staticmethod
    def _residual_projection(
        spatial_dims: int, in_channels: int, out_channels: int, stride: int, downsample: bool
    ) -> nn.Module | None:
        conv_type = Conv[Conv.CONV, spatial_dims]
        return conv_type(in_channels, out_channels, 1, stride=stride, bias=False) if downsample else None

    def _preactivate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, residual)`` for input ``(B, in_channels, *S)``."""
        out = self.relu(self.bn1(x))
        return out, (x if self.downsample is None else self.downsample(out))


class PreActBasicBlock(_PreActivationBlock):
    """Pre-activation residual basic block (ResNet v2) in GMIC's style.

    ``out = conv3x3(ReLU(BN(conv3x3_stride(a)))) + residual`` with ``a = ReLU(BN(x))``; the residual is
    ``conv1x1_stride(a)`` (no bias) when ``downsample`` is set, else ``x``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first convolution (and of the downsample).
        downsample: whether the residual is a 1x1 projection (GMIC uses one in every stage's first block).

    Shapes:
        ``(B, in_channels, *S) -> (B, out_channels, *ceil(S / stride))``.
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, stride: int = 1, downsample: bool = False
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, stride, downsample)
        conv_type = Conv[Conv.CONV, spatial_dims]
        norm_type = Norm[Norm.BATCH, spatial_dims]
        self.conv1 = conv_type(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_type(out_channels)
        self.conv2 = conv_type(out_channels, out_channels, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.downsample = self._residual_projection(spatial_dims, in_channels, out_channels, stride, downsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, residual = self._preactivate(x)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + residual


class AttentionConvBlock(_PreActivationBlock):
    """HCT Attention-Convolution (AC) block: a pre-activation basic block whose first convolution is attention.

    ``a = ReLU(BN1(x))``; ``h = attention(a as tokens) + x``; ``out = conv3x3_stride(ReLU(BN2(h))) + residual``,
    the residual being ``conv1x1_stride(a)`` when ``downsample`` is set, else ``x``. The attention sees every
    pixel (voxel) of the feature map as a token of dimension ``in_channels``. There is no feed-forward layer.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (the attention dimension).
        out_channels: output channels.
        attention: token attention module mapping ``(B, N, in_channels)`` to the same shape.
        stride: stride of the convolution (and of the downsample).
        downsample: whether the residual is a 1x1 projection.

    Shapes:
        ``(B, in_channels, *S) -> (B, out_channels, *ceil(S / stride))``; ``N = prod(S)`` tokens.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        attention: nn.Module,
        stride: int = 1,
        downsample: bool = False,
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, stride, downsample)
        conv_type = Conv[Conv.CONV, spatial_dims]
        norm_type = Norm[Norm.BATCH, spatial_dims]
        self.attention = attention
        self.bn2 = norm_type(in_channels)
        self.conv = conv_type(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.downsample = self._residual_projection(spatial_dims, in_channels, out_channels, stride, downsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, residual = self._preactivate(x)
        tokens = out.flatten(2).transpose(1, 2)  # (B, N, C)
        out = self.attention(tokens).transpose(1, 2).reshape(x.shape) + x
        out = self.conv(self.relu(self.bn2(out)))
        return out + residual


class HCT(nn.Module):
    """Hybrid Convolution-Transformer (HCT) classifier on GMIC's pre-activation ResNet-22.

    Layout (defaults: the paper's network, 1,737,010 parameters at 2 classes)::

        stem   conv7x7 stride 2 (no bias) in_channels -> channels[0]; max-pool 3x3 stride 2
        stage s (s = 0..4), blocks[s] blocks, channels[s], the first with stride strides[s] and a 1x1 downsample:
               pre-activation basic blocks, or AC blocks if s in attention_stages
        head   BN -> ReLU -> global average pool -> Linear(channels[-1], out_channels)

    ``attention_stages=()`` gives the all-convolution GMIC ResNet-22 (2,800,050 parameters). Input sizes are
    free; the attention cost is linear in the token count except for ``attention="softmax"`` (quadratic).

    Args:
        spatial_dims: 2 or 3 (3D tokens are the ``D*H*W`` voxels of a feature map).
        in_channels: input channels.
        out_channels: number of classes (logits).
        channels: widths of the five stages.
        blocks: blocks per stage.
        attention_stages: indices of the stages made of AC blocks.
        attention: ``"performer_softmax"``, ``"performer_relu"`` (FAVOR+), ``"nystrom"`` or ``"softmax"`` (exact).
        heads: attention heads (each AC block's input width must be divisible by it).
        dropout: dropout of the attention modules.
        strides: stride of each stage's first block.
        num_features: Performer random features per head (``None``: ``int(d ln d)``).
        num_landmarks: Nystrom landmarks.
        pinv_iterations: Nystrom pseudo-inverse iterations.

    Shapes:
        ``(B, in_channels, *S) -> (B, out_channels)``.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        blocks: Sequence[int] = (2, 2, 2, 2, 2),
        attention_stages: Sequence[int] = (3, 4),
        attention: str = "performer_softmax",
        heads: int = 8,
        dropout: float = 0.1,
        strides: Sequence[int] = (2, 2, 2, 2, 2),
        num_features: int | None = None,
        num_landmarks: int = 64,
        pinv_iterations: int = 6,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        channels, blocks, strides = tuple(channels), tuple(blocks), tuple(strides)
        if not (len(channels) == len(blocks) == len(strides)) or len(channels) == 0:
            raise ValueError(
                f"channels, blocks and strides need one entry per stage, got {channels!r}, {blocks!r}, {strides!r}."
            )
        if min(channels) < 1 or min(blocks) < 1 or min(strides) < 1:
            raise ValueError("channels, blocks and strides must be positive.")
        attention_stages = tuple(sorted(set(attention_stages)))
        if any(not 0 <= s < len(channels) for s in attention_stages):
            raise ValueError(
                f"attention_stages must be stage indices in [0, {len(channels)}), got {attention_stages!r}."
            )
        if attention not in HCT_ATTENTIONS:
            raise ValueError(f"attention must be one of {HCT_ATTENTIONS}, got {attention!r}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.attention_stages = attention_stages
        self.attention = attention

        conv_type = Conv[Conv.CONV, spatial_dims]
        self.stem = nn.Sequential(
            conv_type(in_channels, channels[0], 7, stride=2, padding=3, bias=False),
            Pool[Pool.MAX, spatial_dims](kernel_size=3, stride=2),
        )
        stages = []
        width = channels[0]
        for index, (stage_width, num_blocks, stride) in enumerate(zip(channels, blocks, strides)):
            stage = []
            for block_index in range(num_blocks):
                block_in = width if block_index == 0 else stage_width
                block_stride = stride if block_index == 0 else 1
                first = block_index == 0
                if index in attention_stages:
                    if block_in % heads != 0:
                        raise ValueError(
                            f"AC block input width {block_in} (stage {index}) is not divisible by heads={heads}."
                        )
                    token_attention = _token_attention(
                        attention, block_in, heads, dropout, num_features, num_landmarks, pinv_iterations
                    )
                    stage.append(
                        AttentionConvBlock(spatial_dims, block_in, stage_width, token_attention, block_stride, first)
                    )
                else:
                    stage.append(PreActBasicBlock(spatial_dims, block_in, stage_width, block_stride, first))
            stages.append(nn.Sequential(*stage))
            width = stage_width
        self.stages = nn.Sequential(*stages)
        self.final_norm = Norm[Norm.BATCH, spatial_dims](width)
        self.relu = nn.ReLU()
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.classifier = nn.Linear(width, out_channels)

        for module in self.modules():
            if isinstance(module, conv_type):
                nn.init.kaiming_normal_(module.weight)

    @torch.no_grad()
    def redraw_projections(self, generator: torch.Generator | None = None) -> int:
        """Resample the random features of every Performer attention; returns how many were redrawn."""
        count = 0
        for module in self.modules():
            if isinstance(module, PerformerAttention):
                module.redraw_projection(generator)
                count += 1
        return count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: images of shape ``(B, in_channels, *S)``.

        Returns:
            logits of shape ``(B, out_channels)``.
        """
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape (B, {self.in_channels}, {', '.join(['*'] * self.spatial_dims)}), "
                f"got {tuple(x.shape)}."
            )
        x = self.stages(self.stem(x))
        x = self.pool(self.relu(self.final_norm(x))).flatten(1)
        return self.classifier(x)

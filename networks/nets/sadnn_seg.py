# Copyright MedAttnSlicer contributors. Apache-2.0.
"""SaDNN-seg: the self-attentive U-net of Sathish, Khare and Sheet for liver segmentation in CT slices."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers import Dropout, Pool
from torch import nn

from networks.arguments import check_spatial_dims
from networks.blocks.local_self_attention import LocalSelfAttention, LocalSelfAttentionBlock

__all__ = ["SaDNNSeg"]

_MAX_UNPOOL = {2: nn.MaxUnpool2d, 3: nn.MaxUnpool3d}


class SaDNNSeg(nn.Module):
    """Self-attentive U-net whose every layer is a local self-attention layer (no convolutions but the 1x1
    projections inside the attention layers).

    With ``features = (f0, f1, f2, f3, f4)`` and ``f_out = final_features`` (default ``f0 // 2``)::

        encoder (attention -> BN -> ReLU)      decoder (attention -> ReLU, no BN)
        e0 = in -> f0                         unpool4(b), cat e4: 2*f4 -> f4, f4 -> f3
        e1 = f0 -> f1          pool1          unpool3, cat e3:    2*f3 -> f3, f3 -> f2
        f1 -> f2, f2 -> f2 = e2  pool2, drop  unpool2, cat e2:    2*f2 -> f2, f2 -> f1
        f2 -> f3, f3 -> f3 = e3  pool3, drop  unpool1, cat e1:    2*f1 -> f0
        f3 -> f4, f4 -> f4 = e4  pool4 -> b   cat e0:             2*f0 -> f_out
                                              output attention (1x1 window): f_out -> out_channels (logits)

    Pools are 2x max-pools returning indices for the matching max-unpools. The defaults give the paper's network
    (1 -> 64, 64 -> 128, ..., 1024 -> 512, ..., 128 -> 32, 32 -> 2): 7,971,298 parameters.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (classes, logits; background included).
        features: the five widths ``(f0, f1, f2, f3, f4)``.
        kernel_size: odd attention neighbourhood of every layer but the output one (which is 1).
        dropout: Dropout2d/3d probability after pool2 and pool3.
        final_features: width of the last decoder layer; ``None`` means ``max(features[0] // 2, spatial_dims)``
            (32 at defaults).
        heads: attention heads of every layer (the paper uses 1).

    Shapes:
        ``(B, in_channels, *spatial) -> (B, out_channels, *spatial)``; every spatial size divisible by 16.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (64, 128, 256, 512, 512),
        kernel_size: int = 3,
        dropout: float = 0.25,
        final_features: int | None = None,
        heads: int = 1,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        features = tuple(int(f) for f in features)
        if len(features) != 5 or min(features) < 1:
            raise ValueError(f"features must be five positive widths (f0, f1, f2, f3, f4), got {features!r}.")
        if final_features is None:
            final_features = max(features[0] // 2, spatial_dims)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.features = features
        self.final_features = final_features
        f0, f1, f2, f3, f4 = features

        def encoder(cin: int, cout: int) -> LocalSelfAttentionBlock:
            return LocalSelfAttentionBlock(spatial_dims, cin, cout, kernel_size, heads, norm="batch", act="relu")

        def decoder(cin: int, cout: int) -> LocalSelfAttentionBlock:
            return LocalSelfAttentionBlock(spatial_dims, cin, cout, kernel_size, heads, norm=None, act="relu")

        pool_type = Pool[Pool.MAX, spatial_dims]
        dropout_type = Dropout[Dropout.DROPOUT, spatial_dims]
        unpool_type = _MAX_UNPOOL[spatial_dims]

        self.enc0 = encoder(in_channels, f0)
        self.enc1 = encoder(f0, f1)
        self.pool1 = pool_type(kernel_size=2, return_indices=True)
        self.enc2 = nn.Sequential(encoder(f1, f2), encoder(f2, f2))
        self.pool2 = pool_type(kernel_size=2, return_indices=True)
        self.drop2 = dropout_type(dropout)
        self.enc3 = nn.Sequential(encoder(f2, f3), encoder(f3, f3))
        self.pool3 = pool_type(kernel_size=2, return_indices=True)
        self.drop3 = dropout_type(dropout)
        self.enc4 = nn.Sequential(encoder(f3, f4), encoder(f4, f4))
        self.pool4 = pool_type(kernel_size=2, return_indices=True)

        self.unpool4 = unpool_type(kernel_size=2)
        self.dec4 = nn.Sequential(decoder(2 * f4, f4), decoder(f4, f3))
        self.unpool3 = unpool_type(kernel_size=2)
        self.dec3 = nn.Sequential(decoder(2 * f3, f3), decoder(f3, f2))
        self.unpool2 = unpool_type(kernel_size=2)
        self.dec2 = nn.Sequential(decoder(2 * f2, f2), decoder(f2, f1))
        self.unpool1 = unpool_type(kernel_size=2)
        self.dec1 = decoder(2 * f1, f0)
        self.dec0 = decoder(2 * f0, final_features)
        # a 1x1 neighbourhood: the softmax over one neighbour is 1, so this is the value projection to logits
        self.output = LocalSelfAttention(spatial_dims, final_features, out_channels, kernel_size=1, heads=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"SaDNNSeg expects (B, {self.in_channels}, *{self.spatial_dims} spatial dims), got {tuple(x.shape)}."
            )
        if any(s % 16 for s in x.shape[2:]):
            raise ValueError(
                f"SaDNNSeg needs every spatial size divisible by 16 (four 2x pools), got {tuple(x.shape[2:])}."
            )
        e0 = self.enc0(x)
        e1 = self.enc1(e0)
        h, i1 = self.pool1(e1)
        e2 = self.enc2(h)
        h, i2 = self.pool2(e2)
        e3 = self.enc3(self.drop2(h))
        h, i3 = self.pool3(e3)
        e4 = self.enc4(self.drop3(h))
        h, i4 = self.pool4(e4)

        h = self.dec4(torch.cat([self.unpool4(h, i4, output_size=e4.shape[2:]), e4], dim=1))
        h = self.dec3(torch.cat([self.unpool3(h, i3, output_size=e3.shape[2:]), e3], dim=1))
        h = self.dec2(torch.cat([self.unpool2(h, i2, output_size=e2.shape[2:]), e2], dim=1))
        h = self.dec1(torch.cat([self.unpool1(h, i1, output_size=e1.shape[2:]), e1], dim=1))
        h = self.dec0(torch.cat([h, e0], dim=1))
        return self.output(h)

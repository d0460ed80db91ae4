# Copyright MedAttnSlicer contributors. Apache-2.0.
"""SaDNN-cls: the self-attentive multi-label classifier of Sathish, Khare and Sheet for chest X-rays."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers import Pool
from monai.networks.nets import FullyConnectedNet
from torch import nn

from networks.arguments import check_spatial_dims
from networks.blocks.local_self_attention import LocalSelfAttentionBlock

__all__ = ["SaDNNCls"]

_F, _T = False, True


class SaDNNCls(nn.Module):
    """A stack of local self-attention blocks (attention -> BN -> ReLU), 2x max-pools after the blocks flagged in
    ``pools``, then a fully connected head with ReLU between layers (MONAI's ``FullyConnectedNet``).

    The defaults give the paper's network for 1 x 512 x 512 chest X-rays: channels 16, 16p, 32, 32p, 64, 64p, 64,
    64p, 64, 64p, 64p (p: pool), six pools 512 -> 8, FC 4096 -> 1024 -> 256 -> 64 -> 14: 4,563,102 parameters.
    The output is logits for multi-label training with ``BCEWithLogitsLoss``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: number of classes.
        channels: output channels of each attention block.
        pools: one flag per block, True for a 2x max-pool after that block.
        fc: widths of the hidden fully connected layers.
        img_size: the (square/cubic) input size the FC head is built for; divisible by ``2 ** sum(pools)``.
        kernel_size: odd attention neighbourhood.
        heads: attention heads of every block (the paper uses 1).

    Shapes:
        ``(B, in_channels, img_size, img_size[, img_size]) -> (B, out_channels)``.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 14,
        channels: Sequence[int] = (16, 16, 32, 32, 64, 64, 64, 64, 64, 64, 64),
        pools: Sequence[bool] = (_F, _T, _F, _T, _F, _T, _F, _T, _F, _T, _T),
        fc: Sequence[int] = (1024, 256, 64),
        img_size: int = 512,
        kernel_size: int = 3,
        heads: int = 1,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        channels = tuple(int(c) for c in channels)
        pools = tuple(bool(p) for p in pools)
        if not channels:
            raise ValueError("channels must name at least one attention block.")
        if len(pools) != len(channels):
            raise ValueError(f"pools needs one flag per block: {len(channels)} channels but {len(pools)} pools.")
        n_pools = sum(pools)
        if not isinstance(img_size, int) or img_size < 1 or img_size % (2**n_pools) != 0:
            raise ValueError(f"img_size must be a positive multiple of 2**{n_pools} (the pools), got {img_size!r}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.img_size = img_size

        layers: list[nn.Module] = []
        pool_type = Pool[Pool.MAX, spatial_dims]
        previous = in_channels
        for width, pool in zip(channels, pools):
            layers.append(LocalSelfAttentionBlock(spatial_dims, previous, width, kernel_size, heads, "batch", "relu"))
            if pool:
                layers.append(pool_type(kernel_size=2))
            previous = width
        self.features = nn.Sequential(*layers)
        self.fc_in_features = channels[-1] * (img_size // 2**n_pools) ** spatial_dims
        self.classifier = FullyConnectedNet(self.fc_in_features, out_channels, list(fc), act="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels,) + (self.img_size,) * self.spatial_dims
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"SaDNNCls expects (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}.")
        return self.classifier(self.features(x))

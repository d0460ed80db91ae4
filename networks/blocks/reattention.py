# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Re-attention (DeepViT, Zhou et al. 2021) and the pre-norm transformer block built on it.

Re-attention mixes the softmax attention maps of the heads with a learnable ``heads x heads`` matrix ``Theta``
before applying them to the values: ``Attn = Norm(Theta^T softmax(Q K^T / sqrt(d_k)))``, ``out = Attn V``.
Efficient Scopeformer (Barhoumi & Rasool, MIDL 2022) uses it in its ViT encoder.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import MLPBlock
from torch import nn

from .token_attention import TokenAttention

__all__ = ["REATTENTION_NORMS", "ReAttention", "ReAttentionTransformerBlock"]

REATTENTION_NORMS = ("batch", "layer", None)


class ReAttention(TokenAttention):
    """Multi-head self-attention with DeepViT re-attention (projections and heads: :class:`TokenAttention`, fused
    ``qkv``/``proj`` layout).

    ``A_h = softmax(Q_h K_h^T / sqrt(d))``; ``A'_g = Norm(sum_h Theta[h, g] A_h)``; ``out = proj(concat_g A'_g V_g)``.
    ``Theta`` starts as the identity. ``norm="batch"`` normalises each mixed head map with a BatchNorm over the
    head channels (DeepViT); ``"layer"`` applies a LayerNorm over the head axis (vit-pytorch's variant); ``None``
    applies no norm. With ``reattention=False`` it is plain multi-head softmax attention (no ``Theta``, no norm).

    Args:
        dim: token dimension ``C``; must be divisible by ``heads``.
        heads: number of attention heads.
        dropout: dropout on the (re-)attention maps and on the output projection.
        qkv_bias: whether the query/key/value projection has a bias.
        reattention: whether to mix the heads' maps with ``Theta``.
        norm: ``"batch"``, ``"layer"`` or ``None``: the normalisation of the mixed maps.

    Shapes:
        input ``(B, N, C)`` -> output ``(B, N, C)``.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dropout: float = 0.0,
        qkv_bias: bool = False,
        reattention: bool = True,
        norm: str | None = "batch",
    ) -> None:
        super().__init__(dim, heads, dropout, qkv_bias, qkv_layout="fused")
        if norm not in REATTENTION_NORMS:
            raise ValueError(f"norm must be one of {REATTENTION_NORMS}, got {norm!r}.")
        self.scale = self.head_dim**-0.5
        self.reattention = reattention
        self.drop_weights = nn.Dropout(dropout)
        self.theta: nn.Parameter | None = nn.Parameter(torch.eye(heads)) if reattention else None
        self.norm: nn.Module | None = None
        self.norm_kind = norm if reattention else None
        if self.norm_kind == "batch":
            self.norm = nn.BatchNorm2d(heads)
        elif self.norm_kind == "layer":
            self.norm = nn.LayerNorm(heads)

    def mixed_maps(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """The heads' softmax maps, mixed by ``Theta`` and normalised (plain softmax maps without re-attention).

        Args:
            query: shape ``(B, heads, N, d)``.
            key: shape ``(B, heads, N, d)``.

        Returns:
            maps of shape ``(B, heads, N, N)`` (before dropout).
        """
        maps = torch.softmax(torch.matmul(query, key.transpose(-2, -1)) * self.scale, dim=-1)
        if self.theta is not None:
            maps = torch.einsum("bhij,hg->bgij", maps, self.theta)
            if self.norm_kind == "batch":
                maps = self.norm(maps)
            elif self.norm_kind == "layer":
                maps = self.norm(maps.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return maps

    def attention_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute the (re-)attention maps and the values.

        Args:
            x: tokens of shape ``(B, N, C)``.

        Returns:
            maps of shape ``(B, heads, N, N)`` (before dropout) and values of shape ``(B, heads, N, d)``.
        """
        query, key, value = self.project_heads(x)
        return self.mixed_maps(query, key), value

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Re-attention of the heads: ``(B, heads, N, d)`` each -> ``(B, heads, N, d)``."""
        return torch.matmul(self.drop_weights(self.mixed_maps(query, key)), value)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, reattention={self.reattention}, norm={self.norm_kind!r}"


class ReAttentionTransformerBlock(nn.Module):
    """Pre-norm transformer encoder block: ``x + ReAttention(LN(x))`` then ``x + MLP(LN(x))``.

    The MLP is MONAI's ``MLPBlock`` with GELU.

    Args:
        dim: token dimension ``C``.
        heads: attention heads.
        mlp_dim: hidden width of the MLP.
        dropout: dropout of attention and MLP.
        qkv_bias: whether the query/key/value projection has a bias.
        reattention: DeepViT re-attention (``True``) or plain multi-head attention (``False``).
        norm: normalisation of the re-attention maps (see :class:`ReAttention`).

    Shapes:
        input ``(B, N, C)`` -> output ``(B, N, C)``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_dim: int,
        dropout: float = 0.0,
        qkv_bias: bool = False,
        reattention: bool = True,
        norm: str | None = "batch",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = ReAttention(dim, heads, dropout, qkv_bias, reattention, norm)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, dropout_rate=dropout, act="GELU")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))

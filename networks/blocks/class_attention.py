# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Class attention (CaiT, Touvron et al. 2021): a learned class token attends to the patch tokens.

PatchConvNet (Touvron et al. 2021) aggregates its convolutional trunk with one such block; its single-head
attention row over the patches is the network's attention map.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import MLPBlock
from torch import nn

__all__ = ["ClassAttention", "ClassAttentionBlock"]


class ClassAttention(nn.Module):
    """Multi-head attention whose only query is the class token.

    For ``u = [cls; x]``: ``q = W_q u_0``, ``k = W_k u``, ``v = W_v u`` (all of ``u``, cls included),
    ``a = softmax(q k^T * d^-1/2)``, output ``proj(a v)`` for the class token only.

    Args:
        dim: token dimension ``C``; must be divisible by ``heads``.
        heads: number of heads (PatchConvNet uses 1).
        qkv_bias: whether the query/key/value projections have a bias.
        dropout: dropout on the attention weights and on the output projection.

    Shapes:
        input ``(B, 1 + N, C)`` -> class-token output ``(B, 1, C)`` and weights ``(B, heads, 1 + N)``.
    """

    def __init__(self, dim: int, heads: int = 1, qkv_bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}).")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}.")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.drop_weights = nn.Dropout(dropout)
        self.drop_output = nn.Dropout(dropout)

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            u: class token followed by the patch tokens, shape ``(B, 1 + N, C)``.

        Returns:
            the attended class token ``(B, 1, C)`` and the attention weights ``(B, heads, 1 + N)``
            (each row sums to 1; before dropout).
        """
        if u.ndim != 3:
            raise ValueError(f"expected tokens of shape (B, 1 + N, C), got {tuple(u.shape)}.")
        batch, tokens, channels = u.shape
        query = self.q(u[:, :1]).reshape(batch, 1, self.heads, self.head_dim).transpose(1, 2)  # (B, h, 1, d)
        key = self.k(u).reshape(batch, tokens, self.heads, self.head_dim).transpose(1, 2)  # (B, h, 1+N, d)
        value = self.v(u).reshape(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
        weights = torch.softmax(torch.matmul(query * self.scale, key.transpose(-2, -1)), dim=-1)  # (B, h, 1, 1+N)
        out = torch.matmul(self.drop_weights(weights), value).transpose(1, 2).reshape(batch, 1, channels)
        return self.drop_output(self.proj(out)), weights[:, :, 0]


class ClassAttentionBlock(nn.Module):
    """Class-attention block with layer scale, updating only the class token.

    ``cls <- cls + gamma1 * ClassAttention(LN([cls; x]))``; ``cls <- cls + gamma2 * MLP(LN(cls))``
    (LayerNorm eps 1e-6, MONAI ``MLPBlock`` with GELU, ``gamma`` vectors initialised to ``layer_scale_init``).

    Args:
        dim: token dimension ``C``.
        heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        layer_scale_init: initial value of ``gamma1`` and ``gamma2``.
        qkv_bias: whether the query/key/value projections have a bias.
        dropout: dropout of attention and MLP.

    Shapes:
        patch tokens ``(B, N, C)`` and class token ``(B, 1, C)`` -> class token ``(B, 1, C)`` and attention
        weights ``(B, heads, 1 + N)``.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 1,
        mlp_ratio: float = 3.0,
        layer_scale_init: float = 1e-4,
        qkv_bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attention = ClassAttention(dim, heads, qkv_bias, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), dropout_rate=dropout, act="GELU")
        self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))

    def forward(self, x: torch.Tensor, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x: patch tokens ``(B, N, C)``.
            cls: class token ``(B, 1, C)``.

        Returns:
            updated class token ``(B, 1, C)`` and attention weights ``(B, heads, 1 + N)``.
        """
        attended, weights = self.attention(self.norm1(torch.cat([cls, x], dim=1)))
        cls = cls + self.gamma1 * attended
        cls = cls + self.gamma2 * self.mlp(self.norm2(cls))
        return cls, weights

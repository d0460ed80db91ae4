# Copyright MedAttnSlicer contributors. Apache-2.0.
"""The scaffolding shared by the project's multi-head self-attentions over a token sequence.

:class:`TokenAttention` owns what Nystromformer, Performer and re-attention have in common: the query/key/value
projections, the split into heads, the merge of the heads, the output projection and its dropout. A subclass
implements only :meth:`TokenAttention.attend`, the maths by which its heads' queries attend to keys and values.

Two parameter layouts are supported because trained checkpoints (the bundled HCT and Scopeformer weights) name
their parameters after them: ``"separate"`` (``to_q``, ``to_k``, ``to_v``, ``to_out``: lucidrains' Performer and
Nystromformer code, used by HCT) and ``"fused"`` (one ``qkv`` linear producing the three, ``proj`` on the output:
timm's ViT, used by DeepViT/Scopeformer).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["QKV_LAYOUTS", "TokenAttention"]

QKV_LAYOUTS = ("separate", "fused")


class TokenAttention(nn.Module):
    """Base of multi-head self-attention on tokens: projections -> heads -> :meth:`attend` -> merged heads -> output.

    Args:
        dim: token (embedding) dimension ``C``; must be divisible by ``heads``.
        heads: number of attention heads; each has dimension ``d = dim // heads``.
        dropout: dropout probability applied after the output projection.
        qkv_bias: whether the query/key/value projections have a bias (the output projection always has one).
        qkv_layout: ``"separate"`` (``to_q``/``to_k``/``to_v``/``to_out``) or ``"fused"`` (``qkv``/``proj``),
            see the module docstring.

    Shapes:
        input ``(B, N, C)`` -> output ``(B, N, C)``; :meth:`attend` maps ``(B, heads, N, d)`` queries, keys and values
        to ``(B, heads, N, d)``.
    """

    def __init__(
        self, dim: int, heads: int, dropout: float = 0.0, qkv_bias: bool = True, qkv_layout: str = "separate"
    ) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}).")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}.")
        if qkv_layout not in QKV_LAYOUTS:
            raise ValueError(f"qkv_layout must be one of {QKV_LAYOUTS}, got {qkv_layout!r}.")
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv_layout = qkv_layout
        if qkv_layout == "separate":
            self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
            self.to_k = nn.Linear(dim, dim, bias=qkv_bias)
            self.to_v = nn.Linear(dim, dim, bias=qkv_bias)
            self.to_out = nn.Linear(dim, dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
            self.proj = nn.Linear(dim, dim)
        self.drop_output = nn.Dropout(dropout)

    @property
    def output_projection(self) -> nn.Linear:
        """The linear applied to the merged heads (``to_out`` or ``proj`` by layout)."""
        return self.to_out if self.qkv_layout == "separate" else self.proj

    def project_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of the tokens, split into heads.

        Args:
            x: tokens of shape ``(B, N, C)``.

        Returns:
            three tensors of shape ``(B, heads, N, d)``.
        """
        if x.ndim != 3:
            raise ValueError(f"expected tokens of shape (B, N, C), got {tuple(x.shape)}.")
        batch, tokens, _ = x.shape
        if self.qkv_layout == "fused":
            qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            return qkv[0], qkv[1], qkv[2]
        return tuple(  # type: ignore[return-value]
            proj(x).reshape(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
            for proj in (self.to_q, self.to_k, self.to_v)
        )

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """Output projection and dropout of the heads' results.

        Args:
            out: shape ``(B, heads, N, d)``.

        Returns:
            shape ``(B, N, C)``.
        """
        batch, _, tokens, _ = out.shape
        out = out.transpose(1, 2).reshape(batch, tokens, self.heads * self.head_dim)
        return self.drop_output(self.output_projection(out))

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """The attention maths of a subclass: ``(B, heads, N, d)`` queries, keys, values -> ``(B, heads, N, d)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement attend(query, key, value)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: tokens of shape ``(B, N, C)``.

        Returns:
            attended tokens of shape ``(B, N, C)``.
        """
        return self.merge_heads(self.attend(*self.project_heads(x)))

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Nystromformer multi-head self-attention (linear in the token count).

Xiong et al., "Nystromformer: A Nystrom-Based Algorithm for Approximating Self-Attention", AAAI 2021,
one of the linear attentions compared in HCT (Taha et al., MICCAI 2022).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .token_attention import TokenAttention

__all__ = ["NystromAttention", "iterative_pinv", "nystrom_attention", "segment_means"]


def segment_means(x: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Means of ``num_segments`` contiguous segments along the token axis (the Nystrom landmarks).

    Segment ``i`` covers tokens ``floor(i N / s)`` to ``ceil((i + 1) N / s)`` (adaptive average pooling), so no
    padding is needed when ``s`` does not divide ``N``; with ``s == N`` the landmarks are the tokens themselves.

    Args:
        x: shape ``(B, heads, N, d)``.
        num_segments: number of landmarks ``s`` with ``1 <= s <= N``.

    Returns:
        shape ``(B, heads, s, d)``.
    """
    batch, heads, tokens, dim = x.shape
    if not 1 <= num_segments <= tokens:
        raise ValueError(f"num_segments must be in [1, {tokens}], got {num_segments}.")
    pooled = F.adaptive_avg_pool1d(x.reshape(batch * heads, tokens, dim).transpose(1, 2), num_segments)
    return pooled.transpose(1, 2).reshape(batch, heads, num_segments, dim)


def iterative_pinv(matrix: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse by the Newton-type iteration of the Nystromformer paper.

    ``Z_0 = A^T / (||A||_1 ||A||_inf)`` and ``Z_{j+1} = Z_j (13 I - A Z_j (15 I - A Z_j (7 I - A Z_j))) / 4``,
    evaluated per matrix of the batch. Only matmuls are used, so it is cheap and differentiable.

    Args:
        matrix: shape ``(..., s, s)``.
        iterations: number of iterations; more give a closer inverse of ill-conditioned matrices.

    Returns:
        approximate pseudo-inverse of shape ``(..., s, s)``.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be positive, got {iterations}.")
    abs_matrix = matrix.abs()
    max_col_sum = abs_matrix.sum(dim=-2).amax(dim=-1, keepdim=True).unsqueeze(-1)
    max_row_sum = abs_matrix.sum(dim=-1).amax(dim=-1, keepdim=True).unsqueeze(-1)
    inverse = matrix.transpose(-2, -1) / (max_col_sum * max_row_sum)
    identity = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    for _ in range(iterations):
        product = matrix @ inverse
        inverse = 0.25 * inverse @ (13 * identity - product @ (15 * identity - product @ (7 * identity - product)))
    return inverse


def nystrom_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_landmarks: int, pinv_iterations: int = 6
) -> torch.Tensor:
    """Nystrom approximation of ``softmax(Q K^T / sqrt(d)) V`` for already split heads.

    ``softmax(Q Kl^T) pinv(softmax(Ql Kl^T)) (softmax(Ql K^T) V)`` with segment-mean landmarks ``Ql``, ``Kl``.
    Uses ``min(num_landmarks, N)`` landmarks; cost ``O(N s d + s^3)``.

    Args:
        query: shape ``(B, heads, N, d)``.
        key: shape ``(B, heads, N, d)``.
        value: shape ``(B, heads, N, e)``.
        num_landmarks: number of landmarks ``s``.
        pinv_iterations: iterations of :func:`iterative_pinv`.

    Returns:
        shape ``(B, heads, N, e)``.
    """
    query = query * query.shape[-1] ** -0.5
    landmarks = min(num_landmarks, key.shape[-2])
    query_landmarks = segment_means(query, landmarks)
    key_landmarks = segment_means(key, landmarks)
    kernel_query = torch.softmax(query @ key_landmarks.transpose(-2, -1), dim=-1)  # (B, h, N, s)
    kernel_landmarks = torch.softmax(query_landmarks @ key_landmarks.transpose(-2, -1), dim=-1)  # (B, h, s, s)
    kernel_key = torch.softmax(query_landmarks @ key.transpose(-2, -1), dim=-1)  # (B, h, s, N)
    landmark_values = kernel_key @ value  # (B, h, s, e)
    return kernel_query @ (iterative_pinv(kernel_landmarks, pinv_iterations) @ landmark_values)


class NystromAttention(TokenAttention):
    """Multi-head self-attention approximated with Nystrom landmarks (projections and heads: :class:`TokenAttention`).

    Args:
        dim: token (embedding) dimension ``C``; must be divisible by ``heads``.
        heads: number of attention heads.
        num_landmarks: number of segment-mean landmarks (capped at the token count).
        pinv_iterations: iterations of the Newton pseudo-inverse.
        dropout: dropout probability applied to the output projection.
        qkv_bias: whether the query/key/value projections have a bias.

    Shapes:
        input ``(B, N, C)`` -> output ``(B, N, C)``.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        num_landmarks: int = 64,
        pinv_iterations: int = 6,
        dropout: float = 0.0,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__(dim, heads, dropout, qkv_bias, qkv_layout="separate")
        if num_landmarks < 1:
            raise ValueError(f"num_landmarks must be positive, got {num_landmarks}.")
        if pinv_iterations < 1:
            raise ValueError(f"pinv_iterations must be positive, got {pinv_iterations}.")
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """:func:`nystrom_attention` of the heads: ``(B, heads, N, d)`` each -> ``(B, heads, N, d)``."""
        return nystrom_attention(query, key, value, self.num_landmarks, self.pinv_iterations)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, num_landmarks={self.num_landmarks}, pinv_iterations={self.pinv_iterations}"

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Performer multi-head self-attention with FAVOR+ random features (linear in the token count).

Choromanski et al., "Rethinking Attention with Performers", ICLR 2021, as used by the HCT
(Taha et al., MICCAI 2022) attention-convolution blocks.
"""

from __future__ import annotations

import math

import torch

from .token_attention import TokenAttention

__all__ = [
    "PerformerAttention",
    "favor_attention",
    "linear_attention",
    "orthogonal_random_features",
    "relu_kernel_features",
    "softmax_kernel_features",
]

SOFTMAX_KERNEL_EPS = 1e-4
RELU_KERNEL_EPS = 1e-3


def orthogonal_random_features(
    num_features: int,
    dim: int,
    scaling: str = "fixed",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw a block-orthogonal Gaussian random projection.

    Rows come in blocks of ``dim`` mutually orthogonal unit vectors (QR of a Gaussian matrix); the last
    block is truncated so there are ``num_features`` rows in total. Orthogonal rows lower the variance of
    the FAVOR+ estimator compared with i.i.d. Gaussian rows.

    Args:
        num_features: number of random features ``m`` (rows).
        dim: dimension ``d`` of the vectors being projected (columns).
        scaling: row norms. ``"fixed"``: every row has norm ``sqrt(dim)`` (the regularised variant used by the
            HCT and Performer reference code). ``"chi"``: norms of independent ``N(0, I_d)`` vectors, so each
            row is marginally an exact Gaussian sample (the unbiased FAVOR+ estimator).
        generator: optional random generator for reproducible draws.
        dtype: floating point type of the result.

    Returns:
        projection of shape ``(num_features, dim)``.
    """
    if num_features < 1 or dim < 1:
        raise ValueError(f"num_features and dim must be positive, got num_features={num_features}, dim={dim}.")
    if scaling not in ("fixed", "chi"):
        raise ValueError(f"scaling must be 'fixed' or 'chi', got {scaling!r}.")
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        q, _ = torch.linalg.qr(gaussian)
        blocks.append(q.T)  # rows of q.T are orthonormal
    rows = torch.cat(blocks, dim=0)[:num_features]
    if scaling == "fixed":
        norms = torch.full((num_features,), math.sqrt(dim), dtype=torch.float64)
    else:
        norms = torch.randn(num_features, dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return (norms[:, None] * rows).to(dtype)


def softmax_kernel_features(
    x: torch.Tensor, projection: torch.Tensor, is_query: bool, eps: float = SOFTMAX_KERNEL_EPS
) -> torch.Tensor:
    """Positive random features whose inner products estimate the softmax kernel ``exp(q . k / sqrt(d))``.

    ``phi(x) = m^-1/2 (exp(W x' - |x'|^2 / 2 - c) + eps)`` with ``x' = d^-1/4 x``. The stabiliser ``c`` is the
    row-wise maximum for queries and the maximum over all tokens and features for keys: both factor out
    of the normalised attention (apart from the tiny ``eps``), so they only prevent overflow.

    Args:
        x: queries or keys, shape ``(B, heads, N, d)``.
        projection: random projection ``W``, shape ``(m, d)``.
        is_query: whether ``x`` holds queries (row-wise stabiliser) or keys (global stabiliser).
        eps: small positive constant keeping the features strictly positive.

    Returns:
        features of shape ``(B, heads, N, m)``.
    """
    head_dim = x.shape[-1]
    x = x * head_dim**-0.25
    projected = torch.matmul(x, projection.to(x.dtype).T)
    half_sq_norm = 0.5 * (x * x).sum(dim=-1, keepdim=True)
    stabiliser = projected.amax(dim=-1, keepdim=True) if is_query else projected.amax(dim=(-2, -1), keepdim=True)
    # the stabiliser is a constant shift, not a function to differentiate through
    stabiliser = stabiliser.detach()
    return projection.shape[0] ** -0.5 * (torch.exp(projected - half_sq_norm - stabiliser) + eps)


def relu_kernel_features(x: torch.Tensor, projection: torch.Tensor, eps: float = RELU_KERNEL_EPS) -> torch.Tensor:
    """Generalised-attention (ReLU kernel) features ``phi(x) = ReLU(W x') + eps`` with ``x' = d^-1/4 x``.

    Args:
        x: queries or keys, shape ``(B, heads, N, d)``.
        projection: random projection ``W``, shape ``(m, d)``.
        eps: small positive constant keeping the features strictly positive.

    Returns:
        features of shape ``(B, heads, N, m)``.
    """
    x = x * x.shape[-1] ** -0.25
    return torch.relu(torch.matmul(x, projection.to(x.dtype).T)) + eps


def linear_attention(query_features: torch.Tensor, key_features: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Non-causal kernelised attention ``D^-1 phi(Q) (phi(K)^T V)``, ``D = diag(phi(Q) sum_j phi(K_j))``.

    Cost is ``O(N m d)`` time and ``O(N (m + d) + m d)`` memory: the ``N x N`` matrix is never formed.

    Args:
        query_features: ``phi(Q)``, shape ``(B, heads, N, m)``.
        key_features: ``phi(K)``, shape ``(B, heads, M, m)``.
        value: ``V``, shape ``(B, heads, M, e)``.

    Returns:
        attention output of shape ``(B, heads, N, e)``.
    """
    context = torch.matmul(key_features.transpose(-2, -1), value)  # (B, h, m, e)
    normaliser = torch.matmul(query_features, key_features.sum(dim=-2).unsqueeze(-1))  # (B, h, N, 1)
    return torch.matmul(query_features, context) / normaliser


def favor_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, projection: torch.Tensor, kernel: str = "softmax"
) -> torch.Tensor:
    """FAVOR+ attention of already split heads.

    With ``kernel="softmax"`` this is an unbiased-up-to-``eps`` (for ``"chi"``-scaled projections) estimate of
    ``softmax(Q K^T / sqrt(d)) V``; with ``kernel="relu"`` it is the Performer-ReLU generalised attention.

    Args:
        query: shape ``(B, heads, N, d)``.
        key: shape ``(B, heads, M, d)``.
        value: shape ``(B, heads, M, e)``.
        projection: random projection of shape ``(m, d)``.
        kernel: ``"softmax"`` or ``"relu"``.

    Returns:
        shape ``(B, heads, N, e)``.
    """
    if kernel == "softmax":
        query_features = softmax_kernel_features(query, projection, is_query=True)
        key_features = softmax_kernel_features(key, projection, is_query=False)
    elif kernel == "relu":
        query_features = relu_kernel_features(query, projection)
        key_features = relu_kernel_features(key, projection)
    else:
        raise ValueError(f"kernel must be 'softmax' or 'relu', got {kernel!r}.")
    return linear_attention(query_features, key_features, value)


class PerformerAttention(TokenAttention):
    """Multi-head self-attention whose softmax is replaced by FAVOR+ random features (projections and heads:
    :class:`TokenAttention`).

    Time and memory grow linearly with the token count ``N``. The random projection is a buffer (saved
    with the state dict, never trained); call :meth:`redraw_projection` to resample it, e.g. periodically
    during training as the Performer paper recommends.

    Args:
        dim: token (embedding) dimension ``C``; must be divisible by ``heads``.
        heads: number of attention heads; each head has dimension ``d = dim // heads``.
        kernel: ``"softmax"`` (FAVOR+ estimate of softmax attention) or ``"relu"`` (generalised attention).
        num_features: number of random features ``m`` per head; ``None`` gives ``int(d * ln d)``.
        dropout: dropout probability applied to the output projection.
        qkv_bias: whether the query/key/value projections have a bias.
        scaling: row norms of the random projection, see :func:`orthogonal_random_features`.

    Shapes:
        input ``(B, N, C)`` -> output ``(B, N, C)``.
    """

    projection: torch.Tensor

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        kernel: str = "softmax",
        num_features: int | None = None,
        dropout: float = 0.0,
        qkv_bias: bool = True,
        scaling: str = "fixed",
    ) -> None:
        super().__init__(dim, heads, dropout, qkv_bias, qkv_layout="separate")
        if kernel not in ("softmax", "relu"):
            raise ValueError(f"kernel must be 'softmax' or 'relu', got {kernel!r}.")
        if num_features is None:
            num_features = int(self.head_dim * math.log(self.head_dim))
            if num_features < 1:
                raise ValueError(
                    f"head dimension {self.head_dim} gives int(d ln d) = {num_features} random features; "
                    "pass num_features explicitly."
                )
        if num_features < 1:
            raise ValueError(f"num_features must be positive, got {num_features}.")
        self.num_features = num_features
        self.kernel = kernel
        self.scaling = scaling
        self.register_buffer("projection", orthogonal_random_features(num_features, self.head_dim, scaling))

    @torch.no_grad()
    def redraw_projection(self, generator: torch.Generator | None = None) -> None:
        """Resample the random projection in place (keeps its device and dtype)."""
        fresh = orthogonal_random_features(self.num_features, self.head_dim, self.scaling, generator=generator)
        self.projection.copy_(fresh)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """:func:`favor_attention` of the heads: ``(B, heads, N, d)`` each -> ``(B, heads, N, d)``."""
        # the exponentials of the softmax kernel overflow in half precision
        out = favor_attention(query.float(), key.float(), value.float(), self.projection, self.kernel)
        return out.to(query.dtype)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, kernel={self.kernel!r}, num_features={self.num_features}, scaling={self.scaling!r}"

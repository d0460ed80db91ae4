# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Slow, obviously correct reference implementations that several test modules check the fast code against."""

from __future__ import annotations

import itertools

import torch

__all__ = ["reference_local_attention"]


def reference_local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel: torch.Tensor, kernel_size: int, heads: int
) -> torch.Tensor:
    """The SASA equation evaluated one pixel, head and neighbour at a time, in float64.

    ``q``, ``k``, ``v``: ``(B, C, *spatial)``; ``rel``: ``(kernel_size ** len(spatial), C)``. Keys and values are zero
    off the image (those neighbours still take part in the softmax with the logit ``q . rel[n]``). Returns
    ``(B, C, *spatial)`` in the dtype of ``q``; differentiable (autograd through the loop is the gradient reference).
    """
    dtype = q.dtype
    q, k, v, rel = (t.double() for t in (q, k, v, rel))
    batch, channels, *spatial = q.shape
    head_dim = channels // heads
    radius = kernel_size // 2
    offsets = list(itertools.product(range(-radius, radius + 1), repeat=len(spatial)))
    zeros = torch.zeros(head_dim, dtype=torch.float64)
    out = torch.zeros_like(v)
    for b in range(batch):
        for p in itertools.product(*(range(s) for s in spatial)):
            for h in range(heads):
                cs = slice(h * head_dim, (h + 1) * head_dim)
                logits, values = [], []
                for n, offset in enumerate(offsets):
                    nb = tuple(pi + oi for pi, oi in zip(p, offset, strict=True))
                    inside = all(0 <= i < s for i, s in zip(nb, spatial, strict=True))
                    key = k[(b, cs) + nb] if inside else zeros
                    values.append(v[(b, cs) + nb] if inside else zeros)
                    logits.append(torch.dot(q[(b, cs) + p], key + rel[n, cs]))
                weights = torch.softmax(torch.stack(logits), dim=0)
                out[(b, cs) + p] = (weights[:, None] * torch.stack(values)).sum(0)
    return out.to(dtype)

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Attention rollout (Abnar & Zuidema, ACL 2020) for Scopeformer in its ``"baseline"`` token configuration.

Each encoder block's attention is averaged over heads, the residual connection is accounted for by adding the
identity, rows are renormalised, and the blocks are composed::

    A'_l = norm_rows(mean_h A_l,h + I)        R = A'_L ... A'_2 A'_1

The class token's row of ``R`` over the ``grid^d`` patch tokens is a map on the pooled feature grid, resized to the
input. Scopeformer mixes heads with DeepViT re-attention whose BatchNorm/LayerNorm can make entries negative; the
applied (mixed, normalised) maps are rolled out with negative entries discarded, as gradient-free rollout assumes
non-negative attention.

Only the baseline mode has spatial tokens. In ``"deep_tr"`` and ``"efficient"`` the tokens are the ``dim``
feature channels (each token's vector is a whole grid map), so the rollout ranks channels, not places: use
Grad-CAM for those.
"""

from __future__ import annotations

import torch

from networks.blocks.reattention import ReAttention
from networks.explain.utils import check_image, evaluation_mode, normalize_maps, resize_to_input
from networks.nets.scopeformer import Scopeformer

__all__ = ["attention_rollout"]


@torch.no_grad()
def attention_rollout(model: Scopeformer, image: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """Attention-rollout maps of a baseline-mode Scopeformer on the input grid (class-agnostic).

    Args:
        model: a :class:`Scopeformer` with ``mode="baseline"`` (run in eval mode; its mode is restored after).
        image: ``(B, in_channels, *S)``.
        normalize: min-max each map to ``[0, 1]`` (else the rollout weights, summing to at most 1 per image).

    Returns:
        ``(B, *S)`` float32 maps.

    Raises:
        TypeError: ``model`` is not a Scopeformer.
        ValueError: the model's tokens are feature channels (``"deep_tr"``/``"efficient"``).
    """
    if not isinstance(model, Scopeformer):
        raise TypeError(
            f"attention rollout is implemented for Scopeformer (baseline mode), got {type(model).__name__}; "
            "use Grad-CAM, the class-attention map (PatchConvNet) or RISE."
        )
    if model.mode != "baseline":
        raise ValueError(
            f"attention rollout needs spatial tokens, but in Scopeformer mode {model.mode!r} the tokens are the "
            f"{model.dim} feature channels (the transposed configuration), so the rollout would rank channels, not "
            "image regions; use Grad-CAM (method='gradcam') for this model."
        )
    image = check_image(image, model.spatial_dims)
    attentions = [m for m in model.blocks.modules() if isinstance(m, ReAttention)]
    inputs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, args, _out: inputs.append(args[0])) for m in attentions]
    try:
        with evaluation_mode(model):
            model(image)
            maps = [attention.attention_maps(tokens)[0] for attention, tokens in zip(attentions, inputs)]
    finally:
        for handle in handles:
            handle.remove()
    if len(maps) != len(attentions):
        raise RuntimeError(f"expected {len(attentions)} attention calls in the forward pass, saw {len(maps)}.")
    tokens = maps[0].shape[-1]
    identity = torch.eye(tokens, device=image.device)
    rollout = identity.expand(image.shape[0], tokens, tokens)
    for layer_maps in maps:
        joint = layer_maps.float().mean(dim=1).clamp(min=0.0) + identity  # residual path: identity
        joint = joint / joint.sum(dim=-1, keepdim=True)
        rollout = torch.bmm(joint, rollout)
    grid = (model.grid,) * model.spatial_dims
    cls_to_patches = rollout[:, 0, 1:].reshape(image.shape[0], *grid)  # drop the class token's own column
    maps_on_input = resize_to_input(cls_to_patches, image.shape[2:])
    return normalize_maps(maps_on_input) if normalize else maps_on_input

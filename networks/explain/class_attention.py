# Copyright MedAttnSlicer contributors. Apache-2.0.
"""PatchConvNet's built-in explanation: the class token's attention over the patch tokens, on the input grid."""

from __future__ import annotations

import torch

from networks.explain.utils import check_image, evaluation_mode, normalize_maps, resize_to_input
from networks.nets.patchconvnet import PatchConvNet

__all__ = ["class_attention_map"]


@torch.no_grad()
def class_attention_map(model: PatchConvNet, image: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """The class-attention map of a :class:`PatchConvNet` (class-agnostic: one class token serves all classes),
    resized (bi/tri)linearly from the ``S / 16`` token grid to the input grid.

    Args:
        model: a PatchConvNet (run in eval mode; its mode is restored after).
        image: ``(B, in_channels, *S)``.
        normalize: min-max each map to ``[0, 1]`` (else the resized attention weights, which sum to 1 on the grid).

    Returns:
        ``(B, *S)`` float32 maps.
    """
    if not isinstance(model, PatchConvNet):
        raise TypeError(
            f"the class-attention map is PatchConvNet's, got {type(model).__name__}; use Grad-CAM or RISE instead."
        )
    image = check_image(image, model.spatial_dims)
    with evaluation_mode(model):
        _, attention = model(image, return_attention=True)  # (B, *S / 16)
    maps = resize_to_input(attention.float(), image.shape[2:])
    return normalize_maps(maps) if normalize else maps

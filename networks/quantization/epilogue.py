# Copyright MedAttnSlicer contributors. Apache-2.0.
"""What follows a local self-attention layer and can be folded into it during conversion.

SaDNN's blocks are ``attention -> BatchNorm -> ReLU`` inside ``nn.Sequential`` containers (MONAI's ADN nests another
Sequential). The INT8 core applies a per-channel epilogue ``relu?(scale * y + shift)`` while it stores its output,
so an eval BatchNorm and a ReLU right after the layer cost nothing there (:func:`fusable_epilogue`); without fusion
the value equalisation's per-channel gain can be folded into a following BatchNorm
(:func:`fold_into_following_batchnorm`).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FollowingLeaf", "fold_into_following_batchnorm", "following_leaves", "fusable_epilogue"]

# (parent container, attribute name in it, module)
FollowingLeaf = tuple[nn.Module, str, nn.Module]


def _first_applied_leaf(module: nn.Module) -> nn.Module:
    while isinstance(module, nn.Sequential) and len(module) > 0:
        module = module[0]
    return module


def _is_foldable_batchnorm(module: nn.Module, channels: int) -> bool:
    return (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and not module.training
        and module.track_running_stats
        and module.running_mean is not None
        and module.num_features == channels
    )


def fold_into_following_batchnorm(model: nn.Module, layer: nn.Module, gain: torch.Tensor) -> bool:
    """If ``layer``'s output goes straight into an eval-mode BatchNorm (next in a Sequential), make that BatchNorm
    take the output scaled by ``gain`` per channel (exactly: ``mean * u``, ``(var + eps) * u^2 - eps``).

    Returns:
        whether a BatchNorm was changed (``False``: the caller must undo the gain elsewhere).
    """
    for parent in model.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.children())
        for index, child in enumerate(children[:-1]):
            if child is not layer:
                continue
            norm = _first_applied_leaf(children[index + 1])
            if _is_foldable_batchnorm(norm, gain.numel()):
                with torch.no_grad():
                    norm.running_mean.mul_(gain)
                    norm.running_var.copy_((norm.running_var + norm.eps) * gain * gain - norm.eps)
                return True
            return False
    return False


def _flatten(container: nn.Module, child_names: list[str]) -> list[FollowingLeaf]:
    """The leaves of ``container``'s children ``child_names`` in order, descending into nested Sequentials."""
    leaves: list[FollowingLeaf] = []
    for child_name in child_names:
        child = container._modules[child_name]
        if isinstance(child, nn.Sequential):
            leaves += _flatten(child, list(child._modules))
        else:
            leaves.append((container, child_name, child))
    return leaves


def following_leaves(model: nn.Module, layer: nn.Module) -> list[FollowingLeaf]:
    """(parent, name, module) of the leaves that run right after ``layer`` in its Sequential (nested Sequentials
    such as MONAI's ADN are descended into), in order; empty when ``layer`` is not inside a Sequential."""
    for parent in model.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for index, name in enumerate(names):
            if parent._modules[name] is not layer:
                continue
            return _flatten(parent, names[index + 1 :])
    return []


def fusable_epilogue(
    model: nn.Module, layer: nn.Module, channels: int
) -> tuple[torch.Tensor | None, torch.Tensor | None, bool, list[FollowingLeaf]]:
    """The eval BatchNorm and/or ReLU directly following ``layer`` (in that order) as a per-channel epilogue.

    Returns:
        ``(scale, shift, relu, fused modules)``: ``scale``/``shift`` of shape ``(channels,)`` such that
        ``scale * y + shift == BatchNorm(y)``, or None without a BatchNorm; whether a ReLU follows; the modules the
        epilogue replaces (the caller swaps them for ``nn.Identity``).
    """
    scale = shift = None
    relu = False
    fused: list[FollowingLeaf] = []
    following = following_leaves(model, layer)
    position = 0
    if position < len(following):
        norm = following[position][2]
        if _is_foldable_batchnorm(norm, channels):
            with torch.no_grad():
                scale = torch.rsqrt(norm.running_var.float() + norm.eps)
                if norm.weight is not None:
                    scale = scale * norm.weight.float()
                shift = -norm.running_mean.float() * scale
                if norm.bias is not None:
                    shift = shift + norm.bias.float()
            fused.append(following[position])
            position += 1
    if position < len(following) and type(following[position][2]) is nn.ReLU:
        relu = True
        fused.append(following[position])
    return scale, shift, relu, fused

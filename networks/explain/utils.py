# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Helpers shared by the explanation methods: input checks, per-image normalisation, resizing to the input grid,
class targets and evaluation-mode contexts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from monai.transforms.utils import rescale_array
from monai.visualize.visualizer import default_upsampler
from torch import nn

_QUANTIZED_PACKAGES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized", "torch.nn.quantized")

__all__ = [
    "check_image",
    "normalize_maps",
    "resize_to_input",
    "resolve_targets",
    "evaluation_mode",
    "is_scripted",
    "is_quantized",
]


def check_image(image: torch.Tensor, spatial_dims: int | None = None) -> torch.Tensor:
    """Validate a batch of images ``(B, C, *S)`` (2 or 3 spatial dims, or exactly ``spatial_dims``) and return it.

    The batch axis is required: a single 2D image ``(C, H, W)`` would otherwise be indistinguishable from a batch
    of 1D signals, and a single 3D image ``(C, D, H, W)`` from a batch of 2D images.

    Raises:
        TypeError: ``image`` is not a floating-point tensor.
        ValueError: wrong number of dimensions, an empty axis, or non-finite values.
    """
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor of shape (B, C, *spatial), got {type(image).__name__}.")
    if not image.is_floating_point():
        raise TypeError(f"image must be a floating-point tensor, got dtype {image.dtype}.")
    allowed = (spatial_dims,) if spatial_dims is not None else (2, 3)
    if image.ndim - 2 not in allowed:
        dims = " or ".join(str(d) for d in allowed)
        raise ValueError(
            f"image must be a batch (B, C, *spatial) with {dims} spatial dims, got shape {tuple(image.shape)}; "
            "add the batch axis with image[None] for a single image."
        )
    if min(image.shape) < 1:
        raise ValueError(f"image has an empty axis: shape {tuple(image.shape)}.")
    if not torch.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values.")
    return image


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map of a batch ``(B, *S)`` to ``[0, 1]`` (MONAI ``rescale_array`` per image).

    A constant map (no pixel is more relevant than another, e.g. an all-zero Grad-CAM) becomes all zeros.

    Raises:
        ValueError: a map holds NaN or infinite values (non-finite model outputs or gradients).
    """
    maps = maps.detach().float()
    if not torch.isfinite(maps).all():
        raise ValueError(
            "the explanation map has NaN or infinite values: the model's outputs or gradients are not finite."
        )
    return torch.stack([rescale_array(m, 0.0, 1.0, dtype=torch.float32) for m in maps]).clamp_(0.0, 1.0)


def resize_to_input(maps: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
    """(Bi/tri)linearly resize maps ``(B, *grid)`` to ``(B, *spatial_size)`` with MONAI's CAM upsampler.

    ``align_corners=False``: each grid cell covers an equal share of the input, as for strided convolutions and
    adaptive pooling.
    """
    spatial_size = tuple(int(s) for s in spatial_size)
    if maps.ndim - 1 != len(spatial_size):
        raise ValueError(f"maps of shape {tuple(maps.shape)} cannot be resized to a {len(spatial_size)}D grid.")
    if tuple(maps.shape[1:]) == spatial_size:
        return maps
    return default_upsampler(spatial_size)(maps[:, None].float())[:, 0]


def resolve_targets(
    target: int | Sequence[int] | torch.Tensor | None,
    probabilities: torch.Tensor | None,
    batch: int,
    num_classes: int | None = None,
) -> list[int]:
    """One class index per image: ``target`` broadcast or checked, or (``None``) the most probable class.

    Args:
        target: an index for every image, one index per image, or ``None``.
        probabilities: ``(B, classes)`` class probabilities (needed when ``target`` is None).
        batch: number of images ``B``.
        num_classes: number of classes, to range-check ``target`` (taken from ``probabilities`` when given).

    Raises:
        ValueError: wrong count, non-integer or out-of-range indices.
    """
    if probabilities is not None:
        num_classes = probabilities.shape[-1]
    if target is None:
        if probabilities is None:
            raise ValueError("target=None needs the class probabilities to pick the top class.")
        return [int(i) for i in probabilities.argmax(dim=-1).tolist()]
    if isinstance(target, torch.Tensor):
        target = target.tolist()
    targets = [target] * batch if isinstance(target, int) else list(target)
    if len(targets) != batch:
        raise ValueError(f"target must be one class index or one per image ({batch}), got {len(targets)}.")
    for t in targets:
        if isinstance(t, bool) or not isinstance(t, int):
            raise ValueError(f"target must hold integer class indices, got {t!r}.")
        if t < 0 or (num_classes is not None and t >= num_classes):
            bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
            raise ValueError(f"target class {t} is out of range {bound}.")
    return [int(t) for t in targets]


@contextlib.contextmanager
def evaluation_mode(model: object) -> Iterator[None]:
    """Put an ``nn.Module`` in eval mode (dropout off, BatchNorm running statistics) and restore its mode after."""
    if not isinstance(model, nn.Module):
        yield
        return
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def is_scripted(model: object) -> bool:
    """Whether ``model`` is TorchScript (scripted, traced or loaded with ``torch.jit.load``)."""
    return isinstance(model, (torch.jit.ScriptModule, torch.jit.ScriptFunction))


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` contains quantised modules (no autograd: Grad-CAM cannot run on it)."""
    return any(type(m).__module__.startswith(_QUANTIZED_PACKAGES) for m in model.modules())

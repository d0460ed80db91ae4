# Copyright MedAttnSlicer contributors. Apache-2.0.
"""How closely an INT8 network reproduces its FP32 original on real images."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["prediction_agreement"]


def _as_batches(images: Iterable[torch.Tensor] | torch.Tensor) -> Iterable[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        return [images]
    return images


def prediction_agreement(
    fp32_model: nn.Module, int8_model: nn.Module, images: Iterable[torch.Tensor] | torch.Tensor
) -> dict[str, Any]:
    """Compare two networks' outputs on ``images`` (one batch ``(B, C, *spatial)`` or an iterable of batches).

    Segmentation outputs ``(B, classes, *spatial)``: predictions are the argmax over classes and foreground is every
    class but 0. Classification outputs ``(B, classes)``: predictions are the multi-label decisions ``logit > 0``
    (``top1_agreement`` also reports argmax agreement).

    Returns:
        ``dice``: pooled Dice of the FP32 and INT8 foreground/positive decisions over all images (1.0 when both are
        empty), ``mean_dice``: mean of per-image Dice, ``max_abs_logit_diff``, ``mean_abs_logit_diff``,
        ``max_abs_logit_fp32`` (the scale of the logits), ``prediction_agreement`` (fraction of equal argmax/label
        decisions), ``foreground_fp32`` / ``foreground_int8`` (counts), ``images``, ``task``.
    """
    fp32_model.eval()
    int8_model.eval()
    intersection = fp32_count = int8_count = 0
    per_image_dice: list[float] = []
    max_diff = 0.0
    sum_diff = 0.0
    n_values = 0
    max_logit = 0.0
    equal = total = 0
    top1_equal = 0
    n_images = 0
    task = None
    with torch.no_grad():
        for batch in _as_batches(images):
            if not isinstance(batch, torch.Tensor):
                raise TypeError(f"images must be tensors, got {type(batch).__name__}")
            out_fp32 = fp32_model(batch).float()
            out_int8 = int8_model(batch).float()
            if out_fp32.shape != out_int8.shape:
                raise ValueError(f"output shapes differ: FP32 {tuple(out_fp32.shape)} vs INT8 {tuple(out_int8.shape)}")
            if out_fp32.ndim < 2:
                raise ValueError(f"outputs must be (B, classes, ...), got {tuple(out_fp32.shape)}")
            diff = (out_fp32 - out_int8).abs()
            max_diff = max(max_diff, float(diff.max()))
            sum_diff += float(diff.sum())
            n_values += diff.numel()
            max_logit = max(max_logit, float(out_fp32.abs().max()))
            if out_fp32.ndim == 2:
                task = "classification"
                pred_fp32, pred_int8 = out_fp32 > 0, out_int8 > 0
                fg_fp32, fg_int8 = pred_fp32, pred_int8
                top1_equal += int((out_fp32.argmax(1) == out_int8.argmax(1)).sum())
            else:
                task = "segmentation"
                pred_fp32, pred_int8 = out_fp32.argmax(1), out_int8.argmax(1)
                fg_fp32, fg_int8 = pred_fp32 != 0, pred_int8 != 0
            equal += int((pred_fp32 == pred_int8).sum())
            total += pred_fp32.numel()
            for a, b in zip(fg_fp32, fg_int8):
                inter, na, nb = int((a & b).sum()), int(a.sum()), int(b.sum())
                intersection += inter
                fp32_count += na
                int8_count += nb
                per_image_dice.append(1.0 if na + nb == 0 else 2.0 * inter / (na + nb))
                n_images += 1
    if n_images == 0:
        raise ValueError("images yielded no batch")
    result = {
        "task": task,
        "images": n_images,
        "dice": 1.0 if fp32_count + int8_count == 0 else 2.0 * intersection / (fp32_count + int8_count),
        "mean_dice": sum(per_image_dice) / len(per_image_dice),
        "max_abs_logit_diff": max_diff,
        "mean_abs_logit_diff": sum_diff / max(n_values, 1),
        "max_abs_logit_fp32": max_logit,
        "prediction_agreement": equal / max(total, 1),
        "foreground_fp32": fp32_count,
        "foreground_int8": int8_count,
    }
    if task == "classification":
        result["top1_agreement"] = top1_equal / n_images
    return result

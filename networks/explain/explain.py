# Copyright MedAttnSlicer contributors. Apache-2.0.
"""One entry point for the explanation maps of any classifier: :func:`explain`.

Per-family defaults (``method="auto"``):

- :class:`PatchConvNet` -> its class-attention map (built in, one forward pass);
- :class:`HCT`, :class:`Scopeformer`, :class:`SaDNNCls` and other eager float ``nn.Module`` s -> Grad-CAM;
- TorchScript modules (e.g. INT8 artifacts), quantised eager models and plain callables -> RISE (black box).

The classifiers are multi-label: class probabilities are ``sigmoid(logits)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from networks.explain.attention_rollout import attention_rollout
from networks.explain.class_attention import class_attention_map
from networks.explain.grad_cam import default_cam_layer, grad_cam, layer_names
from networks.explain.rise import default_cell_size, rise_saliency
from networks.explain.utils import check_image, evaluation_mode, is_quantized, is_scripted, resolve_targets
from networks.nets.patchconvnet import PatchConvNet

__all__ = ["explain", "default_method", "probability_fn", "EXPLAIN_METHODS"]

EXPLAIN_METHODS = ("auto", "rise", "gradcam", "class_attention", "rollout")
ACTIVATIONS = ("auto", "sigmoid", "softmax", None)
# methods whose map does not depend on the class (one class token / attention path for all classes)
_CLASS_AGNOSTIC = ("class_attention", "rollout")
# keyword options each method accepts through explain()
_METHOD_OPTIONS = {
    "gradcam": {"layer"},
    "rise": {"num_masks", "cell_size", "p_keep", "batch_size", "baseline", "generator"},
}


def default_method(model_or_fn: object) -> str:
    """The ``method="auto"`` choice for a model or function (see the module docstring)."""
    if not isinstance(model_or_fn, nn.Module) or is_scripted(model_or_fn) or is_quantized(model_or_fn):
        return "rise"
    if isinstance(model_or_fn, PatchConvNet):
        return "class_attention"
    return "gradcam"


def probability_fn(
    model_or_fn: nn.Module | Callable[[torch.Tensor], torch.Tensor], activation: str | None = "auto"
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function mapping a batch to class probabilities ``(N, classes)``, without gradients, in eval mode.

    ``activation``: ``"sigmoid"`` (multi-label logits), ``"softmax"`` (single-label logits), ``None`` (the output
    already is probabilities) or ``"auto"``: sigmoid for modules (the project's classifiers return multi-label
    logits), none for plain callables (which, as RISE's ``predict_fn``, return probabilities).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}.")
    if not callable(model_or_fn):
        raise TypeError(f"expected an nn.Module or a callable, got {type(model_or_fn).__name__}.")
    if activation == "auto":
        activation = "sigmoid" if isinstance(model_or_fn, nn.Module) else None

    def predict(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), evaluation_mode(model_or_fn):
            outputs = model_or_fn(batch)
        if not isinstance(outputs, torch.Tensor) or outputs.ndim != 2:
            got = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
            raise ValueError(f"the classifier must return (N, classes) scores, got {got}.")
        outputs = outputs.float()
        if activation == "sigmoid":
            return torch.sigmoid(outputs)
        if activation == "softmax":
            return torch.softmax(outputs, dim=1)
        return outputs

    return predict


def explain(
    model_or_fn: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    *,
    method: str = "auto",
    target: int | Sequence[int] | None = None,
    activation: str | None = "auto",
    **options: Any,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Explanation maps of a classifier's prediction, on the input grid.

    Args:
        model_or_fn: a classifier module returning logits, a TorchScript module, or a function returning class
            probabilities (see :func:`probability_fn` for ``activation``).
        image: ``(B, C, *S)``.
        method: ``"auto"`` (per family, see :func:`default_method`), ``"rise"``, ``"gradcam"``,
            ``"class_attention"`` (PatchConvNet) or ``"rollout"`` (Scopeformer, baseline mode).
        target: class to explain, one index or one per image; ``None``: the most probable class of each image.
        activation: how outputs become probabilities (``"auto"``, ``"sigmoid"``, ``"softmax"``, ``None``).
        options: passed to the method: ``layer`` for Grad-CAM; ``num_masks``, ``cell_size``, ``p_keep``,
            ``batch_size``, ``baseline``, ``generator`` for RISE.

    Returns:
        ``(maps, info)``: maps ``(B, *S)`` float32 in ``[0, 1]`` per image; info with ``method``, ``target`` (one
        class per image), ``probability`` (of that class on the unmasked image), ``class_specific`` (False for
        class-agnostic attention maps), ``model`` (type name) and method details (``layer``; RISE settings).
    """
    if method not in EXPLAIN_METHODS:
        raise ValueError(f"method must be one of {EXPLAIN_METHODS}, got {method!r}.")
    spatial_dims = getattr(model_or_fn, "spatial_dims", None)
    image = check_image(image, spatial_dims if isinstance(spatial_dims, int) else None)
    chosen = default_method(model_or_fn) if method == "auto" else method
    unknown = set(options) - _METHOD_OPTIONS.get(chosen, set())
    if unknown:
        raise ValueError(f"options {sorted(unknown)} do not apply to method {chosen!r}.")

    predict = probability_fn(model_or_fn, activation)
    probabilities = predict(image)
    if probabilities.shape[0] != image.shape[0]:
        raise ValueError(f"the classifier returned {probabilities.shape[0]} rows for {image.shape[0]} images.")
    targets = resolve_targets(target, probabilities, image.shape[0])
    info: dict[str, Any] = {
        "method": chosen,
        "target": targets,
        "probability": [float(probabilities[i, t]) for i, t in enumerate(targets)],
        "class_specific": chosen not in _CLASS_AGNOSTIC,
        "model": type(model_or_fn).__name__,
    }

    if chosen == "rise":
        maps = rise_saliency(predict, image, target=targets, **options)
        defaults = inspect.signature(rise_saliency).parameters
        info.update(
            num_masks=options.get("num_masks", defaults["num_masks"].default),
            cell_size=options.get("cell_size") or default_cell_size(image.shape[2:]),
            p_keep=options.get("p_keep", defaults["p_keep"].default),
        )
    elif chosen == "gradcam":
        if not isinstance(model_or_fn, nn.Module):
            raise TypeError(f"Grad-CAM needs an nn.Module, got {type(model_or_fn).__name__}; use method='rise'.")
        layer = options.get("layer")
        names = layer_names(model_or_fn, default_cam_layer(model_or_fn, image) if layer is None else layer)
        maps = grad_cam(model_or_fn, image, target=targets, layer=names)
        info["layer"] = names[0] if len(names) == 1 else list(names)
    elif chosen == "class_attention":
        maps = class_attention_map(model_or_fn, image)  # type: ignore[arg-type]
    else:
        maps = attention_rollout(model_or_fn, image)  # type: ignore[arg-type]
    return maps, info

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Explanation maps of the served classifiers: the request names of ``docs/server_api.md`` mapped onto the shared
:mod:`networks.explain` (one implementation of each method for every network, in the app and outside it).

- ``rise``: RISE, black box (only class probabilities): runs on the served network itself, INT8 included.
- ``grad_cam``: Grad-CAM on the family's default layer (gradients).
- ``attention_rollout``: attention rollout (Scopeformer with patch tokens).
- ``class_attention``: PatchConvNet's class-attention map.

The last three need the eager FP32 network (gradients or attention weights; TorchScript INT8 artifacts have
neither), so INT8 models compute them on their FP32 twin checkpoint and say so in the result.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch

from monailabel_app.lib.errors import BadInputError

__all__ = ["EXPLANATIONS", "NEEDS_EAGER_FP32", "check_explanations", "resolve_explanation", "explanation_map"]

# request name -> networks.explain method name
EXPLANATIONS: dict[str, str] = {
    "rise": "rise",
    "grad_cam": "gradcam",
    "attention_rollout": "rollout",
    "class_attention": "class_attention",
}
NEEDS_EAGER_FP32 = ("grad_cam", "attention_rollout", "class_attention")

# Grad-CAM hooks the network and toggles its requires_grad/in-place flags for the duration of a call; the eager
# network is shared by a family's FP32 and INT8 tasks, so such calls must not overlap
_EAGER_LOCK = threading.Lock()


def check_explanations(explanations: Sequence[str], default: str) -> tuple[str, ...]:
    """Validate a family's explanation list and default (at start-up); returns the list as a tuple."""
    explanations = tuple(explanations)
    unknown = [m for m in explanations if m not in EXPLANATIONS]
    if unknown or not explanations:
        raise ValueError(f"explanations must be a non-empty subset of {list(EXPLANATIONS)}, got {list(explanations)}.")
    if default not in explanations:
        raise ValueError(f"default explanation {default!r} is not one of {list(explanations)}.")
    return explanations


def resolve_explanation(requested: Any, allowed: Sequence[str], default: str, model: str) -> str:
    """The method a request asks for (``explain`` param; empty: the model's default).

    Raises:
        BadInputError: (422) the method is unknown or not available for ``model``; the message names the allowed ones.
    """
    if requested in (None, ""):
        return default
    method = str(requested).strip().lower()
    if method not in allowed:
        kind = "not available for" if method in EXPLANATIONS else "is not an explanation method of"
        raise BadInputError(f"explain {requested!r} {kind} {model}; allowed: {', '.join(allowed)} (default {default}).")
    return method


def explanation_map(
    network: torch.nn.Module,
    image: torch.Tensor,
    method: str,
    target: int,
    rise_masks: int = 256,
    rise_seed: int = 0,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One explanation map of class ``target`` for one image.

    Args:
        network: the classifier (multi-label logits): the served network for ``rise``, the eager FP32 network
            otherwise.
        image: ``(C, H, W)`` preprocessed slice.
        method: a key of :data:`EXPLANATIONS`.
        target: class index explained (class-agnostic methods ignore it).
        rise_masks: RISE masks (at least 8).
        rise_seed: seed of the RISE masks (the same seed gives the same map).

    Returns:
        ``(map (H, W) float32 in [0, 1], info)`` with :func:`networks.explain.explain`'s ``info``.

    Raises:
        BadInputError: the network cannot give this explanation (e.g. attention rollout of a Scopeformer whose
            tokens are feature channels).
    """
    from networks.explain import explain

    options: dict[str, Any] = {}
    if method == "rise":
        options = {
            "num_masks": max(8, int(rise_masks)),
            "generator": torch.Generator().manual_seed(int(rise_seed)),
            "batch_size": 32,
        }
    batch = image[None].float()
    try:
        if method in NEEDS_EAGER_FP32:
            with _EAGER_LOCK:
                maps, info = explain(network, batch, method=EXPLANATIONS[method], target=target, activation="sigmoid")
        else:
            maps, info = explain(
                network, batch, method=EXPLANATIONS[method], target=target, activation="sigmoid", **options
            )
    except (TypeError, ValueError) as err:
        raise BadInputError(f"{method} explanation failed for {type(network).__name__}: {err}") from err
    return maps[0], info

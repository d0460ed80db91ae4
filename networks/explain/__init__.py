# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Explanation maps of the project's classifiers, on the input grid, normalised to [0, 1] per image.

    >>> from networks.explain import explain
    >>> maps, info = explain(model, images)                 # per-family default method, top class
    >>> maps, info = explain(int8_artifact, images)         # TorchScript: RISE
    >>> maps, info = explain(model, images, method="rise", target=0, num_masks=2000)

Methods: RISE (any classifier, black box), Grad-CAM (eager float modules, on MONAI's GradCAM), PatchConvNet's
class-attention map, and attention rollout (Scopeformer, baseline mode).
"""

from .attention_rollout import attention_rollout
from .class_attention import class_attention_map
from .explain import EXPLAIN_METHODS, default_method, explain, probability_fn
from .grad_cam import cam_layer_candidates, default_cam_layer, grad_cam
from .rise import default_cell_size, rise_masks, rise_saliency
from .utils import normalize_maps, resize_to_input

__all__ = [
    "EXPLAIN_METHODS",
    "attention_rollout",
    "cam_layer_candidates",
    "class_attention_map",
    "default_cam_layer",
    "default_cell_size",
    "default_method",
    "explain",
    "grad_cam",
    "normalize_maps",
    "probability_fn",
    "resize_to_input",
    "rise_masks",
    "rise_saliency",
]

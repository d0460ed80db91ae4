# Copyright MedAttnSlicer contributors. Apache-2.0.
"""What :func:`~networks.quantization.quantize_int8` leaves in float, and why.

``quantize_int8`` replaces Conv/Linear leaves (and local self-attention) one by one, each as quantise -> INT8 op ->
dequantise, so only layers with many multiply-accumulates per element pay for that round trip. Everything else stays
float, and the INT8 summary says so in two fields:

- ``float_layers``: counts of the leaf module types left float (``{"LayerNorm": 9, "GELU": 16, ...}``); normalisation,
  activation, pooling and padding layers are elementwise or cheap, and eager PyTorch INT8 has no quantised GELU,
  Swish or (float-exact) LayerNorm to chain them without dequantising anyway;
- ``float_compute``: per type of module whose *own* code computes more than its children (the attention cores of the
  linear-attention, re-attention and class-attention blocks), the qualified names and the reason it stays float.
  Their projections are ordinary ``nn.Linear`` children and are quantised.

Reasons are registered per module type with :func:`register_float_compute`; the project's attention blocks are
registered on first use.
"""

from __future__ import annotations

from monai.networks.layers import DropPath
from torch import nn

from networks.type_lookup import lookup_by_type

__all__ = ["register_float_compute", "float_compute_reasons", "describe_float_parts"]

_REASONS: dict[type, str] = {}
_BUILTINS_REGISTERED = False

# leaf modules without computation at inference
_SILENT_LEAVES = (nn.Identity, nn.Dropout, DropPath)

_ACTIVATION_PRODUCTS = "activation x activation matrix products (eager PyTorch INT8 has only weight x activation ops)"


def register_float_compute(module_type: type, reason: str) -> type:
    """Record that the own computation of ``module_type`` (not its children) stays float in INT8, and why."""
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"register_float_compute needs an nn.Module subclass, got {module_type!r}")
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError(f"a reason is needed for {module_type.__name__}")
    _REASONS[module_type] = reason
    return module_type


def _register_builtins() -> None:
    global _BUILTINS_REGISTERED
    if _BUILTINS_REGISTERED:
        return
    from networks.blocks.class_attention import ClassAttention
    from networks.blocks.nystrom_attention import NystromAttention
    from networks.blocks.performer_attention import PerformerAttention
    from networks.blocks.reattention import ReAttention
    from networks.nets.hct import MultiheadSelfAttention

    defaults = {
        PerformerAttention: "FAVOR+ random-feature maps (queries/keys times the fixed random projection, then exp for "
        "the softmax kernel or ReLU) and the linear-attention products phi(K)^T V, phi(Q) (phi(K)^T V) and the "
        f"normaliser stay float: {_ACTIVATION_PRODUCTS}, and the exp features span many orders of magnitude, more "
        "than one 8-bit scale per tensor holds; to_q/to_k/to_v/to_out are INT8",
        NystromAttention: "segment-mean landmarks, the three softmax kernels, the iterative pseudo-inverse (its "
        "Newton iterations amplify rounding errors) and their products stay float: "
        f"{_ACTIVATION_PRODUCTS}; to_q/to_k/to_v/to_out are INT8",
        ReAttention: "q k^T, softmax, the head-mixing matrix Theta, the norm of the mixed maps and maps x V stay "
        f"float: {_ACTIVATION_PRODUCTS} and softmax; qkv and proj are INT8",
        ClassAttention: "the class token's q k^T, softmax and weighted sum of the values stay float: "
        f"{_ACTIVATION_PRODUCTS}, one query row (few MACs), and the softmax row is the returned attention map; "
        "q/k/v/proj are INT8",
        MultiheadSelfAttention: "torch.nn.MultiheadAttention computes its projections functionally from "
        "in_proj_weight (no nn.Linear child to quantise) and its out_proj is a Linear subclass: all of it stays float",
    }
    for module_type, reason in defaults.items():
        _REASONS.setdefault(module_type, reason)
    _BUILTINS_REGISTERED = True


def float_compute_reasons() -> dict[type, str]:
    """A copy of the registered reasons (module type -> reason)."""
    _register_builtins()
    return dict(_REASONS)


def describe_float_parts(model: nn.Module, quantized_types: tuple[type, ...]) -> dict[str, object]:
    """What of ``model`` is float: ``{"float_layers": {type name: count}, "float_compute": {type name:
    {"modules": [qualified names], "reason": why}}}``.

    ``quantized_types`` are the INT8 replacement types; they and what they contain are skipped.
    """
    _register_builtins()
    float_layers: dict[str, int] = {}
    float_compute: dict[str, dict[str, object]] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        if isinstance(module, quantized_types):
            return
        reason = lookup_by_type(_REASONS, module)
        if reason is not None:
            entry = float_compute.setdefault(type(module).__name__, {"modules": [], "reason": reason})
            entry["modules"].append(prefix or "<root>")
        children = list(module.named_children())
        if not children and not isinstance(module, _SILENT_LEAVES):
            float_layers[type(module).__name__] = float_layers.get(type(module).__name__, 0) + 1
        for name, child in children:
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return {"float_layers": dict(sorted(float_layers.items())), "float_compute": float_compute}

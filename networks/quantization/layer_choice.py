# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Step 1 of :func:`~networks.quantization.quantize_int8`: which layers become INT8 and which stay float, and why.

Quantised: every :class:`~networks.blocks.local_self_attention.LocalSelfAttention` (as a whole: projections and the
fused INT8 core) and every ``nn.Conv1d/2d/3d`` or ``nn.Linear`` leaf of exactly that type whose padding the INT8 op
can express. Kept float, with a reason: modules named in ``keep_float``, modules of a type registered with
:func:`register_float_module` (and all they contain), grouped/depthwise convolutions (unless asked), transposed
convolutions and Conv/Linear subclasses.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import nn

from networks.blocks.local_self_attention import LocalSelfAttention

__all__ = [
    "GROUPED_CONV_REASON",
    "QuantizationTargets",
    "conv_padding",
    "float_module_types",
    "leaf_kind",
    "register_float_module",
    "select_targets",
]

_FLOAT_MODULE_TYPES: set[type] = set()

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

# INT8 depthwise convs measured on the x86/fbgemm engines (2 threads, 8 x 240 x 16 x 16): 1.5-3x slower than FP32
# with symmetric padding, 50-100x slower without (fbgemm's fallback path; EfficientNet pads explicitly, then convolves
# unpadded). Only onednn ran them at FP32 speed.
GROUPED_CONV_REASON = "grouped/depthwise conv kept float (INT8 depthwise is slower than FP32 on x86/fbgemm)"


def register_float_module(module_type: type) -> type:
    """Keep every module of ``module_type`` (and everything inside it) in float during ``quantize_int8``.

    Usable as a class decorator. Attention modules whose internals must not be quantised register here.
    """
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"register_float_module needs an nn.Module subclass, got {module_type!r}")
    _FLOAT_MODULE_TYPES.add(module_type)
    return module_type


def float_module_types() -> set[type]:
    """The registered float-only module types."""
    return set(_FLOAT_MODULE_TYPES)


def conv_padding(conv: nn.Module) -> Any:
    """Numeric padding of a float conv; None when the quantized conv cannot express it."""
    padding = conv.padding
    if isinstance(padding, str):
        if padding == "valid":
            return 0
        # "same": symmetric only when every dilation * (kernel - 1) is even
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            return None
        return tuple(t // 2 for t in total)
    return padding


def leaf_kind(module: nn.Module) -> str | None:
    """``"conv"``/``"linear"`` for leaves quantize_int8 handles; None otherwise. Exact types: subclasses may change
    forward."""
    if type(module) in _CONV_TYPES:
        if module.padding_mode not in ("zeros", "reflect") or conv_padding(module) is None:
            return None
        return "conv"
    if type(module) is nn.Linear:
        return "linear"
    return None


def _is_float_only(module: nn.Module) -> bool:
    return any(isinstance(module, t) for t in _FLOAT_MODULE_TYPES)


class QuantizationTargets(NamedTuple):
    """The layers to quantise, in module order, each once (shared modules are visited once).

    Attributes:
        attention: ``(qualified name, LocalSelfAttention)`` pairs.
        leaves: ``(qualified name, Conv/Linear)`` pairs.
        kept_float: ``"name: reason"`` lines for quantisable-looking layers left float.
    """

    attention: list[tuple[str, nn.Module]]
    leaves: list[tuple[str, nn.Module]]
    kept_float: list[str]


def select_targets(
    model: nn.Module, keep_float: frozenset[str] = frozenset(), quantize_grouped_convs: bool = False
) -> QuantizationTargets:
    """Walk ``model`` and sort its layers into INT8 targets and float layers (with the reason).

    Args:
        model: the float network.
        keep_float: qualified module names to leave float with all they contain.
        quantize_grouped_convs: also target grouped (depthwise) convolutions.
    """
    targets = QuantizationTargets([], [], [])
    seen: set[int] = set()

    def visit(prefix: str, module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if prefix in keep_float:
            targets.kept_float.append(f"{prefix}: {type(module).__name__} kept float on request")
            return
        if _is_float_only(module):
            targets.kept_float.append(f"{prefix or '<root>'}: {type(module).__name__} registered float-only")
            return
        if isinstance(module, LocalSelfAttention):
            targets.attention.append((prefix, module))
            return
        kind = leaf_kind(module)
        if kind == "conv" and module.groups > 1 and not quantize_grouped_convs:
            targets.kept_float.append(
                f"{prefix}: {type(module).__name__}(groups={module.groups}), {GROUPED_CONV_REASON}"
            )
            return
        if kind is not None:
            targets.leaves.append((prefix, module))
            return
        if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            targets.kept_float.append(f"{prefix}: {type(module).__name__} (INT8 transposed conv is wrong on x86)")
            return
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            targets.kept_float.append(
                f"{prefix}: {type(module).__name__} (subclass or padding the INT8 op cannot express)"
            )
            return
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return targets

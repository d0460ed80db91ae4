# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Step 4 of :func:`~networks.quantization.quantize_int8`: put the INT8 layers into the network and pack the
description (``int8_summary``) that :func:`~networks.quantization.save_int8_artifact` stores with the artifact.

``int8_summary`` holds the conversion record (``attention``, ``leaves``, ``kept_float``, ``value_equalization``,
``fused_epilogue``), how the artifact computes (``backend``, ``reduce_range``, ``fbgemm_input_bits``, ``portable``),
``calibration_batches``, and what stays float (``float_layers``, ``float_compute``,
:mod:`networks.quantization.float_parts`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from networks.quantization.float_parts import describe_float_parts
from networks.quantization.modules import QuantizedLeaf, QuantizedLocalSelfAttention
from networks.quantization.observers import FBGEMM_SAFE_INPUT_BITS

__all__ = ["pack_int8_network", "replace_modules"]


def replace_modules(model: nn.Module, replacements: dict[int, nn.Module]) -> nn.Module:
    """Swap every reference to a replaced module (shared modules included) for its replacement.

    Args:
        model: the network, changed in place.
        replacements: new modules by ``id()`` of the module they replace.

    Returns:
        ``model``, or its replacement when the model itself is one replaced layer.
    """
    if id(model) in replacements:
        return replacements[id(model)]
    for parent in list(model.modules()):
        # _modules, not named_children(): that yields a module held twice by one parent only once
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, name, replacements[id(child)])
    return model


def pack_int8_network(
    model: nn.Module,
    replacements: dict[int, nn.Module],
    summary: dict[str, Any],
    *,
    backend: str,
    reduce_range: bool,
    calibration_batches: int,
) -> nn.Module:
    """The INT8 network: ``model`` with ``replacements`` swapped in, in eval mode, with ``int8_summary``.

    Args:
        model: the converted float copy (changed in place).
        replacements: INT8 modules by ``id()`` of the float module they replace (at least one).
        summary: the conversion record (:func:`~networks.quantization.conversion.convert_targets`); completed here.
        backend: the quantized engine the weights were packed for.
        reduce_range: whether FBGEMM's INT8 inputs are 7-bit (a portable artifact).
        calibration_batches: number of calibration batches run.

    Raises:
        ValueError: ``replacements`` is empty (no layer ran during calibration).
    """
    if not replacements:
        raise ValueError("no layer of the model ran during calibration; nothing was quantised")
    model = replace_modules(model, replacements)
    model.eval()
    summary.update(
        backend=backend,
        reduce_range=bool(reduce_range),
        fbgemm_input_bits=FBGEMM_SAFE_INPUT_BITS if reduce_range else 8,
        portable=bool(reduce_range),
        calibration_batches=calibration_batches,
    )
    summary.update(describe_float_parts(model, (QuantizedLeaf, QuantizedLocalSelfAttention)))
    model.int8_summary = summary
    return model

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Step 3 of :func:`~networks.quantization.quantize_int8`: build the INT8 twin of every calibrated target layer.

- a Conv/Linear leaf becomes :class:`~networks.quantization.modules.QuantizedLeaf` (quantise input -> INT8 op ->
  dequantise) with the calibrated input and output ranges (:func:`convert_leaf`);
- a local self-attention layer becomes :class:`~networks.quantization.modules.QuantizedLocalSelfAttention`
  (:func:`convert_attention`): value equalisation, then the epilogue (a following BatchNorm/ReLU, the undoing of
  the equalisation) folded into the INT8 core, then three INT8 projections;
- fallback: a layer that calibration never reached stays float and is listed in ``kept_float``.

The weights are packed for the quantized engine active when these run (``quantize_int8`` sets it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.ao.nn.quantized as nnq
from torch import nn

from networks.blocks.local_self_attention import LocalSelfAttention
from networks.quantization.calibration import CalibrationRanges
from networks.quantization.epilogue import fold_into_following_batchnorm, fusable_epilogue
from networks.quantization.layer_choice import QuantizationTargets, conv_padding, leaf_kind
from networks.quantization.modules import QuantizedLeaf, QuantizedLocalSelfAttention
from networks.quantization.observers import (
    ActivationRange,
    input_equalization,
    quantized_weight,
    value_equalization,
)

__all__ = [
    "convert_attention",
    "convert_leaf",
    "convert_targets",
    "new_summary",
    "quantized_attention",
    "quantized_conv",
    "quantized_linear",
]

_QUANTIZED_CONV = {nn.Conv1d: nnq.Conv1d, nn.Conv2d: nnq.Conv2d, nn.Conv3d: nnq.Conv3d}


def quantized_conv(conv: nn.Module, output_range: ActivationRange) -> nn.Module:
    """INT8 ``torch.ao.nn.quantized`` twin of a float ``nn.Conv1d/2d/3d`` producing ``output_range``'s quint8."""
    qtype = _QUANTIZED_CONV[type(conv)]
    qconv = qtype(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv_padding(conv),
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    bias = None if conv.bias is None else conv.bias.detach().float()
    qconv.set_weight_bias(quantized_weight(conv.weight), bias)
    qconv.scale, qconv.zero_point = output_range.qparams()
    return qconv


def quantized_linear(linear: nn.Linear, output_range: ActivationRange) -> nn.Module:
    """INT8 ``torch.ao.nn.quantized.Linear`` twin of a float ``nn.Linear`` producing ``output_range``'s quint8."""
    qlinear = nnq.Linear(linear.in_features, linear.out_features, bias_=linear.bias is not None)
    bias = None if linear.bias is None else linear.bias.detach().float()
    qlinear.set_weight_bias(quantized_weight(linear.weight), bias)
    qlinear.scale, qlinear.zero_point = output_range.qparams()
    return qlinear


def quantized_attention(
    layer: LocalSelfAttention,
    projections: list[nn.Module],
    input_scale: float,
    input_zero_point: int,
    output_scale: torch.Tensor | None = None,
    output_shift: torch.Tensor | None = None,
    relu: bool = False,
    input_gain: torch.Tensor | None = None,
) -> QuantizedLocalSelfAttention:
    """INT8 twin of ``layer``; its relative embedding is checked against ``layer.relative_embedding()``."""
    tables = torch.cat([getattr(layer, f"rel_{axis}").detach() for axis in range(layer.spatial_dims)], dim=0)
    quantized = QuantizedLocalSelfAttention(
        layer.spatial_dims,
        *projections,
        relative_tables=tables,
        axis_groups=list(layer.axis_groups),
        offset_index=layer._offset_index,
        kernel_size=layer.kernel_size,
        heads=layer.heads,
        input_scale=input_scale,
        input_zero_point=input_zero_point,
        output_scale=output_scale,
        output_shift=output_shift,
        relu=relu,
        input_gain=input_gain,
    )
    with torch.no_grad():
        if not torch.equal(quantized.relative_embedding(), layer.relative_embedding().float()):
            raise RuntimeError(
                "QuantizedLocalSelfAttention's compact relative embedding no longer matches "
                "LocalSelfAttention.relative_embedding(); update networks/quantization/modules.py"
            )
    return quantized


def new_summary(kept_float: list[str]) -> dict[str, Any]:
    """The conversion part of ``int8_summary``, filled by :func:`convert_attention` and :func:`convert_leaf`."""
    return {
        "attention": [],
        "leaves": [],
        "kept_float": list(kept_float),
        "value_equalization": {},
        "input_equalization": {},
        "fused_epilogue": {},
    }


def convert_attention(
    model: nn.Module,
    name: str,
    layer: LocalSelfAttention,
    calibrated: CalibrationRanges,
    summary: dict[str, Any],
    *,
    equalize_values: bool = True,
    fuse_epilogue: bool = True,
    input_equalization_strength: float = 0.0,
    reduce_range: bool = True,
) -> QuantizedLocalSelfAttention | None:
    """INT8 twin of the attention layer ``name`` (None, and a ``kept_float`` line, if calibration never reached it).

    Changes ``model`` in place where the maths moves: the value projection's rows are scaled by the equalisation
    gains; with ``fuse_epilogue`` the BatchNorm/ReLU folded into the core are replaced by ``nn.Identity``; without
    it the gains' undoing goes into a following BatchNorm when there is one. With ``input_equalization_strength``
    > 0 the projections' weight columns are divided by the input gains the INT8 layer multiplies its input by
    (:func:`~networks.quantization.observers.input_equalization`). Records what it did in ``summary``.
    """
    if not calibrated.reached(name):
        summary["kept_float"].append(f"{name}: LocalSelfAttention not reached by calibration")
        return None
    ranges = calibrated.ranges
    value_range = ranges[f"{name}.value#out"]
    output_scale = output_shift = None
    relu = False
    gain = None
    if equalize_values:
        gain, value_range = value_equalization(calibrated.value_channels[name])
        with torch.no_grad():
            layer.value.weight.mul_(gain.view(-1, *([1] * (layer.value.weight.ndim - 1))))
    if fuse_epilogue:
        output_scale, output_shift, relu, fused = fusable_epilogue(model, layer, layer.out_channels)
        if gain is not None:
            output_scale = 1.0 / gain if output_scale is None else output_scale / gain
            summary["value_equalization"][name] = "output rescaled (fused epilogue)"
        for parent, child_name, _child in fused:
            setattr(parent, child_name, nn.Identity())
        if fused:
            summary["fused_epilogue"][name] = [type(child).__name__ for _, _, child in fused]
    elif gain is not None:
        if fold_into_following_batchnorm(model, layer, gain):
            summary["value_equalization"][name] = "folded into BatchNorm"
        else:
            output_scale = 1.0 / gain
            summary["value_equalization"][name] = "output rescaled"
    input_range = ranges[f"{name}#in"]
    input_gain = None
    if input_equalization_strength > 0.0 and layer.kernel_size > 1:
        input_gain, input_range = input_equalization(
            calibrated.input_channels[name], input_equalization_strength, reduce_range
        )
        column = input_gain.view(1, -1, *([1] * (layer.value.weight.ndim - 2)))
        with torch.no_grad():
            for projection in (layer.query, layer.key, layer.value):
                projection.weight.div_(column)
        summary["input_equalization"][name] = round(float(input_gain.max()), 3)
    projections = [
        quantized_conv(layer.query, ranges[f"{name}.query#out"]),
        quantized_conv(layer.key, ranges[f"{name}.key#out"]),
        quantized_conv(layer.value, value_range),
    ]
    scale, zero_point = input_range.qparams()
    quantized = quantized_attention(
        layer, projections, scale, zero_point, output_scale, output_shift, relu, input_gain=input_gain
    )
    summary["attention"].append(name)
    return quantized


def convert_leaf(
    name: str, leaf: nn.Module, calibrated: CalibrationRanges, summary: dict[str, Any]
) -> QuantizedLeaf | None:
    """INT8 twin of the Conv/Linear leaf ``name`` (None, and a ``kept_float`` line, if calibration never reached
    it)."""
    if not calibrated.reached(name):
        summary["kept_float"].append(f"{name}: {type(leaf).__name__} not reached by calibration")
        return None
    out_range = calibrated.ranges[f"{name}#out"]
    qleaf = quantized_conv(leaf, out_range) if leaf_kind(leaf) == "conv" else quantized_linear(leaf, out_range)
    scale, zero_point = calibrated.ranges[f"{name}#in"].qparams()
    summary["leaves"].append(name)
    return QuantizedLeaf(qleaf, scale, zero_point)


def convert_targets(
    model: nn.Module,
    targets: QuantizationTargets,
    calibrated: CalibrationRanges,
    *,
    equalize_values: bool = True,
    fuse_epilogue: bool = True,
    input_equalization_strength: float = 0.0,
    reduce_range: bool = True,
) -> tuple[dict[int, nn.Module], dict[str, Any]]:
    """Convert every target: attention layers first, in module order (each sees the Identity swaps of the previous
    ones), then the leaves.

    Returns:
        ``(replacements, summary)``: INT8 modules by ``id()`` of the float module they replace, and the conversion
        part of ``int8_summary`` (:func:`new_summary`).
    """
    replacements: dict[int, nn.Module] = {}
    summary = new_summary(targets.kept_float)
    for name, layer in targets.attention:
        quantized = convert_attention(
            model,
            name,
            layer,
            calibrated,
            summary,
            equalize_values=equalize_values,
            fuse_epilogue=fuse_epilogue,
            input_equalization_strength=input_equalization_strength,
            reduce_range=reduce_range,
        )
        if quantized is not None:
            replacements[id(layer)] = quantized
    for name, leaf in targets.leaves:
        quantized_leaf = convert_leaf(name, leaf, calibrated, summary)
        if quantized_leaf is not None:
            replacements[id(leaf)] = quantized_leaf
    return replacements, summary

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Modules of an INT8 network built by :func:`networks.quantization.quantize_int8`.

Both take and return float tensors, so they drop into any network in place of the float layer they replace while
everything between them (BatchNorm, ReLU, pooling with indices, unpooling, softmax, residual adds) stays float.
Both are TorchScript-scriptable and traceable; the attention core is the custom op
``torch.ops.medattn.local_attention_int8`` from :mod:`networks.kernels`, so a saved artifact needs only torch
and the kernel library to run.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from networks.arguments import check_spatial_dims

__all__ = ["QuantizedLeaf", "QuantizedLocalSelfAttention"]


class QuantizedLeaf(nn.Module):
    """Float -> quint8 -> quantized Conv/Linear -> float.

    Args:
        module: a quantized module (``torch.ao.nn.quantized.Conv1d/2d/3d`` or ``Linear``) with its output
            scale/zero point set from calibration.
        input_scale: scale of the per-tensor affine quint8 input quantisation (from calibration).
        input_zero_point: zero point of that quantisation.

    Shapes:
        those of the float layer it replaces.
    """

    def __init__(self, module: nn.Module, input_scale: float, input_zero_point: int) -> None:
        super().__init__()
        self.module = module
        self.input_scale = float(input_scale)
        self.input_zero_point = int(input_zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = torch.quantize_per_tensor(x, self.input_scale, self.input_zero_point, torch.quint8)
        return self.module(xq).dequantize()

    def extra_repr(self) -> str:
        return f"input_scale={self.input_scale:.6g}, input_zero_point={self.input_zero_point}"


class QuantizedLocalSelfAttention(nn.Module):
    """INT8 local self-attention: the input is quantised once, the three 1x1 projections run as quantized convs and
    their quint8 outputs go straight into the fused INT8 attention core; the relative-embedding term stays float.

    The core writes its float output channels-last (the layout the next layer's quantized projections read) and can
    apply a per-channel epilogue ``relu?(output_scale * y + output_shift)`` while storing it: ``quantize_int8``
    folds the value equalisation's undoing, a following eval BatchNorm and a following ReLU into it (and replaces
    those modules by ``nn.Identity``), which saves three passes over every activation.

    The relative embedding is kept in the float layer's compact form (one ``(group, kernel_size)`` table per spatial
    axis, concatenated over channels into ``relative_tables`` of shape ``(out_channels, kernel_size)``) and expanded
    to ``(K, out_channels)`` in every forward (a tiny gather), which keeps the artifact 3x smaller than storing the
    expanded table.

    Args:
        spatial_dims: 2 or 3.
        query: quantized 1x1 conv (``torch.ao.nn.quantized.Conv2d``/``Conv3d``), bias-free.
        key: same for keys.
        value: same for values.
        relative_tables: float ``(out_channels, kernel_size)``: row ``c`` is channel ``c``'s table row of the axis
            whose channel group holds ``c``.
        axis_groups: sizes of the contiguous channel groups of each axis (sum ``out_channels``).
        offset_index: ``(K, spatial_dims)`` long, column of each window offset along each axis (row-major offsets).
        kernel_size: odd neighbourhood size.
        heads: attention heads.
        input_scale: scale of the input's quint8 quantisation.
        input_zero_point: zero point of that quantisation.
        output_scale: optional float ``(out_channels,)`` multiplied into the output channels. The value projection
            of an equalised layer produces ``u_c * v_c`` so every channel uses the full 8-bit range of the per-tensor
            quantisation; ``output_scale = 1 / u`` undoes it (the attention weights act per channel, so this is
            exact); a fused following BatchNorm multiplies in its ``weight / sqrt(running_var + eps)``. None: 1.
        output_shift: optional float ``(out_channels,)`` added after ``output_scale`` (a fused BatchNorm's
            ``bias - running_mean * weight / sqrt(running_var + eps)``). None: 0.
        relu: apply ReLU last (a fused following ReLU).
        input_gain: optional float ``(in_channels,)`` multiplied into the input channels before quantisation (input
            equalisation: the projections' weight columns were divided by it, so the float function is unchanged
            while small input channels get more of the 8-bit levels). None: 1.

    Shapes:
        ``(B, in_channels, *spatial) -> (B, out_channels, *spatial)`` float.
    """

    def __init__(
        self,
        spatial_dims: int,
        query: nn.Module,
        key: nn.Module,
        value: nn.Module,
        relative_tables: torch.Tensor,
        axis_groups: List[int],
        offset_index: torch.Tensor,
        kernel_size: int,
        heads: int,
        input_scale: float,
        input_zero_point: int,
        output_scale: Optional[torch.Tensor] = None,
        output_shift: Optional[torch.Tensor] = None,
        relu: bool = False,
        input_gain: Optional[torch.Tensor] = None,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        out_channels = int(query.out_channels)
        if input_gain is not None and tuple(input_gain.shape) != (int(query.in_channels),):
            raise ValueError(f"input_gain must be ({int(query.in_channels)},), got {tuple(input_gain.shape)}")
        for label, tensor in (("output_scale", output_scale), ("output_shift", output_shift)):
            if tensor is not None and tuple(tensor.shape) != (out_channels,):
                raise ValueError(f"{label} must be ({out_channels},), got {tuple(tensor.shape)}")
        if tuple(relative_tables.shape) != (out_channels, kernel_size):
            raise ValueError(
                f"relative_tables must be (out_channels, kernel_size) = ({out_channels}, {kernel_size}), "
                f"got {tuple(relative_tables.shape)}"
            )
        if len(axis_groups) != spatial_dims or sum(axis_groups) != out_channels:
            raise ValueError(f"axis_groups {axis_groups} must give {spatial_dims} groups summing to {out_channels}")
        if tuple(offset_index.shape) != (kernel_size**spatial_dims, spatial_dims):
            raise ValueError(
                f"offset_index must be (kernel_size**spatial_dims, spatial_dims), got {tuple(offset_index.shape)}"
            )
        self.spatial_dims = int(spatial_dims)
        self.in_channels = int(query.in_channels)
        self.out_channels = out_channels
        self.kernel_size = int(kernel_size)
        self.heads = int(heads)
        self.input_scale = float(input_scale)
        self.input_zero_point = int(input_zero_point)
        self.axis_groups: List[int] = [int(g) for g in axis_groups]
        self.query = query
        self.key = key
        self.value = value
        self.register_buffer("relative_tables", relative_tables.detach().float().contiguous().clone())
        self.register_buffer("offset_index", offset_index.detach().long().contiguous().clone())
        self.has_output_scale = output_scale is not None
        scale_shape = [1, out_channels] + [1] * spatial_dims
        scale = output_scale.detach().float() if output_scale is not None else torch.ones(out_channels)
        self.register_buffer("output_scale", scale.reshape(scale_shape).contiguous().clone())
        self.has_output_shift = output_shift is not None
        shift = output_shift.detach().float() if output_shift is not None else torch.zeros(out_channels)
        self.register_buffer("output_shift", shift.reshape(scale_shape).contiguous().clone())
        self.relu = bool(relu)
        self.has_input_gain = input_gain is not None
        gain = input_gain.detach().float() if input_gain is not None else torch.ones(self.in_channels)
        self.register_buffer(
            "input_gain", gain.reshape([1, self.in_channels] + [1] * spatial_dims).contiguous().clone()
        )

    def relative_embedding(self) -> torch.Tensor:
        """``(K, out_channels)`` float: ``rel[n, c] = relative_tables[c, offset_index[n, axis(c)]]``."""
        parts: List[torch.Tensor] = []
        start = 0
        for axis, size in enumerate(self.axis_groups):
            parts.append(self.relative_tables[start : start + size][:, self.offset_index[:, axis]].t())
            start += size
        return torch.cat(parts, dim=1).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_input_gain:
            x = x * self.input_gain
        xq = torch.quantize_per_tensor(x, self.input_scale, self.input_zero_point, torch.quint8)
        # FBGEMM's quantized conv works on channels-last input and would repack an NC[D]HW input once per
        # projection: repack it once here (a 1-byte-per-element copy) for all three.
        if xq.dim() == 4:
            xq = xq.contiguous(memory_format=torch.channels_last)
        elif xq.dim() == 5:
            xq = xq.contiguous(memory_format=torch.channels_last_3d)
        v = self.value(xq)
        if self.kernel_size == 1:
            # one neighbour: its softmax weight is exactly 1, so the layer is its value projection
            y = v.dequantize()
            if self.has_output_scale:
                y = y * self.output_scale
            if self.has_output_shift:
                y = y + self.output_shift
            if self.relu:
                y = torch.relu(y)
            return y
        q = self.query(xq)
        k = self.key(xq)
        scale: Optional[torch.Tensor] = None
        shift: Optional[torch.Tensor] = None
        if self.has_output_scale:
            scale = self.output_scale
        if self.has_output_shift:
            shift = self.output_shift
        return torch.ops.medattn.local_attention_int8(
            q, k, v, self.relative_embedding(), self.kernel_size, self.heads, scale, shift, self.relu
        )

    def extra_repr(self) -> str:
        return (
            f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"kernel_size={self.kernel_size}, heads={self.heads}, input_scale={self.input_scale:.6g}, "
            f"input_zero_point={self.input_zero_point}, relu={self.relu}"
        )

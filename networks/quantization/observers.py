# Copyright MedAttnSlicer contributors. Apache-2.0.
"""The observers :func:`~networks.quantization.quantize_int8` uses, and the value equalisation computed from them.

- Activations: per-tensor affine quint8 from a MinMax range (:class:`ActivationRange`); the x86 default histogram
  observer was ~10x less accurate per layer and gave no gain on trained SaDNN-seg. Inputs of FBGEMM's INT8 ops get
  7 bits (:data:`FBGEMM_SAFE_INPUT_BITS`) so that they never saturate its int16 pair sums on CPUs without VNNI.
- Weights: per-output-channel symmetric qint8 (:func:`quantized_weight`).
- Attention values: per-channel MinMax ranges, from which :func:`value_equalization` derives per-channel gains.
- Attention inputs (optional): per-channel MinMax ranges, from which :func:`input_equalization` derives per-channel
  gains that are undone in the projections' weights.
"""

from __future__ import annotations

import torch
from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

__all__ = [
    "FBGEMM_SAFE_INPUT_BITS",
    "MAX_VALUE_GAIN",
    "ActivationRange",
    "input_equalization",
    "quantized_weight",
    "value_channel_observer",
    "value_equalization",
]

# Bits of the activations fed to FBGEMM's INT8 ops that never saturate its int16 pair sums (CPUs without VNNI).
FBGEMM_SAFE_INPUT_BITS = 7

# Largest per-channel gain of the value equalisation (a channel 256x below the largest gets all 256 levels anyway).
MAX_VALUE_GAIN = 256.0


class ActivationRange:
    """MinMax range of the float tensors seen at one point of the network during calibration.

    Args:
        reduce_range: quantise to 7 bits (``0..127``, for inputs of FBGEMM's INT8 ops) instead of 8.
    """

    def __init__(self, reduce_range: bool) -> None:
        # 7 bits as quant_max=127 (MinMaxObserver's own reduce_range flag is deprecated)
        self.observer = MinMaxObserver(
            dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=127 if reduce_range else 255
        )
        self.calls = 0

    def observe(self, tensor: torch.Tensor) -> None:
        """Widen the range to cover ``tensor`` (any shape)."""
        self.observer(tensor.detach().float())
        self.calls += 1

    def qparams(self) -> tuple[float, int]:
        """``(scale, zero_point)`` of the per-tensor affine quint8 quantisation of the observed range."""
        scale, zero_point = self.observer.calculate_qparams()
        return float(scale), int(zero_point)


def quantized_weight(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel (axis 0) symmetric qint8 copy of a Conv/Linear weight ``(out, in, *kernel)``."""
    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    weight = weight.detach().float()
    observer(weight)
    scales, zero_points = observer.calculate_qparams()
    return torch.quantize_per_channel(weight, scales.double(), zero_points.long(), 0, torch.qint8)


def value_channel_observer() -> PerChannelMinMaxObserver:
    """Observer of the per-channel ranges of an attention layer's values ``(B, C, *spatial)``."""
    return PerChannelMinMaxObserver(ch_axis=1, dtype=torch.quint8)


def input_equalization(
    observer: PerChannelMinMaxObserver, strength: float, reduce_range: bool
) -> tuple[torch.Tensor, ActivationRange]:
    """Per-channel gains ``g_c >= 1`` for the input of an attention layer's projections and the quantisation range of
    the scaled input.

    The three 1x1 projections read one per-tensor quantised input, on 7 bits for FBGEMM (``reduce_range``); input
    channels whose range is far below the largest get few levels, and that was the largest INT8 error of most
    trained SaDNN-seg layers (:mod:`networks.quantization.sensitivity`). Multiplying input channel ``c`` by ``g_c``
    before quantisation and dividing column ``c`` of the projections' weights by ``g_c`` computes the same float
    function. ``g_c = (max_c r_c / r_c) ** strength``: ``strength`` 1 gives every channel the full range but
    shrinks its weight columns (per-output-channel weight quantisation then loses them), 0.5 splits the difference
    between input and weight resolution (the square root of the range ratio, as in cross-layer equalisation).

    Args:
        observer: a :func:`value_channel_observer` that saw the layer's inputs ``(B, C, *spatial)``.
        strength: exponent in ``(0, 1]``.
        reduce_range: 7-bit range (inputs of FBGEMM's ops).

    Returns:
        gains of shape ``(C,)`` and the range of the scaled input.
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"input equalisation strength must be in (0, 1], got {strength}")
    return _channel_gains(observer, strength, reduce_range)


def value_equalization(observer: PerChannelMinMaxObserver) -> tuple[torch.Tensor, ActivationRange]:
    """Per-channel gains ``u_c >= 1`` for the values and the quantisation range of the equalised values.

    Attention mixes the values channel by channel (``y_c = sum_n w_n v_c(n)``), so scaling value channel ``c`` by
    ``u_c`` (a row scaling of the value projection's weights, free for per-channel weight quantisation) scales
    output channel ``c`` by ``u_c`` and nothing else. With ``u_c = max_c r_c / r_c`` (``r_c`` = largest magnitude
    of channel ``c`` in calibration) every channel spans the shared per-tensor 8-bit range instead of the few levels
    a small channel gets next to a large one. This was the dominant INT8 error of trained SaDNN-seg layers.

    Args:
        observer: a :func:`value_channel_observer` that saw the values during calibration.

    Returns:
        gains of shape ``(C,)`` and the 8-bit range of the equalised values.
    """
    return _channel_gains(observer, 1.0, reduce_range=False)  # values feed our INT8 core only: all 8 bits


def _channel_gains(
    observer: PerChannelMinMaxObserver, strength: float, reduce_range: bool
) -> tuple[torch.Tensor, ActivationRange]:
    """``g_c = (max_c r_c / r_c) ** strength`` (capped at :data:`MAX_VALUE_GAIN`; ones for an empty or
    non-finite range) and the per-tensor range of the scaled channels."""
    low, high = observer.min_val, observer.max_val
    magnitude = torch.maximum(low.abs(), high.abs())
    peak = magnitude.max()
    if not torch.isfinite(peak) or peak <= 0:
        gain = torch.ones_like(magnitude)
    else:
        gain = (peak / magnitude.clamp_min(peak / MAX_VALUE_GAIN)).clamp(1.0, MAX_VALUE_GAIN) ** strength
    scaled = ActivationRange(reduce_range=reduce_range)
    scaled.observe(torch.stack([(low * gain).min(), (high * gain).max()]))
    return gain, scaled

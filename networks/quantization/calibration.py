# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Step 2 of :func:`~networks.quantization.quantize_int8`: run the float network on real calibration batches and
record the activation ranges the INT8 layers will use.

Ranges are keyed ``"<layer>#in"`` (an input of an INT8 op) and ``"<layer>#out"`` / ``"<attention>.<proj>#out"``
(an output). Inputs of FBGEMM's INT8 convs/linears get 7 bits when ``reduce_range`` (portable artifacts, see
:mod:`networks.quantization.observers`); outputs, and the q/k/v our own INT8 core reads, always 8 bits.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.ao.quantization.observer import PerChannelMinMaxObserver

from networks.quantization.layer_choice import QuantizationTargets
from networks.quantization.observers import ActivationRange, value_channel_observer

__all__ = ["CalibrationRanges", "calibrate", "calibration_batches"]


def calibration_batches(calibration: Iterable[Any]) -> Iterator[torch.Tensor]:
    """The input tensors of ``calibration``, checked one by one.

    Accepts tensors ``(B, C, *spatial)``, ``(image, label)`` pairs and MONAI-style ``{"image": ...}`` dictionaries.

    Raises:
        TypeError: a single tensor instead of an iterable of batches, a non-tensor or an integer batch.
        ValueError: a dictionary without ``"image"``, or a batch holding NaN or infinite values.
    """
    if isinstance(calibration, torch.Tensor):
        raise TypeError(
            "calibration must be an iterable of input batches (e.g. a list of (B, C, *spatial) tensors or a "
            "DataLoader), not a single tensor; wrap it in a list"
        )
    for item in calibration:
        if isinstance(item, dict):  # MONAI-style batch dictionaries
            if "image" not in item:
                raise ValueError(f"calibration dictionaries need an 'image' key, got keys {sorted(item)}")
            item = item["image"]
        elif isinstance(item, (tuple, list)):  # (image, label) pairs
            item = item[0]
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"calibration batches must be tensors, got {type(item).__name__}")
        if not item.is_floating_point():
            raise TypeError(f"calibration batches must be floating point, got {item.dtype}")
        if not torch.isfinite(item).all():
            raise ValueError("calibration batch contains NaN or infinite values")
        yield item


@dataclass
class CalibrationRanges:
    """What calibration observed.

    Attributes:
        ranges: activation ranges by key (``"<name>#in"``, ``"<name>#out"``, ``"<attention>.query#out"``, ...).
        value_channels: per-channel value ranges of each attention layer (only with value equalisation).
        input_channels: per-channel input ranges of each attention layer (only with input equalisation).
        batches: number of calibration batches run.
    """

    ranges: dict[str, ActivationRange] = field(default_factory=dict)
    value_channels: dict[str, PerChannelMinMaxObserver] = field(default_factory=dict)
    input_channels: dict[str, PerChannelMinMaxObserver] = field(default_factory=dict)
    batches: int = 0

    def reached(self, name: str) -> bool:
        """Whether the layer ``name`` ran at least once during calibration."""
        return self.ranges[f"{name}#in"].calls > 0


def calibrate(
    model: nn.Module,
    targets: QuantizationTargets,
    calibration: Iterable[Any],
    *,
    reduce_range: bool = True,
    equalize_values: bool = True,
    equalize_inputs: bool = False,
) -> CalibrationRanges:
    """Run ``model`` (eval mode, CPU) on every calibration batch with observers on the inputs and outputs of
    ``targets``; the hooks are removed afterwards, also on error.

    Args:
        model: the float network (its forward is run under ``torch.no_grad``).
        targets: the layers to observe (:func:`~networks.quantization.layer_choice.select_targets`).
        calibration: batches as accepted by :func:`calibration_batches`; at least one.
        reduce_range: 7-bit ranges for the inputs of FBGEMM's INT8 ops.
        equalize_values: also record the per-channel ranges of each attention layer's values.
        equalize_inputs: also record the per-channel ranges of each attention layer's input.

    Raises:
        ValueError: calibration yielded no batch (or a bad one, see :func:`calibration_batches`).
    """
    result = CalibrationRanges()
    handles = []

    def record(key: str) -> ActivationRange:
        # "#in": an input of FBGEMM's INT8 ops (7 bits unless reduce_range=False); "#out": an output, 8 bits
        result.ranges[key] = ActivationRange(reduce_range and key.endswith("#in"))
        return result.ranges[key]

    for name, layer in targets.attention:
        in_range = record(f"{name}#in")
        handles.append(layer.register_forward_pre_hook(lambda mod, args, r=in_range: r.observe(args[0])))
        for proj in ("query", "key", "value"):
            out_range = record(f"{name}.{proj}#out")
            handles.append(getattr(layer, proj).register_forward_hook(lambda mod, a, out, r=out_range: r.observe(out)))
        if equalize_inputs:
            in_channels = result.input_channels[name] = value_channel_observer()
            handles.append(
                layer.register_forward_pre_hook(lambda mod, args, o=in_channels: o(args[0].detach().float()))
            )
        if equalize_values:
            observer = result.value_channels[name] = value_channel_observer()
            handles.append(layer.value.register_forward_hook(lambda mod, a, out, o=observer: o(out.detach().float())))
    for name, leaf in targets.leaves:
        in_range, out_range = record(f"{name}#in"), record(f"{name}#out")

        def leaf_hook(mod, args, out, ri=in_range, ro=out_range):
            ri.observe(args[0])
            ro.observe(out)

        handles.append(leaf.register_forward_hook(leaf_hook))

    try:
        with torch.no_grad():
            for batch in calibration_batches(calibration):
                model(batch.cpu().float())
                result.batches += 1
    finally:
        for handle in handles:
            handle.remove()
    if result.batches == 0:
        raise ValueError("calibration yielded no batches; pass at least one real input batch")
    return result

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Which layers lose the INT8 network's agreement with FP32: a per-layer SQNR report.

For every layer :func:`~networks.quantization.quantize_int8` would turn into INT8, the network is quantised with
*only that layer* in INT8 (all the others kept float, ``keep_float``) and compared with the FP32 network on the same
images:

- ``layer_sqnr_db``: SQNR of the layer's own output (with the BatchNorm/ReLU epilogue the INT8 core absorbs, so
  both sides are measured at the same point). Everything before it is float, so both sides see the same input: this
  is the error the layer itself adds.
- ``network_sqnr_db``: SQNR of the whole network's output (logits) with only that layer in INT8: what the layer's
  error costs at the end, after the layers behind it have amplified or absorbed it.
- ``network_dice``: the agreement Dice of :func:`~networks.quantization.agreement.prediction_agreement` with only
  that layer in INT8.

A last row (``layer = "<all>"``) quantises every layer, as shipped. SQNR is ``10 log10(sum ref^2 / sum (ref -
int8)^2)`` over all the images, in dB (about 6 dB per bit; infinite when the outputs are equal).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from networks.blocks.local_self_attention import LocalSelfAttention
from networks.quantization.agreement import prediction_agreement
from networks.quantization.epilogue import fusable_epilogue
from networks.quantization.layer_choice import select_targets
from networks.quantization.quantize import float_copy, quantize_int8

__all__ = ["format_sensitivity", "layer_sensitivity", "sqnr_db"]

ALL_LAYERS = "<all>"


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio of ``test`` against ``reference`` (same shape), in dB; ``inf`` when
    equal, ``-inf`` when the reference is all zeros but ``test`` is not."""
    if reference.shape != test.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(test.shape)}")
    signal = float(reference.double().pow(2).sum())
    noise = float((reference.double() - test.double()).pow(2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _probe_name(model: nn.Module, name: str, layer: nn.Module) -> str:
    """Where a layer's output is read: the last module of the epilogue an INT8 attention core absorbs (it becomes an
    ``nn.Identity`` that passes the core's output on), else the layer itself."""
    if not isinstance(layer, LocalSelfAttention):
        return name
    _, _, _, fused = fusable_epilogue(model, layer, layer.out_channels)
    if not fused:
        return name
    parent, child_name, _ = fused[-1]
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    prefix = names[id(parent)]
    return f"{prefix}.{child_name}" if prefix else child_name


def _outputs(model: nn.Module, images: Sequence[torch.Tensor], probe: str | None) -> tuple[torch.Tensor, ...]:
    """``(network output, probed module output)`` concatenated over ``images`` (probe None: the output twice)."""
    captured: list[torch.Tensor] = []
    handle = None
    if probe is not None:
        module = model.get_submodule(probe)
        handle = module.register_forward_hook(lambda mod, args, out: captured.append(out.detach().float()))
    try:
        with torch.no_grad():
            outputs = [model(batch).detach().float() for batch in images]
    finally:
        if handle is not None:
            handle.remove()
    network = torch.cat([o.reshape(o.shape[0], -1) for o in outputs])
    layer = torch.cat([c.reshape(-1) for c in captured]) if probe is not None else network
    return network, layer


def layer_sensitivity(
    model: nn.Module,
    calibration: Iterable[torch.Tensor],
    images: Iterable[torch.Tensor] | None = None,
    **quantize_options: Any,
) -> list[dict[str, Any]]:
    """Per-layer INT8 sensitivity of ``model`` (see the module docstring).

    Args:
        model: trained FP32 network (left unchanged).
        calibration: input batches ``(B, C, *spatial)`` to calibrate on (as for ``quantize_int8``).
        images: batches to measure on; default: the calibration batches.
        quantize_options: keywords of ``quantize_int8`` (e.g. the family's recipe); a ``keep_float`` given here
            stays float in every row and is not listed.

    Returns:
        one dict per INT8 layer in module order, then one for all of them: ``layer`` (qualified name or ``"<all>"``),
        ``kind`` (``"attention"``, ``"conv"``, ``"linear"``), ``layer_sqnr_db`` (None for ``"<all>"``),
        ``network_sqnr_db``, ``network_dice``, ``prediction_agreement``.
    """
    calibration = list(calibration)
    images = calibration if images is None else list(images)
    if not images:
        raise ValueError("images yielded no batch")
    keep_float = frozenset(quantize_options.pop("keep_float", ()))
    reference = float_copy(model, keep_float)
    targets = select_targets(reference, keep_float, bool(quantize_options.get("quantize_grouped_convs", False)))
    layers = [(name, layer, "attention") for name, layer in targets.attention]
    layers += [(name, leaf, "linear" if isinstance(leaf, nn.Linear) else "conv") for name, leaf in targets.leaves]
    all_names = {name for name, _, _ in layers}
    fp32_network, _ = _outputs(reference, images, None)
    rows: list[dict[str, Any]] = []
    for name, layer, kind in layers:
        probe = _probe_name(reference, name, layer)
        _, fp32_layer = _outputs(reference, images, probe)
        one = quantize_int8(model, calibration, keep_float=keep_float | (all_names - {name}), **quantize_options)
        int8_network, int8_layer = _outputs(one, images, probe)
        agreement = prediction_agreement(reference, one, images)
        rows.append(
            {
                "layer": name,
                "kind": kind,
                "layer_sqnr_db": sqnr_db(fp32_layer, int8_layer),
                "network_sqnr_db": sqnr_db(fp32_network, int8_network),
                "network_dice": agreement["dice"],
                "prediction_agreement": agreement["prediction_agreement"],
            }
        )
    whole = quantize_int8(model, calibration, keep_float=keep_float, **quantize_options)
    int8_network, _ = _outputs(whole, images, None)
    agreement = prediction_agreement(reference, whole, images)
    rows.append(
        {
            "layer": ALL_LAYERS,
            "kind": "network",
            "layer_sqnr_db": None,
            "network_sqnr_db": sqnr_db(fp32_network, int8_network),
            "network_dice": agreement["dice"],
            "prediction_agreement": agreement["prediction_agreement"],
        }
    )
    return rows


def format_sensitivity(rows: Sequence[dict[str, Any]]) -> str:
    """The report of :func:`layer_sensitivity` as a text table, the lowest network SQNR marked."""
    per_layer = [r for r in rows if r["layer"] != ALL_LAYERS]
    worst = sorted(per_layer, key=lambda r: r["network_sqnr_db"])[:3]
    worst_names = {r["layer"] for r in worst}
    width = max([len(r["layer"]) for r in rows] + [5])
    lines = [f"{'layer':<{width}}  {'kind':<9}  layer SQNR dB  net SQNR dB  net Dice  pixel agree"]
    for r in rows:
        layer_sqnr = "" if r["layer_sqnr_db"] is None else f"{r['layer_sqnr_db']:.1f}"
        mark = "  <- most sensitive" if r["layer"] in worst_names else ""
        lines.append(
            f"{r['layer']:<{width}}  {r['kind']:<9}  {layer_sqnr:>13}  {r['network_sqnr_db']:>11.1f}  "
            f"{r['network_dice']:>8.4f}  {r['prediction_agreement']:>11.4f}{mark}"
        )
    return "\n".join(lines)

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""The per-layer INT8 sensitivity report (networks.quantization.sensitivity) and the input equalisation it led to:
SQNR arithmetic checked against hand-computed values, the report's rows and probe points checked against the network
output, and input equalisation checked to keep the float function and to raise the SQNR of a layer whose input
channels have very different ranges."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from networks.blocks.local_self_attention import LocalSelfAttentionBlock
from networks.quantization import quantize_int8
from networks.quantization.sensitivity import ALL_LAYERS, format_sensitivity, layer_sensitivity, sqnr_db


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_sqnr_db_arithmetic():
    reference = torch.ones(100)
    assert sqnr_db(reference, reference + 0.1) == pytest.approx(20.0)  # signal 100, noise 1
    assert sqnr_db(reference, reference.clone()) == math.inf
    assert sqnr_db(torch.zeros(3), torch.ones(3)) == -math.inf
    with pytest.raises(ValueError, match="shapes differ"):
        sqnr_db(torch.zeros(3), torch.zeros(4))


class _AttentionThenConv(nn.Module):
    """attention -> BN -> ReLU (fused into the INT8 core), then a 1x1 conv head: the head's output is the network's."""

    def __init__(self, channel_scales: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("channel_scales", channel_scales.view(1, -1, 1, 1))
        channels = channel_scales.numel()
        self.block = LocalSelfAttentionBlock(2, channels, 8, 3, 1, norm="batch", act="relu")
        self.head = nn.Conv2d(8, 3, 1)
        # the projections undo the input scaling: every channel matters alike, but the per-tensor input quantisation
        # sees ranges as different as channel_scales
        attention = self.block.attention
        with torch.no_grad():
            for projection in (attention.query, attention.key, attention.value):
                projection.weight.div_(channel_scales.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x * self.channel_scales))


def _trained_stats(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    model.train()
    with torch.no_grad():
        for batch in batches:  # real BatchNorm statistics, so the fused epilogue is not the identity
            model(batch)
    return model.eval()


def test_report_rows_and_probe_points():
    model = _AttentionThenConv(torch.ones(4))
    batches = [torch.randn(2, 4, 16, 16) for _ in range(3)]
    _trained_stats(model, batches)
    rows = layer_sensitivity(model, batches)
    assert [r["layer"] for r in rows] == ["block.attention", "head", ALL_LAYERS]
    assert [r["kind"] for r in rows] == ["attention", "conv", "network"]
    attention, head, whole = rows
    # the head is the last layer: its own output is the network output
    assert head["layer_sqnr_db"] == pytest.approx(head["network_sqnr_db"])
    # 8-bit layers: tens of dB, not exact
    for row in (attention, head):
        assert 20.0 < row["layer_sqnr_db"] < 60.0, row
        assert 0.0 <= row["network_dice"] <= 1.0
    # both layers' errors together cost more than either alone
    assert whole["layer_sqnr_db"] is None
    assert whole["network_sqnr_db"] < min(attention["network_sqnr_db"], head["network_sqnr_db"])
    text = format_sensitivity(rows)
    assert "block.attention" in text and "most sensitive" in text


def test_report_keeps_requested_float_layers_out():
    model = _trained_stats(_AttentionThenConv(torch.ones(4)), [torch.randn(2, 4, 16, 16)])
    rows = layer_sensitivity(model, [torch.randn(2, 4, 16, 16)], keep_float=["head"])
    assert [r["layer"] for r in rows] == ["block.attention", ALL_LAYERS]


def test_input_equalization_keeps_the_function_and_raises_sqnr_of_uneven_inputs():
    # input channels spanning 100x: per-tensor 7-bit quantisation leaves the small ones a few levels
    model = _AttentionThenConv(torch.tensor([10.0, 1.0, 0.3, 0.1]))
    batches = [torch.randn(2, 4, 16, 16) for _ in range(3)]
    _trained_stats(model, batches)
    plain = layer_sensitivity(model, batches)[0]
    equalized = layer_sensitivity(model, batches, input_equalization=0.5)[0]
    assert equalized["layer"] == "block.attention"
    assert equalized["layer_sqnr_db"] > plain["layer_sqnr_db"] + 3.0, (plain, equalized)
    qmodel = quantize_int8(model, batches, input_equalization=0.5)
    assert set(qmodel.int8_summary["input_equalization"]) == {"block.attention"}
    # the gain multiplies the input and divides the weight columns: the float function is unchanged
    layer = qmodel.block.attention
    assert layer.has_input_gain and float(layer.input_gain.max()) > 10.0
    with pytest.raises(ValueError, match="input_equalization must be in"):
        quantize_int8(model, batches, input_equalization=1.5)

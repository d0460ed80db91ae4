# Copyright MedAttnSlicer contributors. Apache-2.0.
"""The steps of quantize_int8 one by one: layer choice, calibration (data and observers), conversion (with the
epilogue folding and the fallback for layers calibration never reached) and packing. Expected values are computed
independently here (plain min/max, BatchNorm's own forward, torch's quantised ops), not by the code under test."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from networks.blocks.local_self_attention import LocalSelfAttention
from networks.quantization import QuantizedLeaf, QuantizedLocalSelfAttention, quantize_int8, register_float_module
from networks.quantization.calibration import calibrate, calibration_batches
from networks.quantization.conversion import convert_leaf, convert_targets, new_summary, quantized_conv
from networks.quantization.epilogue import fold_into_following_batchnorm, following_leaves, fusable_epilogue
from networks.quantization.layer_choice import GROUPED_CONV_REASON, select_targets
from networks.quantization.observers import ActivationRange, quantized_weight, value_equalization
from networks.quantization.packing import pack_int8_network, replace_modules
from networks.quantization.quantize import float_copy, quantized_engine


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class _Kept(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


register_float_module(_Kept)


class _LinearSubclass(nn.Linear):
    pass


class _Choices(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.same_even = nn.Conv2d(4, 4, 2, padding="same")  # asymmetric "same": the INT8 op cannot pad it
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.attention = LocalSelfAttention(2, 4, 4)
        self.kept = _Kept()
        self.sub = _LinearSubclass(4, 4)
        self.head = nn.Linear(4, 2)
        self.shared = self.head  # the same module twice: chosen once


def test_layer_choice_sorts_targets_and_float_layers_with_reasons():
    model = _Choices()
    targets = select_targets(model, frozenset({"stem"}))
    assert [name for name, _ in targets.attention] == ["attention"]
    assert [name for name, _ in targets.leaves] == ["head"]
    reasons = dict(line.split(": ", 1) for line in targets.kept_float)
    assert reasons["stem"] == "Conv2d kept float on request"
    assert reasons["depthwise"] == f"Conv2d(groups=4), {GROUPED_CONV_REASON}"
    assert "cannot express" in reasons["same_even"] and "cannot express" in reasons["sub"]
    assert "transposed" in reasons["up"] and reasons["kept"] == "_Kept registered float-only"
    grouped = select_targets(model, quantize_grouped_convs=True)
    assert [name for name, _ in grouped.leaves] == ["stem", "depthwise", "head"]
    attention, leaves, kept_float = grouped  # unpacks like the (attention, leaves, kept_float) triple
    assert (attention, leaves, kept_float) == (grouped.attention, grouped.leaves, grouped.kept_float)


def test_calibration_batches_accepts_pairs_and_dicts_and_rejects_bad_input():
    x = torch.randn(2, 1, 4, 4)
    assert all(b is x for b in calibration_batches([x, (x, "label"), {"image": x, "label": 0}]))
    with pytest.raises(TypeError, match="not a single tensor"):
        list(calibration_batches(x))
    with pytest.raises(ValueError, match="'image' key"):
        list(calibration_batches([{"img": x}]))
    with pytest.raises(TypeError, match="floating point"):
        list(calibration_batches([torch.ones(2, 1, 4, 4, dtype=torch.int64)]))
    with pytest.raises(ValueError, match="NaN"):
        list(calibration_batches([torch.full((1, 1, 2, 2), float("nan"))]))
    with pytest.raises(TypeError, match="must be tensors"):
        list(calibration_batches([[3.0]]))


def test_calibration_records_the_ranges_seen_and_removes_its_hooks():
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 1), LocalSelfAttention(2, 2, 4))
    model.eval()
    batches = [torch.randn(2, 1, 6, 6) * 3, torch.randn(1, 1, 6, 6)]
    targets = select_targets(model)
    calibrated = calibrate(model, targets, batches, reduce_range=True, equalize_values=True)
    assert calibrated.batches == 2
    with torch.no_grad():  # the activations, recomputed without hooks
        a = [model[0](b) for b in batches]
        c = [model[2](model[1](t)) for t in a]
        values = [model[3].value(t) for t in c]

    def observed(key: str) -> tuple[float, float]:
        obs = calibrated.ranges[key].observer
        return float(obs.min_val), float(obs.max_val)

    assert observed("0#in") == (min(float(b.min()) for b in batches), max(float(b.max()) for b in batches))
    assert observed("0#out") == (min(float(t.min()) for t in a), max(float(t.max()) for t in a))
    assert observed("3.value#out") == (min(float(v.min()) for v in values), max(float(v.max()) for v in values))
    assert calibrated.ranges["0#in"].observer.quant_max == 127  # input of an FBGEMM op: 7 bits
    assert calibrated.ranges["0#out"].observer.quant_max == 255 and calibrated.ranges["3#in"].calls == 2
    per_channel = torch.cat(values).transpose(0, 1).flatten(1)
    assert torch.equal(calibrated.value_channels["3"].max_val, per_channel.amax(1))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(ValueError, match="no batches"):
        calibrate(model, targets, [])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_observers_activation_range_weight_and_value_equalization():
    seven, eight = ActivationRange(reduce_range=True), ActivationRange(reduce_range=False)
    for r in (seven, eight):
        r.observe(torch.tensor([-1.0, 3.0]))
    assert seven.qparams() == pytest.approx((4.0 / 127, round(1.0 / (4.0 / 127))))
    assert eight.qparams() == pytest.approx((4.0 / 255, round(1.0 / (4.0 / 255))))
    weight = torch.randn(5, 3, 3, 3)
    q = quantized_weight(weight)
    expected_scales = weight.abs().amax(dim=(1, 2, 3)) / 127.5  # symmetric per output channel
    assert torch.allclose(q.q_per_channel_scales().float(), expected_scales, rtol=1e-6)
    assert (q.dequantize() - weight).abs().le(expected_scales.view(-1, 1, 1, 1) / 2 + 1e-7).all()
    observer = torch.ao.quantization.observer.PerChannelMinMaxObserver(ch_axis=1, dtype=torch.quint8)
    observer(torch.tensor([[4.0, 0.5, -0.01, 0.0], [-2.0, -1.0, 0.01, 0.0]]).view(2, 4, 1))
    gain, equalized = value_equalization(observer)
    # largest magnitude 4, 1, 0.01, 0 per channel -> gains 1, 4, capped 256, 256 (all-zero channel)
    assert gain.tolist() == [1.0, 4.0, 256.0, 256.0]
    assert float(equalized.observer.min_val) == -4.0 and float(equalized.observer.max_val) == 4.0


def _sequential_block(channels: int = 4) -> nn.Sequential:
    block = nn.Sequential(
        LocalSelfAttention(2, channels, channels),
        nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU()),
        nn.Conv2d(4, 4, 1),
    )
    with torch.no_grad():
        norm = block[1][0]
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return block.eval()


def test_epilogue_finds_and_folds_the_following_batchnorm_and_relu():
    block = _sequential_block()
    layer, norm = block[0], block[1][0]
    assert [type(m) for _, _, m in following_leaves(block, layer)] == [nn.BatchNorm2d, nn.ReLU, nn.Conv2d]
    scale, shift, relu, fused = fusable_epilogue(block, layer, 4)
    assert relu and [m for _, _, m in fused] == [norm, block[1][1]]
    y = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert torch.allclose(y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), norm(y), atol=1e-6)
        gain = torch.tensor([1.0, 2.0, 4.0, 8.0])
        before = norm(y)
        assert fold_into_following_batchnorm(block, layer, gain)
        assert torch.allclose(norm(y * gain.view(1, -1, 1, 1)), before, atol=1e-5)
    # no Sequential around the layer: nothing to fuse or fold
    assert fusable_epilogue(layer, layer, 4) == (None, None, False, [])
    assert not fold_into_following_batchnorm(layer, layer, gain)


def test_conversion_of_a_leaf_matches_torch_int8_ops_and_falls_back_when_not_reached():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Linear(6, 3)).eval()
    targets = select_targets(model)
    x = torch.randn(2, 1, 6, 6)
    calibrated = calibrate(model, targets, [x])
    summary = new_summary([])
    with quantized_engine("x86"):
        leaf = convert_leaf("0", model[0], calibrated, summary)
        out_range = calibrated.ranges["0#out"]
        scale, zero_point = calibrated.ranges["0#in"].qparams()
        expected = quantized_conv(model[0], out_range)(torch.quantize_per_tensor(x, scale, zero_point, torch.quint8))
    assert isinstance(leaf, QuantizedLeaf) and summary["leaves"] == ["0"]
    with torch.no_grad():
        assert torch.equal(leaf(x), expected.dequantize())
        assert (leaf(x) - model[0](x)).abs().max() < 0.05 * model[0](x).abs().max()
    # a layer calibration never ran stays float, with the reason
    calibrated.ranges["1#in"].calls = 0
    with quantized_engine("x86"):
        replacements, summary = convert_targets(model, targets, calibrated)
    assert id(model[1]) not in replacements and summary["leaves"] == ["0"]
    assert summary["kept_float"] == ["1: Linear not reached by calibration"]


def test_conversion_of_attention_fuses_the_epilogue_and_equalizes_values():
    block = _sequential_block()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        reference = block(x)
    work = float_copy(block)
    targets = select_targets(work)
    calibrated = calibrate(work, targets, [x, torch.randn(2, 4, 8, 8)])
    with quantized_engine("x86"):
        replacements, summary = convert_targets(work, targets, calibrated)
    attention = replacements[id(work[0])]
    assert isinstance(attention, QuantizedLocalSelfAttention) and attention.relu
    assert summary["fused_epilogue"] == {"0": ["BatchNorm2d", "ReLU"]}
    assert summary["value_equalization"] == {"0": "output rescaled (fused epilogue)"}
    assert isinstance(work[1][0], nn.Identity) and isinstance(work[1][1], nn.Identity)
    int8 = pack_int8_network(work, replacements, summary, backend="x86", reduce_range=True, calibration_batches=2)
    with torch.no_grad():  # INT8 rounding of a random layer: measured 5 % of the output range; a lost BatchNorm or
        # ReLU, or an equalisation gain not undone, is off by the size of the output itself
        assert (int8(x) - reference).abs().max() < 0.1 * reference.abs().max()


def test_packing_swaps_shared_and_root_modules_and_describes_the_artifact():
    conv = nn.Conv2d(1, 1, 1)
    model = nn.Sequential(conv, nn.ReLU(), conv)  # one module used twice
    replacement = nn.Identity()
    assert replace_modules(model, {id(conv): replacement}) is model
    assert model[0] is replacement and model[2] is replacement
    assert replace_modules(conv, {id(conv): replacement}) is replacement
    summary = new_summary(["x: kept"])
    with pytest.raises(ValueError, match="nothing was quantised"):
        pack_int8_network(model, {}, summary, backend="x86", reduce_range=True, calibration_batches=1)
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.GELU()).train()
    leaf = QuantizedLeaf(nn.Identity(), 1.0, 0)
    int8 = pack_int8_network(
        net, {id(net[0]): leaf}, summary, backend="fbgemm", reduce_range=False, calibration_batches=3
    )
    assert int8 is net and net[0] is leaf and not net.training
    info = int8.int8_summary
    described = (info["backend"], info["reduce_range"], info["fbgemm_input_bits"], info["portable"])
    assert described == ("fbgemm", False, 8, False)
    assert info["calibration_batches"] == 3 and info["kept_float"] == ["x: kept"]
    assert info["float_layers"] == {"GELU": 1}  # the INT8 leaf and what it wraps are not listed as float


def test_the_steps_compose_to_quantize_int8():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).eval()
    batches = [torch.randn(2, 1, 6, 6) for _ in range(2)]
    work = float_copy(model)
    targets = select_targets(work)
    calibrated = calibrate(work, targets, batches)
    with quantized_engine("x86"):
        replacements, summary = convert_targets(work, targets, calibrated)
    by_steps = pack_int8_network(work, replacements, summary, backend="x86", reduce_range=True, calibration_batches=2)
    direct = quantize_int8(model, batches)
    x = torch.randn(3, 1, 6, 6)
    with torch.no_grad():
        assert torch.equal(by_steps(x), direct(x))
    assert by_steps.int8_summary == direct.int8_summary

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Fused C++ local-attention cores (torch.ops.medattn): exactness of every code path this CPU can run (portable,
AVX2, AVX-512 VNNI), run-time ISA selection and its MEDATTN_ISA override, INT8 agreement, errors, TorchScript, the
set-up build and its lock, and (slow) the AVX2 path under qemu emulating a Haswell CPU, which has no AVX-512.

``make setup`` builds the library (python -m networks.kernels.build); the module fixture builds it too if it is
missing (about 40 s on 2 shared cores, once per machine: it is cached under ~/.cache/medattn_kernels).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import networks.kernels
from networks.blocks.local_self_attention import local_attention_torch
from networks.isa import cpu_best_isa, requested_isa
from networks.kernels import (
    build_kernels,
    kernel_implementations,
    kernel_library_path,
    load_kernels,
    local_attention_fused,
    local_attention_fused_int8,
)
from tests.references import reference_local_attention

REPO_ROOT = Path(__file__).resolve().parents[1]

# The code path this CPU should get, derived from /proc/cpuinfo independently of the library's CPUID check, and every
# path it can run (each is tested against the references).
ISA_ORDER = ("portable", "avx2", "avx512_vnni")
EXPECTED_ISA = cpu_best_isa()
CPU_ISAS = ISA_ORDER[: ISA_ORDER.index(EXPECTED_ISA) + 1]
# what the public ops run in this process (MEDATTN_ISA may force a lower path, e.g. `make test-avx2`)
SELECTED_ISA = requested_isa()


@pytest.fixture(scope="module", autouse=True)
def kernels():
    """Build the op library if set-up has not (first time on this machine) and load it once for the module."""
    build_kernels()
    load_kernels()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: OpenMP hand-offs would dominate on a shared 2-core machine
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------------------------
# references (the float one, reference_local_attention, is shared with test_local_self_attention)


def reference_attention_int8(q, k, v, rel, kernel_size, heads):
    """The INT8 kernel's documented arithmetic, per pixel: exact integer q.k on the raw bytes, rel in 16-bit fixed
    point per neighbour, float softmax, weights rounded to 8 bits relative to the largest and normalised by their
    integer sum, integer weighted sum of the raw values. Off-image keys / values are their zero points (real 0)."""
    zq, zk, zv = q.q_zero_point(), k.q_zero_point(), v.q_zero_point()
    sq, sk, sv = q.q_scale(), k.q_scale(), v.q_scale()
    qi, ki, vi = (t.int_repr().long() for t in (q, k, v))
    batch, channels, *spatial = q.shape
    head_dim = channels // heads
    radius = kernel_size // 2
    offsets = list(itertools.product(range(-radius, radius + 1), repeat=len(spatial)))
    rel_scale = rel.abs().amax(dim=1) / (127 * 256 + 127)
    rel_scale = torch.where(rel_scale > 0, rel_scale, torch.ones_like(rel_scale))
    rel16 = torch.round(rel / rel_scale[:, None]).long()
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(batch):
        for p in itertools.product(*(range(s) for s in spatial)):
            for h in range(heads):
                cs = slice(h * head_dim, (h + 1) * head_dim)
                qp = qi[(b, cs) + p]
                logits, values = [], []
                for n, offset in enumerate(offsets):
                    nb = tuple(pi + oi for pi, oi in zip(p, offset))
                    inside = all(0 <= i < s for i, s in zip(nb, spatial))
                    qk = int(((qp - zq) * (ki[(b, cs) + nb] - zk)).sum()) if inside else 0
                    qrel = int(((qp - zq) * rel16[n, cs]).sum())
                    logits.append(sq * sk * qk + sq * float(rel_scale[n]) * qrel)
                    values.append(vi[(b, cs) + nb] - zv if inside else torch.zeros(head_dim, dtype=torch.long))
                logits = torch.tensor(logits, dtype=torch.float64)
                weights = torch.round(torch.exp(logits - logits.max()) * 255).long()
                out[(b, cs) + p] = sv * (weights[:, None] * torch.stack(values)).sum(0).double() / weights.sum()
    return out.float()


def fp32_isa(isa):
    return lambda q, k, v, rel, kernel_size, heads: torch.ops.medattn._local_attention_isa(
        q, k, v, rel, kernel_size, heads, isa
    )


def int8_isa(isa):
    def run(q, k, v, rel, kernel_size, heads, out_scale=None, out_shift=None, relu=False):
        return torch.ops.medattn._local_attention_int8_isa(
            q, k, v, rel, kernel_size, heads, out_scale, out_shift, relu, isa
        )

    return run


def random_inputs(shape, kernel_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=generator) for _ in range(3))
    rel = torch.randn(kernel_size ** (len(shape) - 2), shape[1], generator=generator)
    return q, k, v, rel


def quantize_min_max(x: torch.Tensor, quant_max: int = 255) -> torch.Tensor:
    """Per-tensor affine quint8 with the scale and zero point of the tensor's range (always including 0), on the
    integer range [0, quant_max]."""
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = max(hi - lo, 1e-8) / quant_max
    return torch.quantize_per_tensor(x, scale, int(round(-lo / scale)), torch.quint8)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)


# ----------------------------------------------------------------------------------------------------------------
# FP32 kernel

CASES = [
    # (B, C, *spatial), kernel_size, heads: 2D and 3D, odd sizes, batch > 1, window larger than the image,
    # rows spanning several 16-pixel tiles with a ragged tail, head widths that are not multiples of 4 or 8
    ((2, 4, 5, 7), 1, 1),
    ((2, 4, 5, 7), 3, 1),
    ((2, 4, 5, 7), 3, 2),
    ((2, 4, 5, 7), 5, 1),
    ((2, 4, 5, 7), 5, 2),
    ((1, 6, 3, 37), 3, 2),
    ((2, 16, 4, 19), 3, 1),
    ((1, 12, 3, 21), 5, 3),
    ((2, 4, 3, 4, 5), 1, 2),
    ((2, 4, 3, 4, 5), 3, 1),
    ((2, 4, 3, 4, 5), 3, 2),
    ((1, 8, 2, 3, 17), 5, 2),
]


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("shape, kernel_size, heads", CASES)
def test_fp32_kernel_matches_per_pixel_reference(shape, kernel_size, heads, isa):
    q, k, v, rel = random_inputs(shape, kernel_size)
    expected = reference_local_attention(q, k, v, rel, kernel_size, heads)
    got = fp32_isa(isa)(q, k, v, rel, kernel_size, heads)
    assert got.shape == shape and got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if isa == SELECTED_ISA:  # the public op runs the selected path
        fused = local_attention_fused(q, k, v, rel, kernel_size, heads)
        assert torch.equal(fused, got)
        torch.testing.assert_close(fused, local_attention_torch(q, k, v, rel, kernel_size, heads), rtol=1e-5, atol=1e-5)


def one_and_two_threads(op, *args):
    """``op(*args)`` with one intra-op thread (the module's setting) and with two: ``(single, threaded)``."""
    single = op(*args)
    torch.set_num_threads(2)
    try:
        threaded = op(*args)
    finally:
        torch.set_num_threads(1)
    return single, threaded


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_fp32_kernel_on_larger_images_matches_torch_core(isa):
    # many tiles and rows, two threads (each owns a contiguous range of rows and its own row cache)
    for shape, kernel_size, heads in [((3, 24, 29, 70), 3, 2), ((2, 8, 6, 9, 35), 3, 1), ((1, 16, 20, 47), 7, 1)]:
        if isa == "portable" and kernel_size == 7:
            continue  # the per-pixel path is slow; its exactness is covered above
        q, k, v, rel = random_inputs(shape, kernel_size, seed=1)
        expected = local_attention_torch(q, k, v, rel, kernel_size, heads)
        single, threaded = one_and_two_threads(fp32_isa(isa), q, k, v, rel, kernel_size, heads)
        torch.testing.assert_close(single, expected, rtol=1e-5, atol=2e-5)
        assert torch.equal(single, threaded)


def test_fp32_kernel_reads_non_contiguous_inputs():
    q, k, v, rel = random_inputs((2, 8, 9, 11), 3)
    expected = local_attention_fused(q, k, v, rel, 3, 2)
    got = local_attention_fused(channels_last(q), k.transpose(2, 3).contiguous().transpose(2, 3), v, rel, 3, 2)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_selected_isa_is_the_one_the_cpu_flags_call_for():
    """The library's CPUID choice agrees with /proc/cpuinfo: avx512_vnni + avx512vbmi + avx512bw -> avx512_vnni,
    avx2 + fma -> avx2, else portable (unless MEDATTN_ISA forces a lower path)."""
    implementations = kernel_implementations()
    assert implementations["cpu_best_isa"] == EXPECTED_ISA
    assert implementations["available_isas"] == list(CPU_ISAS)
    assert implementations["selected_isa"] == SELECTED_ISA
    assert implementations["fp32"] == implementations["int8"] == SELECTED_ISA


# ----------------------------------------------------------------------------------------------------------------
# INT8 kernel

INT8_CASES = [
    ((2, 4, 5, 7), 3, 1),
    ((2, 8, 5, 7), 5, 2),
    ((1, 6, 3, 37), 3, 2),  # head width 3: channel groups padded to 4
    ((2, 16, 4, 19), 3, 1),
    ((1, 12, 3, 21), 5, 3),
    ((2, 4, 3, 4, 5), 3, 2),
    ((1, 8, 2, 3, 17), 5, 2),
    ((1, 64, 3, 20), 3, 1),  # 16 channel groups: one full register transpose
]


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("shape, kernel_size, heads", INT8_CASES)
def test_int8_kernel_matches_its_integer_reference(shape, kernel_size, heads, isa):
    q, k, v, rel = random_inputs(shape, kernel_size, seed=2)
    qq, kq, vq = (channels_last(quantize_min_max(t)) for t in (q * 0.6 + 0.2, k * 0.8 - 0.1, v))
    got = int8_isa(isa)(qq, kq, vq, rel, kernel_size, heads)
    portable = int8_isa("portable")(qq, kq, vq, rel, kernel_size, heads)
    expected = reference_attention_int8(qq, kq, vq, rel, kernel_size, heads)
    if isa == SELECTED_ISA:  # the public op runs the selected path
        assert torch.equal(local_attention_fused_int8(qq, kq, vq, rel, kernel_size, heads), got)
    # channels-last output: the layout the next layer's quantized projections read
    assert (
        got.shape == shape
        and got.dtype == torch.float32
        and got.is_contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    )
    # float32 vs float64 logits can move a weight across a rounding boundary: at most one weight LSB (1/255 of
    # the largest weight) times the value range, and rarely
    one_lsb = 2 * vq.dequantize().abs().max().item() / 255
    for result in (got, portable):
        error = (result - expected).abs()
        assert error.max().item() <= one_lsb
        assert (error > 1e-5).float().mean().item() < 0.01  # measured: none
    torch.testing.assert_close(got, portable, rtol=1e-5, atol=1e-5)
    # and the INT8 arithmetic stays close to the float contract on the same (dequantized) inputs
    float_reference = reference_local_attention(
        qq.dequantize(), kq.dequantize(), vq.dequantize(), rel, kernel_size, heads
    )
    assert (got - float_reference).abs().max().item() <= 0.05 * float_reference.abs().max().item()


def test_int8_kernel_accepts_any_memory_format_and_kernel_size_one():
    q, k, v, rel = random_inputs((2, 8, 6, 10), 3, seed=3)
    qq, kq, vq = (quantize_min_max(t) for t in (q, k, v))  # NCHW quantized tensors are repacked once
    nchw = local_attention_fused_int8(qq, kq, vq, rel, 3, 2)
    nhwc = local_attention_fused_int8(channels_last(qq), channels_last(kq), channels_last(vq), rel, 3, 2)
    torch.testing.assert_close(nchw, nhwc, rtol=0, atol=0)
    # a one-pixel window: softmax over a single neighbour is 1, so the output is v itself
    single = local_attention_fused_int8(qq, kq, vq, rel[4:5], 1, 2)
    torch.testing.assert_close(single, vq.dequantize(), rtol=0, atol=0)


@pytest.mark.parametrize(
    "shape, kernel_size, heads",
    [((2, 64, 5, 21), 3, 1), ((1, 12, 3, 21), 5, 3), ((1, 8, 2, 3, 17), 3, 2), ((2, 8, 4, 6), 1, 1)],
)
def test_int8_kernel_epilogue_is_per_channel_affine_then_relu(shape, kernel_size, heads):
    """The fused epilogue (a folded BatchNorm -> ReLU) equals the same maths applied to the plain output."""
    q, k, v, rel = random_inputs(shape, kernel_size, seed=7)
    qq, kq, vq = (channels_last(quantize_min_max(t)) for t in (q, k, v))
    generator = torch.Generator().manual_seed(8)
    scale = torch.randn(shape[1], generator=generator)
    shift = torch.randn(shape[1], generator=generator)
    view = (1, shape[1]) + (1,) * (len(shape) - 2)
    for op in [torch.ops.medattn.local_attention_int8] + [int8_isa(isa) for isa in CPU_ISAS]:
        plain = op(qq, kq, vq, rel, kernel_size, heads)
        expected = torch.relu(plain * scale.view(view) + shift.view(view))
        fused = op(qq, kq, vq, rel, kernel_size, heads, scale, shift, True)
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
        assert (fused == 0).any() and (fused > 0).any()
        torch.testing.assert_close(
            op(qq, kq, vq, rel, kernel_size, heads, None, shift), plain + shift.view(view), rtol=1e-5, atol=1e-5
        )
    with pytest.raises(RuntimeError, match="out_scale must hold one value per channel"):
        torch.ops.medattn.local_attention_int8(qq, kq, vq, rel, kernel_size, heads, scale[:-1], shift, True)
    with pytest.raises(RuntimeError, match="out_shift must be a float32"):
        torch.ops.medattn.local_attention_int8(qq, kq, vq, rel, kernel_size, heads, scale, shift.double(), False)


def test_int8_op_six_argument_form_of_older_artifacts_still_compiles():
    """Artifacts saved before the epilogue arguments existed call the op with six arguments; TorchScript recompiles
    their code on load against the current schema, whose new arguments have defaults."""
    q, k, v, rel = random_inputs((1, 8, 5, 9), 3, seed=9)
    qq, kq, vq = (channels_last(quantize_min_max(t)) for t in (q, k, v))
    unit = torch.jit.CompilationUnit(
        "def core(q: Tensor, k: Tensor, v: Tensor, rel: Tensor) -> Tensor:\n"
        "    return torch.ops.medattn.local_attention_int8(q, k, v, rel, 3, 2)\n"
    )
    assert torch.equal(unit.core(qq, kq, vq, rel), local_attention_fused_int8(qq, kq, vq, rel, 3, 2))


@pytest.mark.parametrize("isa", [isa for isa in CPU_ISAS if isa != "portable"])
def test_int8_kernel_on_larger_images_with_two_threads(isa):
    # many tiles, ragged tails, 64-channel rows (vector repacking) and a 600-channel head (AVX2: q . rel summed in
    # chunks of 256 channels)
    portable = int8_isa("portable")
    for shape, kernel_size, heads, seed in [
        ((3, 32, 23, 70), 3, 2, 4),
        ((1, 64, 9, 29), 5, 1, 5),
        ((1, 600, 3, 11), 3, 1, 6),
        ((1, 34, 5, 23), 7, 2, 7),
    ]:
        q, k, v, rel = random_inputs(shape, kernel_size, seed=seed)
        qq, kq, vq = (channels_last(quantize_min_max(t)) for t in (q, k, v))
        single, threaded = one_and_two_threads(int8_isa(isa), qq, kq, vq, rel, kernel_size, heads)
        assert torch.equal(single, threaded)
        torch.testing.assert_close(single, portable(qq, kq, vq, rel, kernel_size, heads), rtol=1e-5, atol=1e-5)


def smooth_features(batch: int, in_channels: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Band-limited random images and simple nonlinear features of them, like an early network layer sees."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 1, height, width, generator=generator)
    taps = torch.exp(-(torch.arange(-6, 7, dtype=torch.float32) ** 2) / 8)
    taps = taps / taps.sum()
    image = F.conv2d(F.pad(noise, (6, 6, 0, 0), mode="reflect"), taps.view(1, 1, 1, -1))
    image = F.conv2d(F.pad(image, (0, 0, 6, 6), mode="reflect"), taps.view(1, 1, -1, 1))
    image = (image - image.mean()) / image.std()
    features = [image, F.relu(image), torch.tanh(2 * image), torch.sin(3 * image)]
    return torch.cat(features * math.ceil(in_channels / 4), dim=1)[:, :in_channels]


def quantized_projection(features: torch.Tensor, out_channels: int, seed: int):
    """A bias-free 1x1 conv in float and its FBGEMM/x86 quantized version (per-channel weights, min/max scales).

    The conv's input is quantized to 7 bits ([0, 127], what MinMaxObserver(reduce_range=True) gives and what the
    project's quantizer uses on every CPU): without VNNI, FBGEMM multiplies u8 activations by s8 weights with
    vpmaddubsw, which saturates the sum of two products in int16, and full-range 8-bit inputs overflow it."""
    from torch.ao.nn.quantized import Conv2d as QuantizedConv2d

    generator = torch.Generator().manual_seed(seed)
    in_channels = features.shape[1]
    weight = torch.randn(out_channels, in_channels, 1, 1, generator=generator) / math.sqrt(in_channels)
    float_out = F.conv2d(features, weight)
    weight_scale = weight.abs().amax(dim=(1, 2, 3)) / 127
    qweight = torch.quantize_per_channel(
        weight, weight_scale, torch.zeros(out_channels, dtype=torch.long), 0, torch.qint8
    )
    conv = QuantizedConv2d(in_channels, out_channels, 1, bias=False)
    conv.set_weight_bias(qweight, None)
    reference = quantize_min_max(float_out)
    conv.scale, conv.zero_point = reference.q_scale(), reference.q_zero_point()
    return float_out, conv(quantize_min_max(features, quant_max=127))


@pytest.mark.parametrize("channels, kernel_size, heads", [(32, 3, 1), (32, 3, 2), (16, 5, 1)])
def test_int8_kernel_agrees_with_fp32_kernel_on_quantized_convolution_outputs(channels, kernel_size, heads):
    previous_engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
    try:
        features = smooth_features(2, 8, 40, 53, seed=5)
        (q, qq), (k, kq), (v, vq) = (quantized_projection(features, channels, seed) for seed in (6, 7, 8))
    finally:
        torch.backends.quantized.engine = previous_engine
    assert qq.dtype == torch.quint8 and qq.is_contiguous(memory_format=torch.channels_last)
    rel = torch.randn(kernel_size**2, channels, generator=torch.Generator().manual_seed(9))
    got = local_attention_fused_int8(qq, kq, vq, rel, kernel_size, heads)
    on_dequantized = local_attention_fused(qq.dequantize(), kq.dequantize(), vq.dequantize(), rel, kernel_size, heads)
    on_float = local_attention_fused(q, k, v, rel, kernel_size, heads)
    output_scale = on_float.abs().max().item()
    # the kernel's own approximations (16-bit rel, 8-bit softmax weights): measured <= 0.5 % of the output scale
    assert (got - on_dequantized).abs().max().item() <= 0.01 * output_scale
    # end to end, including the quantization of q, k and v (measured RMS 0.2-0.4 % of the output scale)
    assert (got - on_float).pow(2).mean().sqrt().item() <= 0.02 * output_scale


# ----------------------------------------------------------------------------------------------------------------
# errors and autograd


def test_wrong_inputs_raise_clear_errors():
    q, k, v, rel = random_inputs((1, 4, 5, 6), 3)
    qq, kq, vq = (quantize_min_max(t) for t in (q, k, v))
    with pytest.raises(RuntimeError, match="quint8"):
        local_attention_fused_int8(q, k, v, rel, 3, 1)
    with pytest.raises(RuntimeError, match="local_attention_int8"):
        local_attention_fused(qq, kq, vq, rel, 3, 1)
    with pytest.raises(RuntimeError, match="float32"):
        local_attention_fused(q.double(), k.double(), v.double(), rel, 3, 1)
    with pytest.raises(RuntimeError, match="quint8"):
        signed = torch.quantize_per_tensor(q, 0.1, 0, torch.qint8)
        local_attention_fused_int8(signed, kq, vq, rel, 3, 1)
    with pytest.raises(RuntimeError, match="per tensor"):
        per_channel = torch.quantize_per_channel(
            q, torch.full((4,), 0.1), torch.zeros(4, dtype=torch.long), 1, torch.quint8
        )
        local_attention_fused_int8(per_channel, kq, vq, rel, 3, 1)
    with pytest.raises(RuntimeError, match="rel must have shape"):
        local_attention_fused(q, k, v, rel[:8], 3, 1)
    with pytest.raises(RuntimeError, match="odd"):
        local_attention_fused(q, k, v, rel, 2, 1)
    with pytest.raises(RuntimeError, match="heads"):
        local_attention_fused(q, k, v, rel, 3, 3)
    with pytest.raises(RuntimeError, match="same shape"):
        local_attention_fused(q, k[:, :, :4], v, rel, 3, 1)
    with pytest.raises(RuntimeError, match="2 or 3 spatial dims"):
        local_attention_fused(q[0], k[0], v[0], rel, 3, 1)


def test_inference_only_kernels_refuse_inputs_that_require_grad():
    q, k, v, rel = random_inputs((1, 4, 5, 6), 3)
    rel.requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference-only"):
        local_attention_fused(q, k, v, rel, 3, 1)
    qq, kq, vq = (quantize_min_max(t) for t in (q, k, v))
    with pytest.raises(RuntimeError, match="inference-only"):
        local_attention_fused_int8(qq, kq, vq, rel, 3, 1)
    with torch.no_grad():
        out = local_attention_fused(q, k, v, rel, 3, 1)
    assert not out.requires_grad
    with torch.inference_mode():
        local_attention_fused_int8(qq, kq, vq, rel, 3, 1)


# ----------------------------------------------------------------------------------------------------------------
# TorchScript


class _AttentionCore(torch.nn.Module):
    def __init__(self, kernel_size: int, heads: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.heads = heads

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
        return local_attention_fused(q, k, v, rel, self.kernel_size, self.heads)


class _Int8AttentionCore(_AttentionCore):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
        return local_attention_fused_int8(q, k, v, rel, self.kernel_size, self.heads)


def test_ops_are_recorded_by_script_and_trace_and_load_without_python_classes(tmp_path):
    q, k, v, rel = random_inputs((2, 6, 7, 9), 3, seed=10)
    qq, kq, vq = (channels_last(quantize_min_max(t)) for t in (q, k, v))
    expected = local_attention_fused(q, k, v, rel, 3, 2)
    expected_int8 = local_attention_fused_int8(qq, kq, vq, rel, 3, 2)

    scripted = torch.jit.script(_AttentionCore(3, 2))
    assert "medattn::local_attention" in str(scripted.inlined_graph)
    traced = torch.jit.trace(_AttentionCore(3, 2), (q, k, v, rel))
    assert "medattn::local_attention" in str(traced.graph)
    scripted_int8 = torch.jit.script(_Int8AttentionCore(3, 2))
    assert "medattn::local_attention_int8" in str(scripted_int8.inlined_graph)
    torch.testing.assert_close(scripted(q, k, v, rel), expected, rtol=0, atol=0)
    torch.testing.assert_close(traced(q, k, v, rel), expected, rtol=0, atol=0)

    scripted.save(str(tmp_path / "fp32.pt"))
    scripted_int8.save(str(tmp_path / "int8.pt"))
    torch.save(
        {"inputs": (q, k, v, rel), "int8_inputs": (qq, kq, vq), "expected": expected, "expected_int8": expected_int8},
        tmp_path / "data.pt",
    )
    # a fresh interpreter with torch and the op library only: no networks package on the path
    script = textwrap.dedent(
        f"""
        import sys, torch
        torch.ops.load_library({kernel_library_path()!r})
        data = torch.load({str(tmp_path / "data.pt")!r}, weights_only=False)
        q, k, v, rel = data["inputs"]
        qq, kq, vq = data["int8_inputs"]
        fp32 = torch.jit.load({str(tmp_path / "fp32.pt")!r})
        int8 = torch.jit.load({str(tmp_path / "int8.pt")!r})
        with torch.no_grad():
            assert torch.equal(fp32(q, k, v, rel), data["expected"])
            assert torch.equal(int8(qq, kq, vq, rel), data["expected_int8"])
        assert "networks" not in sys.modules
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


# ----------------------------------------------------------------------------------------------------------------
# ISA selection


def test_isa_ops_refuse_unknown_and_unsupported_isas():
    q, k, v, rel = random_inputs((1, 4, 5, 6), 3)
    qq, kq, vq = (quantize_min_max(t) for t in (q, k, v))
    with pytest.raises(RuntimeError, match="unknown ISA 'sse9'"):
        fp32_isa("sse9")(q, k, v, rel, 3, 1)
    # names are matched like networks.isa does: blanks stripped, any case
    assert torch.equal(fp32_isa(" Portable ")(q, k, v, rel, 3, 1), fp32_isa("portable")(q, k, v, rel, 3, 1))
    missing = ISA_ORDER[len(CPU_ISAS) :]
    for isa in missing:  # never an illegal instruction: a clear error naming the ISA and the CPU's best
        with pytest.raises(RuntimeError, match=f"{isa} code path was requested but this CPU lacks it.*{EXPECTED_ISA}"):
            fp32_isa(isa)(q, k, v, rel, 3, 1)
        with pytest.raises(RuntimeError, match=f"{isa} code path was requested but this CPU lacks it"):
            int8_isa(isa)(qq, kq, vq, rel, 3, 1)


_ISA_SCRIPT = """
import json, sys, torch
torch.ops.load_library(sys.argv[1])
try:
    implementations = list(torch.ops.medattn.implementations())
except RuntimeError as error:
    print(json.dumps({"error": str(error)}))
    sys.exit(0)
data = torch.load(sys.argv[2], weights_only=False)
q, k, v, rel = data["fp32"]
qq, kq, vq = data["int8"]
with torch.inference_mode():
    fp32 = torch.ops.medattn.local_attention(q, k, v, rel, 3, 2)
    int8 = torch.ops.medattn.local_attention_int8(qq, kq, vq, rel, 3, 2, data["scale"], data["shift"], True)
torch.save({"fp32": fp32, "int8": int8}, sys.argv[3])
print(json.dumps({"implementations": implementations}))
"""


def run_json_report(command: list[str], env: dict[str, str], timeout: float) -> dict:
    """Run a script that prints a JSON report as its last line; the report (the script must exit 0)."""
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_with_isa(isa: str, tmp_path: Path, data_file: Path) -> dict:
    """A fresh interpreter (torch and the op library only) with MEDATTN_ISA=isa runs both public ops."""
    out_file = tmp_path / f"out_{isa}.pt"
    command = [sys.executable, "-c", _ISA_SCRIPT, kernel_library_path(), str(data_file), str(out_file)]
    report = run_json_report(command, dict(os.environ, MEDATTN_ISA=isa), timeout=300)
    if "error" not in report:
        report.update(torch.load(out_file))
    return report


def test_medattn_isa_environment_variable_forces_a_lower_path(tmp_path):
    q, k, v, rel = random_inputs((2, 32, 9, 21), 3, seed=11)
    qq, kq, vq = (channels_last(quantize_min_max(t)) for t in (q, k, v))
    scale, shift = torch.randn(32, generator=torch.Generator().manual_seed(12)), torch.linspace(-1, 1, 32)
    data_file = tmp_path / "inputs.pt"
    torch.save({"fp32": (q, k, v, rel), "int8": (qq, kq, vq), "scale": scale, "shift": shift}, data_file)
    for isa in [isa for isa in ("avx2", "portable") if isa in CPU_ISAS]:
        report = run_with_isa(isa, tmp_path, data_file)
        assert f"selected_isa={isa}" in report["implementations"]
        assert f"fp32={isa}" in report["implementations"] and f"int8={isa}" in report["implementations"]
        assert f"cpu_best_isa={EXPECTED_ISA}" in report["implementations"]
        # the same outputs as that path's test op in this process
        assert torch.equal(report["fp32"], fp32_isa(isa)(q, k, v, rel, 3, 2))
        assert torch.equal(report["int8"], int8_isa(isa)(qq, kq, vq, rel, 3, 2, scale, shift, True))
        # and the same results as every other path, to float rounding
        torch.testing.assert_close(report["fp32"], local_attention_fused(q, k, v, rel, 3, 2), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            report["int8"], local_attention_fused_int8(qq, kq, vq, rel, 3, 2, scale, shift, True), rtol=1e-5, atol=1e-5
        )


def test_medattn_isa_naming_a_path_the_cpu_lacks_raises_a_clear_error(tmp_path):
    missing = ISA_ORDER[len(CPU_ISAS) :]
    if not missing:
        pytest.skip(
            f"this CPU runs the highest code path ({EXPECTED_ISA}): no ISA it lacks can be requested here; "
            "the test runs on AVX2-only and older machines"
        )
    for isa in missing:
        report = run_with_isa(isa, tmp_path, tmp_path / "unused.pt")
        assert f"MEDATTN_ISA: the {isa} code path was requested but this CPU lacks it" in report["error"]
        assert f"the best this CPU supports is {EXPECTED_ISA}" in report["error"]
    report = run_with_isa("avx3000", tmp_path, tmp_path / "unused.pt")
    assert "MEDATTN_ISA: unknown ISA 'avx3000'" in report["error"]


_QEMU_SCRIPT = """
import json, sys, torch
torch.ops.load_library(sys.argv[1])
implementations = dict(item.split("=", 1) for item in torch.ops.medattn.implementations())
data = torch.load(sys.argv[2], weights_only=False)
q, k, v, rel = data["fp32"]
qq, kq, vq = data["int8"]
with torch.inference_mode():
    fp32 = torch.ops.medattn.local_attention(q, k, v, rel, 3, 2)
    int8 = torch.ops.medattn.local_attention_int8(qq, kq, vq, rel, 3, 2)
print(json.dumps({"implementations": implementations,
                  "fp32_max_diff": (fp32 - data["expected_fp32"]).abs().max().item(),
                  "int8_max_diff": (int8 - data["expected_int8"]).abs().max().item()}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("cpu, isa", [("Haswell", "avx2"), ("Nehalem", "portable")])
def test_code_path_runs_on_an_emulated_cpu_without_higher_isas(cpu, isa, tmp_path):
    """qemu-user emulating a Haswell (AVX2 + FMA, no AVX-512) / Nehalem (SSE4.2, no AVX) CPU: the library selects
    avx2 / portable by CPUID and gives the results computed natively with that path, so that path needs no
    instruction of the higher ones (an AVX-512 or AVX instruction would be SIGILL under emulation)."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.skip("qemu-x86_64 not installed (Debian: apt-get install qemu-user)")
    if isa not in CPU_ISAS:
        pytest.skip(f"the {isa} reference results must be computed natively, and this CPU lacks {isa}")
    q, k, v, rel = random_inputs((1, 32, 6, 19), 3, seed=13)
    qq, kq, vq = (channels_last(quantize_min_max(t)) for t in (q, k, v))
    data_file = tmp_path / "inputs.pt"
    torch.save(
        {
            "fp32": (q, k, v, rel),
            "int8": (qq, kq, vq),
            "expected_fp32": fp32_isa(isa)(q, k, v, rel, 3, 2),
            "expected_int8": int8_isa(isa)(qq, kq, vq, rel, 3, 2),
        },
        data_file,
    )
    env = {key: value for key, value in os.environ.items() if key != "MEDATTN_ISA"}
    # the venv's python is the system interpreter behind a symlink: qemu-user runs it with the host's libraries
    command = [qemu, "-cpu", cpu, sys.executable, "-c", _QEMU_SCRIPT, kernel_library_path(), str(data_file)]
    report = run_json_report(command, env, timeout=600)
    assert report["implementations"]["selected_isa"] == isa
    assert report["implementations"]["cpu_best_isa"] == isa
    # IEEE arithmetic is emulated exactly: the same bits as natively
    assert report["fp32_max_diff"] == 0.0
    assert report["int8_max_diff"] == 0.0


# ----------------------------------------------------------------------------------------------------------------
# set-up build


def test_load_without_a_built_library_says_how_to_build_it(tmp_path, monkeypatch):
    """Loading never compiles: with no library for this checkout in the cache, load_kernels raises and names the
    set-up command."""
    monkeypatch.setenv("MEDATTN_KERNELS_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(networks.kernels, "_library_path", None)
    monkeypatch.setattr(networks.kernels, "_ops_registered", lambda: False)  # as in a fresh process
    with pytest.raises(RuntimeError, match=r"not built .*run `make setup` \(or `python -m networks.kernels.build`\)"):
        load_kernels()
    assert not (tmp_path / "empty-cache").exists()


@pytest.mark.slow
def test_concurrent_first_builds_compile_once_and_both_load(tmp_path):
    """Two set-up builds at once into an empty cache: one compiles under the lock, the other waits; both then load
    the same library and run both cores."""
    env = dict(os.environ, MEDATTN_KERNELS_CACHE=str(tmp_path / "cache"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "networks.kernels.build", "--json", "--check"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO_ROOT,
        )
        for _ in range(2)
    ]
    reports = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, stderr[-3000:]
        reports.append(json.loads(stdout.strip().splitlines()[-1]))
    assert reports[0]["path"] == reports[1]["path"]
    assert Path(reports[0]["path"]).is_file()
    assert Path(reports[0]["path"]).is_relative_to(tmp_path / "cache")
    assert sorted(report["build_seconds"] is None for report in reports) == [False, True]
    assert all(report["implementations"]["cpu_best_isa"] == EXPECTED_ISA for report in reports)
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if ".build-" in p.name]
    assert leftovers == []
    # a third run finds it built and returns at once
    again = subprocess.run(
        [sys.executable, str(REPO_ROOT / "networks" / "kernels" / "build.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert again.returncode == 0 and "up to date" in again.stdout

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Local self-attention (SASA) core and layer: exactness against a per-pixel loop, gradients, errors, memory."""

from __future__ import annotations

import itertools
import json
import os

import pytest
import torch

from networks.blocks.local_self_attention import (
    ATTENTION_BACKENDS,
    LocalSelfAttention,
    local_attention_torch,
    register_attention_backend,
)
from tests.peak_memory import run_measuring_script
from tests.references import reference_local_attention

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize(
    "spatial, kernel_size, heads",
    [((5, 6), 3, 1), ((5, 6), 5, 2), ((3, 2), 5, 1), ((3, 4, 5), 3, 2), ((3, 3, 4), 5, 1), ((4, 3), 1, 2)],
)
def test_core_matches_per_pixel_reference(spatial, kernel_size, heads):
    torch.manual_seed(0)
    channels = 4
    q, k, v = (torch.randn(2, channels, *spatial, dtype=torch.float64) for _ in range(3))
    rel = torch.randn(kernel_size ** len(spatial), channels, dtype=torch.float64)
    expected = reference_local_attention(q, k, v, rel, kernel_size, heads)
    got = local_attention_torch(q, k, v, rel, kernel_size, heads)
    assert got.shape == q.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("heads", [1, 2])
def test_core_channel_chunking_matches_reference(monkeypatch, heads):
    """Large inputs sum q * k in channel chunks; force that path with a tiny temporary budget."""
    import networks.blocks.local_self_attention as lsa

    monkeypatch.setattr(lsa, "_PRODUCT_BUDGET_ELEMENTS", 40)
    torch.manual_seed(0)
    inputs = [torch.randn(2, 6, 4, 5, dtype=torch.float64) for _ in range(3)]
    inputs.append(torch.randn(9, 6, dtype=torch.float64))
    upstream = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    results = []
    for fn in (local_attention_torch, reference_local_attention):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        out = fn(*leaves, 3, heads)
        (out * upstream).sum().backward()
        results.append([out] + [leaf.grad for leaf in leaves])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_core_accepts_non_contiguous_inputs():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 6, 5, 4, dtype=torch.float64).transpose(2, 3) for _ in range(3))
    rel = torch.randn(9, 6, dtype=torch.float64)
    torch.testing.assert_close(local_attention_torch(q, k, v, rel, 3, 3), reference_local_attention(q, k, v, rel, 3, 3))


@pytest.mark.parametrize("shape, kernel_size, heads", [((2, 4, 4, 5), 3, 2), ((1, 3, 3, 2, 3), 5, 1)])
def test_core_gradients_match_autograd_of_reference(shape, kernel_size, heads):
    """The hand-written backward equals autograd through the per-pixel reference, for q, k, v and rel."""
    torch.manual_seed(0)
    inputs = [torch.randn(*shape, dtype=torch.float64) for _ in range(3)]
    inputs.append(torch.randn(kernel_size ** (len(shape) - 2), shape[1], dtype=torch.float64))
    upstream = torch.randn(*shape, dtype=torch.float64)
    grads = []
    for fn in (local_attention_torch, reference_local_attention):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        (fn(*leaves, kernel_size, heads) * upstream).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for name, got, expected in zip(["q", "k", "v", "rel"], *grads):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


def test_core_gradcheck():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rel = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: local_attention_torch(*t, 3, 2), (q, k, v, rel), fast_mode=True)


def test_layer_relative_embedding_layout_and_output():
    """The layer equals the reference on its own projections, with rel[n, c] = rel_g[c - start_g, o_g(n) + k//2]."""
    torch.manual_seed(0)
    layer = LocalSelfAttention(3, in_channels=2, out_channels=8, kernel_size=3, heads=2).double()
    assert [tuple(getattr(layer, f"rel_{a}").shape) for a in range(3)] == [(2, 3), (2, 3), (4, 3)]
    rel = layer.relative_embedding()
    assert rel.shape == (27, 8)
    starts = [0, 2, 4, 8]
    for n, offset in enumerate(itertools.product((-1, 0, 1), repeat=3)):
        for axis in range(3):
            table = getattr(layer, f"rel_{axis}")
            torch.testing.assert_close(rel[n, starts[axis] : starts[axis + 1]], table[:, offset[axis] + 1])

    x = torch.randn(1, 2, 3, 4, 3, dtype=torch.float64)
    expected = reference_local_attention(layer.query(x), layer.key(x), layer.value(x), rel, 3, 2)
    torch.testing.assert_close(layer(x), expected)


def test_layer_2d_shapes_parameters_and_gradients():
    torch.manual_seed(0)
    layer = LocalSelfAttention(2, in_channels=3, out_channels=6, kernel_size=5, heads=3)
    assert [tuple(getattr(layer, f"rel_{a}").shape) for a in range(2)] == [(3, 5), (3, 5)]
    assert sum(p.numel() for p in layer.parameters()) == 3 * 3 * 6 + 6 * 5
    x = torch.randn(2, 3, 7, 9, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 6, 7, 9)
    y.square().mean().backward()
    for name, param in list(layer.named_parameters()) + [("x", x)]:
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_kernel_size_one_is_the_value_projection():
    torch.manual_seed(0)
    layer = LocalSelfAttention(2, in_channels=5, out_channels=2, kernel_size=1)
    x = torch.randn(2, 5, 6, 6)
    torch.testing.assert_close(layer(x), layer.value(x))
    # in 3D a 1-wide window accepts fewer channels than axes (SaDNN's 3D output layer with 2 classes)
    layer3d = LocalSelfAttention(3, in_channels=4, out_channels=2, kernel_size=1)
    x3d = torch.randn(1, 4, 2, 3, 4)
    torch.testing.assert_close(layer3d(x3d), layer3d.value(x3d))


def test_backend_dispatch():
    torch.manual_seed(0)
    layer = LocalSelfAttention(2, in_channels=2, out_channels=4, kernel_size=3, heads=2).double()
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    expected = layer(x)
    register_attention_backend("per_pixel_reference", reference_local_attention)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_attention_backend("per_pixel_reference", reference_local_attention)
        layer.backend = "per_pixel_reference"
        torch.testing.assert_close(layer(x), expected)
        layer.backend = "no_such_backend"
        with pytest.raises(ValueError, match="unknown attention backend 'no_such_backend'"):
            layer(x)
    finally:
        ATTENTION_BACKENDS.pop("per_pixel_reference", None)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"spatial_dims": 1, "in_channels": 2, "out_channels": 4}, "spatial_dims"),
        ({"spatial_dims": 2, "in_channels": 2, "out_channels": 4, "kernel_size": 4}, "odd"),
        ({"spatial_dims": 2, "in_channels": 2, "out_channels": 4, "kernel_size": 0}, "odd"),
        ({"spatial_dims": 2, "in_channels": 2, "out_channels": 6, "heads": 4}, "divisible by heads"),
        ({"spatial_dims": 3, "in_channels": 2, "out_channels": 2}, "out_channels"),
        ({"spatial_dims": 2, "in_channels": 0, "out_channels": 4}, "in_channels"),
    ],
)
def test_layer_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LocalSelfAttention(**kwargs)


def test_forward_and_core_input_errors():
    layer = LocalSelfAttention(2, in_channels=3, out_channels=4)
    with pytest.raises(ValueError, match="expected input"):
        layer(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="expected input"):
        layer(torch.randn(1, 3, 8, 8, 8))
    q = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match="rel must have shape"):
        local_attention_torch(q, q, q, torch.randn(8, 4), 3, 1)
    with pytest.raises(ValueError, match="same shape"):
        local_attention_torch(q, q, torch.randn(1, 4, 5, 4), torch.randn(9, 4), 3, 1)
    with pytest.raises(ValueError, match="heads"):
        local_attention_torch(q, q, q, torch.randn(9, 4), 3, 3)
    with pytest.raises(ValueError, match="kernel_size"):
        local_attention_torch(q, q, q, torch.randn(9, 4), 2, 1)
    with pytest.raises(ValueError, match="2 or 3 spatial dims"):
        local_attention_torch(q[0], q[0], q[0], torch.randn(3, 5), 3, 1)


# Peak memory of one no-grad forward (tests/peak_memory.py). The baseline is the RSS after importing, warming up on a
# small input and allocating the 512 x 512 input.
_MEMORY_SCRIPT = """
import json, torch
from networks.blocks.local_self_attention import LocalSelfAttention

torch.manual_seed(0)
layer = LocalSelfAttention(2, 64, 64, kernel_size=3).eval()
with torch.no_grad():
    layer(torch.randn(1, 64, 32, 32))
    x = torch.randn(1, 64, 512, 512)
    growth, y, method = growth_during(lambda: layer(x))
print(json.dumps({"growth": growth, "input": x.numel() * x.element_size(),
                  "output": y.numel() * y.element_size(), "shape": list(y.shape), "method": method}))
"""


def test_forward_peak_memory_within_three_times_input_plus_output():
    stdout = run_measuring_script(_MEMORY_SCRIPT, env=dict(os.environ, OMP_NUM_THREADS="2"), timeout=300)
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["shape"] == [1, 64, 512, 512]
    budget = 3 * (report["input"] + report["output"])
    # the output itself must be resident, so a growth below it would mean the measurement is broken
    assert report["output"] <= report["growth"] <= budget, report


def test_scale_query_init_scales_only_query_projections():
    from networks import SaDNNSeg
    from networks.blocks import scale_query_init

    torch.manual_seed(0)
    model = SaDNNSeg(spatial_dims=2, in_channels=1, out_channels=2, features=(4, 8, 8, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    changed = scale_query_init(model, 0.1)
    n_attention = sum(isinstance(m, LocalSelfAttention) for m in model.modules())
    assert changed == n_attention > 0
    for key, value in model.state_dict().items():
        expected = before[key] * 0.1 if key.endswith("query.weight") else before[key]
        torch.testing.assert_close(value, expected)
    with pytest.raises(ValueError, match="positive"):
        scale_query_init(model, 0.0)

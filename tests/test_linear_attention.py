# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Performer (FAVOR+) and Nystrom attention: approximation of softmax attention, module behaviour, linear memory."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from networks.blocks.nystrom_attention import NystromAttention, iterative_pinv, nystrom_attention, segment_means
from networks.blocks.performer_attention import (
    PerformerAttention,
    favor_attention,
    linear_attention,
    orthogonal_random_features,
    relu_kernel_features,
)
from tests.peak_memory import run_measuring_script

pytestmark = pytest.mark.usefixtures("single_thread")

REPO_ROOT = Path(__file__).resolve().parents[1]


def exact_softmax_attention(query, key, value):
    logits = query @ key.transpose(-2, -1) / math.sqrt(query.shape[-1])
    return torch.softmax(logits, dim=-1) @ value


def relative_error(estimate, reference):
    return ((estimate - reference).norm() / reference.norm()).item()


def module_reference(module, x):
    """Exact softmax attention with the module's own projections (via scaled_dot_product_attention)."""
    batch, tokens, dim = x.shape

    def split(t):
        return t.reshape(batch, tokens, module.heads, module.head_dim).transpose(1, 2)

    q, k, v = split(module.to_q(x)), split(module.to_k(x)), split(module.to_v(x))
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, dim)
    return module.to_out(out)


def test_orthogonal_random_features_structure():
    generator = torch.Generator().manual_seed(0)
    projection = orthogonal_random_features(40, 16, "fixed", generator=generator, dtype=torch.float64)
    assert projection.shape == (40, 16)
    torch.testing.assert_close(projection.norm(dim=1), torch.full((40,), 4.0, dtype=torch.float64))
    for start in (0, 16):  # full blocks: mutually orthogonal rows
        block = projection[start : start + 16]
        torch.testing.assert_close(block @ block.T, 16.0 * torch.eye(16, dtype=torch.float64))
    chi = orthogonal_random_features(40, 16, "chi", generator=generator)
    assert not torch.allclose(chi.norm(dim=1), torch.full((40,), 4.0), atol=1e-3)
    with pytest.raises(ValueError, match="scaling"):
        orthogonal_random_features(8, 4, "unit")


def test_favor_softmax_error_falls_with_more_features():
    feature_counts = (8, 64, 512)
    errors = {m: 0.0 for m in feature_counts}
    seeds = range(8)
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        query = 0.5 * torch.randn(1, 2, 32, 16, generator=generator)
        key = 0.5 * torch.randn(1, 2, 32, 16, generator=generator)
        value = torch.randn(1, 2, 32, 8, generator=generator)
        reference = exact_softmax_attention(query, key, value)
        for m in feature_counts:
            projection = orthogonal_random_features(m, 16, generator=generator)
            estimate = favor_attention(query, key, value, projection, "softmax")
            errors[m] += relative_error(estimate, reference) / len(seeds)
    assert errors[8] > errors[64] > errors[512]
    assert errors[512] < 0.2
    assert errors[8] > 2 * errors[512]


def test_favor_relu_equals_explicit_kernel_attention():
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 3, 20, 8), torch.randn(2, 3, 20, 8), torch.randn(2, 3, 20, 5)
    projection = orthogonal_random_features(12, 8)
    q_features = relu_kernel_features(query, projection)
    k_features = relu_kernel_features(key, projection)
    weights = q_features @ k_features.transpose(-2, -1)
    explicit = (weights / weights.sum(dim=-1, keepdim=True)) @ value
    torch.testing.assert_close(favor_attention(query, key, value, projection, "relu"), explicit)
    torch.testing.assert_close(linear_attention(q_features, k_features, value), explicit)
    with pytest.raises(ValueError, match="kernel"):
        favor_attention(query, key, value, projection, "cosine")


def test_performer_module_approximates_softmax_attention_and_redraws():
    torch.manual_seed(0)
    x = 0.5 * torch.randn(2, 24, 32)
    few = PerformerAttention(32, heads=4, kernel="softmax").eval()
    many = PerformerAttention(32, heads=4, kernel="softmax", num_features=2048).eval()
    many.load_state_dict({k: v for k, v in few.state_dict().items() if k != "projection"}, strict=False)
    assert few.num_features == int(8 * math.log(8))
    assert "projection" in few.state_dict() and all(p is not few.projection for p in few.parameters())
    reference = module_reference(few, x)
    with torch.no_grad():
        assert relative_error(many(x), reference) < 0.1
        out = few(x)
        assert out.shape == x.shape
        torch.testing.assert_close(few(x), out)  # eval mode: deterministic
        before = few.projection.clone()
        few.redraw_projection(torch.Generator().manual_seed(1))
        assert not torch.equal(few.projection, before)
        assert not torch.allclose(few(x), out)
    with pytest.raises(ValueError, match="divisible"):
        PerformerAttention(30, heads=4)
    with pytest.raises(ValueError, match="num_features"):
        PerformerAttention(8, heads=8)  # head dim 1: int(1 * ln 1) = 0 features
    with pytest.raises(ValueError, match="shape"):
        few(torch.randn(2, 32))


def test_segment_means_and_iterative_pinv():
    x = torch.randn(1, 2, 12, 3)
    torch.testing.assert_close(segment_means(x, 12), x)
    torch.testing.assert_close(segment_means(x, 4), x.reshape(1, 2, 4, 3, 3).mean(dim=3))
    assert segment_means(torch.randn(1, 1, 10, 3), 3).shape == (1, 1, 3, 3)
    with pytest.raises(ValueError, match="num_segments"):
        segment_means(x, 13)
    torch.manual_seed(0)
    matrix = torch.eye(6) + 0.1 * torch.randn(3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(iterative_pinv(matrix, 8), torch.linalg.pinv(matrix))


def test_nystrom_is_near_exact_with_as_many_landmarks_as_tokens():
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 2, 32, 16, generator=generator), torch.randn(2, 2, 32, 16, generator=generator)
    value = torch.randn(2, 2, 32, 8, generator=generator)
    reference = exact_softmax_attention(query, key, value)
    assert relative_error(nystrom_attention(query, key, value, 32, pinv_iterations=20), reference) < 1e-3
    # more landmarks than tokens are capped at the token count
    assert relative_error(nystrom_attention(query, key, value, 64, pinv_iterations=20), reference) < 1e-3

    torch.manual_seed(0)
    module = NystromAttention(32, heads=4, num_landmarks=64, pinv_iterations=20).eval()
    x = torch.randn(2, 24, 32)
    with torch.no_grad():
        assert relative_error(module(x), module_reference(module, x)) < 1e-3


def test_nystrom_approximates_attention_over_smooth_tokens():
    # image-like tokens vary smoothly along the sequence, which segment-mean landmarks summarise well
    generator = torch.Generator().manual_seed(0)
    position = torch.linspace(0, 1, 64)[:, None]

    def smooth_tokens(dim):
        frequency = 3 * torch.randn(dim, generator=generator)
        phase = 6 * torch.rand(dim, generator=generator)
        return torch.sin(math.pi * frequency * position + phase)[None, None]

    query, key = smooth_tokens(16), smooth_tokens(16)
    value = torch.randn(1, 1, 64, 8, generator=generator)
    reference = exact_softmax_attention(query, key, value)
    uniform = value.mean(dim=-2, keepdim=True).expand_as(reference)  # a trivial guess, for scale
    error = relative_error(nystrom_attention(query, key, value, num_landmarks=16), reference)
    assert error < 0.05
    assert error < 0.2 * relative_error(uniform, reference)


_PEAK_MEMORY_SCRIPT = """
import sys, torch
from networks.blocks.performer_attention import PerformerAttention

def peak_bytes(block, tokens):
    x = torch.randn(1, tokens, 64)
    growth, _, method = growth_during(lambda: block(x))
    assert method == VMHWM, method  # two sizes in one process: the lifetime peak cannot tell them apart
    return growth

torch.set_num_threads(1)
torch.manual_seed(0)
block = PerformerAttention(64, heads=8).eval()
with torch.no_grad():
    block(torch.randn(1, 16, 64))
    print(*(peak_bytes(block, int(tokens)) for tokens in sys.argv[1:]))
"""


def test_performer_peak_memory_grows_linearly_with_tokens():
    # a fixed mmap threshold makes glibc return every freed tensor to the OS, so RSS follows the live tensors
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    stdout = run_measuring_script(_PEAK_MEMORY_SCRIPT, "8192", "32768", env=env, timeout=120)
    small, large = (int(value) for value in stdout.split())
    # 4x the tokens: ~4x the memory for linear attention (a quadratic one would need ~16x)
    assert small > 4 * 2**20, small
    assert 3.0 < large / small < 5.0, (small, large)


# ------------------------------------------------------------------------------ one token-attention base


def test_token_attentions_share_one_base_and_keep_their_parameter_names():
    """Projections, heads and output live in TokenAttention; the subclasses only define attend(). The parameter
    names are those of the checkpoints trained before the base existed (bundled HCT and Scopeformer weights)."""
    from networks.blocks.reattention import ReAttention
    from networks.blocks.token_attention import TokenAttention

    separate = [
        "to_q.weight",
        "to_q.bias",
        "to_k.weight",
        "to_k.bias",
        "to_v.weight",
        "to_v.bias",
        "to_out.weight",
        "to_out.bias",
    ]
    modules = {
        PerformerAttention(32, 4): ["projection", *separate],
        NystromAttention(32, 4, num_landmarks=8): separate,
        ReAttention(32, 4): [
            "theta",
            "qkv.weight",
            "proj.weight",
            "proj.bias",
            "norm.weight",
            "norm.bias",
            "norm.running_mean",
            "norm.running_var",
            "norm.num_batches_tracked",
        ],
    }
    for module, keys in modules.items():
        assert isinstance(module, TokenAttention)
        assert list(module.state_dict()) == keys
        for shared in ("forward", "project_heads", "merge_heads"):
            assert getattr(type(module), shared) is getattr(TokenAttention, shared), (type(module), shared)
        assert type(module).attend is not TokenAttention.attend
    with pytest.raises(NotImplementedError, match="attend"):
        TokenAttention(8, 2)(torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="qkv_layout"):
        TokenAttention(8, 2, qkv_layout="packed")
    with pytest.raises(ValueError, match="divisible"):
        PerformerAttention(30, 4)
    with pytest.raises(ValueError, match="expected tokens"):
        NystromAttention(8, 2)(torch.randn(3, 8))


def test_bundled_hct_performer_computes_favor_with_its_own_weights():
    """The bundled HCT weights load into the Performer layers, which compute FAVOR+ of the projections named in
    the checkpoint: recomputed here from the raw state-dict tensors with torch's functional ops."""
    from networks.checkpoint import load_checkpoint

    model, _ = load_checkpoint(REPO_ROOT / "monailabel_app" / "model" / "hct_cls.pt")  # strict: every key fits
    layers = [m for m in model.modules() if isinstance(m, PerformerAttention)]
    assert layers
    torch.manual_seed(0)
    for layer in layers:
        dim = layer.heads * layer.head_dim
        x = torch.randn(2, 20, dim)
        state = layer.state_dict()

        def heads(name, x=x, state=state, layer=layer):
            t = F.linear(x, state[f"{name}.weight"], state[f"{name}.bias"])
            return t.reshape(2, 20, layer.heads, layer.head_dim).transpose(1, 2)

        out = favor_attention(heads("to_q"), heads("to_k"), heads("to_v"), state["projection"], layer.kernel)
        expected = F.linear(out.transpose(1, 2).reshape(2, 20, dim), state["to_out.weight"], state["to_out.bias"])
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""HCT (Taha et al. 2022): parameter counts of the paper's network and the GMIC baseline, block wiring, shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from networks.blocks.nystrom_attention import NystromAttention
from networks.blocks.performer_attention import PerformerAttention
from networks.model_card import count_parameters
from networks.nets.hct import HCT, HCT_ATTENTIONS, AttentionConvBlock, MultiheadSelfAttention, PreActBasicBlock

pytestmark = pytest.mark.usefixtures("single_thread")


def _resnet22_params(attention_stages: tuple[int, ...]) -> int:
    """GMIC's pre-activation ResNet-22 from its layer shapes (../shared/REFERENCE.md): a 7x7 stem 1 -> 16 without
    bias; five stages of two blocks, widths 16, 32, 64, 128, 256; a basic block is BN(cin), 3x3 cin -> cout, BN(cout),
    3x3 cout -> cout (no biases), an attention-convolution block BN(cin), attention over cin (q, k, v, out linears
    with bias), BN(cin), 3x3 cin -> cout; a stage's first block has a 1x1 downsample without bias; head BN + linear
    256 -> 2. The attention's random features are buffers, not parameters."""
    total = 7 * 7 * 16
    previous = 16
    for stage, width in enumerate((16, 32, 64, 128, 256), start=1):
        for block in range(2):
            cin = previous if block == 0 else width
            downsample = cin * width if block == 0 else 0
            if stage in attention_stages:
                total += 2 * cin + 4 * (cin * cin + cin) + 2 * cin + 9 * cin * width + downsample
            else:
                total += 2 * cin + 9 * cin * width + 2 * width + 9 * width * width + downsample
        previous = width
    return total + 2 * 256 + (256 * 2 + 2)


@pytest.mark.parametrize("attention", HCT_ATTENTIONS)
def test_paper_parameter_count(attention):
    # ../shared/REFERENCE.md: 1,737,010 at 2 classes with attention-convolution blocks in stages 4-5
    assert count_parameters(HCT(attention=attention)) == _resnet22_params((4, 5)) == 1_737_010


def test_gmic_baseline_parameter_count():
    model = HCT(attention_stages=())
    assert count_parameters(model) == _resnet22_params(()) == 2_800_050  # REFERENCE.md: all-convolution 2,800,050
    assert not any(isinstance(m, AttentionConvBlock) for m in model.modules())


def test_attention_blocks_sit_in_the_last_two_stages():
    model = HCT()
    kinds = [[type(block) for block in stage] for stage in model.stages]
    assert kinds[:3] == [[PreActBasicBlock] * 2] * 3
    assert kinds[3:] == [[AttentionConvBlock] * 2] * 2
    widths = [block.attention.head_dim * block.attention.heads for stage in model.stages[3:] for block in stage]
    assert widths == [64, 128, 128, 256]  # the attention runs on each AC block's input width
    assert [block.attention.num_features for stage in model.stages[3:] for block in stage] == [16, 44, 44, 110]


def _randomise_batch_norms(module):
    generator = torch.Generator().manual_seed(3)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=generator))
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=generator))


def test_attention_conv_block_follows_its_equation():
    torch.manual_seed(0)
    attention = PerformerAttention(16, heads=4, kernel="relu")
    block = AttentionConvBlock(2, 16, 32, attention, stride=2, downsample=True).eval()
    _randomise_batch_norms(block)
    x = torch.randn(2, 16, 6, 5)
    with torch.no_grad():
        activated = F.relu(block.bn1(x))
        tokens = activated.flatten(2).transpose(1, 2)
        attended = attention(tokens).transpose(1, 2).reshape(x.shape) + x
        expected = block.conv(F.relu(block.bn2(attended))) + block.downsample(activated)
        torch.testing.assert_close(block(x), expected)
        assert block(x).shape == (2, 32, 3, 3)
    with pytest.raises(ValueError, match="downsample"):
        AttentionConvBlock(2, 16, 32, attention, stride=1, downsample=False)


def test_pre_activation_block_follows_its_equation():
    torch.manual_seed(0)
    block = PreActBasicBlock(2, 8, 8).eval()
    _randomise_batch_norms(block)
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        expected = block.conv2(F.relu(block.bn2(block.conv1(F.relu(block.bn1(x)))))) + x
        torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("attention", HCT_ATTENTIONS)
def test_forward_backward_each_attention(attention):
    torch.manual_seed(0)
    model = HCT(attention=attention, channels=(8, 8, 16, 16, 32), heads=4, out_channels=3)
    x = torch.randn(2, 1, 160, 128)  # 5x4 tokens in the first AC block
    logits = model(x)
    assert logits.shape == (2, 3)
    logits.sum().backward()
    attention_modules = [
        m for m in model.modules() if isinstance(m, (PerformerAttention, NystromAttention, MultiheadSelfAttention))
    ]
    assert len(attention_modules) == 4
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for m in attention_modules for p in m.parameters())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))  # dropout is off in eval mode


def test_redraw_projections_changes_performer_outputs():
    torch.manual_seed(0)
    model = HCT(channels=(8, 8, 16, 16, 32), heads=4).eval()
    x = torch.randn(1, 1, 128, 128)
    with torch.no_grad():
        before = model(x)
        assert model.redraw_projections(torch.Generator().manual_seed(5)) == 4
        assert not torch.allclose(model(x), before)
    assert HCT(attention="nystrom", channels=(8, 8, 16, 16, 32), heads=4).redraw_projections() == 0


def test_three_dimensional_input():
    torch.manual_seed(0)
    model = HCT(spatial_dims=3, channels=(4, 4, 8, 8, 8), heads=2, attention="performer_relu").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64, 64)).shape == (1, 2)  # 2x2x2 voxel tokens in the first AC block


def test_invalid_configurations_and_inputs():
    with pytest.raises(ValueError, match="attention must be one of"):
        HCT(attention="linformer")
    with pytest.raises(ValueError, match="not divisible by heads"):
        HCT(channels=(6, 6, 6, 6, 6))
    with pytest.raises(ValueError, match="attention_stages"):
        HCT(attention_stages=(5,))
    with pytest.raises(ValueError, match="one entry per stage"):
        HCT(blocks=(2, 2))
    with pytest.raises(ValueError, match="expected input"):
        HCT(channels=(8, 8, 16, 16, 32))(torch.randn(1, 3, 64, 64))


@pytest.mark.slow  # ~25 s: child processes (torch import) and exact attention at 3328 tokens
def test_whole_network_memory_is_linear_in_tokens_up_to_2048x1664():
    # the benchmark's own measurement (peak RSS of one forward, in a child process per attention) on its quick ladder
    # 1024x832 -> 2048x1664; exact softmax attention is the control that shows the measurement can see N^2 growth
    from benchmarks.hct_resolution import QUICK_LADDER, measure

    results = measure(QUICK_LADDER, ("performer_softmax", "softmax"), repeats=1, threads=1, log=lambda _: None)
    performer, exact = results["performer_softmax"], results["softmax"]
    assert performer["points"][-1]["tokens"] == [3328, 832, 832, 208]  # 64x52 feature map in the first AC block
    assert performer["points"][0]["peak_bytes"] > 16 * 2**20  # a real forward's activations, not noise
    assert performer["memory_slope"] < 1.3, performer
    assert all(ratio < 2.6 for ratio in performer["memory_per_doubling"]), performer  # 2.0 per doubling: linear
    # exact attention materialises 8 x N^2 weights (338 MiB at 3328 tokens): clearly super-linear
    assert exact["memory_slope"] > 1.6, exact
    assert exact["points"][-1]["peak_bytes"] > 2.5 * performer["points"][-1]["peak_bytes"]

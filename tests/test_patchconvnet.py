# Copyright MedAttnSlicer contributors. Apache-2.0.
"""PatchConvNet (Touvron et al. 2021): S60 parameter counts, block equations, class-attention map."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from networks.blocks.class_attention import ClassAttention, ClassAttentionBlock
from networks.model_card import count_parameters
from networks.nets.patchconvnet import ChannelsFirstLayerNorm, PatchConvBlock, PatchConvNet, patch_conv_stem

pytestmark = pytest.mark.usefixtures("single_thread")


def test_s60_parameter_counts():
    model = PatchConvNet()
    d = 384
    # from the layer shapes (../shared/REFERENCE.md gives the same figures for S60 at 1000 classes):
    # stem: four 3x3 convolutions without bias, 3 -> 48 -> 96 -> 192 -> 384
    stem = 9 * (3 * 48 + 48 * 96 + 96 * 192 + 192 * d)
    # block: LayerNorm, 1x1 conv, depthwise 3x3, squeeze-excite 384 -> 96 -> 384, 1x1 conv (all with bias), gamma
    block = 2 * d + (d * d + d) + (9 * d + d) + (d * 96 + 96) + (96 * d + d) + (d * d + d) + d
    # class attention: two LayerNorms, q, k, v and projection (bias), MLP 384 -> 1152 -> 384, gamma1 and gamma2
    aggregation = 2 * (2 * d) + 4 * (d * d + d) + (d * 3 * d + 3 * d) + (3 * d * d + d) + 2 * d
    head = d * 1000 + 1000
    assert count_parameters(model.stem) == stem == 872_208
    assert len(model.blocks) == 60
    assert {count_parameters(block) for block in model.blocks} == {block} == {374_880}
    assert count_parameters(model.aggregation) == aggregation == 1_479_936
    assert count_parameters(model.head) == head == 385_000
    assert model.cls_token.numel() + count_parameters(model.norm) == d + 2 * d == 1_152
    assert count_parameters(model) == stem + 60 * block + aggregation + head + 3 * d == 25_231_096


def test_stem_makes_a_14x14_token_grid_from_224():
    stem = patch_conv_stem(2, 3, 32)
    assert [m.conv.out_channels for m in stem] == [4, 8, 16, 32]
    assert all(m.conv.bias is None for m in stem)
    assert all(isinstance(m.adn.A, torch.nn.GELU) for m in stem[:3]) and not hasattr(stem[3], "adn")
    with torch.no_grad():
        assert stem(torch.randn(1, 3, 224, 224)).shape == (1, 32, 14, 14)


def test_channels_first_layer_norm_uses_the_module():
    norm = ChannelsFirstLayerNorm(6)
    assert isinstance(norm.norm, torch.nn.LayerNorm) and norm.norm.eps == 1e-6
    x = torch.randn(2, 6, 4, 5)
    expected = F.layer_norm(x.permute(0, 2, 3, 1), (6,), eps=1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(norm(x), expected)


def test_trunk_block_follows_its_equation():
    torch.manual_seed(0)
    block = PatchConvBlock(2, 16, layer_scale_init=0.5)
    x = torch.randn(2, 16, 5, 5)
    conv_in, _, depthwise, _, squeeze_excite, conv_out = block.branch
    assert depthwise.groups == 16 and depthwise.kernel_size == (3, 3)
    h = F.gelu(depthwise(F.gelu(conv_in(block.norm(x)))))
    se = squeeze_excite.fc
    assert se[0].out_features == 4  # reduction 4
    gate = torch.sigmoid(se[2](F.relu(se[0](h.mean(dim=(2, 3))))))
    expected = x + 0.5 * conv_out(h * gate[:, :, None, None])
    torch.testing.assert_close(block(x), expected)


def test_class_attention_block_updates_only_the_class_token():
    torch.manual_seed(0)
    block = ClassAttentionBlock(12, heads=1, mlp_ratio=3, layer_scale_init=1e-4)
    assert block.mlp.linear1.out_features == 36
    x, cls = torch.randn(2, 7, 12), torch.randn(2, 1, 12)
    new_cls, weights = block(x, cls)
    assert new_cls.shape == (2, 1, 12) and weights.shape == (2, 1, 8)
    u = block.norm1(torch.cat([cls, x], dim=1))
    attention = block.attention
    logits = attention.q(u[:, :1]) @ attention.k(u).transpose(1, 2) * 12**-0.5
    expected_weights = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(weights[:, 0], expected_weights[:, 0])
    cls_mid = cls + block.gamma1 * attention.proj(expected_weights @ attention.v(u))
    torch.testing.assert_close(new_cls, cls_mid + block.gamma2 * block.mlp(block.norm2(cls_mid)))
    with pytest.raises(ValueError, match="divisible"):
        ClassAttention(10, heads=3)


def test_forward_and_attention_map():
    torch.manual_seed(0)
    model = PatchConvNet(dim=32, depth=2, out_channels=5)
    x = torch.randn(2, 3, 96, 64)
    logits = model(x)
    assert logits.shape == (2, 5)
    logits.sum().backward()
    assert model.cls_token.grad is not None and model.stem[0].conv.weight.grad is not None
    model.eval()
    with torch.no_grad():
        logits_again, attention_map = model(x, return_attention=True)
        torch.testing.assert_close(logits_again, model(x))
        assert attention_map.shape == (2, 6, 4)
        assert (attention_map >= 0).all()
        torch.testing.assert_close(attention_map.sum(dim=(1, 2)), torch.ones(2))
        # the map is the class token's softmax row over the patches, class entry dropped and renormalised
        tokens = model.blocks(model.stem(x)).flatten(2).transpose(1, 2)
        _, weights = model.aggregation(tokens, model.cls_token.expand(2, -1, -1))
        expected = weights[:, 0, 1:] / weights[:, 0, 1:].sum(dim=-1, keepdim=True)
        torch.testing.assert_close(attention_map.flatten(1), expected)


def test_three_dimensional_variant():
    torch.manual_seed(0)
    model = PatchConvNet(spatial_dims=3, in_channels=1, out_channels=2, dim=16, depth=1).eval()
    with torch.no_grad():
        logits, attention_map = model(torch.randn(1, 1, 32, 48, 32), return_attention=True)
    assert logits.shape == (1, 2) and attention_map.shape == (1, 2, 3, 2)
    torch.testing.assert_close(attention_map.sum(), torch.tensor(1.0))


def test_invalid_configurations_and_inputs():
    with pytest.raises(ValueError, match="divisible by 8"):
        PatchConvNet(dim=36, depth=1)
    with pytest.raises(ValueError, match="spatial_dims"):
        PatchConvNet(spatial_dims=1, dim=16, depth=1)
    with pytest.raises(ValueError, match="expected input"):
        PatchConvNet(dim=16, depth=1)(torch.randn(1, 1, 64, 64))

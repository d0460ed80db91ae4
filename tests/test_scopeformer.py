# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Efficient Scopeformer: token modes, re-attention, backbone weights, frozen-backbone size, loss, HU windows."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet121, resnet10

from networks.blocks.reattention import ReAttention, ReAttentionTransformerBlock
from networks.nets.scopeformer import (
    SCOPEFORMER_MODES,
    BackboneFeatures,
    Scopeformer,
    hu_windows,
    weighted_multilabel_log_loss,
)

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(dim=24, depth=1, heads=2, mlp_dim=32, grid=2)


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@pytest.mark.parametrize("mode", SCOPEFORMER_MODES)
def test_modes_give_multilabel_logits(mode):
    torch.manual_seed(0)
    model = Scopeformer(backbones=("resnet10", "efficientnet-b0"), mode=mode, **TINY)
    x = torch.randn(2, 3, 64, 64)
    logits = model(x)
    assert logits.shape == (2, 6)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.blocks.parameters())
    tokens = {"baseline": 4 + 1, "deep_tr": 24 + 1, "efficient": 24}[mode]
    width = 24 if mode == "baseline" else 4
    assert model.position.shape == (1, tokens, width)
    assert (model.cls_token is None) == (mode == "efficient")


def test_default_backbone_ensemble_feature_map():
    torch.manual_seed(0)
    model = Scopeformer(**TINY).eval()  # densenet121 + efficientnet-b0 + resnet18
    assert [b.out_channels for b in model.backbones] == [1024, 320, 512]
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        assert model.feature_map(x).shape == (1, 24, 2, 2)
        assert model(x).shape == (1, 6)


def test_reattention_with_identity_theta_and_no_norm_is_softmax_attention():
    torch.manual_seed(0)
    plain = ReAttention(32, heads=4, reattention=False).eval()
    mixed = ReAttention(32, heads=4, reattention=True, norm=None).eval()
    mixed.load_state_dict(plain.state_dict(), strict=False)
    torch.testing.assert_close(mixed.theta.data, torch.eye(4))
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        assert torch.equal(mixed(x), plain(x))
        qkv = plain.qkv(x).reshape(2, 10, 3, 4, 8).permute(2, 0, 3, 1, 4)
        reference = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(2, 10, 32)
        torch.testing.assert_close(plain(x), plain.proj(reference))
        mixed.theta.copy_(torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0, 0, 1, 0], [0, 0, 0, 1]]))
        assert not torch.allclose(mixed(x), plain(x))  # mixing heads changes the output


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_reattention_norms(norm):
    torch.manual_seed(0)
    block = ReAttentionTransformerBlock(16, heads=4, mlp_dim=32, norm=norm)
    x = torch.randn(3, 7, 16)
    out = block(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert block.attention.theta.grad is not None
    maps, _ = block.attention.attention_maps(block.norm1(x))
    assert maps.shape == (3, 4, 7, 7)
    with pytest.raises(ValueError, match="norm"):
        ReAttention(16, heads=4, norm="group")


def test_backbone_weights_load_from_file(tmp_path):
    torch.manual_seed(0)
    source = DenseNet121(spatial_dims=2, in_channels=3, out_channels=6)  # a full classifier: head keys ignored
    path = tmp_path / "densenet121.pt"
    torch.save(source.state_dict(), path)
    model = Scopeformer(backbones=("densenet121", "resnet10"), backbone_weights={"densenet121": path}, **TINY)
    loaded = model.backbones[0].net.features.state_dict()
    assert all(torch.equal(value, source.features.state_dict()[key]) for key, value in loaded.items())

    resnet = resnet10(spatial_dims=2, n_input_channels=3)
    torch.save(resnet.state_dict(), tmp_path / "resnet10.pt")
    with pytest.raises(ValueError, match="not a state dict of MONAI backbone 'densenet121'"):
        BackboneFeatures("densenet121").load_weights(tmp_path / "resnet10.pt")
    backbone = BackboneFeatures("resnet10")
    backbone.load_weights(tmp_path / "resnet10.pt")
    torch.testing.assert_close(backbone.net.layer4[0].conv1.weight, resnet.layer4[0].conv1.weight)
    with pytest.raises(ValueError, match="wrong shape"):
        BackboneFeatures("resnet10", in_channels=1).load_weights(tmp_path / "resnet10.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read backbone weights"):
        backbone.load_weights(tmp_path / "garbage.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        backbone.load_weights(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not in"):
        Scopeformer(backbones=("resnet18",), backbone_weights={"resnet10": tmp_path / "resnet10.pt"}, **TINY)


def test_frozen_backbones_leave_the_paper_sized_trainable_part():
    model = Scopeformer(freeze_backbones=True)  # paper-like: d 384, 8 layers, 16 heads, MLP 4096, 8x8 grid
    trainable = count_parameters(model, trainable_only=True)
    assert trainable == count_parameters(model) - count_parameters(model.backbones)
    width, tokens = 64, 384  # efficient mode: the 384 channels are tokens of length 8 * 8
    block = (2 * 2 * width) + (3 * width * width) + (width * width + width) + 16 * 16 + 2 * 16  # norms, attention
    block += width * 4096 + 4096 + 4096 * width + width  # MLP
    projections = (1024 + 320 + 512) * 128 + 3 * 128
    expected = 8 * block + projections + tokens * width + 2 * width + (384 * 6 + 6)
    assert trainable == expected == 4_628_486
    assert 4e6 < trainable < 8e6  # the paper reports ~6M trainable parameters

    model.train()
    assert all(not b.training for b in model.backbones) and model.blocks.training
    small = Scopeformer(backbones=("resnet10",), freeze_backbones=True, **TINY).train()
    small(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is None for p in small.backbones.parameters())
    assert small.projections[0].weight.grad is not None


def test_weighted_multilabel_log_loss_matches_the_rsna_metric():
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 6), (torch.rand(5, 6) > 0.5).float()
    weights = torch.tensor([2.0, 1, 1, 1, 1, 1])
    p = torch.sigmoid(logits).double()
    per_entry = -(targets * torch.log(p) + (1 - targets) * torch.log(1 - p))
    expected = (per_entry * weights).sum() / (weights.sum() * 5)
    loss = weighted_multilabel_log_loss(logits, targets, (2, 1, 1, 1, 1, 1))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert loss.ndim == 0
    with pytest.raises(ValueError, match="class_weights must have 6"):
        weighted_multilabel_log_loss(logits, targets, (2, 1, 1))
    with pytest.raises(ValueError, match="same|shape"):
        weighted_multilabel_log_loss(logits, targets[:, :5], (2, 1, 1, 1, 1, 1))


def test_hu_windows():
    hu = torch.tensor([[-1000.0, 0.0, 40.0, 80.0, 180.0, 1000.0]])
    windows = hu_windows(hu)
    assert type(windows) is torch.Tensor and windows.shape == (3, 1, 6)
    torch.testing.assert_close(windows[0, 0], torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 1.0]))  # brain 40/80
    torch.testing.assert_close(windows[1, 0], torch.tensor([0.0, 0.1, 0.3, 0.5, 1.0, 1.0]))  # subdural 80/200
    torch.testing.assert_close(windows[2], windows[1])  # soft tissue as listed by the paper: 80/200
    batch = hu_windows(torch.zeros(4, 1, 8, 8))
    assert batch.shape == (4, 3, 8, 8)
    assert hu_windows(hu, windows=((0.0, 2000.0),)).shape == (1, 1, 6)
    with pytest.raises(ValueError, match="2D slices"):
        hu_windows(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="positive width"):
        hu_windows(hu, windows=((40.0, 0.0),))


def test_invalid_configurations():
    with pytest.raises(ValueError, match="mode"):
        Scopeformer(mode="tiny", **TINY)
    with pytest.raises(ValueError, match="unknown backbones"):
        Scopeformer(backbones=("xception",), **TINY)
    with pytest.raises(ValueError, match="divisible by the number of backbones"):
        Scopeformer(backbones=("resnet10", "resnet10", "resnet10", "resnet10", "resnet10"), **TINY)
    with pytest.raises(ValueError, match="heads"):
        Scopeformer(backbones=("resnet10",), dim=24, depth=1, heads=3, mlp_dim=8, grid=2)
    with pytest.raises(ValueError, match="expected input"):
        Scopeformer(backbones=("resnet10",), **TINY)(torch.randn(1, 1, 64, 64))
    with torch.no_grad():  # any input of at least 32 pixels works, even below 32 * grid
        logits = Scopeformer(backbones=("resnet10",), **TINY).eval()(torch.randn(1, 3, 32, 32))
    assert logits.shape == (1, 6) and math.isfinite(float(logits[0, 0]))


def _narrow_resnet_params(blocks: tuple[int, ...], widths: tuple[int, ...] = (8, 16, 32, 64)) -> int:
    """Parameters of MONAI's ResNet (basic blocks, no fc) at 1/8 width on one input channel, from its layer shapes:
    a 7x7 stem without bias + BatchNorm; per block two 3x3 convolutions without bias, each with a BatchNorm; the
    first block of a stage that changes width has a 1x1 downsample convolution with bias + BatchNorm."""
    total = 7 * 7 * 1 * widths[0] + 2 * widths[0]
    previous = widths[0]
    for count, width in zip(blocks, widths):
        for i in range(count):
            cin = previous if i == 0 else width
            total += 9 * cin * width + 2 * width + 9 * width * width + 2 * width
            if i == 0 and cin != width:
                total += cin * width + width + 2 * width
        previous = width
    return total


def test_narrow_resnet_backbones_for_cpu_sized_models():
    """``backbone_width`` narrows ResNet backbones (MONAI widen_factor); the app's ``scopeformer_tiny`` uses it."""
    from networks.factory import create_model

    narrow = BackboneFeatures("resnet10", spatial_dims=2, in_channels=1, width=0.125)
    assert narrow.out_channels == 64 and count_parameters(narrow) == _narrow_resnet_params((1, 1, 1, 1)) == 77_640
    assert narrow(torch.zeros(1, 1, 64, 64)).shape == (1, 64, 2, 2)
    with pytest.raises(ValueError, match="ResNet backbones only"):
        BackboneFeatures("densenet121", width=0.5)
    with pytest.raises(ValueError, match="positive"):
        BackboneFeatures("resnet10", width=0.0)
    torch.manual_seed(0)
    tiny = create_model("scopeformer_tiny", in_channels=1, out_channels=5).eval()
    # two 1x1 projections 64 -> 32 (bias), CLS + 17 positions of width 64, two pre-norm blocks (LayerNorms, qkv
    # without bias, output projection, Theta 4 x 4 and BatchNorm2d(4) of re-attention, MLP 64 -> 256 -> 64), the final
    # LayerNorm and the 64 -> 5 head
    block = 2 * (2 * 64) + 64 * 3 * 64 + (64 * 64 + 64) + 4 * 4 + 2 * 4 + (64 * 256 + 256) + (256 * 64 + 64)
    transformer = 2 * (64 * 32 + 32) + 64 + 17 * 64 + 2 * block + 2 * 64 + (64 * 5 + 5)
    expected = _narrow_resnet_params((1, 1, 1, 1)) + _narrow_resnet_params((2, 2, 2, 2)) + transformer
    assert tiny.mode == "baseline" and count_parameters(tiny) == expected == 359_077
    with torch.no_grad():
        assert tiny(torch.randn(2, 1, 128, 128)).shape == (2, 5)


def test_backbone_norm_replaces_every_batchnorm_and_keeps_the_parameter_count():
    """``backbone_norm`` swaps all of a ResNet backbone's BatchNorms (MONAI's ``ResNet(norm=...)`` only swaps the
    stem's); an affine instance norm keeps the parameters and drops the running statistics, so a slice's features no
    longer depend on the training set's batch statistics."""
    from networks.factory import create_model

    batch = BackboneFeatures("resnet10", spatial_dims=2, in_channels=1, width=0.125)
    instance = BackboneFeatures(
        "resnet10", spatial_dims=2, in_channels=1, width=0.125, norm=("instance", {"affine": True})
    )
    assert count_parameters(instance) == count_parameters(batch) == 77_640
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in instance.modules())
    assert sum(isinstance(m, torch.nn.InstanceNorm2d) for m in instance.modules()) == sum(
        isinstance(m, torch.nn.BatchNorm2d) for m in batch.modules()
    )
    assert not list(instance.buffers())
    # instance-normalised features: scaling the input (a contrast change; the stem conv has no bias) changes nothing
    x = torch.rand(2, 1, 64, 64)
    instance.train()  # no running statistics: train and eval mode are the same function
    with torch.no_grad():
        torch.testing.assert_close(instance(x), instance.eval()(3.0 * x), atol=2e-2, rtol=5e-2)
    with pytest.raises(ValueError, match="ResNet backbones only"):
        BackboneFeatures("densenet121", norm="instance")
    # list form, as factory kwargs come back from a checkpoint's JSON-like metadata
    model = create_model("scopeformer_tiny", in_channels=1, out_channels=5, backbone_norm=["group", {"num_groups": 4}])
    assert count_parameters(model) == 359_077
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.backbones.modules())


def test_bundled_scopeformer_reattention_computes_with_its_own_weights():
    """The bundled Scopeformer weights load into the re-attention layers (parameter names kept by the shared
    token-attention base), which compute re-attention of the fused qkv projection: recomputed here from the raw
    state-dict tensors with torch's functional ops."""
    from pathlib import Path

    from networks.checkpoint import load_checkpoint

    model, _ = load_checkpoint(Path(__file__).resolve().parents[1] / "monailabel_app" / "model" / "scopeformer_cls.pt")
    layers = [m for m in model.modules() if isinstance(m, ReAttention)]
    assert layers
    torch.manual_seed(0)
    for layer in layers:
        heads, head_dim = layer.heads, layer.head_dim
        dim = heads * head_dim
        x = torch.randn(2, 9, dim)
        state = layer.state_dict()
        qkv = F.linear(x, state["qkv.weight"], state.get("qkv.bias")).reshape(2, 9, 3, heads, head_dim)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        maps = torch.softmax(q @ k.transpose(-2, -1) / head_dim**0.5, dim=-1)
        if "theta" in state:
            maps = torch.einsum("bhij,hg->bgij", maps, state["theta"])
            if layer.norm_kind == "batch":
                maps = F.batch_norm(
                    maps,
                    state["norm.running_mean"],
                    state["norm.running_var"],
                    state["norm.weight"],
                    state["norm.bias"],
                    eps=layer.norm.eps,
                )
            elif layer.norm_kind == "layer":
                maps = F.layer_norm(
                    maps.permute(0, 2, 3, 1), (heads,), state["norm.weight"], state["norm.bias"], eps=layer.norm.eps
                ).permute(0, 3, 1, 2)
        out = (maps @ v).transpose(1, 2).reshape(2, 9, dim)
        expected = F.linear(out, state["proj.weight"], state["proj.bias"])
        with torch.no_grad():
            torch.testing.assert_close(layer.eval()(x), expected, rtol=1e-5, atol=1e-6)

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""networks.model_card: parameters, MACs (counter + rules), energy, real file sizes, JSON and radar PNG."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from networks.blocks.local_self_attention import LocalSelfAttention, LocalSelfAttentionBlock
from networks.factory import create_model
from networks.model_card import (
    ENERGY_PJ,
    count_int8_macs,
    count_macs,
    count_parameters,
    energy_joules,
    main,
    model_card,
    radar_chart,
    register_mac_rule,
    save_model_cards,
)
from networks.quantization import quantize_int8, save_int8_artifact


def _conv_linear_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),  # 16x16 out
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False),  # 8x8 out
        nn.BatchNorm2d(6),
        nn.Flatten(),
        nn.Linear(6 * 8 * 8, 10),
        nn.Linear(10, 3),
    )


def test_parameter_count_closed_form():
    net = _conv_linear_net()
    expected = (4 * 1 * 9 + 4) + (6 * 4 * 9) + 2 * 6 + (384 * 10 + 10) + (10 * 3 + 3)
    assert count_parameters(net) == expected
    assert count_parameters(create_model("sadnn_seg")) == 7_971_298  # paper (with relative embeddings)
    assert count_parameters(create_model("sadnn_cls")) == 4_563_102


@pytest.mark.parametrize("batch", [1, 3])
def test_macs_of_conv_linear_net_equal_closed_form(batch):
    net = _conv_linear_net()
    expected = batch * (4 * 1 * 9 * 16 * 16 + 6 * 4 * 9 * 8 * 8 + 384 * 10 + 10 * 3)
    macs = count_macs(net, (batch, 1, 16, 16))
    assert macs == {"macs": expected, "macs_counted": expected, "macs_rules": 0}
    # counting on real tensors gives the same
    assert count_macs(net, (batch, 1, 16, 16), device="cpu")["macs"] == expected


@pytest.mark.parametrize(
    "spatial_dims, shape, kernel_size", [(2, (2, 3, 12, 10), 3), (3, (1, 3, 6, 5, 4), 3), (2, (1, 3, 8, 8), 1)]
)
def test_local_self_attention_rule(spatial_dims, shape, kernel_size):
    torch.manual_seed(0)
    c_in, c_out = shape[1], 8
    layer = LocalSelfAttention(spatial_dims, c_in, c_out, kernel_size=kernel_size)
    pixels = shape[0] * math.prod(shape[2:])
    projections = 3 * c_in * c_out * pixels
    core = 2 * kernel_size**spatial_dims * c_out * pixels
    macs = count_macs(layer, shape)
    assert macs == {"macs": projections + core, "macs_counted": projections, "macs_rules": core}
    # inside a block with BN/ReLU and next to a conv: rule applies per layer, the conv is counted normally
    conv = (nn.Conv2d if spatial_dims == 2 else nn.Conv3d)(c_out, 2, 1)
    net = nn.Sequential(LocalSelfAttentionBlock(spatial_dims, c_in, c_out, kernel_size), conv)
    assert count_macs(net, shape)["macs"] == projections + core + 2 * c_out * pixels


def test_rule_replaces_only_the_modules_own_counted_ops():
    class MatmulAttention(nn.Module):
        """Own matmul (seen by the counter) plus a child projection."""

        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4, bias=False)

        def forward(self, x):  # x: (B, N, 4)
            p = self.proj(x)
            return torch.softmax(p @ p.transpose(1, 2), -1) @ p

    x_shape = (2, 5, 4)
    proj = 2 * 5 * 4 * 4
    own = 2 * (5 * 5 * 4) * 2  # two bmm of B x (5x4 @ 4x5) and (5x5 @ 5x4)
    assert count_macs(MatmulAttention(), x_shape)["macs"] == proj + own
    register_mac_rule(MatmulAttention, lambda module, inputs, output: 7)
    assert count_macs(MatmulAttention(), x_shape) == {"macs": proj + 7, "macs_counted": proj, "macs_rules": 7}

    @register_mac_rule(MatmulAttention)
    def _rule(module, inputs, output):
        return 11

    assert count_macs(nn.Sequential(MatmulAttention(), MatmulAttention()), x_shape)["macs"] == 2 * (proj + 11)
    with pytest.raises(TypeError):
        register_mac_rule(int, _rule)


def test_energy_arithmetic():
    assert ENERGY_PJ == {"int8": {"mul": 0.2, "add": 0.03}, "fp32": {"mul": 3.7, "add": 0.9}}
    assert energy_joules(10**12, "fp32") == pytest.approx(4.6)
    assert energy_joules(10**12, "int8") == pytest.approx(0.23)
    assert energy_joules(0, "int8") == 0.0
    with pytest.raises(ValueError, match="precision"):
        energy_joules(1, "fp16")
    with pytest.raises(ValueError, match="non-negative"):
        energy_joules(-1, "fp32")


def test_card_sizes_are_real_file_sizes_and_energy_follows_macs(tmp_path):
    torch.manual_seed(0)
    model = create_model("sadnn_seg_small").eval()
    calibration = [torch.randn(2, 1, 32, 32) for _ in range(2)]
    int8 = quantize_int8(model, calibration)
    artifact = save_int8_artifact(int8, calibration[0], tmp_path / "int8.pt")
    card = model_card(
        model,
        (1, 1, 64, 64),
        name="seg",
        int8_artifact_path=artifact,
        fp32_state_dict_path=tmp_path / "fp32.pt",
    )
    assert card["fp32_size_bytes"] == (tmp_path / "fp32.pt").stat().st_size
    assert card["int8_size_bytes"] == artifact.stat().st_size
    assert card["size_ratio"] == pytest.approx(card["int8_size_bytes"] / card["fp32_size_bytes"])

    # sadnn_seg_small from its layer shapes: a local attention layer cin -> cout with a k x k neighbourhood has
    # q, k, v 1x1 projections without bias (3 cin cout) and relative embeddings (cout/2 x k rows + cout/2 x k columns);
    # encoder blocks add a BatchNorm (2 cout); features (8, 16, 32, 64, 64), a 4-wide last layer, 1x1 output 4 -> 2
    def attention(cin: int, cout: int, k: int = 3) -> int:
        return 3 * cin * cout + cout * k

    encoder = [(1, 8), (8, 16), (16, 32), (32, 32), (32, 64), (64, 64), (64, 64), (64, 64)]
    decoder = [(128, 64), (64, 64), (128, 64), (64, 32), (64, 32), (32, 16), (32, 8), (16, 4)]
    expected = sum(attention(i, o) + 2 * o for i, o in encoder) + sum(attention(i, o) for i, o in decoder)
    expected += attention(4, 2, k=1)
    assert card["params"] == expected == 126_846
    assert card["macs"] == count_macs(model, (1, 1, 64, 64))["macs"]
    assert card["energy_fp32_j"] == pytest.approx(card["macs"] * 4.6e-12)
    assert card["energy_int8_j"] == pytest.approx(card["macs"] * 0.23e-12)
    assert card["macs_int8"] == card["macs"] and card["energy_int8_mixed_j"] == pytest.approx(card["energy_int8_j"])
    assert card["precision"] == "int8" and card["input_shape"] == [1, 1, 64, 64]
    json.dumps(card)  # JSON-serialisable

    # from the INT8 model: a temporary artifact of the same network has nearly the same size
    card2 = model_card(model, (1, 1, 64, 64), name="seg", int8_model=int8)
    assert abs(card2["int8_size_bytes"] - card["int8_size_bytes"]) < 1024
    fp32_only = model_card(model, (1, 1, 64, 64), name="seg")
    assert fp32_only["int8_size_bytes"] is None and fp32_only["energy_int8_j"] is None
    assert fp32_only["precision"] == "fp32"
    with pytest.raises(ValueError, match="either"):
        model_card(model, (1, 1, 64, 64), name="x", int8_model=int8, int8_artifact_path=artifact)
    with pytest.raises(FileNotFoundError):
        model_card(model, (1, 1, 64, 64), name="x", int8_artifact_path=tmp_path / "missing.pt")


def _fake_cards():
    return [
        {
            "name": "a",
            "params": 100,
            "macs": 10**9,
            "fp32_size_bytes": 400,
            "int8_size_bytes": 110,
            "energy_fp32_j": 4.6e-3,
            "energy_int8_j": 2.3e-4,
        },
        {
            "name": "b",
            "params": 10,
            "macs": 10**7,
            "fp32_size_bytes": 40,
            "int8_size_bytes": None,
            "energy_fp32_j": 4.6e-5,
            "energy_int8_j": None,
        },
    ]


@pytest.mark.parametrize("scale", ["log", "linear"])
def test_json_and_radar_png(tmp_path, scale):
    cards = _fake_cards()
    json_path = save_model_cards(cards, tmp_path / "out" / "cards.json")
    assert json.loads(json_path.read_text()) == cards
    png = radar_chart(cards, tmp_path / "out" / "radar.png", scale=scale)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    import matplotlib.pyplot as plt

    image = plt.imread(png)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cards.json", "radar.png"]
    with pytest.raises(ValueError, match="at least one card"):
        radar_chart([{"name": "c", "params": 1, "macs": 1}], tmp_path / "x.png")


def test_cli_writes_cards(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--models", "sadnn_seg_small", "sadnn_cls_small", "unet_baseline"]) == 0
    printed = json.loads(capsys.readouterr().out)
    stored = json.loads((tmp_path / "model_cards.json").read_text())
    assert printed == stored
    assert [c["name"] for c in stored] == ["sadnn_seg_small", "sadnn_cls_small", "unet_baseline"]
    for card in stored:
        assert card["int8_size_bytes"] == (tmp_path / "artifacts" / f"{card['name']}_int8.pt").stat().st_size
        assert card["fp32_size_bytes"] == (tmp_path / "artifacts" / f"{card['name']}_fp32_state_dict.pt").stat().st_size
        assert "random calibration" in card["int8_size_source"]
        assert 0 < card["energy_int8_j"] < card["energy_fp32_j"]
    assert (tmp_path / "model_cards_radar.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------- attention classifiers (HCT, Scopeformer, PatchConvNet)


def test_counter_covers_token_attention_matmuls():
    """FlopCounterMode sees the matrix products of the Performer, re-attention and class attention (closed forms)."""
    from networks.blocks import ClassAttention, PerformerAttention, ReAttention

    batch, tokens, dim, heads = 2, 10, 16, 4
    d = dim // heads
    performer = PerformerAttention(dim, heads, kernel="softmax", num_features=7)
    m = performer.num_features
    projections = 4 * tokens * dim * dim
    # phi(Q), phi(K): N d m per head each; phi(K)^T V and phi(Q) (phi(K)^T V): N m d each; normaliser N m
    favor = heads * (2 * tokens * d * m + 2 * tokens * m * d + tokens * m)
    for device in ("meta", "cpu"):
        assert count_macs(performer, (batch, tokens, dim), device=device)["macs"] == batch * (projections + favor)

    reattention = ReAttention(dim, heads, reattention=True, norm="batch")
    # qkv + proj; q k^T and maps x V: N^2 d per head each; Theta mixing: h^2 per map entry
    expected = batch * (4 * tokens * dim * dim + 2 * tokens * tokens * dim + tokens * tokens * heads * heads)
    assert count_macs(reattention, (batch, tokens, dim))["macs"] == expected

    class_attention = ClassAttention(dim, heads=1)
    # q of the class token, k and v of all 1 + N tokens, proj of the class token; q k^T and weights x V: (1 + N) C
    expected = batch * (2 * dim * dim + 2 * tokens * dim * dim + 2 * tokens * dim)
    assert count_macs(class_attention, (batch, tokens, dim))["macs"] == expected


def _conv_and_linear_macs(model: nn.Module, shape) -> tuple[int, int]:
    """MACs of the Conv/Linear layers alone (all, and without grouped convs), from hooks on real tensors."""
    totals = [0, 0]

    def hook(module, inputs, output):
        if isinstance(module, nn.Linear):
            macs = output.numel() * module.in_features
        else:
            macs = output.numel() * module.weight[0].numel()
        totals[0] += macs
        if getattr(module, "groups", 1) == 1:
            totals[1] += macs

    handles = [m.register_forward_hook(hook) for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    with torch.no_grad():
        model.eval()(torch.zeros(shape))
    for handle in handles:
        handle.remove()
    return totals[0], totals[1]


@pytest.mark.parametrize("family", ["hct_cls", "patchconvnet_cls", "scopeformer_cls"])
def test_attention_classifier_macs_cover_convs_linears_and_attention(family):
    from networks.registry import get_family

    small = get_family(family).small  # the small variant the cards report, at its card size
    name, kwargs, shape = small.factory_name, small.factory_kwargs, (1, *small.input_shape)
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    macs = count_macs(model, shape)
    floor, ungrouped = _conv_and_linear_macs(model, shape)
    # everything is counted by FlopCounterMode (no rule modules) and the attention products add to the conv/linear MACs
    assert macs["macs_rules"] == 0 and macs["macs"] == macs["macs_counted"]
    assert floor < macs["macs"] < 1.5 * floor
    assert count_macs(model, shape, device="cpu")["macs"] == macs["macs"]
    # the INT8 network runs exactly the (ungrouped) conv/linear MACs in integer arithmetic; the attention products
    # and the depthwise convs stay float
    assert count_int8_macs(model, shape) == ungrouped


def test_int8_macs_of_local_attention_nets_are_all_macs():
    model = create_model("sadnn_seg_small")
    assert count_int8_macs(model, (1, 1, 64, 64)) == count_macs(model, (1, 1, 64, 64))["macs"]


def test_int8_macs_leave_out_the_layers_kept_float():
    model = create_model("sadnn_seg_small")
    shape = (1, 1, 64, 64)
    everything = count_int8_macs(model, shape)
    kept = count_int8_macs(model, shape, keep_float=["enc0.attention", "enc1.attention"])
    # the two layers kept float are exactly the MACs of a network made of them alone
    alone = count_macs(model.enc0.attention, shape)["macs"] + count_macs(model.enc1.attention, (1, 8, 64, 64))["macs"]
    assert kept == everything - alone
    card = model_card(model, shape, name="kept", int8_model=None, int8_keep_float=["enc0.attention"])
    assert card["macs_int8"] < card["macs"]


def _card_model_layer_macs(name: str) -> int:
    """MACs of the convolutions and linear layers of a registered card model, from their shapes: output elements x
    input channels per group x kernel elements, or output elements x input features."""
    from networks.model_card import CARD_MODELS

    kwargs, shape, _ = CARD_MODELS[name]
    model = create_model(name, **kwargs).eval().to("meta")
    total = 0

    def hook(module, _inputs, output):
        nonlocal total
        if isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        else:
            total += output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)

    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    handles = [m.register_forward_hook(hook) for m in layers]
    with torch.no_grad():
        model(torch.zeros(shape, device="meta"))
    for handle in handles:
        handle.remove()
    return total


def test_paper_size_attention_classifier_cards(tmp_path):
    from networks.model_card import registered_model_cards

    names = ["hct", "patchconvnet_s60", "scopeformer"]
    cards = {card["name"]: card for card in registered_model_cards(names, out_dir=tmp_path)}
    assert cards["hct"]["params"] == 1_737_010  # ../shared/REFERENCE.md (HCT reference code), derived in test_hct.py
    assert cards["patchconvnet_s60"]["params"] == 25_231_096  # the same for S60, derived in test_patchconvnet.py
    # MACs derived here, apart from the card's FlopCounterMode count: every convolution and linear layer from its
    # shapes (forward hooks on the meta device), plus the attention products, which are no modules, by formula.
    layer_macs = {name: _card_model_layer_macs(name) for name in names}
    # S60 at 224 x 224: one class-attention query over the 197 tokens (cls + 14 x 14), d 384: q k^T and a v
    assert cards["patchconvnet_s60"]["macs"] == layer_macs["patchconvnet_s60"] + 2 * 197 * 384
    assert 3.0e9 < cards["patchconvnet_s60"]["macs"] < 5.0e9  # the trunk: 60 x (2 x 384^2 + ...) x 196 ~ 3.5 G

    # HCT at 2048 x 1664: Performer FAVOR+ in the AC blocks, 8 heads of width dh = d / 8, m = int(dh ln dh) random
    # features; per block 2 N m d (projecting q and k) + 2 N m d (phi(K)^T V, then phi(Q) times it) + N m h (the
    # normaliser). Tokens: stage 4 sees 64 x 52 then 32 x 26, stage 5 32 x 26 then 16 x 13.
    def performer(tokens: int, d: int) -> int:
        m = int((d // 8) * math.log(d // 8))
        return 4 * tokens * m * d + 8 * tokens * m

    hct_attention = performer(64 * 52, 64) + 2 * performer(32 * 26, 128) + performer(16 * 13, 256)
    assert hct_attention == 75_741_952
    assert cards["hct"]["macs"] == layer_macs["hct"] + hct_attention
    # Scopeformer ("efficient": the 384 feature channels are the tokens, each 8 x 8 = 64 wide), 8 layers, 16 heads:
    # q k^T and attention times v, N^2 x 64 each, and re-attention's head mixing Theta, heads^2 x N^2
    tokens, width, heads, layers = 384, 64, 16, 8
    scopeformer_attention = layers * (2 * tokens * tokens * width + heads * heads * tokens * tokens)
    assert cards["scopeformer"]["macs"] == layer_macs["scopeformer"] + scopeformer_attention
    for card in cards.values():
        assert card["int8_size_bytes"] < card["fp32_size_bytes"], card
        assert card["size_ratio"] < 0.5, card
        assert 0 < card["energy_int8_j"] < card["energy_int8_mixed_j"] < card["energy_fp32_j"]
        assert 0 < card["macs_int8"] < card["macs"]
        assert card["int8_size_bytes"] == (tmp_path / "artifacts" / f"{card['name']}_int8.pt").stat().st_size

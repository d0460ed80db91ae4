# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Model factory: registry, defaults, overrides and errors."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import networks
import networks.factory as factory
from networks import SaDNNCls, SaDNNSeg, create_model, list_models, register_model
from networks.blocks import LocalSelfAttention
from networks.model_card import count_parameters

pytestmark = pytest.mark.usefixtures("single_thread")

BUILTIN = ["resnet18_baseline", "sadnn_cls", "sadnn_cls_small", "sadnn_seg", "sadnn_seg_small", "unet_baseline"]


@pytest.fixture
def private_registry(monkeypatch):
    """Registrations made by a test stay in a copy of the registry."""
    monkeypatch.setattr(factory, "_MODELS", dict(factory._MODELS))


def test_builtin_models_are_listed_sorted():
    names = list_models()
    assert set(BUILTIN) <= set(names)
    assert names == sorted(names)


def test_paper_models_by_name():
    seg = create_model("sadnn_seg")
    assert isinstance(seg, SaDNNSeg) and count_parameters(seg) == 7_971_298
    cls = create_model("sadnn_cls")
    assert isinstance(cls, SaDNNCls) and count_parameters(cls) == 4_563_102


def test_small_models_are_cpu_sized_and_run():
    torch.manual_seed(0)
    seg = create_model("sadnn_seg_small")
    assert 100_000 <= count_parameters(seg) <= 300_000
    assert seg(torch.randn(1, 1, 32, 32)).shape == (1, 2, 32, 32)
    cls = create_model("sadnn_cls_small", out_channels=3)
    assert count_parameters(cls) < 300_000
    assert cls(torch.randn(2, 1, 128, 128)).shape == (2, 3)


def test_overrides_replace_defaults():
    seg = create_model("sadnn_seg_small", spatial_dims=3, out_channels=4, features=(4, 4, 4, 4, 4))
    assert seg.spatial_dims == 3 and seg.out_channels == 4 and seg.features == (4, 4, 4, 4, 4)
    # the small variant's defaults are visible in its signature
    signature = inspect.signature(factory._MODELS["sadnn_seg_small"])
    assert signature.parameters["features"].default == (8, 16, 32, 64, 64)
    assert isinstance(create_model("unet_baseline", features=(4, 4, 8, 8, 16, 4)), nn.Module)
    assert create_model("resnet18_baseline", out_channels=3).fc.out_features == 3


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match="unknown model 'sadnn_xl'") as err:
        create_model("sadnn_xl")
    for name in BUILTIN:
        assert name in str(err.value)


def test_unknown_override_names_the_argument():
    with pytest.raises(ValueError, match="sadnn_seg.*channel_widths"):
        create_model("sadnn_seg", channel_widths=(1, 2))


def test_register_model(private_registry):
    @register_model("tiny_conv")
    def tiny_conv(in_channels: int = 1, out_channels: int = 2) -> nn.Module:
        return nn.Conv2d(in_channels, out_channels, 1)

    assert "tiny_conv" in list_models()
    assert create_model("tiny_conv", out_channels=5).out_channels == 5
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny_conv")(tiny_conv)
    register_model("tiny_conv", overwrite=True)(lambda: nn.Identity())
    assert isinstance(create_model("tiny_conv"), nn.Identity)
    with pytest.raises(ValueError, match="non-empty string"):
        register_model("")


@pytest.mark.parametrize(
    "build",
    [
        lambda dims: networks.SaDNNSeg(spatial_dims=dims),
        lambda dims: networks.SaDNNCls(spatial_dims=dims),
        lambda dims: networks.PatchConvNet(spatial_dims=dims),
        lambda dims: networks.HCT(spatial_dims=dims),
        lambda dims: networks.Scopeformer(spatial_dims=dims),
        lambda dims: LocalSelfAttention(dims, in_channels=2, out_channels=2),
    ],
    ids=["SaDNNSeg", "SaDNNCls", "PatchConvNet", "HCT", "Scopeformer", "LocalSelfAttention"],
)
@pytest.mark.parametrize("dims", [1, 4])
def test_networks_reject_unsupported_spatial_dims(build, dims):
    with pytest.raises(ValueError, match=f"spatial_dims must be 2 or 3, got {dims}"):
        build(dims)

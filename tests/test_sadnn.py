# Copyright MedAttnSlicer contributors. Apache-2.0.
"""SaDNN-seg, SaDNN-cls and the MONAI baselines: paper parameter counts, structure, 2D/3D shapes, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from networks import LocalSelfAttention, SaDNNCls, SaDNNSeg, resnet18_baseline, unet_baseline
from networks.model_card import count_parameters

pytestmark = pytest.mark.usefixtures("single_thread")


def _attention_params(cin: int, cout: int, k: int = 3) -> int:
    """A local self-attention layer: q, k, v 1x1 projections without bias and relative embeddings (cout/2 x k for
    rows, cout/2 x k for columns)."""
    return 3 * cin * cout + cout * k


def test_sadnn_seg_paper_parameter_count():
    net = SaDNNSeg()
    # from the layer widths (test_sadnn_seg_paper_layer_widths): encoder blocks add a BatchNorm, the decoder none,
    # the output layer is 32 -> 2 with a 1x1 neighbourhood
    encoder = [(1, 64), (64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512), (512, 512)]
    decoder = [(1024, 512), (512, 512), (1024, 512), (512, 256), (512, 256), (256, 128), (256, 64), (128, 32)]
    expected = sum(_attention_params(i, o) + 2 * o for i, o in encoder) + sum(
        _attention_params(i, o) for i, o in decoder
    )
    expected += _attention_params(32, 2, k=1)
    # ../shared/REFERENCE.md: 7,971,298 with relative embeddings; 7,950,720 projection weights (the paper's "7.95M")
    assert count_parameters(net) == expected == 7_971_298
    projections = sum(
        p.numel() for name, p in net.named_parameters() if name.endswith(("query.weight", "key.weight", "value.weight"))
    )
    assert projections == 7_950_720  # the paper's "7.95M"


def test_sadnn_seg_paper_layer_widths():
    net = SaDNNSeg()
    layers = [m for m in net.modules() if isinstance(m, LocalSelfAttention)]
    widths = [(m.in_channels, m.out_channels) for m in layers]
    assert widths == [
        (1, 64), (64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512), (512, 512),  # encoder
        (1024, 512), (512, 512), (1024, 512), (512, 256), (512, 256), (256, 128), (256, 64), (128, 32),  # decoder
        (32, 2),  # output
    ]  # fmt: skip
    assert [m.kernel_size for m in layers] == [3] * 16 + [1]
    # BatchNorm in the 8 encoder blocks only; Dropout2d(0.25) after pool2 and pool3
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 8
    assert [m.p for m in net.modules() if isinstance(m, nn.Dropout2d)] == [0.25, 0.25]


def test_sadnn_seg_small_2d_forward_backward():
    torch.manual_seed(0)
    net = SaDNNSeg(features=(8, 16, 32, 64, 64))
    assert net.final_features == 4  # the 32-wide last layer scales with features[0]
    x = torch.randn(2, 1, 32, 32)
    y = net(x)
    assert y.shape == (2, 2, 32, 32)
    nn.functional.cross_entropy(y, torch.randint(0, 2, (2, 32, 32))).backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_sadnn_seg_3d_forward_and_eval_determinism():
    torch.manual_seed(0)
    net = SaDNNSeg(spatial_dims=3, in_channels=2, out_channels=3, features=(6, 6, 6, 6, 6)).eval()
    assert sum(isinstance(m, nn.BatchNorm3d) for m in net.modules()) == 8
    x = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        y = net(x)
        assert y.shape == (1, 3, 16, 16, 16)
        torch.testing.assert_close(net(x), y)  # dropout is off in eval


def test_sadnn_seg_input_errors():
    net = SaDNNSeg(features=(4, 4, 4, 4, 4))
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.randn(1, 1, 32, 24))
    with pytest.raises(ValueError, match="expects"):
        net(torch.randn(1, 2, 32, 32))
    with pytest.raises(ValueError, match="five"):
        SaDNNSeg(features=(8, 16, 32))
    with pytest.raises(ValueError, match="spatial_dims"):
        SaDNNSeg(spatial_dims=1)


def test_sadnn_cls_paper_parameter_count_and_head():
    net = SaDNNCls()
    # attention -> BN blocks 1-16-16-32-32-64 (then 64 six more times), FC 4096 -> 1024 -> 256 -> 64 -> 14
    widths = [1, 16, 16, 32, 32, 64, 64, 64, 64, 64, 64, 64]
    blocks = sum(_attention_params(i, o) + 2 * o for i, o in zip(widths, widths[1:]))
    fc = sum(i * o + o for i, o in [(4096, 1024), (1024, 256), (256, 64), (64, 14)])
    assert count_parameters(net) == blocks + fc == 4_563_102  # ../shared/REFERENCE.md: 4,563,102 at 14 classes
    assert net.fc_in_features == 4096
    linears = [(m.in_features, m.out_features) for m in net.modules() if isinstance(m, nn.Linear)]
    assert linears == [(4096, 1024), (1024, 256), (256, 64), (64, 14)]
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 6


def test_sadnn_cls_small_2d_forward_backward():
    torch.manual_seed(0)
    net = SaDNNCls(out_channels=5, channels=(4, 8, 8), pools=(True, True, True), fc=(16,), img_size=32)
    assert net.fc_in_features == 8 * 4 * 4
    x = torch.randn(3, 1, 32, 32)
    logits = net(x)
    assert logits.shape == (3, 5)
    nn.functional.binary_cross_entropy_with_logits(logits, torch.randint(0, 2, (3, 5)).float()).backward()
    assert all(p.grad is not None for p in net.parameters())


def test_sadnn_cls_3d_forward():
    torch.manual_seed(0)
    net = SaDNNCls(spatial_dims=3, out_channels=3, channels=(3, 6), pools=(True, True), fc=(8,), img_size=8)
    assert net.fc_in_features == 6 * 2**3
    assert net(torch.randn(2, 1, 8, 8, 8)).shape == (2, 3)


def test_sadnn_cls_errors():
    with pytest.raises(ValueError, match="one flag per block"):
        SaDNNCls(channels=(4, 8), pools=(True,), img_size=32)
    with pytest.raises(ValueError, match="img_size"):
        SaDNNCls(channels=(4, 8), pools=(True, True), img_size=30)
    net = SaDNNCls(channels=(4,), pools=(True,), fc=(8,), img_size=16)
    with pytest.raises(ValueError, match="expects"):
        net(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_unet_baseline_shapes_without_transposed_convs(spatial_dims):
    torch.manual_seed(0)
    net = unet_baseline(spatial_dims=spatial_dims, out_channels=3, features=(4, 4, 8, 8, 16, 4)).eval()
    assert not any(isinstance(m, (nn.ConvTranspose2d, nn.ConvTranspose3d)) for m in net.modules())
    x = torch.randn(1, 1, *(16,) * spatial_dims)
    assert net(x).shape == (1, 3, *(16,) * spatial_dims)
    with pytest.raises(ValueError, match="six"):
        unet_baseline(features=(16, 32, 64, 128))


@pytest.mark.parametrize("spatial_dims, size", [(2, 64), (3, 16)])
def test_resnet18_baseline_shapes(spatial_dims, size):
    torch.manual_seed(0)
    net = resnet18_baseline(spatial_dims=spatial_dims, in_channels=1, out_channels=4)
    assert net(torch.randn(2, 1, *(size,) * spatial_dims)).shape == (2, 4)

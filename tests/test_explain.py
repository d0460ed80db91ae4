# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Tests of networks.explain: maps on the input grid in [0, 1], the methods' contracts, and faithfulness.

Faithfulness: small classifiers are trained (seconds, one thread, fixed seeds) on synthetic 64 x 64 images whose
class 0 is "a bright Gaussian blob is present" (at a random place) and class 1 "a thin bright bar is present".
For held-out images with a detected blob, replacing the top-10 % saliency pixels of class 0 by the background (0)
must lower P(class 0) clearly more than replacing a region of the same shape and size at random places (the top
region rolled by random offsets).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from networks.explain import (
    attention_rollout,
    class_attention_map,
    default_cam_layer,
    default_method,
    explain,
    grad_cam,
    probability_fn,
    rise_masks,
    rise_saliency,
)
from networks.factory import create_model

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    # torch.jit.trace of the models' input checks, and torch's own deprecation of quantised tensors (quantize_dynamic)
    pytest.mark.filterwarnings("ignore:Converting a tensor to a Python boolean might cause the trace"),
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor, torch.quantize_per_channel"),
]

SIZE = 64
BLOB = 0  # the class whose evidence is local and explained in the faithfulness tests
TOP_FRACTION = 0.10
# HCT-small's strides reduce 64 pixels to a 1 x 1 last stage; these keep 8 x 8 maps in the attention stages 3-4, as
# the default strides do for the paper's large mammograms
HCT_STRIDES = (2, 1, 1, 1, 1)


def blob_bar_images(count: int, generator: torch.Generator, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` noisy images ``(count, 1, size, size)`` and multi-label targets ``(count, 2)``.

    Class 0: a Gaussian blob (sigma 2.5, peak 1) at a uniformly random place; class 1: a 2 x 20 bar of value 0.8.
    Each present with probability 1/2, independently; background N(0, 0.15^2).
    """
    rows, cols = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    labels = (torch.rand(count, 2, generator=generator) < 0.5).float()
    images = 0.15 * torch.randn(count, 1, size, size, generator=generator)
    for i in range(count):
        if labels[i, 0]:
            cy, cx = (6 + torch.rand(2, generator=generator) * (size - 12)).tolist()
            images[i, 0] += torch.exp(-((rows - cy) ** 2 + (cols - cx) ** 2) / (2 * 2.5**2))
        if labels[i, 1]:
            y0 = 4 + int(torch.randint(0, size - 8, (1,), generator=generator))
            x0 = 4 + int(torch.randint(0, size - 28, (1,), generator=generator))
            images[i, 0, y0 : y0 + 2, x0 : x0 + 20] += 0.8
    return images, labels


def train_classifier(model: nn.Module, steps: int, seed: int = 0) -> nn.Module:
    """Adam + BCE-with-logits on freshly drawn batches of 32 (multi-label)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        images, labels = blob_bar_images(32, generator)
        loss = F.binary_cross_entropy_with_logits(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def held_out_positives(model: nn.Module, count: int = 12) -> torch.Tensor:
    """Held-out images with a blob that the model detects (P(blob) > 0.5); checks the model learnt the task."""
    images, labels = blob_bar_images(160, torch.Generator().manual_seed(1234))
    probabilities = probability_fn(model)(images)
    accuracy = ((probabilities[:, BLOB] > 0.5).float() == labels[:, BLOB]).float().mean().item()
    assert accuracy >= 0.9, f"{type(model).__name__} did not learn the blob class (held-out accuracy {accuracy:.2f})"
    return images[(labels[:, BLOB] == 1) & (probabilities[:, BLOB] > 0.5)][:count]


def deletion_drops(
    predict, images: torch.Tensor, maps: torch.Tensor, target: int, fraction: float = TOP_FRACTION, n_random: int = 16
) -> tuple[float, float]:
    """Mean drop of P(target) when the top-``fraction`` saliency pixels are set to the background (0), and mean drop
    when a region of the same shape and size, rolled by random offsets, is."""
    generator = torch.Generator().manual_seed(7)
    count, _, height, width = images.shape
    k = int(fraction * height * width)
    reference = predict(images)[:, target]
    top_drops, random_drops = [], []
    for i in range(count):
        region = torch.zeros(height * width, dtype=torch.bool)
        region[maps[i].flatten().topk(k).indices] = True
        region = region.reshape(height, width)
        offsets = torch.stack([torch.randint(0, s, (n_random,), generator=generator) for s in (height, width)], 1)
        regions = [region] + [torch.roll(region, tuple(offset.tolist()), (0, 1)) for offset in offsets]
        masked = images[i : i + 1].repeat(len(regions), 1, 1, 1)
        for j, r in enumerate(regions):
            masked[j, :, r] = 0.0
        drops = reference[i] - predict(masked)[:, target]
        top_drops.append(drops[0].item())
        random_drops.append(drops[1:].mean().item())
    return sum(top_drops) / count, sum(random_drops) / count


def assert_faithful(name: str, top: float, random: float) -> None:
    print(f"\n{name}: P(blob) drop, top-{TOP_FRACTION:.0%} saliency region {top:.3f} vs random region {random:.3f}")
    assert top > random + 0.1 and top > 2 * random, f"{name}: top-region drop {top:.3f} vs random {random:.3f}"


@pytest.fixture(scope="module")
def trained_hct() -> nn.Module:
    torch.manual_seed(0)
    return train_classifier(create_model("hct_small", in_channels=1, out_channels=2, strides=HCT_STRIDES), 150)


@pytest.fixture(scope="module")
def trained_patchconvnet() -> nn.Module:
    torch.manual_seed(0)
    return train_classifier(create_model("patchconvnet_small", in_channels=1, out_channels=2), 150)


# --- faithfulness --------------------------------------------------------------------------------------------------


def test_gradcam_hct_faithful(trained_hct):
    images = held_out_positives(trained_hct)
    assert len(images) >= 8
    assert default_cam_layer(trained_hct, images) == "relu"  # the activated last (attention) stage, 8 x 8 here
    maps, info = explain(trained_hct, images, target=BLOB)
    assert info["method"] == "gradcam" and info["layer"] == "relu"
    top, random = deletion_drops(probability_fn(trained_hct), images, maps, BLOB)
    assert_faithful("Grad-CAM / HCT-small", top, random)


def test_class_attention_patchconvnet_faithful(trained_patchconvnet):
    images = held_out_positives(trained_patchconvnet)
    assert len(images) >= 8
    maps, info = explain(trained_patchconvnet, images)
    assert info["method"] == "class_attention" and not info["class_specific"]
    top, random = deletion_drops(probability_fn(trained_patchconvnet), images, maps, BLOB)
    assert_faithful("class attention / PatchConvNet-small", top, random)


@pytest.mark.parametrize("model_fixture", ["trained_hct", "trained_patchconvnet"])
def test_rise_faithful_black_box(model_fixture, request):
    """RISE only sees a probability function: here the TorchScript trace of the trained model."""
    model = request.getfixturevalue(model_fixture)
    images = held_out_positives(model)
    with torch.no_grad():
        scripted = torch.jit.trace(model, images[:2], check_trace=False)
    predict = probability_fn(scripted)  # sigmoid of the traced logits
    maps, info = explain(
        scripted, images, target=BLOB, num_masks=400, batch_size=100, generator=torch.Generator().manual_seed(3)
    )
    assert info["method"] == "rise"
    top, random = deletion_drops(predict, images, maps, BLOB)
    assert_faithful(f"RISE / traced {type(model).__name__}", top, random)


# --- maps on the input grid ----------------------------------------------------------------------------------------

GRID_CASES = [
    ("hct_small", {"in_channels": 1}, (2, 1, 64, 64), ("auto", "gradcam", "rise")),
    ("patchconvnet_small", {"in_channels": 1}, (2, 1, 48, 80), ("auto", "gradcam", "rise")),
    ("sadnn_cls_small", {"in_channels": 1, "out_channels": 3, "img_size": 32}, (2, 1, 32, 32), ("auto", "rise")),
    ("scopeformer_small", {"in_channels": 1, "mode": "baseline", "grid": 2}, (1, 1, 64, 64), ("auto", "rollout")),
    ("scopeformer_small", {"in_channels": 1, "mode": "efficient", "grid": 2}, (1, 1, 64, 64), ("gradcam",)),
    ("hct_small", {"in_channels": 1, "spatial_dims": 3}, (1, 1, 32, 24, 32), ("gradcam", "rise")),
    ("patchconvnet_small", {"in_channels": 1, "spatial_dims": 3}, (1, 1, 32, 32, 16), ("auto",)),
]


@pytest.mark.parametrize("name, kwargs, shape, methods", GRID_CASES)
def test_maps_on_input_grid(name, kwargs, shape, methods):
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    images = torch.randn(shape)
    for method in methods:
        options = {}
        if method == "rise":
            options = {"num_masks": 24, "batch_size": 12, "generator": torch.Generator().manual_seed(0)}
        maps, info = explain(model, images, method=method, **options)
        assert maps.shape == (shape[0], *shape[2:]), (name, method)
        assert maps.dtype == torch.float32 and torch.isfinite(maps).all()
        assert maps.min() >= 0.0 and maps.max() <= 1.0
        assert len(info["target"]) == shape[0]
        assert info["method"] == (default_method(model) if method == "auto" else method)
    assert model.training  # explanations run in eval mode and restore the caller's mode


def test_top_class_is_default_target():
    torch.manual_seed(0)
    model = create_model("hct_small", in_channels=1, out_channels=4)
    images = torch.randn(3, 1, 64, 64)
    _, info = explain(model, images, method="gradcam")
    with torch.no_grad():
        expected = torch.sigmoid(model.eval()(images)).argmax(1).tolist()
    assert info["target"] == expected
    assert info["probability"] == pytest.approx(
        [torch.sigmoid(model(images))[i, t].item() for i, t in enumerate(expected)], abs=1e-6
    )


# --- RISE ------------------------------------------------------------------------------------------------------------


def window_score(batch: torch.Tensor) -> torch.Tensor:
    """A fixed classifier: P(class 0) grows with the intensity inside rows/cols 8..23, P(class 1) with 40..55."""
    first = batch[:, 0, 8:24, 8:24].mean(dim=(1, 2))
    second = batch[:, 0, 40:56, 40:56].mean(dim=(1, 2))
    return torch.sigmoid(torch.stack([8 * first - 2, 8 * second - 2], dim=1))


def test_rise_reproducible_and_class_specific():
    image = torch.ones(1, 1, 64, 64)
    kwargs = {"num_masks": 1000, "batch_size": 96, "cell_size": 8}  # 1000 is not a multiple of the batch
    first = rise_saliency(window_score, image, target=0, generator=torch.Generator().manual_seed(5), **kwargs)
    again = rise_saliency(window_score, image, target=0, generator=torch.Generator().manual_seed(5), **kwargs)
    other = rise_saliency(window_score, image, target=0, generator=torch.Generator().manual_seed(6), **kwargs)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.shape == (1, 64, 64) and first.min() >= 0 and first.max() <= 1
    # the saliency of each class sits in its own window
    second = rise_saliency(window_score, image, target=1, generator=torch.Generator().manual_seed(5), **kwargs)
    for saliency, (start, stop) in ((first, (8, 24)), (second, (40, 56))):
        window = torch.zeros(64, 64, dtype=torch.bool)
        window[start:stop, start:stop] = True
        inside, outside = saliency[0][window].mean(), saliency[0][~window].mean()
        assert inside > outside + 0.25, (inside, outside)
        top = saliency[0].flatten().topk(200).indices  # as many pixels as 78 % of the window
        assert window.flatten()[top].float().mean() > 0.6


def test_rise_masks_smooth_binary_in_3d():
    masks = rise_masks(16, (20, 24, 12), cell_size=(5, 6, 4), p_keep=0.3, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (16, 1, 20, 24, 12)
    assert masks.min() >= 0 and masks.max() <= 1
    assert 0.15 < masks.mean() < 0.45  # about p_keep of the volume is kept
    assert ((masks > 0.01) & (masks < 0.99)).any()  # upsampled smoothly, not a hard grid


def test_rise_rejects_bad_predict_fn_and_arguments():
    image = torch.rand(1, 1, 64, 64)
    with pytest.raises(ValueError, match="class probabilities"):
        rise_saliency(lambda x: x.mean(dim=(1, 2, 3)), image, target=0, num_masks=8)
    with pytest.raises(ValueError, match="out of range"):
        rise_saliency(window_score, image, target=2, num_masks=8)
    with pytest.raises(ValueError, match="p_keep"):
        rise_saliency(window_score, image, target=0, num_masks=8, p_keep=0.0)
    with pytest.raises(ValueError, match="cell_size"):
        rise_saliency(window_score, image, target=0, num_masks=8, cell_size=(4, 4, 4))
    with pytest.raises(ValueError, match="batch"):
        rise_saliency(window_score, image[0], target=0, num_masks=8)


# --- Grad-CAM -------------------------------------------------------------------------------------------------------


def test_gradcam_leaves_frozen_model_untouched():
    """A served model: frozen, called under no_grad, in train mode, with stale gradients. Grad-CAM still works and
    leaves no hooks, gradients, flags or mode changes behind."""
    torch.manual_seed(0)
    model = create_model("hct_small", in_channels=1, strides=HCT_STRIDES)
    for p in model.parameters():
        p.requires_grad_(False)
    stale = torch.full_like(model.classifier.weight, 3.0)
    model.classifier.weight.grad = stale
    images = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        maps = grad_cam(model, images, target=[0, 1])
    assert maps.shape == (2, 64, 64) and maps.max() == 1.0
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(not p.requires_grad for p in model.parameters())
    assert model.classifier.weight.grad is stale
    assert all(p.grad is None for n, p in model.named_parameters() if n != "classifier.weight")
    assert model.training


def test_gradcam_exact_on_a_linear_cnn():
    """logits = (+1, -1) * mean(ReLU(conv1x1(x))) with an identity convolution. At the (in-place) ReLU, Grad-CAM of
    class 0 is ReLU(x) up to scale and class 1 has no positive evidence (an all-zero map); at the convolution, the
    negative class weight times negative activations makes class 1's map ReLU(-x) up to scale."""
    conv = nn.Conv2d(1, 1, 1)
    head = nn.Linear(1, 2)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.zero_()
        head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        head.bias.zero_()
    model = nn.Sequential(conv, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    images = torch.randn(2, 1, 24, 20, generator=torch.Generator().manual_seed(0))

    def scaled(maps: torch.Tensor) -> torch.Tensor:
        return maps / maps.flatten(1).max(1).values[:, None, None]

    positive, negative = scaled(images[:, 0].clamp(min=0)), scaled((-images[:, 0]).clamp(min=0))
    torch.testing.assert_close(grad_cam(model, images, target=0, layer="1"), positive)
    assert torch.equal(grad_cam(model, images, target=1, layer="1"), torch.zeros(2, 24, 20))
    assert model[1].inplace  # switched off for the backward hooks, then restored
    assert default_cam_layer(model) == "0"  # the last convolution of a generic network
    torch.testing.assert_close(grad_cam(model, images, target=0), positive)
    torch.testing.assert_close(grad_cam(model, images, target=1), negative)


def _reference_grad_cam(model: nn.Module, images: torch.Tensor, target: int, names: tuple[str, ...]) -> torch.Tensor:
    """Grad-CAM written out from its definition (Selvaraju et al. 2017), apart from MONAI's and ours: per layer
    ``ReLU(sum_k mean_s(d y_c / d A_k) A_k)``, bilinearly resized to the input (corners not aligned), summed."""
    modules = dict(model.named_modules())
    activations: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_module, _args, output):
            output.retain_grad()
            activations[name] = output

        return hook

    handles = [modules[name].register_forward_hook(keep(name)) for name in names]
    try:
        model.eval()
        with torch.enable_grad():
            model(images)[:, target].sum().backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    total = torch.zeros(images.shape[0], *images.shape[2:])
    for name in names:
        a = activations[name].detach().double()
        weights = activations[name].grad.double().mean(dim=(2, 3), keepdim=True)
        cam = (weights * a).sum(dim=1, keepdim=True).clamp(min=0)
        total += F.interpolate(cam, size=images.shape[2:], mode="bilinear", align_corners=False)[:, 0].float()
    return total


def test_gradcam_on_frozen_scopeformer_backbones():
    # The served configuration (patch tokens, mode="baseline"). In "efficient" and "deep_tr" modes the tokens are
    # the feature channels and their LayerNorm runs over the grid, so the logits do not change when a channel's
    # map shifts by a constant: the mean gradient Grad-CAM weights each channel with is 0, and the "map" is
    # rounding noise (~1e-10) that min-max scaling blows up to [0, 1].
    torch.manual_seed(0)
    model = create_model("scopeformer_small", in_channels=1, mode="baseline", grid=2, freeze_backbones=True)
    names = ("projections.0", "projections.1")
    assert default_cam_layer(model) == names
    images = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    images[0, :, 8:24, 40:56] += 3.0  # a bright square: something for the backbones to respond to
    maps = grad_cam(model, images, target=0)
    assert maps.shape == (2, 64, 64) and torch.isfinite(maps).all()
    raw = grad_cam(model, images, target=0, normalize=False)
    reference = _reference_grad_cam(model, images, 0, names)
    # a real map: not constant, and far above rounding noise
    assert (reference.flatten(1).std(dim=1) > 1e-3 * reference.flatten(1).max(dim=1).values).all()
    assert reference.max() > 1e-4, reference.max()
    torch.testing.assert_close(raw, reference, rtol=1e-4, atol=1e-6 * float(reference.max()))
    assert all(not p.requires_grad for p in model.backbones.parameters())  # still frozen afterwards
    # a different class weighs the features differently: its map is not the same
    assert not torch.allclose(grad_cam(model, images, target=1, normalize=False), raw, atol=1e-3 * float(raw.max()))


def test_default_cam_layers():
    hct = create_model("hct_small", in_channels=1)
    assert default_cam_layer(hct) == "relu"
    # 64 px: the last stages are 1 x 1, the deepest stage with an 8 x 8 map is chosen
    assert default_cam_layer(hct, torch.zeros(1, 1, 64, 64)) == "stages.0"
    assert default_cam_layer(hct, torch.zeros(1, 1, 64, 64), min_grid=4) == "stages.1"
    assert default_cam_layer(hct, torch.zeros(1, 1, 512, 512), min_grid=4) == "relu"
    sadnn = create_model("sadnn_cls_small", in_channels=1, img_size=64)
    assert default_cam_layer(sadnn) == "features.11"  # the last attention block (4 x 4 at 64 px)
    assert default_cam_layer(sadnn, torch.zeros(1, 1, 64, 64)) == "features.9"  # the one before (8 x 8)
    assert all(type(sadnn.features[i]).__name__ == "LocalSelfAttentionBlock" for i in (9, 11))
    assert default_cam_layer(create_model("patchconvnet_small", in_channels=1)) == "blocks.5"
    # a module passed as the layer is the same as its name
    images = torch.randn(1, 1, 64, 64)
    torch.testing.assert_close(
        grad_cam(hct, images, target=1, layer=hct.stages[1]), grad_cam(hct, images, target=1, layer="stages.1")
    )
    torch.testing.assert_close(grad_cam(hct, images, target=1), grad_cam(hct, images, target=1, layer="stages.0"))


def test_gradcam_errors_name_the_problem():
    hct = create_model("hct_small", in_channels=1)
    images = torch.randn(1, 1, 64, 64)
    with pytest.raises(ValueError, match="no submodule named 'stages.9'"):
        grad_cam(hct, images, target=0, layer="stages.9")
    with pytest.raises(ValueError, match="feature map"):
        grad_cam(hct, images, target=0, layer="stages.3.0.attention")
    with pytest.raises(ValueError, match="out of range"):
        grad_cam(hct, images, target=5)
    with torch.no_grad():
        traced = torch.jit.trace(hct.eval(), images, check_trace=False)
    with pytest.raises(TypeError, match="RISE"):
        grad_cam(traced, images, target=0)
    with pytest.raises(ValueError, match="spatial dims"):
        grad_cam(hct, torch.randn(1, 1, 16, 16, 16), target=0)


# --- attention maps ---------------------------------------------------------------------------------------------------


def _reference_rollout(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) in float64, from the encoder blocks' weights: each block's
    attention recomputed from its query/key projection, DeepViT head mixing ``Theta`` and BatchNorm (eval
    statistics), averaged over heads, negative entries dropped, plus the identity, rows renormalised, composed
    over the blocks; the class token's row over the patch tokens, bilinearly resized to the input."""
    from networks.blocks.reattention import ReAttention

    attentions = [m for m in model.blocks.modules() if isinstance(m, ReAttention)]
    inputs = []
    handles = [
        m.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach().double())) for m in attentions
    ]
    try:
        model.eval()
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    batch, tokens = images.shape[0], inputs[0].shape[1]
    rollout = torch.eye(tokens, dtype=torch.float64).repeat(batch, 1, 1)
    for attention, x in zip(attentions, inputs):
        heads, d = attention.heads, attention.head_dim
        qkv = x @ attention.qkv.weight.double().T
        if attention.qkv.bias is not None:
            qkv = qkv + attention.qkv.bias.double()
        q, k = qkv[..., : heads * d], qkv[..., heads * d : 2 * heads * d]
        q = q.reshape(batch, tokens, heads, d).permute(0, 2, 1, 3)
        k = k.reshape(batch, tokens, heads, d).permute(0, 2, 1, 3)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        theta = attention.theta.double()
        mixed = torch.stack([sum(theta[h, g] * weights[:, h] for h in range(heads)) for g in range(heads)], dim=1)
        bn = attention.norm
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        mixed = (mixed - bn.running_mean.double()[:, None, None]) * scale[:, None, None] + bn.bias.double()[
            :, None, None
        ]
        joint = mixed.mean(dim=1).clamp(min=0) + torch.eye(tokens, dtype=torch.float64)
        joint = joint / joint.sum(dim=-1, keepdim=True)
        rollout = joint @ rollout
    grid = rollout[:, 0, 1:].reshape(batch, model.grid, model.grid)
    return F.interpolate(grid[:, None], size=images.shape[2:], mode="bilinear", align_corners=False)[:, 0].float()


def test_rollout_only_for_spatial_tokens():
    torch.manual_seed(0)
    baseline = create_model("scopeformer_small", in_channels=1, mode="baseline", grid=2)
    with torch.no_grad():  # a non-trivial head mixing and BatchNorm, so some mixed entries are negative
        generator = torch.Generator().manual_seed(2)
        for m in baseline.modules():
            if type(m).__name__ == "ReAttention":
                m.theta.add_(0.5 * torch.randn(m.theta.shape, generator=generator))
                m.norm.running_mean.copy_(0.05 * torch.randn(m.heads, generator=generator))
                m.norm.running_var.uniform_(0.5, 2.0, generator=generator)
                m.norm.weight.uniform_(0.5, 1.5, generator=generator)
                m.norm.bias.copy_(0.05 * torch.randn(m.heads, generator=generator))
    images = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    maps = attention_rollout(baseline, images)
    assert maps.shape == (2, 64, 64) and maps.min() >= 0 and maps.max() <= 1
    raw = attention_rollout(baseline, images, normalize=False)
    reference = _reference_rollout(baseline, images)
    assert (reference.flatten(1).std(dim=1) > 0).all()
    torch.testing.assert_close(raw, reference, rtol=1e-4, atol=1e-6)
    assert 0 < raw.max() <= 1
    for mode in ("deep_tr", "efficient"):
        model = create_model("scopeformer_small", in_channels=1, mode=mode, grid=2)
        with pytest.raises(ValueError, match="feature channels.*Grad-CAM"):
            attention_rollout(model, torch.randn(1, 1, 64, 64))
    with pytest.raises(TypeError, match="Scopeformer"):
        attention_rollout(create_model("hct_small", in_channels=1), torch.randn(1, 1, 64, 64))


def test_class_attention_map_is_the_models_map_upsampled(trained_patchconvnet):
    images = held_out_positives(trained_patchconvnet, count=4)
    trained_patchconvnet.train()
    with torch.no_grad():
        _, attention = trained_patchconvnet.eval()(images, return_attention=True)  # (4, 4, 4) token grid
    raw = class_attention_map(trained_patchconvnet.train(), images, normalize=False)
    assert trained_patchconvnet.training
    assert raw.shape == (4, 64, 64)
    # bilinear, corners not aligned: the 16 x 16 cells keep the tokens' total weight and the peak token
    cells = F.avg_pool2d(raw[:, None], 16)[:, 0]
    torch.testing.assert_close(cells.sum(dim=(1, 2)), attention.sum(dim=(1, 2)), atol=1e-4, rtol=0)
    assert torch.equal(attention.flatten(1).argmax(1), cells.flatten(1).argmax(1))
    assert attention.max() > 3 / attention[0].numel()  # trained: peaked, not uniform
    normalized = class_attention_map(trained_patchconvnet, images)
    assert torch.equal(normalized.flatten(1).argmax(1), raw.flatten(1).argmax(1))
    with pytest.raises(TypeError, match="PatchConvNet"):
        class_attention_map(create_model("hct_small", in_channels=1), images)


# --- dispatch --------------------------------------------------------------------------------------------------------


def test_explain_dispatch_per_family():
    torch.manual_seed(0)
    patchconvnet = create_model("patchconvnet_small", in_channels=1)
    assert default_method(patchconvnet) == "class_attention"
    assert default_method(create_model("hct_small")) == "gradcam"
    assert default_method(create_model("sadnn_cls_small")) == "gradcam"
    assert default_method(window_score) == "rise"
    quantized = torch.ao.quantization.quantize_dynamic(patchconvnet, {nn.Linear}, dtype=torch.qint8)
    assert default_method(quantized) == "rise"
    images = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert default_method(torch.jit.trace(patchconvnet.eval(), images, check_trace=False)) == "rise"

    # a plain function returns probabilities: no sigmoid is applied on top
    maps, info = explain(window_score, torch.ones(1, 1, 64, 64), num_masks=16, batch_size=16)
    assert info["method"] == "rise" and info["target"] == [0]
    assert info["probability"] == pytest.approx([window_score(torch.ones(1, 1, 64, 64))[0, 0].item()])
    assert maps.shape == (1, 64, 64)


def test_explain_rejects_bad_requests():
    hct = create_model("hct_small", in_channels=1)
    images = torch.randn(1, 1, 64, 64)
    with pytest.raises(ValueError, match="method must be one of"):
        explain(hct, images, method="lime")
    with pytest.raises(ValueError, match="do not apply"):
        explain(hct, images, method="gradcam", num_masks=10)
    with pytest.raises(ValueError, match="spatial dims"):
        explain(hct, images[0])
    with pytest.raises(TypeError, match="floating-point"):
        explain(hct, images.to(torch.int64))
    with pytest.raises(ValueError, match="NaN"):
        explain(hct, torch.full_like(images, math.nan))
    with pytest.raises(TypeError, match="Scopeformer"):
        explain(hct, images, method="rollout")
    with pytest.raises(ValueError, match="one per image"):
        explain(hct, torch.randn(2, 1, 64, 64), target=[0, 1, 1])

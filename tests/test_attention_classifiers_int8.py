# Copyright MedAttnSlicer contributors. Apache-2.0.
"""INT8 path of the attention classifiers of issue 5: HCT, Efficient Scopeformer and PatchConvNet.

What is quantised (every Conv/Linear, attention projections included) and what stays float (the attention cores'
activation x activation products, softmax, FAVOR+ features, LayerNorm/BatchNorm, activations) is checked on the
networks' structure; agreement of INT8 with FP32 is measured on held-out real CT slices (example_ct) with the small
variants trained briefly on the other slices for per-slice organ presence (sample_models/trained_models.py; labels are
TotalSegmentator outputs, not manual ground truth).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from networks.blocks import ClassAttention, PerformerAttention, ReAttention
from networks.factory import create_model
from networks.quantization import (
    QuantizedLeaf,
    load_int8_artifact,
    prediction_agreement,
    quantize_int8,
    read_artifact_metadata,
    save_int8_artifact,
)
from sample_models import CONFIGS, ct_slices, data_for, trained_model

# config name -> (attention core type kept float, number of such modules, depthwise convs kept float, float layer
# types that must be reported). Depthwise: EfficientNet-B0's 16 MBConv blocks, PatchConvNet-small's 6 blocks.
STRUCTURE = {
    "hct_small_cls_2d": (PerformerAttention, 4, 0, {"BatchNorm2d", "ReLU", "MaxPool2d"}),
    "scopeformer_small_cls_2d": (ReAttention, 2, 16, {"LayerNorm", "BatchNorm2d", "GELU"}),
    "patchconvnet_small_cls_2d": (ClassAttention, 1, 6, {"LayerNorm", "GELU", "Sigmoid"}),
}


def _conv_linear_names(model: nn.Module, grouped: bool | None = None) -> list[str]:
    """Names of the float Conv2d/Linear layers; ``grouped`` selects grouped convs (True), the others (False) or all."""
    return [
        name
        for name, m in model.named_modules()
        if type(m) in (nn.Conv2d, nn.Linear) and (grouped is None or (getattr(m, "groups", 1) > 1) == grouped)
    ]


@pytest.mark.parametrize("config_name", list(STRUCTURE))
def test_int8_quantises_every_conv_and_linear_and_reports_float_parts(config_name):
    config = CONFIGS[config_name]
    attention_type, n_attention, n_depthwise, float_types = STRUCTURE[config_name]
    torch.manual_seed(0)
    model = create_model(config.model_name, **config.model_kwargs).eval()
    calibration = [ct_slices(config.size).split("train")[0][:2]]
    int8 = quantize_int8(model, calibration)
    summary = int8.int8_summary

    # every Conv2d/Linear is INT8, the attention projections included, except the depthwise convs (slower in INT8)
    depthwise = _conv_linear_names(model, grouped=True)
    assert len(depthwise) == n_depthwise
    assert summary["leaves"] == _conv_linear_names(model, grouped=False) and summary["attention"] == []
    assert [entry.split(":")[0] for entry in summary["kept_float"]] == depthwise
    assert all("depthwise" in entry and "slower" in entry for entry in summary["kept_float"])
    assert _conv_linear_names(int8) == depthwise
    cores = [(name, m) for name, m in int8.named_modules() if isinstance(m, attention_type)]
    assert len(cores) == n_attention
    for _, core in cores:
        projections = [c for c in core.children() if isinstance(c, QuantizedLeaf)]
        assert len(projections) >= 2  # q/k/v (or fused qkv) and the output projection

    # the summary says which attention arithmetic stays float, where, and why
    entry = summary["float_compute"][attention_type.__name__]
    assert entry["modules"] == [name for name, _ in cores]
    assert "stay float" in entry["reason"] and "INT8" in entry["reason"]
    assert float_types <= set(summary["float_layers"]), summary["float_layers"]
    assert summary["float_layers"].get("Conv2d", 0) == n_depthwise and "Linear" not in summary["float_layers"]
    if attention_type is PerformerAttention:  # the random features stay a float buffer
        assert all(core.projection.dtype == torch.float32 for _, core in cores)
        assert "FAVOR+" in entry["reason"]

    with torch.no_grad():
        x = ct_slices(config.size).split("held_out")[0][:4]
        reference, quantised = model(x), int8(x)
    assert quantised.dtype == torch.float32
    assert quantised.shape == reference.shape == (4, config.model_kwargs["out_channels"])


# Measured on held-out slices (30 per net, 6 organ labels each = 180 decisions) with the one-thread trained weights:
# see each test. ``min_positives`` keeps agreement non-trivial: the FP32 net must predict real organ presence, and its
# label accuracy must stay clearly above always answering each label's majority (0.59-0.62 on these slices).
@pytest.mark.slow
@pytest.mark.parametrize(
    "config_name, min_dice, min_agreement, min_positives, min_accuracy",
    [
        # measured: Dice 1.000, decision agreement 1.000, 76 positive decisions, accuracy 0.961, max |dlogit| 0.83
        ("hct_small_cls_2d", 0.97, 0.97, 60, 0.9),
        # measured: Dice 1.000, agreement 1.000, 101 positives, accuracy 0.850, max |dlogit| 0.021 (logits <= 0.71)
        ("scopeformer_small_cls_2d", 0.97, 0.97, 60, 0.75),
        # measured: Dice 1.000, agreement 1.000, 100 positives, accuracy 0.900, max |dlogit| 0.19
        ("patchconvnet_small_cls_2d", 0.97, 0.97, 60, 0.8),
    ],
)
def test_int8_agrees_with_fp32_on_real_slices_and_artifact_round_trips(
    config_name, min_dice, min_agreement, min_positives, min_accuracy, tmp_path
):
    model, config = trained_model(config_name)
    data = data_for(config)
    train_images, _, _ = data.split("train")
    held_out, _, organs = data.split("held_out")
    int8 = quantize_int8(model, list(train_images.split(8)))
    batches = list(held_out.split(8))
    result = prediction_agreement(model, int8, batches)

    with torch.no_grad():
        fp32_logits = model(held_out)
    accuracy = float(((fp32_logits > 0).float() == organs).float().mean())
    assert result["foreground_fp32"] >= min_positives, result
    assert accuracy >= min_accuracy, accuracy
    assert result["dice"] >= min_dice, result
    assert result["prediction_agreement"] >= min_agreement, result

    # the TorchScript artifact holds the same INT8 network and loads without the Python classes' code paths
    path = save_int8_artifact(int8, train_images[:2], tmp_path / f"{config_name}_int8.pt")
    meta = read_artifact_metadata(path)
    assert meta["precision"] == "int8" and meta["model_class"] == type(model).__name__
    loaded = load_int8_artifact(path)
    with torch.no_grad():
        for x in batches:
            torch.testing.assert_close(loaded(x), int8(x), rtol=0, atol=1e-5)
    assert prediction_agreement(model, loaded, batches)["dice"] == result["dice"]

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""INT8 post-training quantisation, TorchScript artifacts and INT8-vs-FP32 agreement.

Agreement is measured on held-out real CT slices/crops (example_ct) with networks trained briefly on the other
slices (sample_models/trained_models.py; cached in ~/.cache/medattn/trained_models, trained by `make test` first).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from networks.blocks.local_self_attention import LocalSelfAttention, local_attention_torch
from networks.factory import create_model
from networks.quantization import (
    ArtifactError,
    QuantizedLeaf,
    QuantizedLocalSelfAttention,
    export_torchscript,
    fused_fp32_model,
    kernel_library_path,
    load_artifact,
    load_fp32_artifact,
    load_int8_artifact,
    prediction_agreement,
    quantize_int8,
    read_artifact_metadata,
    register_float_module,
    save_fp32_artifact,
    save_int8_artifact,
)
from networks.registry import get_family
from sample_models import ct_slices, data_for, trained_model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _calibration(size: int = 64, batch: int = 8) -> list[torch.Tensor]:
    images, _, _ = ct_slices(size).split("train")
    return list(images.split(batch))


def _held_out(size: int = 64, batch: int = 8) -> list[torch.Tensor]:
    images, _, _ = ct_slices(size).split("held_out")
    return list(images.split(batch))


# ----------------------------------------------------------------------------------------------- structure


def test_sadnn_seg_structure_and_original_untouched():
    model = create_model("sadnn_seg_small").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    int8 = quantize_int8(model, _calibration()[:1])
    assert not any(isinstance(m, LocalSelfAttention) for m in int8.modules())
    layers = [m for m in int8.modules() if isinstance(m, QuantizedLocalSelfAttention)]
    assert len(layers) == 17 and sum(m.kernel_size == 1 for m in layers) == 1
    assert len(int8.int8_summary["attention"]) == 17 and int8.int8_summary["leaves"] == []
    assert int8.int8_summary["backend"] == "x86" and int8.int8_summary["calibration_batches"] == 1
    # the FP32 model is unchanged: same weights, pure-torch core, float layers
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.backend == "torch" for m in model.modules() if isinstance(m, LocalSelfAttention))
    # INT8 relative embeddings reproduce the float layer's exactly
    float_layers = [m for m in model.modules() if isinstance(m, LocalSelfAttention)]
    for fl, ql in zip(float_layers, layers):
        assert torch.equal(ql.relative_embedding(), fl.relative_embedding())


def test_sadnn_seg_epilogue_fusion_matches_unfused_network():
    """BatchNorm -> ReLU after each encoder layer (ReLU after each decoder layer) and the value equalisation's undoing
    run in the INT8 core's epilogue; the network computes the same as with those modules kept separate."""
    model = create_model("sadnn_seg_small").eval()
    calibration = _calibration()[:2]
    fused = quantize_int8(model, calibration)
    unfused = quantize_int8(model, calibration, fuse_epilogue=False)
    assert unfused.int8_summary["fused_epilogue"] == {}
    epilogues = fused.int8_summary["fused_epilogue"]
    assert epilogues["enc0.attention"] == ["BatchNorm2d", "ReLU"] and epilogues["dec0.attention"] == ["ReLU"]
    assert len(epilogues) == 16 and "output" not in epilogues  # the logits layer has nothing after it
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ReLU)) for m in fused.modules())
    assert fused.enc0.attention.relu and not fused.output.relu
    x = _held_out()[0]
    with torch.no_grad():
        a, b = fused(x), unfused(x)
        # the core writes channels-last, the layout the next layer's quantized projections read
        assert fused.enc1.attention(fused.enc0(x)).is_contiguous(memory_format=torch.channels_last)
    # float rounding of the folded BatchNorm can flip a requantised byte downstream (measured: max 0.012 of the
    # logit range, argmax identical)
    assert (a - b).abs().max() < 0.02 * b.abs().max()
    assert (a.argmax(1) == b.argmax(1)).float().mean() > 0.999


class _FloatOnlyAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, dim)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v


register_float_module(_FloatOnlyAttention)


class _MixedNet(nn.Module):
    """Conv1d/2d, transposed conv, local attention, a float-only attention module and linears."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.attention = LocalSelfAttention(2, 8, 8)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.down = nn.Conv2d(8, 8, 2, stride=2, padding="valid")
        self.seq = nn.Conv1d(8, 8, 3, padding=1)
        self.tokens = _FloatOnlyAttention(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = self.down(torch.relu(self.up(self.attention(h))))
        h = torch.relu(self.seq(h.flatten(2)))  # (B, 8, N)
        h = self.tokens(h.transpose(1, 2))  # (B, N, 8)
        return self.head(h.mean(1))


def test_generic_network_quantises_conv_linear_and_attention_only():
    model = _MixedNet().eval()
    calibration = _calibration(32)
    int8 = quantize_int8(model, calibration)
    assert isinstance(int8.stem, QuantizedLeaf) and isinstance(int8.down, QuantizedLeaf)
    assert isinstance(int8.seq, QuantizedLeaf) and isinstance(int8.head, QuantizedLeaf)
    assert isinstance(int8.attention, QuantizedLocalSelfAttention)
    assert type(int8.up) is nn.ConvTranspose2d  # INT8 transposed conv is wrong on x86: kept float
    assert type(int8.tokens.qkv) is nn.Linear  # registered float-only module: untouched
    kept = " ".join(int8.int8_summary["kept_float"])
    assert "up: ConvTranspose2d" in kept and "tokens: _FloatOnlyAttention" in kept
    with torch.no_grad():
        x = calibration[0]
        reference, quantised = model(x), int8(x)
    assert (reference - quantised).abs().max() < 0.05 * reference.abs().max() + 1e-3


@pytest.mark.parametrize("spatial_dims, shape", [(2, (2, 4, 24, 20)), (3, (1, 4, 8, 10, 12))])
def test_int8_layer_feeds_quantized_projections_to_fused_core(spatial_dims, shape):
    layer = LocalSelfAttention(spatial_dims, shape[1], 8).eval()
    x = torch.randn(shape)
    int8 = quantize_int8(layer, [x, torch.randn(shape)])
    assert isinstance(int8, QuantizedLocalSelfAttention)
    with torch.no_grad():
        xq = torch.quantize_per_tensor(x, int8.input_scale, int8.input_zero_point, torch.quint8)
        q, k, v = int8.query(xq), int8.key(xq), int8.value(xq)
        assert q.dtype == k.dtype == v.dtype == torch.quint8
        # the same maths in float on the dequantised INT8 projections: differs only by the core's 8-bit weights
        rel = layer.relative_embedding()
        reference = local_attention_torch(q.dequantize(), k.dequantize(), v.dequantize(), rel, 3, 1)
        # a standalone layer has no BatchNorm to absorb the value equalisation: its output undoes it
        assert int8.has_output_scale and float(int8.output_scale.max()) == 1.0
        reference = reference * int8.output_scale
        out = int8(x)
        float_out = layer(x)
    assert out.dtype == torch.float32 and out.shape == float_out.shape
    assert (out - reference).abs().max() <= 1.5 * v.q_scale()
    # end to end, with the input quantised to the 7 bits FBGEMM takes on every CPU (unit normal input, so half its
    # 127 steps are spent on negative values): measured 0.066 x max for the 3D case, the same on AVX2 and VNNI CPUs
    assert (out - float_out).abs().max() < 0.08 * float_out.abs().max()


def test_calibration_input_errors():
    model = create_model("sadnn_seg_small")
    with pytest.raises(ValueError, match="no batches"):
        quantize_int8(model, [])
    with pytest.raises(TypeError, match="iterable of input batches"):
        quantize_int8(model, torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="NaN"):
        quantize_int8(model, [torch.full((1, 1, 32, 32), float("nan"))])
    with pytest.raises(TypeError, match="floating point"):
        quantize_int8(model, [torch.zeros(1, 1, 32, 32, dtype=torch.long)])
    with pytest.raises(ValueError, match="backend"):
        quantize_int8(model, [torch.zeros(1, 1, 32, 32)], backend="tpu")
    with pytest.raises(ValueError, match="nothing to quantise|no Conv"):
        quantize_int8(nn.Sequential(nn.ReLU()), [torch.zeros(1, 1, 4, 4)])


def test_fbgemm_and_x86_backends():
    layer = LocalSelfAttention(2, 8, 16).eval()
    calibration = [torch.rand(2, 8, 24, 24) for _ in range(2)]
    x86 = quantize_int8(layer, calibration, backend="x86")
    fbgemm = quantize_int8(layer, calibration, backend="fbgemm")
    assert x86.int8_summary["backend"] == "x86" and fbgemm.int8_summary["backend"] == "fbgemm"
    x = torch.rand(2, 8, 24, 24)
    with torch.no_grad():
        a, b, reference = x86(x), fbgemm(x), layer(x)
    # the engines may round a requantised output differently by one step; nothing more
    assert (a - b).abs().max() <= 2 * fbgemm.value.scale
    assert (b - reference).abs().max() < 0.05 * reference.abs().max()


def test_prediction_agreement_arithmetic():
    class Fixed(nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, x):
            return self.logits

    a = torch.zeros(1, 2, 2, 2)
    a[0, 1, 0, :] = 1.0  # foreground: two pixels of the top row
    b = torch.zeros(1, 2, 2, 2)
    b[0, 1, 0, 0] = 1.0  # one of them
    b[0, 1, 1, 1] = 3.0  # plus one more
    result = prediction_agreement(Fixed(a), Fixed(b), torch.zeros(1))
    assert result["dice"] == pytest.approx(2 * 1 / (2 + 2))
    assert result["max_abs_logit_diff"] == pytest.approx(3.0)
    assert result["prediction_agreement"] == pytest.approx(2 / 4)
    assert result["foreground_fp32"] == 2 and result["foreground_int8"] == 2
    same = prediction_agreement(Fixed(a), Fixed(a.clone()), [torch.zeros(1), torch.zeros(1)])
    assert same["dice"] == 1.0 and same["max_abs_logit_diff"] == 0.0 and same["images"] == 2
    logits_a, logits_b = torch.tensor([[1.0, -1.0, 2.0]]), torch.tensor([[1.0, 0.5, -2.0]])
    cls = prediction_agreement(Fixed(logits_a), Fixed(logits_b), torch.zeros(1))
    assert cls["task"] == "classification" and cls["dice"] == pytest.approx(2 * 1 / (2 + 2))
    assert cls["top1_agreement"] == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        prediction_agreement(Fixed(a), Fixed(torch.zeros(1, 3, 2, 2)), torch.zeros(1))


# ----------------------------------------------------------------------------------------------- artifacts


_FRESH_PROCESS = textwrap.dedent(
    """
    import importlib.util, sys
    import torch
    library, engine, artifact, inputs, outputs = sys.argv[1:6]
    assert importlib.util.find_spec("networks") is None, "the project's classes must not be importable here"
    torch.ops.load_library(library)
    torch.backends.quantized.engine = engine
    model = torch.jit.load(artifact)
    with torch.no_grad():
        torch.save([model(x) for x in torch.load(inputs)], outputs)
    assert not any(name.split(".")[0] == "networks" for name in sys.modules)
    """
)


def _fresh_env() -> dict[str, str]:
    """A bare environment (no PYTHONPATH): only thread settings are passed on."""
    env = {"PATH": "/usr/bin:/bin"}
    for key in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def _run_fresh(artifact, inputs: list[torch.Tensor], tmp_path, engine: str = "x86") -> list[torch.Tensor]:
    torch.save(inputs, tmp_path / "inputs.pt")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _FRESH_PROCESS,
            kernel_library_path(),
            engine,
            str(artifact),
            str(tmp_path / "inputs.pt"),
            str(tmp_path / "outputs.pt"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=_fresh_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "outputs.pt")


def test_traced_int8_artifact_generalises_and_loads_without_project_classes(tmp_path):
    model = create_model("sadnn_seg_small").eval()
    int8 = quantize_int8(model, _calibration()[:2])
    held_out = _held_out()
    example = held_out[0][:2]
    path = save_int8_artifact(int8, example, tmp_path / "seg_int8.pt", metadata={"note": "test"})
    meta = read_artifact_metadata(path)
    assert meta["precision"] == "int8" and meta["export"] == "trace" and meta["note"] == "test"
    assert meta["quantized_engine"] == "x86" and "medattn::local_attention_int8" in meta["custom_ops"]
    bigger = torch.nn.functional.interpolate(held_out[1], size=(96, 96), mode="bilinear")  # other size and batch
    inputs = [held_out[0], bigger[:3]]
    with torch.no_grad():
        expected = [int8(x) for x in inputs]
        loaded = load_int8_artifact(path)
        for x, y in zip(inputs, expected):
            torch.testing.assert_close(loaded(x), y, rtol=0, atol=1e-5)
    for got, y in zip(_run_fresh(path, inputs, tmp_path), expected):
        torch.testing.assert_close(got, y, rtol=0, atol=1e-5)


def test_scripted_unet_artifact_and_fp32_best_path(tmp_path):
    model = create_model("unet_baseline", features=(8, 8, 16, 16, 32, 8)).eval()
    int8 = quantize_int8(model, _calibration()[:1])
    assert len(int8.int8_summary["leaves"]) > 10
    x = _held_out()[0]
    path = save_int8_artifact(int8, x[:1], tmp_path / "unet_int8.pt")
    assert read_artifact_metadata(path)["export"] == "script"
    with torch.no_grad():
        expected = int8(x)
    (got,) = _run_fresh(path, [x], tmp_path)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    # FP32 best path: fused FP32 core, traced; identical to the in-memory fused network. Against the pure-torch core
    # the layers agree to ~1e-4, but SaDNN's max-pool indices flip on near-ties and unpooling then moves values by a
    # pixel, so the end-to-end comparison is by predictions.
    seg, _ = trained_model("sadnn_seg_small_2d")
    fp32_path = save_fp32_artifact(seg, x[:1], tmp_path / "seg_fp32.pt")
    meta = read_artifact_metadata(fp32_path)
    assert meta["precision"] == "fp32" and meta["custom_ops"] == ["medattn::local_attention"]
    fp32 = load_fp32_artifact(fp32_path)
    with torch.no_grad():
        got = fp32(x)
        torch.testing.assert_close(got, fused_fp32_model(seg)(x), rtol=0, atol=1e-5)
    assert prediction_agreement(seg, fp32, x)["dice"] >= 0.99
    with pytest.raises(ArtifactError, match="holds a fp32 network"):
        load_int8_artifact(fp32_path)


def test_artifact_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_artifact(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_artifact(bad)
    plain = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(plain))
    with pytest.raises(ArtifactError, match="without MedAttnSlicer metadata"):
        load_artifact(plain)
    with pytest.raises(ValueError, match="int8_summary"):
        save_int8_artifact(nn.Linear(2, 2), torch.zeros(1, 2), tmp_path / "x.pt")

    class FrozenShape(nn.Module):
        def forward(self, x):
            return x.reshape(int(x.shape[0]), 4 * 4).sum(1)  # int(): the trace freezes the shape

    with pytest.raises(ArtifactError, match="does not generalise|accepts no input shape"):
        export_torchscript(FrozenShape(), torch.zeros(2, 1, 4, 4), method="trace")


# ------------------------------------------------------------------------------ agreement, trained weights


# networks quantised with their served family's INT8 recipe (networks.registry), as the server does after training
RECIPE_OF = {"sadnn_seg_small_2d": "sadnn_seg", "sadnn_cls_small_2d": "sadnn_cls"}


def _agreement(name: str, min_dice: float, min_foreground: int) -> dict:
    model, config = trained_model(name)
    data = data_for(config)
    train_images, _, _ = data.split("train")
    held_out, _, _ = data.split("held_out")
    batch = 8 if config.spatial_dims == 2 else 2
    options = get_family(RECIPE_OF[name]).int8.quantize_options if name in RECIPE_OF else {}
    int8 = quantize_int8(model, list(train_images.split(batch)), **options)
    result = prediction_agreement(model, int8, list(held_out.split(batch)))
    # the FP32 network must predict real structures, or agreement would be trivially perfect
    assert result["foreground_fp32"] >= min_foreground, result
    assert result["dice"] >= min_dice, result
    return result


# (network, min Dice, min FP32 foreground, {other agreement figure: its floor}); the measurements behind the floors:
# - sadnn_seg_small_2d, with the deterministic (one-thread) training: foreground Dice 0.92, pixel agreement 0.980.
#   Trained with two threads the same recipe gave 0.977 / 0.997: these briefly trained nets vary that much run to run.
#   With the sadnn_seg INT8 recipe (input equalisation, enc0/enc1 float): 0.941 / 0.994 (defaults: 0.916 / 0.991).
# - sadnn_cls_small_2d: Dice of the presence decisions 0.949, top-1 agreement 0.933 (28 of 30 held-out slices); with
#   the sadnn_cls recipe (input equalisation) and the current pinned training: 0.986, decisions 0.989, top-1 1.0.
# - unet_baseline_3d, with the pinned training (sample_models.trained_models.training_environment, the same weights
#   on AVX2 and AVX-512 machines): agreement Dice 0.951 on 269 FP32 liver voxels of the held-out crops.
# - sadnn_seg_small_3d, trained for 120 steps on four 16x32x32 crops, is weak (FP32 Dice vs label 0.56) and its
#   uncertain predictions flip easily: INT8 agreement measured 0.885 (voxels 0.973) with the pinned training, the
#   same on AVX2 and VNNI CPUs (portable artifacts). The bound guards that level.
AGREEMENT_FLOORS = [
    ("sadnn_seg_small_2d", 0.93, 1000, {"prediction_agreement": 0.99}),
    ("unet_baseline_2d", 0.97, 1000, {}),
    ("sadnn_cls_small_2d", 0.95, 20, {"prediction_agreement": 0.97, "top1_agreement": 0.9}),
    ("unet_baseline_3d", 0.93, 200, {}),
    ("sadnn_seg_small_3d", 0.85, 500, {"prediction_agreement": 0.96}),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, min_dice, min_foreground, other_floors", AGREEMENT_FLOORS)
def test_int8_agreement_on_real_ct(name, min_dice, min_foreground, other_floors):
    result = _agreement(name, min_dice, min_foreground)
    for key, floor in other_floors.items():
        assert result[key] >= floor, result

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""CPU instruction-set classes: detection, the override, why INT8 inputs are 7-bit, and artifacts that run the same on
either class (made under one, run under the other in child processes that force it)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from networks.isa import (
    ISA_OVERRIDE_ENV,
    cpu_best_isa,
    fbgemm_saturates,
    isa_environment,
    requested_isa,
)
from networks.quantization import QuantizedLeaf, load_int8_artifact, quantize_int8, save_int8_artifact

REPO_ROOT = Path(__file__).resolve().parents[1]
HASWELL = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"})
# as Linux spells them in /proc/cpuinfo
ICE_LAKE = HASWELL | {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512vbmi"}


def test_best_class_from_cpu_flags():
    assert cpu_best_isa(ICE_LAKE) == "avx512_vnni"
    assert cpu_best_isa(HASWELL) == "avx2"
    assert cpu_best_isa(ICE_LAKE - {"avx512vbmi"}) == "avx2"  # Cascade Lake: VNNI, no VBMI -> the AVX2 kernels
    assert cpu_best_isa(ICE_LAKE - {"avx512vbmi"} | {"avx512_vbmi"}) == "avx512_vnni"  # either spelling
    assert cpu_best_isa(HASWELL - {"fma"}) == "portable"
    assert cpu_best_isa(frozenset()) == "portable"


def test_override_names_a_lower_class_or_fails_clearly():
    best = cpu_best_isa()
    assert requested_isa({}) == best
    assert requested_isa({ISA_OVERRIDE_ENV: "native"}) == best
    assert requested_isa({ISA_OVERRIDE_ENV: " Portable "}) == "portable"
    with pytest.raises(ValueError, match="not one of native, avx512_vnni, avx2, portable"):
        requested_isa({ISA_OVERRIDE_ENV: "sse9"})
    if best != "avx512_vnni":
        with pytest.raises(ValueError, match=f"more than this CPU has \\(its best is {best}\\)"):
            requested_isa({ISA_OVERRIDE_ENV: "avx512_vnni"})
        with pytest.raises(ValueError, match="more than this CPU has"):
            isa_environment("avx512_vnni")


def test_environment_forces_all_three_libraries_and_native_clears_them():
    env = isa_environment("avx2", base={"PATH": "/bin", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX512"})
    assert env == {
        "PATH": "/bin",
        ISA_OVERRIDE_ENV: "avx2",
        "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
    }
    assert isa_environment("native", base=env) == {"PATH": "/bin"}
    assert fbgemm_saturates(env)
    assert fbgemm_saturates({"FBGEMM_ENABLE_INSTRUCTIONS": "AVX512"})  # AVX-512 without VNNI multiplies like AVX2


def _run_child(script: str, isa: str) -> dict:
    env = isa_environment(isa)
    env["PYTHONPATH"] = str(REPO_ROOT)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


SATURATION_CHILD = """
import json, torch, torch.nn.functional as F
from torch.ao.nn.quantized import Conv2d
from networks.isa import fbgemm_saturates
torch.backends.quantized.engine = "x86"
g = torch.Generator().manual_seed(0)
x = torch.rand(4, 64, 16, 16, generator=g) * 3                          # non-negative activations using their range
w = torch.rand(64, 64, 1, 1, generator=g) * 2 - 1                       # weights spread over the int8 range
result = {"saturates": fbgemm_saturates()}
for bits in (7, 8):
    top = 2 ** bits - 1
    scale = float(x.max()) / top
    xq = torch.quantize_per_tensor(x, scale, 0, torch.quint8)
    wq = torch.quantize_per_channel(w, w.abs().amax((1, 2, 3)) / 127, torch.zeros(64, dtype=torch.long), 0, torch.qint8)
    exact = F.conv2d(xq.dequantize(), wq.dequantize())                 # integer products summed without saturation
    conv = Conv2d(64, 64, 1, bias=False)
    conv.set_weight_bias(wq, None)
    conv.scale, conv.zero_point = float(exact.abs().max()) * 2 / 255, 128
    got = conv(xq).dequantize()
    result[f"error_{bits}"] = float((got - exact).abs().max() / (exact.max() - exact.min()))
print(json.dumps(result))
"""


def test_fbgemm_saturates_8_bit_inputs_on_avx2_but_not_7_bit_ones():
    """Why the quantiser gives FBGEMM 7-bit inputs: under AVX2 dispatch (forced on any CPU) 8-bit inputs lose
    several % of the output range to int16 saturation, 7-bit ones only the output rounding."""
    forced = _run_child(SATURATION_CHILD, "avx2")
    assert forced["saturates"]
    output_rounding = 1.0 / 255  # one step of the 8-bit output quantisation, relative to about the output range
    assert forced["error_7"] <= output_rounding
    assert forced["error_8"] >= 0.02, forced
    native = _run_child(SATURATION_CHILD, "native")
    assert native["error_7"] <= output_rounding
    if not native["saturates"]:  # a VNNI CPU sums exactly even with 8 bits
        assert native["error_8"] <= output_rounding


def test_quantizer_feeds_fbgemm_7_bit_inputs_and_says_so():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1)).eval()
    calibration = [torch.randn(2, 1, 16, 16) * 5 for _ in range(3)]
    int8 = quantize_int8(model, calibration)
    assert int8.int8_summary["fbgemm_input_bits"] == 7 and int8.int8_summary["portable"]
    leaves = [m for m in int8.modules() if isinstance(m, QuantizedLeaf)]
    assert len(leaves) == 2
    # every calibration input lands in 0..127 (the top of the range maps to 127, not 255)
    inputs = {id(leaves[0]): torch.cat(calibration), id(leaves[1]): torch.relu(model[0](torch.cat(calibration)))}
    for leaf in leaves:
        raw = torch.quantize_per_tensor(
            inputs[id(leaf)].detach(), leaf.input_scale, leaf.input_zero_point, torch.quint8
        ).int_repr()
        assert int(raw.max()) == 127
    eight_bit = quantize_int8(model, calibration, reduce_range=False)
    assert eight_bit.int8_summary["fbgemm_input_bits"] == 8 and not eight_bit.int8_summary["portable"]


ARTIFACT_CHILD = """
import json, torch
from networks.isa import requested_isa
from networks.kernels import kernel_implementations
from networks.quantization import load_int8_artifact
data = torch.load({data!r})
net = load_int8_artifact({artifact!r})
with torch.no_grad():
    out = net(data["x"])
torch.save(out, {out!r})
print(json.dumps({{"isa": requested_isa(), "kernels": kernel_implementations()["int8"]}}))
"""


@pytest.mark.slow
def test_artifact_made_here_runs_the_same_under_each_class(tmp_path):
    """A portable INT8 artifact of the trained small SaDNN-seg, made in this process, run in a child forced to the
    AVX2 class and in one at this CPU's best: both agree with each other and with FP32 as closely as here."""
    from networks.quantization import prediction_agreement
    from sample_models import data_for, trained_model

    model, config = trained_model("sadnn_seg_small_2d")
    data = data_for(config)
    train_images, _, _ = data.split("train")
    held_out, _, _ = data.split("held_out")
    artifact = save_int8_artifact(
        quantize_int8(model, list(train_images.split(8))), train_images[:2], tmp_path / "sadnn_seg_int8.pt"
    )
    torch.save({"x": held_out}, tmp_path / "data.pt")
    outputs = {}
    for isa in ("avx2", "native"):
        script = ARTIFACT_CHILD.format(
            data=str(tmp_path / "data.pt"), artifact=str(artifact), out=str(tmp_path / f"{isa}.pt")
        )
        report = _run_child(script, isa)
        if isa == "avx2":
            assert report == {"isa": "avx2", "kernels": "avx2"}
        outputs[isa] = torch.load(tmp_path / f"{isa}.pt")
    with torch.no_grad():
        fp32 = model(held_out)
    # the integers are the same on both classes (7-bit FBGEMM inputs, exact integer attention): only float rounding
    # of the requantisation and of the softmax differs, and it moves a logit by at most a few of its 8-bit steps
    logit_range = float(fp32.max() - fp32.min())
    assert float((outputs["avx2"] - outputs["native"]).abs().max()) <= 0.02 * logit_range
    figures = {isa: prediction_agreement(model, _Fixed(out), [held_out]) for isa, out in outputs.items()}
    assert abs(figures["avx2"]["dice"] - figures["native"]["dice"]) <= 0.005, figures
    here = prediction_agreement(model, load_int8_artifact(artifact), [held_out])
    assert abs(figures["native"]["dice"] - here["dice"]) <= 0.005, (figures, here)


class _Fixed(torch.nn.Module):
    """A "network" that returns outputs computed elsewhere (for prediction_agreement)."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output


def test_artifact_with_8_bit_inputs_warns_where_fbgemm_saturates(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1)).eval()
    calibration = [torch.randn(1, 1, 8, 8)]
    path = save_int8_artifact(quantize_int8(model, calibration, reduce_range=False), calibration[0], tmp_path / "a.pt")
    portable = save_int8_artifact(quantize_int8(model, calibration), calibration[0], tmp_path / "b.pt")
    script = f"""
    import json, warnings
    from networks.quantization import load_int8_artifact
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_int8_artifact({str(path)!r})
        eight = [str(w.message) for w in caught]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_int8_artifact({str(portable)!r})
        seven = [str(w.message) for w in caught if "saturate" in str(w.message)]
    print(json.dumps({{"eight": eight, "seven": seven}}))
    """
    warned = _run_child(script, "avx2")
    assert any("saturate" in message and "Re-quantise" in message for message in warned["eight"]), warned
    assert warned["seven"] == []

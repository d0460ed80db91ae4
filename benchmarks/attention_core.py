# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Side-by-side timing of the local self-attention cores: pure PyTorch vs fused FP32 vs fused INT8 (C++ kernels),
the fused cores once per code path (ISA).

Run ``python -m benchmarks.attention_core`` (``--repeats N``, ``--quick`` for small shapes, ``--isa avx2,portable``:
the code paths to time, default every one this CPU has; each runs through ``torch.ops.medattn._local_attention_isa``
/ ``_local_attention_int8_isa``). Every configuration times the pure-PyTorch core (FP32 eager) and the FP32 and
INT8 cores of every ISA in the same process, interleaved round-robin so that load from other processes hits them alike,
with ``torch.set_num_threads(2)`` under ``torch.inference_mode()``, and reports medians of wall time. Each
configuration is timed again with one thread as a control: on a loaded machine every OpenMP parallel region can
wait for a descheduled second thread (milliseconds), which distorts short calls and the many small ops of the
pure-PyTorch core. Inputs are
realistic rather than white noise: q, k, v are bias-free 1x1 projections of smooth images; the INT8 core gets them
as per-tensor quint8 in channels-last layout, as FBGEMM quantized convolutions produce them (the quantization is
not timed). Agreement is reported next to the times. The last line printed is one JSON object with everything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from networks.blocks.local_self_attention import local_attention_torch
from networks.kernels import kernel_implementations, load_kernels, local_attention_fused

# name, batch, channels, spatial size, kernel_size, heads
CONFIGS = [
    ("2d_c64_256", 8, 64, (256, 256), 3, 1),
    ("2d_c16_128", 8, 16, (128, 128), 3, 1),
    ("2d_c256_64", 8, 256, (64, 64), 3, 1),
    ("3d_c32_64", 1, 32, (64, 64, 64), 3, 1),
]
QUICK_CONFIGS = [
    ("2d_c64_64", 2, 64, (64, 64), 3, 1),
    ("2d_c16_32", 2, 16, (32, 32), 3, 1),
    ("3d_c16_16", 1, 16, (16, 16, 16), 3, 1),
]


def smooth_features(batch: int, in_channels: int, spatial: tuple[int, ...], seed: int) -> torch.Tensor:
    """(batch, in_channels, *spatial): a low-pass filtered random image and simple nonlinear features of it."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 1, *spatial, generator=generator)
    taps = torch.exp(-(torch.arange(-6, 7, dtype=torch.float32) ** 2) / 8)
    taps = taps / taps.sum()
    conv = F.conv2d if len(spatial) == 2 else F.conv3d
    for axis in range(len(spatial)):
        shape = [1, 1] + [1] * len(spatial)
        shape[2 + axis] = -1
        pad = [0, 0] * len(spatial)
        pad[2 * (len(spatial) - 1 - axis)] = pad[2 * (len(spatial) - 1 - axis) + 1] = 6
        image = conv(F.pad(image, pad, mode="reflect"), taps.view(shape))
    image = (image - image.mean()) / image.std()
    features = [image, F.relu(image), torch.tanh(2 * image), torch.sin(3 * image)]
    return torch.cat(features * math.ceil(in_channels / 4), dim=1)[:, :in_channels]


def quantize_min_max(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor affine quint8 over the tensor's range, channels-last like an FBGEMM quantized conv output."""
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = max(hi - lo, 1e-8) / 255
    quantized = torch.quantize_per_tensor(x, scale, int(round(-lo / scale)), torch.quint8)
    return quantized.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)


def make_inputs(batch: int, channels: int, spatial: tuple[int, ...], kernel_size: int, seed: int = 0):
    in_channels = 8
    features = smooth_features(batch, in_channels, spatial, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    conv = F.conv2d if len(spatial) == 2 else F.conv3d
    weights = [
        torch.randn(channels, in_channels, *([1] * len(spatial)), generator=generator) / math.sqrt(in_channels)
        for _ in range(3)
    ]
    q, k, v = (conv(features, w).contiguous() for w in weights)
    rel = torch.randn(kernel_size ** len(spatial), channels, generator=generator)
    return q, k, v, rel


def time_round_robin(functions: dict[str, Callable[[], torch.Tensor]], repeats: int) -> dict[str, list[float]]:
    for function in functions.values():  # warm-up: first-call allocations, page faults of fresh buffers
        function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    names = list(functions)
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            start = time.perf_counter()
            functions[name]()
            times[name].append(time.perf_counter() - start)
    return times


def timing_summary(times: dict[str, list[float]], isas: list[str], selected: str) -> dict:
    medians = {key: statistics.median(values) for key, values in times.items()}
    torch_core = medians["torch_core"]
    summary = {
        "median_seconds": medians,
        "min_seconds": {key: min(values) for key, values in times.items()},
        # per ISA: time as a fraction of the pure-PyTorch FP32 eager core, and INT8 time / FP32 time of that ISA
        "isa": {
            isa: {
                "fp32_time_vs_torch_core": medians[f"fp32_{isa}"] / torch_core,
                "int8_time_vs_torch_core": medians[f"int8_{isa}"] / torch_core,
                "int8_time_vs_fp32": medians[f"int8_{isa}"] / medians[f"fp32_{isa}"],
            }
            for isa in isas
        },
    }
    if selected in isas:  # the public ops run this path (the speedups earlier versions of this report had)
        summary["speedup"] = {
            "fused_fp32_vs_torch_core": torch_core / medians[f"fp32_{selected}"],
            "fused_int8_vs_torch_core": torch_core / medians[f"int8_{selected}"],
            "fused_int8_vs_fused_fp32": medians[f"fp32_{selected}"] / medians[f"int8_{selected}"],
        }
    return summary


def run_config(name, batch, channels, spatial, kernel_size, heads, repeats, threads, isas, selected) -> dict:
    q, k, v, rel = make_inputs(batch, channels, spatial, kernel_size)
    qq, kq, vq = (quantize_min_max(t) for t in (q, k, v))
    functions: dict[str, Callable[[], torch.Tensor]] = {
        "torch_core": lambda: local_attention_torch(q, k, v, rel, kernel_size, heads)
    }
    for isa in isas:
        functions[f"fp32_{isa}"] = lambda isa=isa: torch.ops.medattn._local_attention_isa(
            q, k, v, rel, kernel_size, heads, isa
        )
        functions[f"int8_{isa}"] = lambda isa=isa: torch.ops.medattn._local_attention_int8_isa(
            qq, kq, vq, rel, kernel_size, heads, None, None, False, isa
        )
    result = {
        "name": name,
        "shape": [batch, channels, *spatial],
        "kernel_size": kernel_size,
        "heads": heads,
        "repeats": repeats,
        "isas": isas,
    }
    for count in threads:
        torch.set_num_threads(count)
        result[f"threads_{count}"] = timing_summary(time_round_robin(functions, repeats), isas, selected)
    torch.set_num_threads(threads[0])

    reference = functions["torch_core"]()
    on_dequantized = local_attention_fused(qq.dequantize(), kq.dequantize(), vq.dequantize(), rel, kernel_size, heads)
    output_scale = reference.abs().max().item()
    result["agreement"] = {"output_scale": output_scale}
    for isa in isas:
        fused = functions[f"fp32_{isa}"]()
        int8 = functions[f"int8_{isa}"]()
        result["agreement"][isa] = {
            "fp32_vs_torch_max_abs": (fused - reference).abs().max().item(),
            # the INT8 kernel's own approximations (16-bit rel, 8-bit softmax weights) on identical inputs
            "int8_vs_fp32_same_dequantized_inputs_max_rel": (int8 - on_dequantized).abs().max().item() / output_scale,
            # end to end, including the 8-bit quantization of q, k and v
            "int8_vs_fp32_max_rel": (int8 - fused).abs().max().item() / output_scale,
            "int8_vs_fp32_rms_rel": (int8 - fused).pow(2).mean().sqrt().item() / output_scale,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per core, configuration and thread count")
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run of the script)")
    parser.add_argument("--no-single-thread", action="store_true", help="skip the one-thread control timings")
    parser.add_argument(
        "--isa",
        default="",
        help="comma list of code paths to time (avx512_vnni, avx2, portable); default: every one this CPU has",
    )
    parser.add_argument("--config", default="", help="comma list of configuration names to run (default: all)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    threads = [2] if args.no_single_thread else [2, 1]
    torch.set_num_threads(2)
    load_kernels()
    implementations = kernel_implementations()
    available = list(implementations["available_isas"])
    isas = [isa.strip() for isa in args.isa.split(",") if isa.strip()] or available
    unknown = [isa for isa in isas if isa not in available]
    if unknown:
        parser.error(f"--isa {','.join(unknown)}: not available on this CPU (available: {', '.join(available)})")
    configs = QUICK_CONFIGS if args.quick else CONFIGS
    if args.config:
        wanted = args.config.split(",")
        configs = [config for config in configs if config[0] in wanted]
        if not configs:
            parser.error(f"--config {args.config}: no such configuration")
    report = {
        "benchmark": "attention_core",
        "torch": torch.__version__,
        "threads": threads,
        "kernel_implementations": implementations,
        "isas": isas,
        "loadavg_start": list(os.getloadavg()),
        "configs": [],
    }
    with torch.inference_mode():
        for config in configs:
            result = run_config(
                *config, repeats=args.repeats, threads=threads, isas=isas, selected=str(implementations["selected_isa"])
            )
            report["configs"].append(result)
            for count in threads:
                m, per_isa = result[f"threads_{count}"]["median_seconds"], result[f"threads_{count}"]["isa"]
                print(
                    f"{result['name']:>12} {str(result['shape']):>20} {count} thr: torch core (fp32 eager) "
                    f"{m['torch_core'] * 1e3:7.1f} ms",
                    flush=True,
                )
                for isa in isas:
                    r = per_isa[isa]
                    print(
                        f"{'':>12} {isa:>12}: fp32 {m[f'fp32_{isa}'] * 1e3:7.1f} ms "
                        f"({r['fp32_time_vs_torch_core']:5.2f}x torch) | int8 {m[f'int8_{isa}'] * 1e3:7.1f} ms "
                        f"({r['int8_time_vs_torch_core']:5.2f}x torch, {r['int8_time_vs_fp32']:4.2f}x fp32)",
                        flush=True,
                    )
            for isa in isas:
                agreement = result["agreement"][isa]
                print(
                    f"{'':>12} {isa:>12}: int8 vs fp32 kernel: max {agreement['int8_vs_fp32_max_rel']:.4f}, rms "
                    f"{agreement['int8_vs_fp32_rms_rel']:.5f} of the output scale (same dequantized inputs: max "
                    f"{agreement['int8_vs_fp32_same_dequantized_inputs_max_rel']:.4f})",
                    flush=True,
                )
    report["loadavg_end"] = list(os.getloadavg())
    print(json.dumps(report))


if __name__ == "__main__":
    main()

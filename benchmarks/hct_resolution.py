# Copyright MedAttnSlicer contributors. Apache-2.0.
"""HCT at growing resolution: forward time and peak memory vs the number of attention tokens, up to 2048 x 1664.

    python -m benchmarks.hct_resolution [--quick] [--repeats N] [--threads T] [--attentions A [A ...]]

The paper's point (Taha et al. 2022) is that linear attention lets the whole network run on full-resolution
mammograms. For the paper's HCT (``HCT()`` defaults, random weights, eval mode, no grad, batch 1, 1 channel) with
Performer FAVOR+ softmax, Performer ReLU and Nystrom attention, and with exact softmax attention
(``attention="softmax"``, ``torch.nn.MultiheadAttention``, the quadratic reference), it measures at a ladder of
resolutions that doubles the token count at every step (512 x 416 ... 2048 x 1664):

- ``tokens``: the token count of every AC block (recorded by hooks during the forward); slopes use the first AC
  block's, the largest (64 x 52 = 3328 at 2048 x 1664). All counts are proportional to the pixel count.
- wall time: median of ``--repeats`` forwards, the attentions timed interleaved (one call of each per round,
  rotating the order) in this process with ``torch.set_num_threads(T)``, so load from other processes hits all alike.
- peak memory: the rise of the peak RSS during one forward, in a fresh child process per attention that measures the
  ladder in ascending order: ``/proc/self/clear_refs`` resets the peak (``VmHWM``) before each forward, and
  ``MALLOC_MMAP_THRESHOLD_=65536`` makes glibc return every freed tensor to the OS, so the RSS follows the live
  tensors and one point's freed buffers cannot hide the next one's allocations. (tracemalloc does not see torch's
  allocations.) For exact attention the size of the attention weights of the first AC block
  (``heads * N^2 * 4`` bytes, materialised by ``nn.MultiheadAttention`` on this CPU build) is reported next to it.
- the log-log slope of time and memory vs tokens between the smallest and the largest point (linear ~ 1.0, the
  attention part of exact attention -> 2.0), and each step's ratio per doubling of tokens.

Convolutions cost the same for every attention and are linear in the pixels, so for exact attention the slope of the
whole network rises towards 2 only as its N^2 term takes over (from ~1000 tokens, ~1000 x 800 pixels, on); with a
linear attention the peak is that of the convolutions' activations. Fixed per-call costs make time slopes from the
small end a little below 1; the per-doubling ratios at the top show the asymptote. Progress goes to stderr, the
table to stdout, and the last line printed is one JSON object with everything (``--quick``: the top three rungs,
1024 x 832 to 2048 x 1664, as the tests use them).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the OpenMP runtime's start (torch import)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from benchmarks.attention_core import time_round_robin  # noqa: E402
from networks.nets.hct import HCT, AttentionConvBlock  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
ATTENTIONS = ("performer_softmax", "performer_relu", "nystrom", "softmax")
LINEAR_ATTENTIONS = ("performer_softmax", "performer_relu", "nystrom")
# each step doubles the pixel (and token) count: side x sqrt(2); the paper's mammograms are 2048 x 1664 and larger
LADDER = ((512, 416), (724, 588), (1024, 832), (1448, 1176), (2048, 1664))
# exact attention's N^2 weights outgrow the convolutions' activations only from ~1000 x 800 on (~1000 tokens), so the
# quick ladder keeps the top of the full one: there a quadratic attention shows (memory slope ~1.9), a linear one not
QUICK_LADDER = ((1024, 832), (1448, 1176), (2048, 1664))
HEADS = 8  # HCT's default, for the analytic size of exact attention's weights


def build_model(attention: str) -> HCT:
    torch.manual_seed(0)
    return HCT(attention=attention).eval()


def make_input(height: int, width: int) -> torch.Tensor:
    """(1, 1, height, width) standard-normal image (the cost of every attention here does not depend on content)."""
    return torch.randn(1, 1, height, width, generator=torch.Generator().manual_seed(0))


def ac_token_counts(model: HCT, height: int, width: int) -> list[int]:
    """Tokens seen by each AC block of ``model`` for a ``height x width`` input, recorded during a real forward."""
    counts: list[int] = []
    hooks = [
        module.register_forward_pre_hook(lambda _m, args: counts.append(math.prod(args[0].shape[2:])))
        for module in model.modules()
        if isinstance(module, AttentionConvBlock)
    ]
    try:
        with torch.no_grad():
            model(make_input(height, width))
    finally:
        for hook in hooks:
            hook.remove()
    return counts


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status (peak memory needs Linux procfs).")


def _memory_child(attention: str, ladder: Sequence[tuple[int, int]], threads: int) -> None:
    """Child process: print the peak RSS rise (bytes) of one forward per resolution, ascending, as one JSON list."""
    torch.set_num_threads(threads)
    model = build_model(attention)
    peaks = []
    with torch.no_grad():
        model(make_input(64, 64))  # first-call allocations (thread pools, kernels) are not part of any point
        for height, width in ladder:
            x = make_input(height, width)
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # reset VmHWM to the current RSS
            before = _proc_status_bytes("VmRSS")
            model(x)
            peaks.append(_proc_status_bytes("VmHWM") - before)
            del x
    print(json.dumps(peaks))


def measure_peak_memory(attention: str, ladder: Sequence[tuple[int, int]], threads: int) -> list[int]:
    """Peak RSS rise in bytes of one forward of HCT(attention) per resolution, measured in a fresh child process."""
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": str(threads),
            "MALLOC_MMAP_THRESHOLD_": "65536",  # RSS follows live tensors (freed ones are unmapped at once)
        }
    )
    ladder_arg = ",".join(f"{h}x{w}" for h, w in ladder)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.hct_resolution",
            "--memory-child",
            attention,
            "--ladder",
            ladder_arg,
            "--threads",
            str(threads),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement of {attention} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Slope of log(y) vs log(x) between the first and the last point (1.0: linear, 2.0: quadratic)."""
    return math.log(ys[-1] / ys[0]) / math.log(xs[-1] / xs[0])


def per_doubling_ratios(xs: Sequence[float], ys: Sequence[float]) -> list[float]:
    """Each step's growth of y per doubling of x: (y1/y0) ** (1 / log2(x1/x0)); 2.0 is linear, 4.0 quadratic."""
    return [(y1 / y0) ** (1 / math.log2(x1 / x0)) for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:])]


def measure(
    ladder: Sequence[tuple[int, int]] = LADDER,
    attentions: Sequence[str] = ATTENTIONS,
    repeats: int = 5,
    threads: int = 2,
    log=lambda message: print(message, file=sys.stderr, flush=True),
) -> dict:
    """Time, peak memory and token counts of HCT per attention and resolution, with slopes vs tokens.

    Returns ``{attention: {"points": [...], "time_slope", "memory_slope", "time_per_doubling",
    "memory_per_doubling"}}``; each point has ``height, width, tokens`` (per AC block), ``median_seconds``,
    ``seconds`` (all timed calls) and ``peak_bytes``; exact attention's points add ``attention_weights_bytes``.
    """
    unknown = set(attentions) - set(ATTENTIONS)
    if unknown or not attentions:
        raise ValueError(f"attentions must be a non-empty subset of {ATTENTIONS}, got {list(attentions)}.")
    if len(ladder) < 2 or any(h < 64 or w < 64 for h, w in ladder):
        raise ValueError(f"the ladder needs at least two resolutions of at least 64 x 64, got {list(ladder)}.")
    ladder = sorted(ladder, key=lambda hw: hw[0] * hw[1])

    peaks = {}
    for attention in attentions:
        log(f"peak memory: {attention} (child process)")
        peaks[attention] = measure_peak_memory(attention, ladder, threads)

    torch.set_num_threads(threads)
    models = {attention: build_model(attention) for attention in attentions}
    results: dict[str, dict] = {attention: {"points": []} for attention in attentions}
    for index, (height, width) in enumerate(ladder):
        log(f"timing {height} x {width}")
        x = make_input(height, width)
        with torch.no_grad():
            times = time_round_robin({a: (lambda m=models[a], x=x: m(x)) for a in attentions}, repeats)
        tokens = ac_token_counts(models[attentions[0]], height, width)  # the same for every attention
        for attention in attentions:
            point = {
                "height": height,
                "width": width,
                "tokens": tokens,
                "median_seconds": statistics.median(times[attention]),
                "seconds": times[attention],
                "peak_bytes": peaks[attention][index],
            }
            if attention == "softmax":
                point["attention_weights_bytes"] = HEADS * tokens[0] ** 2 * 4
            results[attention]["points"].append(point)

    for result in results.values():
        tokens = [p["tokens"][0] for p in result["points"]]
        seconds = [p["median_seconds"] for p in result["points"]]
        memory = [p["peak_bytes"] for p in result["points"]]
        result["time_slope"] = loglog_slope(tokens, seconds)
        result["memory_slope"] = loglog_slope(tokens, memory)
        result["time_per_doubling"] = per_doubling_ratios(tokens, seconds)
        result["memory_per_doubling"] = per_doubling_ratios(tokens, memory)
    return results


def print_table(results: dict) -> None:
    print(
        f"{'attention':>17} {'input':>11} {'AC tokens':>22} {'time ms':>9} {'peak MiB':>9} {'x2 time':>8} {'x2 mem':>7}"
    )
    for attention, result in results.items():
        for index, point in enumerate(result["points"]):
            ratios = (
                ("", "")
                if index == 0
                else (
                    f"{result['time_per_doubling'][index - 1]:.2f}",
                    f"{result['memory_per_doubling'][index - 1]:.2f}",
                )
            )
            extra = ""
            if "attention_weights_bytes" in point:
                extra = f"  (attention weights {point['attention_weights_bytes'] / 2**20:.0f} MiB)"
            print(
                f"{attention:>17} {point['height']:>5}x{point['width']:<5} "
                f"{','.join(map(str, point['tokens'])):>22} {point['median_seconds'] * 1e3:9.1f} "
                f"{point['peak_bytes'] / 2**20:9.1f} {ratios[0]:>8} {ratios[1]:>7}{extra}"
            )
        print(f"{'':>17} slope vs tokens: time {result['time_slope']:.2f}, memory {result['memory_slope']:.2f}")


def parse_ladder(text: str) -> list[tuple[int, int]]:
    try:
        ladder = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--ladder wants HxW[,HxW...], got {text!r}") from err
    if any(len(hw) != 2 for hw in ladder):
        raise argparse.ArgumentTypeError(f"--ladder wants HxW[,HxW...], got {text!r}")
    return ladder  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"small ladder {QUICK_LADDER} (used by the tests)")
    parser.add_argument("--ladder", type=parse_ladder, help="resolutions HxW,HxW,... (overrides --quick)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per attention and resolution")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (timing and memory children)")
    parser.add_argument("--attentions", nargs="+", choices=ATTENTIONS, default=list(ATTENTIONS))
    parser.add_argument("--memory-child", choices=ATTENTIONS, help=argparse.SUPPRESS)  # internal: child process
    args = parser.parse_args()
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    ladder = args.ladder or (QUICK_LADDER if args.quick else LADDER)
    if args.memory_child:
        _memory_child(args.memory_child, ladder, args.threads)
        return

    start = time.perf_counter()
    loadavg_start = list(os.getloadavg())
    results = measure(ladder, args.attentions, args.repeats, args.threads)
    print_table(results)
    report = {
        "benchmark": "hct_resolution",
        "_run": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "repeats": args.repeats,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "loadavg_start": loadavg_start,
            "loadavg_end": list(os.getloadavg()),
            "seconds": time.perf_counter() - start,
        },
        "ladder": [list(hw) for hw in sorted(ladder, key=lambda hw: hw[0] * hw[1])],
        "results": results,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()

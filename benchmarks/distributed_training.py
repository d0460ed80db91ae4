# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Data-parallel training speed: 2 ``torchrun`` ranks x 1 thread against 1 process x 2 threads, side by side.

    python -m benchmarks.distributed_training [--family sadnn_seg] [--epochs 6] [--num-samples 4] [--repeats 2]
                                              [--out runs/bench_distributed_training.json]

Both configurations train the same family on the same data (the sample liver datastore's training images,
``example_ct`` and ``example_mr_sm``) with the same global batch: 2 volumes x ``num_samples`` slices per step (1
process: ``train_batch_size`` 2; 2 ranks: 1 each, gradients all-reduced over gloo), for ``epochs`` steps, through
``python -m monailabel_app.train`` (the server's train task). Runs alternate (1, 2, 1, 2, ...) so that load from
other processes on the machine falls on both alike; the median of ``repeats`` is reported.

Reported per configuration: ``train_s`` (the training loop alone, ignite's ``COMPLETED`` time on rank 0),
``slices_per_s`` (global slices / ``train_s``) and ``wall_s`` (the whole command: start-up, data caching,
re-quantisation and publishing included). The last line printed is one JSON object with ``speedup_train``
(1-process ``train_s`` / 2-rank ``train_s``), ``speedup_wall`` and the per-step communication of the scaling model
(``allreduce_bytes_per_step``: every rank sends and receives about 2 (N-1)/N x the gradient bytes in gloo's ring
all-reduce). Then the scaling model (:func:`scaling_model`, also under ``scaling_model``): what each rank computes and
communicates per step, the predicted step time and speed-up of 1..16 machines at a fixed global batch from the
measured per-volume step time, and what limits it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

TRAIN_IMAGES = ("example_ct", "example_mr_sm")


def run_once(
    workers: int, studies: Path, work: Path, family: str, epochs: int, num_samples: int, global_volumes: int = 2
) -> dict[str, Any]:
    """One training run with ``workers`` ranks of cores // ``workers`` threads each; its timings."""
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // workers)
    model_dir = Path(tempfile.mkdtemp(prefix=f"w{workers}_", dir=work))
    out = model_dir / "stats.json"
    command = [
        sys.executable, "-m", "monailabel_app.train",
        "--studies", str(studies), "--model", family, "--conf", "model_dir", str(model_dir),
        "--set", f"max_epochs={epochs}", "--set", f"num_samples={num_samples}",
        "--set", f"train_batch_size={global_volumes // workers}", "--set", "val_split=0",
        "--set", "calibration_slices=8", "--workers", str(workers), "--threads", str(threads), "--output", str(out),
    ]  # fmt: skip
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(REPO_ROOT))
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{workers} rank(s) failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    stats = json.loads(out.read_text())
    steps = int(stats["iterations"])
    slices = steps * global_volumes * num_samples
    return {
        "workers": workers,
        "threads_per_rank": threads,
        "steps": steps,
        "global_slices": slices,
        "train_s": float(stats["train_seconds"]),
        "slices_per_s": slices / float(stats["train_seconds"]),
        "wall_s": wall,
    }


def gradient_bytes(family: str) -> int:
    """Bytes of the gradients one step all-reduces (FP32, every trainable parameter of the family's network)."""
    from monailabel_app.lib.model_store import MODEL_SPECS
    from networks.factory import create_model

    spec = MODEL_SPECS[family]
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in spec.factory_kwargs.items()}
    model = create_model(spec.factory_name, **kwargs)
    return sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)


def scaling_model(
    step_s_per_volume: float,
    grad_bytes: int,
    global_volumes: int = 8,
    link_gbit_s: float = 1.0,
    hop_latency_s: float = 1e-4,
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16),
) -> dict[str, Any]:
    """Predicted step time and speed-up of N ranks (one per machine) over 1, at a fixed global batch.

    Per step every rank (1) computes forward + backward on its share, ``ceil(global_volumes / N)`` volumes, measured
    here as ``step_s_per_volume``; (2) all-reduces the gradients, ``grad_bytes``, in gloo's ring: it sends and
    receives ``2 (N-1)/N x grad_bytes`` in ``2 (N-1)`` hops of ``hop_latency_s`` over a ``link_gbit_s`` link; (3)
    applies the same Adam update as every other rank (no communication). A model, not a measurement.
    """
    predicted = {}
    for n in ranks:
        compute = -(-global_volumes // n) * step_s_per_volume
        communicate = (
            0.0 if n == 1 else 2 * (n - 1) / n * grad_bytes / (link_gbit_s * 1e9 / 8) + 2 * (n - 1) * hop_latency_s
        )
        predicted[n] = {"step_s": compute + communicate, "allreduce_s": communicate}
    base = predicted[ranks[0]]["step_s"]
    for figures in predicted.values():
        figures["speedup"] = base / figures["step_s"]
    return {
        "global_volumes": global_volumes,
        "link_gbit_s": link_gbit_s,
        "hop_latency_s": hop_latency_s,
        "step_s_per_volume": step_s_per_volume,
        "ranks": predicted,
    }


def describe_scaling(model: dict[str, Any], grad_bytes: int) -> str:
    """The scaling model as printed text: what each rank computes and communicates, predictions, what limits it."""
    g = model["global_volumes"]
    rows = ", ".join(
        f"N={n}: {f['step_s']:.2f} s/step ({f['allreduce_s'] * 1e3:.1f} ms all-reduce), {f['speedup']:.2f}x"
        for n, f in model["ranks"].items()
    )
    return (
        "scaling model (one rank per machine, a fixed global batch of "
        f"{g} volumes): per step each of N ranks computes forward + backward on ceil({g}/N) volumes "
        f"({model['step_s_per_volume']:.2f} s per volume, measured above with 2 ranks x 1 thread) and all-reduces "
        f"{grad_bytes / 1e6:.2f} MB of gradients (ring: sends and receives 2(N-1)/N of it in 2(N-1) hops; assumed "
        f"{model['link_gbit_s']:g} Gb/s, {model['hop_latency_s'] * 1e3:g} ms a hop); then every rank applies the same "
        f"Adam update, with no communication.\n  predicted: {rows}\n"
        f"  limits: (1) no more ranks than volumes in the global batch (beyond {g} ranks a step cannot be split "
        "further; raising train_batch_size x ranks changes the training: fewer, larger steps); (2) every step waits "
        "for the slowest rank (a loaded machine, a bigger volume); (3) each rank starts Python, torch and MONAI and "
        "caches its share of the volumes, which short runs do not pay back; (4) the all-reduce grows towards 2x the "
        "gradient bytes per rank plus 2(N-1) hop latencies: negligible next to seconds of CPU computation, it matters "
        "only when a step's computation falls to tens of milliseconds; (5) BatchNorm statistics come from each "
        "rank's own slices (SyncBatchNorm refuses CPU tensors) unless freeze_batchnorm is set."
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="sadnn_seg")
    parser.add_argument("--epochs", type=int, default=6, help="steps per run (one per epoch: 2 volumes, 2 ranks)")
    parser.add_argument("--num-samples", type=int, default=4, help="slices drawn per volume per step")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the summary JSON here")
    args = parser.parse_args(argv)

    from sample_data import build_datastore

    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:
        work = Path(tmp)
        studies = Path(build_datastore(("liver",), work / "liver", image_ids=TRAIN_IMAGES).path)
        runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        for repeat in range(args.repeats):
            for workers in (1, 2):
                run = run_once(workers, studies, work, args.family, args.epochs, args.num_samples)
                runs[workers].append(run)
                print(
                    f"repeat {repeat + 1}: {workers} rank(s) x {run['threads_per_rank']} thread(s): "
                    f"train {run['train_s']:.1f} s ({run['slices_per_s']:.2f} slices/s), wall {run['wall_s']:.1f} s",
                    flush=True,
                )
    keys = ("train_s", "slices_per_s", "wall_s")
    median = {w: {k: statistics.median(r[k] for r in rs) for k in keys} for w, rs in runs.items()}
    grad_bytes = gradient_bytes(args.family)
    summary = {
        "family": args.family,
        "cores": len(os.sched_getaffinity(0)),
        "steps": runs[1][0]["steps"],
        "global_slices_per_step": 2 * args.num_samples,
        "one_process_2_threads": median[1],
        "two_ranks_1_thread": median[2],
        "speedup_train": median[1]["train_s"] / median[2]["train_s"],
        "speedup_wall": median[1]["wall_s"] / median[2]["wall_s"],
        "gradient_bytes": grad_bytes,
        "allreduce_bytes_per_step": {n: round(2 * (n - 1) / n * grad_bytes) for n in (2, 4, 8)},
        "scaling_model": scaling_model(median[2]["train_s"] / runs[2][0]["steps"], grad_bytes),
        "runs": runs,
    }
    print(
        f"{args.family}: 2 ranks x 1 thread vs 1 process x 2 threads, same global batch: training loop "
        f"{summary['speedup_train']:.2f}x, whole command {summary['speedup_wall']:.2f}x; each step all-reduces "
        f"{grad_bytes / 1e6:.1f} MB of gradients"
    )
    print(describe_scaling(summary["scaling_model"], grad_bytes))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))
    return summary


if __name__ == "__main__":
    main()

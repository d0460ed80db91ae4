# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Many annotators, one server: ``/infer`` latency and throughput under 1, 4 and 20 concurrent clients, and ``/info``
latency under that load, on the real server (127.0.0.1), side by side for several serving configurations.

    python -m benchmarks.load [--quick] [--clients 1,4,20] [--rounds 2] [--configs blocking,pool,pool1]
                              [--max-seconds 1200] [--out runs/bench_load.json]

Each configuration runs its own ``monailabel start_server`` on a temporary copy of one sample CT with one model;
the servers run side by side (idle when it is not their turn) and their bursts alternate, so the shared machine's
changing load hits every configuration alike:

- ``blocking``: ``--conf infer_offload false``, MONAI Label's own request handling (inference on the event loop);
- ``pool``: the app's default inference pool (``workers x torch threads`` = cores);
- ``pool1``: one inference worker with all cores' torch threads (FIFO, no concurrency).

For each number of clients N and configuration, ``rounds`` bursts of N simultaneous
``POST /infer/<model>?output=image`` requests are sent (one per client, started together), while another client
polls ``GET /info/`` every 100 ms. Per N it reports p50/p95 request latency, throughput (answers per second over a
burst), non-200 answers and the ``/info`` latency (p50/p99/max), and the ratios ``p50(N) / p50(1)`` (its own and the
blocking server's single-client p50) against the target ``(N + 1) / 2`` (a FIFO server answering one request after
another; a server that answers everyone at the end scores N), and its throughput over the blocking server's. The run
is bounded: no new burst starts after ``--max-seconds``. The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

CONFIGS: dict[str, dict[str, str]] = {
    "blocking": {"infer_offload": "false"},
    "pool": {},
    "pool1": {"infer_workers": "1"},
}


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, linear between order statistics."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class InfoPoller:
    """Polls ``GET /info/`` every ``period`` seconds in a thread and records each latency."""

    def __init__(self, url: str, period: float = 0.1) -> None:
        self.url, self.period = url, period
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                requests.get(self.url + "/info/", timeout=900).raise_for_status()
            except requests.RequestException as err:  # counted as its full wait, then polling goes on
                self.errors.append(str(err))
            self.latencies.append(time.perf_counter() - start)
            self._stop.wait(self.period)

    def __enter__(self) -> InfoPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def burst(url: str, model: str, image: str, clients: int) -> tuple[list[float], list[int], float]:
    """``clients`` simultaneous inferences; ``(latencies, status codes, seconds until the last answer)``."""
    barrier = threading.Barrier(clients)

    def one(_: int) -> tuple[float, int]:
        barrier.wait()
        start = time.perf_counter()
        reply = requests.post(f"{url}/infer/{model}", params={"image": image, "output": "image"}, timeout=900)
        return time.perf_counter() - start, reply.status_code

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients)))
    return [r[0] for r in results], [r[1] for r in results], time.perf_counter() - start


def _row(latencies: list[float], codes: list[int], throughputs: list[float], info: list[float]) -> dict[str, Any]:
    return {
        "requests": len(codes),
        "non_200": sum(1 for c in codes if c != 200),
        "p50_s": round(percentile(latencies, 0.5), 3),
        "p95_s": round(percentile(latencies, 0.95), 3),
        "throughput_per_s": round(statistics.fmean(throughputs), 4) if throughputs else None,
        "info_requests": len(info),
        "info_p50_ms": round(1000 * percentile(info, 0.5), 1),
        "info_p99_ms": round(1000 * percentile(info, 0.99), 1),
        "info_max_ms": round(1000 * max(info, default=float("nan")), 1),
    }


def measure(urls: dict[str, str], model: str, image: str, clients: list[int], rounds: int, deadline: float) -> dict:
    """Figures per configuration and number of clients (see the module docstring). The configurations' servers run
    side by side (idle but one at a time under load): their bursts alternate, so a change in the machine's load
    (it is shared) hits every configuration alike."""
    for url in urls.values():
        requests.post(f"{url}/infer/{model}", params={"image": image, "output": "json"}, timeout=900).raise_for_status()
    figures: dict[str, dict[str, Any]] = {name: {} for name in urls}
    for n in clients:
        samples = {name: ([], [], [], []) for name in urls}  # latencies, codes, throughputs, /info latencies
        for _ in range(rounds if n < 20 else max(1, rounds // 2)):
            if time.monotonic() > deadline and all(samples[name][0] for name in urls):
                break
            for name, url in urls.items():
                with InfoPoller(url) as poller:
                    lat, status, seconds = burst(url, model, image, n)
                ok = [t for t, c in zip(lat, status, strict=True) if c == 200]
                samples[name][0].extend(ok)
                samples[name][1].extend(status)
                samples[name][2].append(len(ok) / seconds)
                samples[name][3].extend(poller.latencies)
        for name in urls:
            figures[name][str(n)] = _row(*samples[name])
            print(f"  {name:>8} {n:>2} clients: {figures[name][str(n)]}", flush=True)
    for rows in figures.values():
        single = rows.get("1", {}).get("p50_s")
        for n, row in rows.items():
            if single:
                row["p50_ratio"] = round(row["p50_s"] / single, 2)
                row["p50_ratio_target"] = (int(n) + 1) / 2
    return figures


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from contextlib import ExitStack

    from monailabel_app.launcher import start_server
    from sample_data.datastore_copy import copy_sample_datastore

    studies = copy_sample_datastore(work / "studies", images=(args.image,))
    deadline = time.monotonic() + args.max_seconds
    with ExitStack() as stack:
        urls, serving = {}, {}
        for name in args.configs:
            conf = {"models": args.model, "model_dir": str(work / "models"), **CONFIGS[name]}
            print(f"{name}: --conf {conf}", flush=True)
            server = stack.enter_context(start_server(studies, conf, log_path=work / f"server_{name}.log"))
            urls[name] = server.url
            serving[name] = requests.get(server.url + "/info/", timeout=60).json().get("serving", {}).get("infer")
        figures = measure(urls, args.model, args.image, args.clients, args.rounds, deadline)
    return {name: {"serving": serving[name], **figures[name]} for name in args.configs}


def summarise(results: dict[str, Any], clients: list[int]) -> dict[str, Any]:
    """Ratios: each configuration's p50(N) over the blocking server's single-client p50 (today's single-request
    latency; the target is (N + 1) / 2), and its throughput over the blocking server's at the same N."""
    summary: dict[str, Any] = {"configs": results}
    blocking = results.get("blocking", {})
    today = blocking.get("1", {}).get("p50_s")
    for name, figures in results.items():
        for n in clients:
            row = figures.get(str(n))
            if not row:
                continue
            if today:
                row["p50_vs_blocking_single"] = round(row["p50_s"] / today, 2)
            base = blocking.get(str(n), {}).get("throughput_per_s")
            if base and row["throughput_per_s"]:
                row["throughput_vs_blocking"] = round(row["throughput_per_s"] / base, 2)
            print(
                f"{name:>8} N={n:>2}: p50 {row['p50_s']:.2f} s = {row.get('p50_ratio', float('nan')):.2f}x its own "
                f"single-client p50, {row.get('p50_vs_blocking_single', float('nan')):.2f}x today's (target <= "
                f"{(n + 1) / 2:.1f}x); p95 {row['p95_s']:.2f} s; {row['throughput_per_s']} answers/s "
                f"({row.get('throughput_vs_blocking', float('nan'))}x today's); /info p50 {row['info_p50_ms']} ms, "
                f"p99 {row['info_p99_ms']} ms, max {row['info_max_ms']} ms; {row['non_200']} non-200"
            )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="clients 1,4,8, one round, the 30-slice CT crop")
    parser.add_argument("--clients", default="1,4,20", help="comma list of concurrent clients")
    parser.add_argument("--rounds", type=int, default=2, help="bursts per number of clients (half for 20+)")
    parser.add_argument("--configs", default="blocking,pool,pool1", help=f"comma list of {list(CONFIGS)}")
    parser.add_argument("--model", default="sadnn_seg_int8")
    parser.add_argument("--image", default="example_ct", help="sample image id (example_ct: 122x101x112)")
    parser.add_argument("--max-seconds", type=float, default=1200.0, help="no new burst after this many seconds")
    parser.add_argument("--out", default=None, help="also write the JSON summary here")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.rounds, args.image = "1,4,8", 1, "example_ct_sm"
    args.clients = [int(c) for c in str(args.clients).split(",") if c.strip()]
    args.configs = [c.strip() for c in str(args.configs).split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown --configs {unknown}; choose from {list(CONFIGS)}")
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        summary = summarise(run(args, Path(tmp)), args.clients)
    summary.update(model=args.model, image=args.image, clients=args.clients, rounds=args.rounds)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Batch inference speed-up of ``--workers N`` over ``--workers 1`` (``python -m monailabel_app.batch_infer``'s
engine), side by side in one run.

    python -m benchmarks.batch_infer [--copies 8] [--image example_ct] [--workers 1,2] [--model sadnn_seg_int8]

Builds a temporary datastore of ``copies`` copies of one sample CT, then labels all of it once per worker count
into a fresh output folder (end to end as a user sees it: worker start-up and model loading included, torch
threads = cores / workers), ``--repeats`` times per worker count in ABBA order. Prints the median seconds, images
per minute end to end and in steady state (between the first and the last finished image: start-up left out), and
the speed-ups over the first worker count; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=8, help="images in the datastore (copies of --image)")
    parser.add_argument("--image", default="example_ct", help="sample image id (example_ct: 122x101x112)")
    parser.add_argument("--workers", default="1,2", help="comma list of worker counts to compare")
    parser.add_argument("--model", default="sadnn_seg_int8")
    parser.add_argument("--repeats", type=int, default=2, help="runs per worker count, in ABBA order (default 2)")
    args = parser.parse_args(argv)
    worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]

    from monailabel_app.lib.batch.runner import run_batch
    from monailabel_app.lib.batch.sources import DatastoreSource
    from monailabel_app.lib.serving.pool import machine_cores
    from sample_data.datastore_copy import copy_sample_datastore

    order = []
    for repeat in range(args.repeats):  # ABBA...: a drift in the shared machine's load hits both alike
        order += worker_counts if repeat % 2 == 0 else list(reversed(worker_counts))
    runs: dict[int, list[dict]] = {w: [] for w in worker_counts}
    with tempfile.TemporaryDirectory(prefix="bench_batch_") as tmp:
        sample = copy_sample_datastore(Path(tmp) / "sample", images=(args.image,))
        studies = Path(tmp) / "studies"
        studies.mkdir()
        for index in range(args.copies):
            shutil.copy2(sample / f"{args.image}.nii.gz", studies / f"{args.image}_{index:03d}.nii.gz")
        for run_index, workers in enumerate(order):
            out = Path(tmp) / f"out_{run_index}"
            finished: list[float] = []
            start = time.perf_counter()
            report = run_batch(
                args.model,
                DatastoreSource(str(studies)),
                out,
                workers=workers,
                on_progress=lambda *_, done=finished: done.append(time.perf_counter()),
            )
            seconds = time.perf_counter() - start
            if report.failed or len(report.done) != args.copies:
                raise RuntimeError(f"workers={workers}: {len(report.done)} done, failed {report.failed}")
            # steady state: images after the first one, over the time between the first and the last answer
            steady = (len(finished) - 1) / (finished[-1] - finished[0]) * 60 if len(finished) > 1 else float("nan")
            first = finished[0] - start
            runs[workers].append({"seconds": seconds, "steady_images_per_min": steady, "first_image_s": first})
            print(
                f"--workers {workers}: {seconds:.1f} s for {args.copies} images (first after {first:.1f} s, then "
                f"{steady:.2f} images/min)",
                flush=True,
            )
    rows = []
    for workers in worker_counts:
        seconds = statistics.median(r["seconds"] for r in runs[workers])
        steady = statistics.median(r["steady_images_per_min"] for r in runs[workers])
        first = statistics.median(r["first_image_s"] for r in runs[workers])
        rows.append(
            {
                "workers": workers,
                "seconds": round(seconds, 2),
                "images_per_min": round(60 * args.copies / seconds, 2),
                "steady_images_per_min": round(steady, 2),
                "first_image_s": round(first, 2),
            }
        )
    base = rows[0]
    for row in rows:
        row["speedup"] = round(base["seconds"] / row["seconds"], 3)
        row["steady_speedup"] = round(row["steady_images_per_min"] / base["steady_images_per_min"], 3)
        print(
            f"--workers {row['workers']}: median {row['seconds']} s, {row['images_per_min']} images/min end to end "
            f"(speed-up {row['speedup']}x), steady {row['steady_images_per_min']} images/min "
            f"(speed-up {row['steady_speedup']}x) over --workers {base['workers']}; first image after "
            f"{row['first_image_s']} s"
        )
    print(
        json.dumps(
            {
                "model": args.model,
                "image": args.image,
                "copies": args.copies,
                "cores": machine_cores(),
                "order": order,
                "runs": rows,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

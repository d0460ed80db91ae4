# Copyright MedAttnSlicer contributors. Apache-2.0.
"""End-to-end ``/infer`` latency of the real MedAttnSlicer MONAI Label server.

    python -m benchmarks.server [--repeats 3] [--threads 2] [--out runs/bench_server.json] [--isa native,avx2]

Starts ``monailabel start_server`` (the app in ``monailabel_app``, bundled weights) on a temporary copy of the sample
CT plus a 512 x 512 x 100 volume resampled from it, then times ``POST /infer/{model}?output=image`` over HTTP for
SaDNN-seg INT8, SaDNN-seg FP32 and the MONAI UNet baseline FP32, side by side in one run (after one warm-up call per
model and image), and records MONAI Label's own latency breakdown (``pre``, ``infer``, ``post``, ``write``,
``total`` from the result JSON, fetched with ``output=json`` in a separate identical call).

The last line printed is one JSON object with at least ``int8_total_s``, ``fp32_total_s``, ``unet_fp32_total_s``
(median end-to-end seconds on the 512 x 512 x 100 volume) and ``overhead_fraction`` (everything but ``infer``, over
the end-to-end total, for INT8 on that volume). Targets: SaDNN-seg INT8 end to end faster than the MONAI UNet FP32,
``overhead_fraction <= 0.35``, and ``int8_total_s <= 0.5 * fp32_total_s``; ``targets_met`` says whether they were.

``--isa native,avx2`` runs the whole benchmark (server included) once per CPU instruction-set class, in a child
process whose environment forces it (:mod:`networks.isa`), and prints the classes side by side; ``isa`` in the
summary says which class a run used.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests
import SimpleITK as sitk

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.isa_runs import isa_list  # noqa: E402

MODELS = ("sadnn_seg_int8", "sadnn_seg_fp32", "unet_seg_fp32")
LARGE_ID = "example_ct_512x512x100"


def resample_to_size(image: sitk.Image, size: tuple[int, int, int]) -> sitk.Image:
    """``image`` resampled (linear) onto a grid of ``size`` voxels covering the same physical extent."""
    old_size = np.array(image.GetSize(), dtype=np.float64)
    old_spacing = np.array(image.GetSpacing(), dtype=np.float64)
    new_spacing = old_size * old_spacing / np.array(size, dtype=np.float64)
    return sitk.Resample(
        image,
        [int(s) for s in size],
        sitk.Transform(),
        sitk.sitkLinear,
        image.GetOrigin(),
        new_spacing.tolist(),
        image.GetDirection(),
        -1024.0,
        sitk.sitkInt16,
    )


def prepare_studies(folder: Path) -> dict[str, dict[str, Any]]:
    """The sample CT and its 512 x 512 x 100 resampling in ``folder``; returns their sizes."""
    from sample_data import build_datastore

    source = Path(build_datastore(("liver",)).path) / "example_ct.nii.gz"
    folder.mkdir(parents=True, exist_ok=True)
    ct = sitk.ReadImage(str(source))
    sitk.WriteImage(sitk.Cast(ct, sitk.sitkInt16), str(folder / "example_ct.nii.gz"), useCompression=True)
    sitk.WriteImage(resample_to_size(ct, (512, 512, 100)), str(folder / f"{LARGE_ID}.nii.gz"), useCompression=True)
    return {
        image_id: {"size": list(sitk.ReadImage(str(folder / f"{image_id}.nii.gz")).GetSize())}
        for image_id in ("example_ct", LARGE_ID)
    }


def time_infer(url: str, model: str, image_id: str) -> tuple[float, int]:
    """Seconds for one ``POST /infer`` returning the label image, and the response size in bytes."""
    start = time.perf_counter()
    r = requests.post(
        f"{url}/infer/{model}",
        params={"image": image_id, "output": "image"},
        files={"params": (None, "{}")},
        timeout=1800,
    )
    elapsed = time.perf_counter() - start
    if r.status_code != 200:
        raise RuntimeError(f"/infer/{model} on {image_id}: HTTP {r.status_code} {r.text[:500]}")
    return elapsed, len(r.content)


def server_latencies(url: str, model: str, image_id: str) -> dict[str, float]:
    r = requests.post(
        f"{url}/infer/{model}",
        params={"image": image_id, "output": "json"},
        files={"params": (None, "{}")},
        timeout=1800,
    )
    if r.status_code != 200:
        raise RuntimeError(f"/infer/{model} on {image_id}: HTTP {r.status_code} {r.text[:500]}")
    lat = r.json()["latencies"]
    return {k: float(lat[k]) for k in ("pre", "infer", "invert", "post", "write", "total")}


def run(repeats: int, threads: int | None, work: Path) -> dict[str, Any]:
    from monailabel_app.launcher import start_server

    images = prepare_studies(work / "studies")
    conf = {"models": ",".join(MODELS), "model_dir": str(work / "models")}
    if threads:
        conf["threads"] = str(threads)
    results: dict[str, Any] = {"images": images, "repeats": repeats, "models": {}}
    with start_server(work / "studies", conf, log_path=work / "server.log") as server:
        for image_id in images:
            for model in MODELS:  # warm-up: model load, first-call allocations
                time_infer(server.url, model, image_id)
        for image_id in images:
            for model in MODELS:
                e2e, breakdowns = [], []
                for _ in range(repeats):
                    seconds, size = time_infer(server.url, model, image_id)
                    e2e.append(seconds)
                    breakdowns.append(server_latencies(server.url, model, image_id))
                median = {k: statistics.median(b[k] for b in breakdowns) for k in breakdowns[0]}
                total = statistics.median(e2e)
                results["models"].setdefault(model, {})[image_id] = {
                    "end_to_end_s": round(total, 3),
                    "end_to_end_all_s": [round(s, 3) for s in e2e],
                    "server_latencies_s": median,
                    "response_bytes": size,
                    "overhead_fraction": round(max(0.0, total - median["infer"]) / total, 4),
                }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per model and image (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="--conf threads for the server (default torch's)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument(
        "--isa", type=isa_list, default=None, help="comma list of instruction-set classes side by side (native,avx2)"
    )
    args = parser.parse_args(argv)
    if args.isa:
        return compare_isas(args.isa, args.out, list(sys.argv[1:] if argv is None else argv))
    from networks.isa import cpu_best_isa, requested_isa

    with tempfile.TemporaryDirectory(prefix="bench_server_") as tmp:
        results = run(args.repeats, args.threads, Path(tmp))
    large = {m: results["models"][m][LARGE_ID] for m in MODELS}
    summary = {
        "int8_total_s": large["sadnn_seg_int8"]["end_to_end_s"],
        "fp32_total_s": large["sadnn_seg_fp32"]["end_to_end_s"],
        "unet_fp32_total_s": large["unet_seg_fp32"]["end_to_end_s"],
        "overhead_fraction": large["sadnn_seg_int8"]["overhead_fraction"],
        "int8_over_fp32": round(large["sadnn_seg_int8"]["end_to_end_s"] / large["sadnn_seg_fp32"]["end_to_end_s"], 4),
        "volume": f"{LARGE_ID} {results['images'][LARGE_ID]['size']}",
        "sample_ct": {m: results["models"][m]["example_ct"]["end_to_end_s"] for m in MODELS},
        "breakdown_s": {m: large[m]["server_latencies_s"] for m in MODELS},
        "cpu_threads": args.threads or os.cpu_count(),
        "isa": requested_isa(),
        "cpu_best_isa": cpu_best_isa(),
        "int8_over_unet_fp32": round(
            large["sadnn_seg_int8"]["end_to_end_s"] / large["unet_seg_fp32"]["end_to_end_s"], 4
        ),
    }
    summary["targets_met"] = {
        "int8<unet_fp32": summary["int8_over_unet_fp32"] < 1.0,
        "overhead_fraction<=0.35": summary["overhead_fraction"] <= 0.35,
        "int8<=0.5*fp32": summary["int8_over_fp32"] <= 0.5,
    }
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"summary": summary, "details": results}, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


def compare_isas(isas: list[str], out: str | None, argv: list[str]) -> int:
    """The benchmark once per class of ``--isa``; prints each class's summary and the ratios to the first."""
    from benchmarks.isa_runs import run_per_isa

    runs = run_per_isa("benchmarks.server", argv, isas)
    summaries = {isa: run["summary"] for isa, run in runs.items()}
    first = summaries[isas[0]]
    for isa in isas[1:]:
        summaries[isa]["int8_total_over_" + isas[0]] = round(summaries[isa]["int8_total_s"] / first["int8_total_s"], 4)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"isas": isas, "summaries": summaries, "runs": runs}, indent=2) + "\n")
    print(json.dumps({"isas": isas, "summaries": summaries}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

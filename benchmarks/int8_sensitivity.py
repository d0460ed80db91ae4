# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Which layers of a bundled network lose INT8 agreement with FP32: the per-layer SQNR report of
:func:`networks.quantization.sensitivity.layer_sensitivity`.

    python -m benchmarks.int8_sensitivity [--families sadnn_seg,sadnn_cls] [--slices 32] [--images calibration]

For each family, the bundled FP32 network (``monailabel_app/model``) is calibrated on slices of the training images
(as ``make requantize`` does, with the family's registry recipe) and, for every INT8 layer, quantised with only
that layer in INT8. The report is measured on the calibration slices by default (``--images calibration``: what a
recipe may be chosen on); ``--images held_out`` measures on slices of the held-out CT instead, to report, never to
choose. The last line printed is one JSON object.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the OpenMP runtime's start (torch import)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from benchmarks.int8_portability import HELD_OUT_IMAGE, TRAIN_IMAGES, slices_of  # noqa: E402
from networks.registry import family_list, get_family, list_families  # noqa: E402

FAMILIES = tuple(family.family for family in list_families() if family.int8 is not None)


def measure_family(family: str, n_slices: int, images: str) -> dict[str, Any]:
    from networks.quantization.sensitivity import format_sensitivity, layer_sensitivity

    start = time.perf_counter()
    model, calibration = slices_of(family, TRAIN_IMAGES, n_slices, seed=0)
    measured = calibration
    if images == "held_out":
        _, measured = slices_of(family, (HELD_OUT_IMAGE,), n_slices, seed=1)
    options = dict(get_family(family).int8.quantize_options)
    rows = layer_sensitivity(model, calibration, measured, **options)
    print(f"[int8_sensitivity] {family} (recipe {options or 'defaults'}, measured on {images}):", file=sys.stderr)
    print(format_sensitivity(rows), file=sys.stderr, flush=True)
    finite = [{k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in row.items()} for row in rows]
    return {
        "recipe": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
        "layers": finite,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--families",
        type=family_list(FAMILIES),
        default="sadnn_seg,sadnn_cls",
        help="comma list of " + ", ".join(FAMILIES),
    )
    parser.add_argument("--slices", type=int, default=32, help="calibration (and measured) slices per family")
    parser.add_argument("--images", choices=("calibration", "held_out"), default="calibration")
    args = parser.parse_args(argv)
    families = args.families
    torch.set_num_threads(2)
    results = {family: measure_family(family, args.slices, args.images) for family in families}
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

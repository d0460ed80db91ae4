# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Does an INT8 artifact give the same quality on every CPU class? Agreement of the bundled networks' INT8 twins with
FP32 for activation widths at the inputs of FBGEMM's INT8 ops, as this CPU computes them and as exact integer
arithmetic (what an AVX-512 VNNI CPU computes) would.

    python -m benchmarks.int8_portability [--families sadnn_seg,unet_seg,...] [--slices 32] [--out results.json]

For each bundled INT8 family (FP32 weights from ``monailabel_app/model``), it calibrates on slices of the training
images and compares INT8 with FP32 on slices of the held-out CT (``example_ct_dicom``; labels and images from the
sample data, TotalSegmentator outputs), for

- ``portable``: 7-bit inputs of FBGEMM's ops, 8-bit outputs (``quantize_int8`` default) on this CPU;
- ``8bit``: 8-bit inputs (``reduce_range=False``, what the bundled artifacts had before) on this CPU: on a CPU
  without VNNI, FBGEMM's int16 pair sums saturate;
- ``portable_exact`` / ``8bit_exact``: the same networks with every FBGEMM op replaced by its exact integer result
  (dequantise, float conv/linear, requantise): what a CPU with VNNI computes.

``portable`` equal to ``portable_exact`` shows the artifact computes the same on both classes; ``8bit`` vs
``8bit_exact`` shows what saturation costs; ``portable_exact`` vs ``8bit_exact`` what the seventh bit costs where
nothing saturates. Run it under ``MEDATTN_ISA=avx2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2`` (see :mod:`networks.isa`) on an
AVX-512 machine to see the AVX2 class there. The last line printed is one JSON object.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the OpenMP runtime's start (torch import)

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.ao.nn.quantized as nnq  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from networks.registry import family_list, get_family, list_families  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED = REPO_ROOT / "monailabel_app" / "model"
FAMILIES = tuple(family.family for family in list_families() if family.int8 is not None)  # served in INT8
TRAIN_IMAGES = ("example_ct", "example_mr_sm")
HELD_OUT_IMAGE = "example_ct_dicom"


class ExactIntegerOp(nn.Module):
    """An FBGEMM quantized conv/linear computed exactly: ``quantize(float_op(dequantize(x), dequantize(W)) + b)``.

    A CPU with VNNI sums the u8 x s8 products in int32 without saturation, so this is its result (up to float
    rounding of the requantisation)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, xq: torch.Tensor) -> torch.Tensor:
        m = self.module
        x, weight, bias = xq.dequantize(), m.weight().dequantize(), m.bias()
        if isinstance(m, nnq.Linear):
            y = F.linear(x, weight, bias)
        else:
            conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight.ndim - 2]
            if m.padding_mode != "zeros":
                raise ValueError(f"exact emulation supports zero padding only, got {m.padding_mode}")
            y = conv(x, weight, bias, m.stride, m.padding, m.dilation, m.groups)
        return torch.quantize_per_tensor(y, float(m.scale), int(m.zero_point), torch.quint8)


def exact_twin(qmodel: nn.Module) -> nn.Module:
    """Copy of an INT8 network (from ``quantize_int8``) whose FBGEMM ops are :class:`ExactIntegerOp`."""
    twin = copy.deepcopy(qmodel)
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nnq.Linear)):
                setattr(parent, name, ExactIntegerOp(child))
    return twin


def slices_of(family: str, image_ids: tuple[str, ...], n_slices: int, seed: int) -> tuple[nn.Module, list]:
    """The family's bundled FP32 network and ``n_slices`` preprocessed slices (about half with the organ) of the
    sample images, in batches of 8."""
    from monailabel.datastore.local import LocalDatastore

    from monailabel_app.lib.preprocess import Preprocessing
    from monailabel_app.lib.trainers.common import calibration_slices
    from monailabel_app.train_bundled import build_datastores
    from networks.checkpoint import load_checkpoint

    model, metadata = load_checkpoint(BUNDLED / f"{family}.pt")
    prep = Preprocessing.from_dict(metadata["app"]["preprocess"])
    organs = get_family(family).labels
    work = REPO_ROOT / "runs" / "int8_portability"
    train_dir, held_dir = build_datastores(work, organs)
    store = LocalDatastore(
        str(held_dir if image_ids == (HELD_OUT_IMAGE,) else train_dir),
        extensions=("*.nii.gz",),
        auto_reload=False,
    )
    datalist = [
        {"image": store.get_image_uri(i), "label": store.get_label_uri(i, "final")}
        for i in sorted(store.get_labeled_images())
        if i in image_ids
    ]
    batches, _ = calibration_slices(datalist, prep, list(range(1, len(organs) + 1)), n_slices=n_slices, seed=seed)
    return model.eval(), batches


def measure_family(family: str, n_slices: int) -> dict[str, Any]:
    from networks.quantization import prediction_agreement, quantize_int8

    start = time.perf_counter()
    model, calibration = slices_of(family, TRAIN_IMAGES, n_slices, seed=0)
    _, held_out = slices_of(family, (HELD_OUT_IMAGE,), n_slices, seed=1)
    result: dict[str, Any] = {}
    for label, reduce_range in (("portable", True), ("8bit", False)):
        qmodel = quantize_int8(model, calibration, reduce_range=reduce_range)
        for suffix, network in (("", qmodel), ("_exact", exact_twin(qmodel))):
            figures = prediction_agreement(model, network, held_out)
            result[label + suffix] = {
                key: round(float(figures[key]), 4)
                for key in ("dice", "prediction_agreement", "max_abs_logit_diff", "mean_abs_logit_diff")
            }
    result["held_out_slices"] = sum(len(b) for b in held_out)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    from networks.isa import cpu_best_isa, fbgemm_saturates, requested_isa

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--families",
        type=family_list(FAMILIES),
        default=",".join(FAMILIES),
        help="comma list of " + ", ".join(FAMILIES),
    )
    parser.add_argument("--slices", type=int, default=32, help="calibration and held-out slices per family")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    families = args.families
    torch.set_num_threads(2)
    results: dict[str, Any] = {}
    for family in families:
        print(f"[int8_portability] {family}", file=sys.stderr, flush=True)
        results[family] = measure_family(family, args.slices)
        row = "  ".join(f"{k} {v['dice']:.4f}" for k, v in results[family].items() if isinstance(v, dict))
        print(f"[int8_portability] {family}: agreement Dice {row}", file=sys.stderr, flush=True)
    results["_run"] = {
        "isa": requested_isa(),
        "cpu_best_isa": cpu_best_isa(),
        "fbgemm_saturates": fbgemm_saturates(),
        "fbgemm_enable_instructions": os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS"),
        "torch": torch.__version__,
        "labels_are": "TotalSegmentator model outputs, not manual ground truth (agreement needs no label)",
    }
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

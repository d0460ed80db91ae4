# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Build the ``medattn`` op library into the kernel cache: ``python -m networks.kernels.build``.

Run by ``make setup`` (as ``python networks/kernels/build.py``, which skips importing the ``networks`` package and
returns in well under a second when the library is up to date). Compiles once per sources / flags / torch / Python
version (concurrent runs compile once), prints where the library is and which code path this CPU will use.
Options: ``--json`` prints one JSON object instead (path, build_seconds, implementations); ``--check`` also loads
the library and runs both cores on a tiny input (always done after a fresh build).
"""

from __future__ import annotations

import argparse
import json
import sys

if __package__:
    from . import _library
else:  # run as a script: networks/kernels/build.py
    import _library  # type: ignore[import-not-found,no-redef]


def _cpu_best_isa() -> str:
    """networks/isa.py's answer, loaded by path: importing the ``networks`` package would import torch (seconds)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_medattn_isa", Path(__file__).resolve().parents[1] / "isa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cpu_best_isa()


def _load_and_check(path: str) -> dict:
    """Load the library in this process, run both cores once and return what ``implementations()`` reports."""
    import warnings

    import torch

    torch.ops.load_library(path)
    report = dict(item.split("=", 1) for item in torch.ops.medattn.implementations())
    q = torch.randn(1, 4, 5, 6)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notice of quantize_per_tensor
        torch.ops.medattn.local_attention(q, q, q, torch.zeros(9, 4), 3, 1)
        qq = torch.quantize_per_tensor(q, 0.05, 128, torch.quint8)
        torch.ops.medattn.local_attention_int8(qq, qq, qq, torch.zeros(9, 4), 3, 1)
    return {key: value.split(",") if key == "available_isas" else value for key, value in report.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object (path, build_seconds, ...)")
    parser.add_argument("--check", action="store_true", help="load the library and run both cores once")
    args = parser.parse_args(argv)

    try:
        path, seconds = _library.build_library()
    except RuntimeError as error:
        print(error, file=sys.stderr)
        return 1
    implementations = None
    if args.check or args.json or seconds is not None:
        implementations = _load_and_check(str(path))
    if args.json:
        print(json.dumps({"path": str(path), "build_seconds": seconds, "implementations": implementations}))
        return 0
    state = f"built in {seconds:.1f} s" if seconds is not None else "up to date"
    print(f"medattn kernels {state}: {path}")
    if implementations is not None:
        print(
            f"medattn kernels: this CPU runs the {implementations['selected_isa']} code path (available: "
            f"{', '.join(implementations['available_isas'])})"
        )
    else:
        print(
            f"medattn kernels: this CPU gets the {_cpu_best_isa()} code path (from /proc/cpuinfo; "
            f"MEDATTN_ISA=avx2|portable forces a lower one)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

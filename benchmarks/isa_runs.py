# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Run a benchmark once per CPU instruction-set class, side by side, for its ``--isa native,avx2`` option.

Which instructions FBGEMM, ATen and our kernels use is fixed when each library starts, so each class runs the same
benchmark command in a child process whose environment forces it (:func:`networks.isa.isa_environment`); the
classes run one after the other on the same machine, and each child's JSON result is collected.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from networks.isa import isa_environment

REPO_ROOT = Path(__file__).resolve().parents[1]


def isa_list(text: str) -> list[str]:
    """The ``--isa`` option's type: ``"native,avx2"`` -> ``["native", "avx2"]``, each checked against this CPU
    (``argparse.ArgumentTypeError`` with the reason otherwise, which argparse reports as a usage error)."""
    isas = [item.strip().lower() for item in text.split(",") if item.strip()]
    if not isas:
        raise argparse.ArgumentTypeError("needs at least one class, e.g. native,avx2")
    for isa in isas:
        try:
            isa_environment(isa)  # raises for an unknown class or one above this CPU
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err
    return isas


def run_per_isa(module: str, argv: list[str], isas: list[str]) -> dict[str, Any]:
    """``python -m module *argv --out FILE`` once per class in ``isas`` (``argv`` without its own ``--isa`` and
    ``--out``); returns ``{isa: that run's JSON}``.

    Raises:
        RuntimeError: a child failed (its exit code and the end of its stderr are in the message).
    """
    argv = _strip_option(_strip_option(argv, "--isa"), "--out")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="medattn_isa_runs_") as tmp:
        for isa in isas:
            out = Path(tmp) / f"{isa}.json"
            print(f"[{module}] running with the {isa} instruction-set class", file=sys.stderr, flush=True)
            completed = subprocess.run(
                [sys.executable, "-m", module, *argv, "--out", str(out)],
                env=isa_environment(isa),
                cwd=REPO_ROOT,
                stdout=subprocess.DEVNULL,
                stderr=None,  # the child's progress shows as it runs
                check=False,
            )
            if completed.returncode != 0 or not out.is_file():
                raise RuntimeError(f"{module} under --isa {isa} failed with exit code {completed.returncode}")
            results[isa] = json.loads(out.read_text())
    return results


def _strip_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option`` and its value (``--isa x`` or ``--isa=x``)."""
    kept: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == option:
            skip = True
            continue
        if item.startswith(option + "="):
            continue
        kept.append(item)
    return kept

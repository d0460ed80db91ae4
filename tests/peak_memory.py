# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Peak memory of one step, measured in a fresh interpreter so that nothing else of the test process counts.

Linux keeps the peak resident set size (VmHWM); writing "5" to /proc/self/clear_refs resets it to the current RSS.
A script run by :func:`run_measuring_script` can call ``growth_during(step)``: the peak RSS after ``step()`` minus
the RSS just before it. Where clear_refs is not writable, ru_maxrss (the lifetime peak) is used instead, which can
only overestimate the growth; the method used (``VMHWM`` or ``"ru_maxrss"``) is returned with it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

__all__ = ["VMHWM", "run_measuring_script"]

VMHWM = "VmHWM after clear_refs"

# prepended to every script: standard library only
_HELPERS = f'''
import resource

VMHWM = {VMHWM!r}


def status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key + " missing from /proc/self/status")


def growth_during(step):
    """(bytes the peak RSS rose by while step() ran, step's result, the method: VMHWM or "ru_maxrss")."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = VMHWM
    except OSError:
        method = "ru_maxrss"
    baseline = status_bytes("VmRSS")
    result = step()
    if method == "ru_maxrss":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    else:
        peak = status_bytes("VmHWM")
    return peak - baseline, result, method

'''


def run_measuring_script(script: str, *args: str, env: dict[str, str], timeout: float) -> str:
    """The standard output of ``python -c script args`` with ``growth_during`` defined, run in the repository with
    it on the module path; ``env`` is the script's whole environment (besides ``PYTHONPATH``). It must exit 0."""
    result = subprocess.run(
        [sys.executable, "-c", _HELPERS + script, *args],
        cwd=REPO_ROOT,
        env={**env, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout

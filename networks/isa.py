# Copyright MedAttnSlicer contributors. Apache-2.0.
"""x86 instruction-set classes that decide how INT8 runs, and how to force a lower class for a test or a benchmark.

Two classes of hospital CPU matter for INT8 inference:

- ``avx512_vnni``: AVX-512 (F, BW, DQ, VL) with VNNI (``vpdpbusd``: u8 x s8 products summed exactly in int32) and VBMI;
- ``avx2``: AVX2 + FMA without VNNI (Intel Core before 12th gen, AMD before Zen 4). FBGEMM multiplies u8 x s8 there
  with ``vpmaddubsw``, which adds each pair of products in a *saturating* int16: with 8-bit activations a 1x1 conv
  64->64 on post-ReLU inputs was off by up to 8 % of its output range. With 7-bit activations (0..127) a pair is
  at most 2 * 127 * 128 = 32512 < 32767, so it never saturates and both classes compute the same integers.

``portable`` is the plain C++ path of the project's own kernels (any x86-64 CPU).

Which path runs is decided where a network runs, not where its artifact was made. Three switches force a lower one:
``MEDATTN_ISA`` (the project's kernels, :mod:`networks.kernels`), ``FBGEMM_ENABLE_INSTRUCTIONS`` (FBGEMM's INT8
convolutions and linears) and ``ATEN_CPU_CAPABILITY`` (PyTorch's own float kernels). They are read when each library
first starts, so they are set for a new process: :func:`isa_environment` gives that process's environment.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

__all__ = [
    "ISA_CLASSES",
    "ISA_OVERRIDE_ENV",
    "cpu_best_isa",
    "cpu_flags",
    "cpu_has_vnni",
    "fbgemm_saturates",
    "isa_environment",
    "requested_isa",
]

# best first
ISA_CLASSES = ("avx512_vnni", "avx2", "portable")
ISA_OVERRIDE_ENV = "MEDATTN_ISA"

# what each class sets for FBGEMM and ATen ("native": nothing forced)
_FBGEMM_INSTRUCTIONS = {"avx512_vnni": "AVX512_E1", "avx2": "AVX2"}
_ATEN_CAPABILITY = {"avx512_vnni": "avx512", "avx2": "avx2", "portable": "default"}
_FORCING_VARIABLES = (ISA_OVERRIDE_ENV, "FBGEMM_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of this machine (``/proc/cpuinfo``); empty where that file cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_best_isa(flags: frozenset[str] | None = None) -> str:
    """The best class this CPU (or the given flag set) supports: ``avx512_vnni``, ``avx2`` or ``portable``."""
    flags = cpu_flags() if flags is None else flags
    # Linux spells these "avx512_vnni" but "avx512vbmi"; accept either spelling of each
    flags = (
        flags
        | {name.replace("avx512_", "avx512") for name in flags}
        | {name.replace("avx512", "avx512_", 1) for name in flags if name.startswith("avx512") and "_" not in name}
    )
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512vbmi"} <= flags:
        return "avx512_vnni"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "portable"


def cpu_has_vnni() -> bool:
    """Whether this CPU has AVX512-VNNI / AVX-VNNI / AMX (INT8 dot products without 16-bit saturation)."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def requested_isa(environ: Mapping[str, str] | None = None) -> str:
    """The class the project's kernels run in this process: ``$MEDATTN_ISA`` if set (``native`` or empty means the
    CPU's best), else the CPU's best.

    Raises:
        ValueError: an unknown class name, or one this CPU lacks.
    """
    environ = os.environ if environ is None else environ
    requested = environ.get(ISA_OVERRIDE_ENV, "").strip().lower()
    best = cpu_best_isa()
    if requested in ("", "native"):
        return best
    if requested not in ISA_CLASSES:
        raise ValueError(f"{ISA_OVERRIDE_ENV}={requested!r} is not one of native, {', '.join(ISA_CLASSES)}")
    if ISA_CLASSES.index(requested) < ISA_CLASSES.index(best):
        raise ValueError(f"{ISA_OVERRIDE_ENV}={requested} asks for more than this CPU has (its best is {best})")
    return requested


def fbgemm_saturates(environ: Mapping[str, str] | None = None) -> bool:
    """Whether FBGEMM's INT8 dot products saturate in int16 in this process: no VNNI, or forced down to AVX2."""
    environ = os.environ if environ is None else environ
    forced = environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").strip().upper()
    if forced in ("AVX2", "AVX512"):  # AVX512 without the _E1 (VNNI) extension multiplies like AVX2
        return True
    return not cpu_has_vnni()


def isa_environment(isa: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a child process that runs as a CPU of class ``isa`` would: ``native`` (the CPU's best, nothing
    forced), ``avx512_vnni``, ``avx2`` (our kernels, FBGEMM and ATen all on AVX2) or ``portable`` (our kernels' plain
    C++ path and ATen's default kernels; FBGEMM needs AVX2 and keeps the CPU's best).

    Raises:
        ValueError: an unknown class, or one above this CPU's best.
    """
    env = dict(os.environ if base is None else base)
    for name in _FORCING_VARIABLES:
        env.pop(name, None)
    isa = isa.strip().lower()
    if isa == "native":
        return env
    requested_isa({ISA_OVERRIDE_ENV: isa})  # validates the name against this CPU
    env[ISA_OVERRIDE_ENV] = isa
    env["ATEN_CPU_CAPABILITY"] = _ATEN_CAPABILITY[isa]
    if isa in _FBGEMM_INSTRUCTIONS:
        env["FBGEMM_ENABLE_INSTRUCTIONS"] = _FBGEMM_INSTRUCTIONS[isa]
    return env

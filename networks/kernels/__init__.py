# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Fused C++ cores of local self-attention (FP32 and INT8), registered as the torch custom ops ``torch.ops.medattn.*``.

The library is built once per machine in set-up (``make setup`` runs ``python -m networks.kernels.build``), never at
request time: :func:`load_kernels` only loads it and raises a RuntimeError naming that command if it is missing. It
is cached in ``$MEDATTN_KERNELS_CACHE`` or ``~/.cache/medattn_kernels/<hash>/`` keyed by the sources, flags,
compiler, torch and Python versions (see :mod:`networks.kernels._library`; concurrent builds compile once under an
``fcntl`` lock and publish with an atomic rename).

The library is portable across x86-64 machines: it is compiled without ``-march`` and holds three code paths, chosen
once per process by CPUID: ``portable`` (baseline C++), ``avx2`` (AVX2 + FMA, 8 lanes; the INT8 core on int16
``vpmaddwd``) and ``avx512_vnni`` (AVX-512 F/BW/VNNI/VBMI, 16 lanes; the INT8 core on ``vpdpbusd``). The environment
variable ``MEDATTN_ISA`` = ``avx512_vnni`` | ``avx2`` | ``portable`` forces a path (unset, empty or ``native``: the
best available); naming one the CPU lacks raises a RuntimeError instead of crashing on an illegal instruction.
:func:`kernel_implementations` reports the choice; ``torch.ops.medattn._local_attention_isa`` /
``_local_attention_int8_isa`` run one named path (tests, benchmarks).

Because the ops are registered with ``TORCH_LIBRARY``, modules that call them can be scripted or traced and the
saved TorchScript file loads in any process that has run ``torch.ops.load_library(kernel_library_path())``.

Both cores compute, for every pixel ``p`` and head ``h`` (contiguous blocks of ``C / heads`` channels)::

    logit[h, n] = sum_{c in h} q[c, p] * (kpad[c, p + n] + rel[n, c]);   w = softmax_n(logit)
    y[c, p]     = sum_n w[h(c), n] * vpad[c, p + n]

with ``kpad`` / ``vpad`` zero outside the image, exactly like
:func:`networks.blocks.local_self_attention.local_attention_torch`. They are inference only.
"""

from __future__ import annotations

import threading

import torch

from . import _library

__all__ = [
    "build_kernels",
    "kernel_implementations",
    "kernel_library_path",
    "last_build_seconds",
    "load_kernels",
    "local_attention_fused",
    "local_attention_fused_int8",
]

_load_lock = threading.Lock()
_library_path: str | None = None
_build_seconds: float | None = None


def build_kernels() -> float | None:
    """Build the op library into the cache unless it is there (1-2 min on 2 shared cores; concurrent callers
    compile once). Returns the seconds spent compiling, None when it was already built. Set-up work: servers and
    tests only load (:func:`load_kernels`)."""
    global _build_seconds
    _, seconds = _library.build_library()
    if seconds is not None:
        _build_seconds = seconds
    return seconds


def _ops_registered() -> bool:
    try:
        torch.ops.medattn.local_attention  # noqa: B018 -- attribute lookup resolves the op or raises
    except (AttributeError, RuntimeError):
        return False
    return True


def load_kernels() -> None:
    """Load the prebuilt ``medattn`` op library, once per process (never compiles).

    Raises:
        RuntimeError: the library for these sources / torch / Python is not built (run ``make setup`` or
            ``python -m networks.kernels.build``), or ``MEDATTN_ISA`` names a code path this CPU lacks.
    """
    global _library_path
    if _library_path is not None:
        return
    with _load_lock:
        if _library_path is not None:
            return
        target = _library.library_path()
        if not _ops_registered():
            if not target.is_file():
                raise RuntimeError(
                    f"the medattn kernel library is not built for this checkout, torch and Python (expected at "
                    f"{target}); {_library.BUILD_HINT}"
                )
            torch.ops.load_library(str(target))
        torch.ops.medattn.implementations()  # raises now, not at the first call, if MEDATTN_ISA cannot be honoured
        _library_path = str(target)


def kernel_library_path() -> str:
    """Path of the compiled op library (loading it), for ``torch.ops.load_library`` in other processes."""
    load_kernels()
    assert _library_path is not None
    return _library_path


def last_build_seconds() -> float | None:
    """Wall time of the compilation done by :func:`build_kernels` in this process, or None (none done)."""
    return _build_seconds


def kernel_implementations() -> dict[str, str | list[str]]:
    """What runs in this process, e.g. ``{"fp32": "avx2", "int8": "avx2", "selected_isa": "avx2",
    "cpu_best_isa": "avx2", "available_isas": ["portable", "avx2"]}`` ("fp32" / "int8": the code path of each core,
    "available_isas": every path this CPU can run, lowest first)."""
    load_kernels()
    report: dict[str, str | list[str]] = {}
    for item in torch.ops.medattn.implementations():
        key, value = item.split("=", 1)
        report[key] = value.split(",") if key == "available_isas" else value
    return report


def local_attention_fused(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel: torch.Tensor, kernel_size: int, heads: int
) -> torch.Tensor:
    """Fused FP32 local self-attention core (inference only), same contract as ``local_attention_torch``.

    Args:
        q: queries ``(B, C, *spatial)`` float32 with 2 or 3 spatial dims (contiguous NC[D]HW is read in place).
        k: keys, same shape as ``q``.
        v: values, same shape as ``q``.
        rel: relative embeddings ``(K, C)`` float32, ``K = kernel_size ** spatial_dims``, row-major offsets.
        kernel_size: odd window size along every axis.
        heads: number of heads (contiguous channel blocks of ``C / heads``).

    Returns:
        ``(B, C, *spatial)`` float32, contiguous.

    Raises:
        RuntimeError: wrong shapes or dtypes, or an input requires grad while grad mode is on.
    """
    if not torch.jit.is_scripting():
        load_kernels()
    return torch.ops.medattn.local_attention(q, k, v, rel, kernel_size, heads)


def local_attention_fused_int8(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel: torch.Tensor,
    kernel_size: int,
    heads: int,
    out_scale: torch.Tensor | None = None,
    out_shift: torch.Tensor | None = None,
    relu: bool = False,
) -> torch.Tensor:
    """Fused INT8 local self-attention core on quantized q, k, v (inference only), with an optional per-channel
    epilogue ``relu?(out_scale * y + out_shift)`` applied while storing (a folded BatchNorm -> ReLU).

    ``q . k`` and the weighted value sum run in integer arithmetic (VNNI on the raw bytes, or AVX2 ``vpmaddwd`` on
    zero-point-free int16), ``q . rel`` uses a
    16-bit fixed-point copy of ``rel``, the softmax runs in float and its weights are rounded to 8 bits relative to
    the largest weight (see ``csrc/local_attention_int8.cpp``).

    Args:
        q: ``torch.quint8`` per-tensor affine ``(B, C, *spatial)``, 2 or 3 spatial dims; channels-last (the layout
            of FBGEMM/x86 quantized conv outputs) is read without a copy, other layouts are repacked once.
        k: keys, same shape, quint8 per-tensor affine (own scale / zero point).
        v: values, same shape, quint8 per-tensor affine.
        rel: relative embeddings ``(K, C)`` float32.
        kernel_size: odd window size along every axis.
        heads: number of heads.
        out_scale: optional float32 ``(C,)`` multiplied into the output channels (None: 1).
        out_shift: optional float32 ``(C,)`` added after the scale (None: 0).
        relu: apply ReLU last.

    Returns:
        ``(B, C, *spatial)`` float32 in channels-last memory format (the layout the next layer's quantized
        projections read; ``.contiguous()`` gives NC[D]HW).

    Raises:
        RuntimeError: q, k or v not quint8 per-tensor affine, wrong shapes, out_scale/out_shift not float32 with C
            values, or grad required with grad mode on.
    """
    if not torch.jit.is_scripting():
        load_kernels()
    return torch.ops.medattn.local_attention_int8(q, k, v, rel, kernel_size, heads, out_scale, out_shift, relu)

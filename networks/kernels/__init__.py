# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Fused C++ cores of local self-attention (FP32 and INT8), registered as the torch custom ops ``torch.ops.medattn.*``.

The library is compiled just in time with ``torch.utils.cpp_extension`` (``-O3 -march=native -fopenmp``; AVX-512
VNNI code paths where the machine has them, plain C++ elsewhere) into a cache directory
``$MEDATTN_KERNELS_CACHE`` or ``~/.cache/medattn_kernels/<hash>/`` keyed by the sources, flags, torch and Python
versions and the CPU flags, and loaded once per process by :func:`load_kernels`. Concurrent builds are safe: the
builder holds an ``fcntl`` lock per hash, compiles into a private temporary directory in a child process and moves
the finished library into place with an atomic rename.

Because the ops are registered with ``TORCH_LIBRARY``, modules that call them can be scripted or traced and the
saved TorchScript file loads in any process that has run ``torch.ops.load_library(kernel_library_path())``.

Both cores compute, for every pixel ``p`` and head ``h`` (contiguous blocks of ``C / heads`` channels)::

    logit[h, n] = sum_{c in h} q[c, p] * (kpad[c, p + n] + rel[n, c]);   w = softmax_n(logit)
    y[c, p]     = sum_n w[h(c), n] * vpad[c, p + n]

with ``kpad`` / ``vpad`` zero outside the image, exactly like
:func:`networks.blocks.local_self_attention.local_attention_torch`. They are inference only.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from typing import Optional

import torch

__all__ = [
    "kernel_implementations",
    "kernel_library_path",
    "last_build_seconds",
    "load_kernels",
    "local_attention_fused",
    "local_attention_fused_int8",
]

_LIBRARY_NAME = "medattn_kernels"
_SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
_SOURCES = ("medattn_ops.cpp", "local_attention_fp32.cpp", "local_attention_int8.cpp")
_HEADERS = ("local_attention.h", "simd_math.h")
_CFLAGS = ("-O3", "-march=native", "-fopenmp")
_LDFLAGS = ("-fopenmp",)

_load_lock = threading.Lock()
_library_path: str | None = None
_build_seconds: float | None = None


def _cache_root() -> Path:
    configured = os.environ.get("MEDATTN_KERNELS_CACHE")
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "medattn_kernels"


def _cpu_flags() -> str:
    """The CPU feature flags: ``-march=native`` code must not be reused on a machine with fewer features."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build_key() -> str:
    digest = hashlib.sha256()
    for name in _SOURCES + _HEADERS:
        digest.update(name.encode())
        digest.update((_SOURCE_DIR / name).read_bytes())
    for item in (
        _CFLAGS,
        _LDFLAGS,
        torch.__version__,
        sys.version_info[:2],
        platform.machine(),
        os.environ.get("CXX", "c++"),
        _cpu_flags(),
    ):
        digest.update(repr(item).encode())
    return digest.hexdigest()[:20]


_BUILD_SCRIPT = """
import json, sys
from torch.utils.cpp_extension import load
args = json.loads(sys.argv[1])
load(name=args["name"], sources=args["sources"], extra_cflags=args["cflags"], extra_ldflags=args["ldflags"],
     build_directory=args["build_directory"], is_python_module=False, verbose=False)
"""


def _build(target: Path) -> float:
    """Compile the library into ``target`` (atomic rename from a private build directory); returns seconds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(prefix=f"{target.parent.name}.build-", dir=target.parent.parent))
    try:
        args = {
            "name": _LIBRARY_NAME,
            "sources": [str(_SOURCE_DIR / name) for name in _SOURCES],
            "cflags": list(_CFLAGS),
            "ldflags": list(_LDFLAGS),
            "build_directory": str(build_dir),
        }
        start = time.perf_counter()
        # A child process compiles (and test-loads) the library, so this process loads only the final copy.
        result = subprocess.run(
            [sys.executable, "-c", _BUILD_SCRIPT, json.dumps(args)], capture_output=True, text=True, check=False
        )
        seconds = time.perf_counter() - start
        built = build_dir / f"{_LIBRARY_NAME}.so"
        if result.returncode != 0 or not built.is_file():
            log = (result.stdout + result.stderr)[-6000:]
            raise RuntimeError(f"building the medattn kernels failed (exit code {result.returncode}):\n{log}")
        os.replace(built, target)
        return seconds
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)


def _ops_registered() -> bool:
    try:
        torch.ops.medattn.local_attention  # noqa: B018 -- attribute lookup resolves the op or raises
    except (AttributeError, RuntimeError):
        return False
    return True


def load_kernels() -> None:
    """Build (first use on this machine: 20-40 s on 2 cores) and load the ``medattn`` op library, once per process.

    Raises:
        RuntimeError: the compiler failed (the message carries the end of the build log).
    """
    global _library_path, _build_seconds
    if _library_path is not None:
        return
    with _load_lock:
        if _library_path is not None:
            return
        key = _build_key()
        target = _cache_root() / key / f"{_LIBRARY_NAME}.so"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target.parent.with_name(f"{key}.lock"), "w") as lock_file:
                fcntl.flock(lock_file, fcntl.LOCK_EX)  # released by the kernel even if this process dies
                try:
                    if not target.is_file():  # another process may have finished it while we waited
                        _build_seconds = _build(target)
                finally:
                    fcntl.flock(lock_file, fcntl.LOCK_UN)
        if not _ops_registered():
            torch.ops.load_library(str(target))
        _library_path = str(target)


def kernel_library_path() -> str:
    """Path of the compiled op library (building it if needed), for ``torch.ops.load_library`` in other processes."""
    load_kernels()
    assert _library_path is not None
    return _library_path


def last_build_seconds() -> float | None:
    """Wall time of the compilation done by this process, or None when the library came from the cache."""
    return _build_seconds


def kernel_implementations() -> dict[str, str]:
    """Code path of each core on this build, e.g. ``{"fp32": "avx512", "int8": "avx512_vnni"}`` (or "portable")."""
    load_kernels()
    return dict(item.split("=", 1) for item in torch.ops.medattn.implementations())


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
    out_scale: Optional[torch.Tensor] = None,
    out_shift: Optional[torch.Tensor] = None,
    relu: bool = False,
) -> torch.Tensor:
    """Fused INT8 local self-attention core on quantized q, k, v (inference only), with an optional per-channel
    epilogue ``relu?(out_scale * y + out_shift)`` applied while storing (a folded BatchNorm -> ReLU).

    ``q . k`` and the weighted value sum run in integer arithmetic on the raw bytes (VNNI), ``q . rel`` uses a
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

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Where the ``medattn`` op library lives and how it is built. Deliberately free of torch imports (the torch version
comes from the package metadata), so that ``make setup`` can check that the library is up to date in a fraction of a
second; the compiler runs in a child process that imports ``torch.utils.cpp_extension``.

The library is portable: it is compiled for baseline x86-64 (``-O3 -fopenmp``, no ``-march``) and carries AVX2 and
AVX-512 VNNI code paths in translation units compiled with target pragmas, chosen at run time by CPUID. The cache
key therefore covers the sources, flags, compiler, torch and Python versions but not the CPU.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LIBRARY_NAME = "medattn_kernels"
SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
SOURCES = (
    "medattn_ops.cpp",
    "isa.cpp",
    "local_attention_fp32.cpp",
    "local_attention_fp32_avx2.cpp",
    "local_attention_fp32_avx512.cpp",
    "local_attention_int8.cpp",
    "local_attention_int8_avx2.cpp",
    "local_attention_int8_avx512.cpp",
)
HEADERS = ("local_attention.h", "isa_kernels.h", "simd_math.h")
# -ffp-contract=off: no multiply-add is fused unless the code asks for it with an FMA intrinsic. The AVX2 INT8 core
# reproduces the portable core's float expressions operation for operation, so that both round the same way.
CFLAGS = ("-O3", "-fopenmp", "-ffp-contract=off")
LDFLAGS = ("-fopenmp",)
ISAS = ("portable", "avx2", "avx512_vnni")

BUILD_HINT = "run `make setup` (or `python -m networks.kernels.build`) to build it"


def cache_root() -> Path:
    configured = os.environ.get("MEDATTN_KERNELS_CACHE")
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "medattn_kernels"


def build_key() -> str:
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update(name.encode())
        digest.update((SOURCE_DIR / name).read_bytes())
    for item in (
        CFLAGS,
        LDFLAGS,
        importlib.metadata.version("torch"),
        sys.version_info[:2],
        platform.machine(),
        os.environ.get("CXX", "c++"),
    ):
        digest.update(repr(item).encode())
    return digest.hexdigest()[:20]


def library_path() -> Path:
    """Where the library for the current sources, flags, torch and Python is (or will be) cached."""
    key = build_key()
    return cache_root() / key / f"{LIBRARY_NAME}.so"


_BUILD_SCRIPT = """
import json, sys
from torch.utils.cpp_extension import load
args = json.loads(sys.argv[1])
load(name=args["name"], sources=args["sources"], extra_cflags=args["cflags"], extra_ldflags=args["ldflags"],
     build_directory=args["build_directory"], is_python_module=False, verbose=False)
"""


def _compile(target: Path) -> float:
    """Compile the library into ``target`` (atomic rename from a private build directory); returns seconds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(prefix=f"{target.parent.name}.build-", dir=target.parent.parent))
    try:
        args = {
            "name": LIBRARY_NAME,
            "sources": [str(SOURCE_DIR / name) for name in SOURCES],
            "cflags": list(CFLAGS),
            "ldflags": list(LDFLAGS),
            "build_directory": str(build_dir),
        }
        start = time.perf_counter()
        # A child process compiles (and test-loads) the library, so the caller loads only the final copy.
        result = subprocess.run(
            [sys.executable, "-c", _BUILD_SCRIPT, json.dumps(args)], capture_output=True, text=True, check=False
        )
        seconds = time.perf_counter() - start
        built = build_dir / f"{LIBRARY_NAME}.so"
        if result.returncode != 0 or not built.is_file():
            log = (result.stdout + result.stderr)[-6000:]
            raise RuntimeError(f"building the medattn kernels failed (exit code {result.returncode}):\n{log}")
        os.replace(built, target)
        return seconds
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)


def build_library() -> tuple[Path, float | None]:
    """Build the library unless it is cached (about 1-2 min on 2 shared cores). Concurrent builders are safe: they
    serialise on an ``fcntl`` lock per key and the loser finds the winner's library. Returns the path and the
    seconds this call spent compiling (None: it was already built)."""
    target = library_path()
    seconds = None
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent.with_name(f"{target.parent.name}.lock"), "w") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)  # released by the kernel even if this process dies
            try:
                if not target.is_file():  # another process may have finished it while we waited
                    seconds = _compile(target)
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)
    return target, seconds

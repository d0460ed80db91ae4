# Copyright MedAttnSlicer contributors. Apache-2.0.
"""TorchScript artifacts of FP32 and INT8 networks that load without the project's Python classes.

An artifact is a ``torch.jit.save`` file (scripted when the network's Python is scriptable, otherwise traced and
checked on a second input size) with a JSON description stored inside it as the extra file
``medattnslicer.json``::

    {"format": "medattnslicer-torchscript", "version": 1, "precision": "int8" | "fp32",
     "quantized_engine": "x86", "export": "script" | "trace", "example_input_shape": [...],
     "custom_ops": ["medattn::local_attention_int8", ...],
     "portable": true, "fbgemm_input_bits": 7, ...}

``portable`` (INT8 only): the artifact computes the same on CPUs with and without VNNI (7-bit inputs to FBGEMM's
INT8 ops, see :mod:`networks.quantization.quantize`). Loading one that is not portable on a CPU whose FBGEMM
saturates warns.

Loading needs only torch plus the kernel library registering the ``torch.ops.medattn`` ops:
:func:`load_artifact` loads it through :func:`networks.kernels.load_kernels`, then sets the quantized engine the
INT8 weights were packed for, then calls ``torch.jit.load``.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from networks.atomic_file import atomic_path
from networks.isa import fbgemm_saturates
from networks.quantization.quantize import quantized_engine
from networks.quantization.tracing import traceable_copy

__all__ = [
    "ARTIFACT_FORMAT",
    "ArtifactError",
    "export_torchscript",
    "fused_fp32_model",
    "save_int8_artifact",
    "save_fp32_artifact",
    "load_artifact",
    "load_int8_artifact",
    "load_fp32_artifact",
    "read_artifact_metadata",
    "kernel_library_path",
]

ARTIFACT_FORMAT = "medattnslicer-torchscript"
ARTIFACT_VERSION = 1
_META_NAME = "medattnslicer.json"


class ArtifactError(RuntimeError):
    """An artifact is missing, damaged, of the wrong precision, or a network cannot be exported."""


def _alternative_inputs(example: torch.Tensor) -> list[torch.Tensor]:
    """Inputs of other shapes used to check that a traced graph did not freeze the example's sizes."""
    spatial = example.shape[2:]
    bigger = (example.shape[0] + 1, example.shape[1], *(s + 16 for s in spatial))
    other_batch = (example.shape[0] + 1, *example.shape[1:])
    generator = torch.Generator().manual_seed(1234)
    scale = example.detach().float().std().clamp_min(1e-3)
    offset = example.detach().float().mean()
    return [
        torch.randn(shape, generator=generator, dtype=example.dtype) * scale + offset
        for shape in (bigger, other_batch)
        if len(shape) >= 2
    ]


def _outputs_close(a: Any, b: Any, atol: float, rtol: float) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return all(_outputs_close(x, y, atol, rtol) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return all(_outputs_close(a[k], b[k], atol, rtol) for k in a)
    return False


def export_torchscript(
    model: nn.Module, example_input: torch.Tensor, *, method: str = "auto", atol: float = 1e-4, rtol: float = 1e-4
) -> tuple[torch.jit.ScriptModule, str]:
    """TorchScript of ``model`` (eval mode) and how it was made (``"script"`` or ``"trace"``).

    ``method="auto"`` scripts when the network's Python is scriptable, else traces on ``example_input`` (with
    trace-friendly twins of modules such as ``nn.MaxUnpool2d``, see :mod:`networks.quantization.tracing`) and checks
    the traced graph against eager execution on inputs of other batch and spatial sizes that the eager model accepts
    (at least one must be accepted, so a trace that froze the example's shape is caught). A scripted module is
    checked on ``example_input``.

    Raises:
        ArtifactError: when tracing records a graph that differs from the model on another input size.
    """
    if method not in ("auto", "script", "trace"):
        raise ValueError(f"method must be 'auto', 'script' or 'trace', got {method!r}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
    model = model.eval()
    scripted, how = None, None
    script_error = None
    if method in ("auto", "script"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scripted = torch.jit.script(model)
            how = "script"
        except Exception as err:  # TorchScript raises several error types for unsupported Python
            script_error = err
            if method == "script":
                raise ArtifactError(f"{type(model).__name__} is not scriptable: {err}") from err
    with torch.no_grad():
        if scripted is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                scripted = torch.jit.trace(traceable_copy(model), example_input, check_trace=False)
            how = "trace"
            checked = 0
            for other in _alternative_inputs(example_input):
                try:
                    expected = model(other)
                except Exception:  # the network itself rejects this shape (e.g. a fixed input size)
                    continue
                try:
                    got = scripted(other)
                except Exception as err:  # the graph froze a shape of the example
                    raise ArtifactError(
                        f"traced {type(model).__name__} does not generalise from input {tuple(example_input.shape)} "
                        f"to {tuple(other.shape)}: {str(err).splitlines()[-1] if str(err) else err!r}; "
                        f"scripting failed with: {script_error}"
                    ) from err
                if not _outputs_close(expected, got, atol, rtol):
                    raise ArtifactError(
                        f"traced {type(model).__name__} does not generalise from input {tuple(example_input.shape)} "
                        f"to {tuple(other.shape)} (the trace froze a shape-dependent branch); scripting failed with: "
                        f"{script_error}"
                    )
                checked += 1
            if checked == 0:
                raise ArtifactError(
                    f"{type(model).__name__} accepts no input shape other than {tuple(example_input.shape)}, so the "
                    "trace cannot be checked for frozen shapes"
                )
        expected = model(example_input)
        got = scripted(example_input)
        if not _outputs_close(expected, got, atol, rtol):
            raise ArtifactError(f"{how}d {type(model).__name__} differs from eager execution on the example input")
    return scripted, how


def _custom_ops(graph_module: torch.jit.ScriptModule) -> list[str]:
    ops: set[str] = set()

    def visit_nodes(nodes) -> None:
        for node in nodes:
            if node.kind().startswith("medattn::"):
                ops.add(node.kind())
            for block in node.blocks():  # branches and loops of scripted code
                visit_nodes(block.nodes())

    def visit(module: torch.jit.ScriptModule) -> None:
        try:
            graph = module.graph  # the forward graph (in-memory traced modules wrap forward in a Python function)
        except (AttributeError, RuntimeError):
            graph = None
        if graph is not None:
            visit_nodes(graph.nodes())
        for child in module.children():
            visit(child)

    visit(graph_module)
    return sorted(ops)


def _atomic_jit_save(module: torch.jit.ScriptModule, path: Path, meta: dict[str, Any]) -> Path:
    with atomic_path(path) as tmp:
        torch.jit.save(module, tmp, _extra_files={_META_NAME: json.dumps(meta)})
    return path


def _save_artifact(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    precision: str,
    engine: str | None,
    metadata: dict[str, Any] | None,
    method: str,
) -> Path:
    from networks.kernels import load_kernels

    load_kernels()  # the custom ops must be registered to script or trace calls to them
    if engine is not None:
        with quantized_engine(engine):
            scripted, how = export_torchscript(model, example_input, method=method)
    else:
        scripted, how = export_torchscript(model, example_input, method=method)
    meta = {
        "format": ARTIFACT_FORMAT,
        "version": ARTIFACT_VERSION,
        "precision": precision,
        "quantized_engine": engine,
        "export": how,
        "model_class": type(model).__name__,
        "example_input_shape": list(example_input.shape),
        "custom_ops": _custom_ops(scripted),
        "torch_version": torch.__version__,
    }
    if metadata:
        overlap = set(meta) & set(metadata)
        if overlap:
            raise ValueError(f"metadata keys {sorted(overlap)} are reserved by the artifact format")
        meta.update(metadata)
    return _atomic_jit_save(scripted, Path(path), meta)


def save_int8_artifact(
    qmodel: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    *,
    metadata: dict[str, Any] | None = None,
    method: str = "auto",
) -> Path:
    """Save an INT8 network from :func:`~networks.quantization.quantize_int8` as a TorchScript artifact (atomically).

    Args:
        qmodel: the INT8 network.
        example_input: an input batch ``(B, C, *spatial)`` used for tracing and for checking the export.
        path: destination file.
        metadata: extra JSON-like fields stored in the artifact (e.g. training config, agreement figures).
        method: ``"auto"`` (script, else trace), ``"script"`` or ``"trace"``.
    """
    summary = getattr(qmodel, "int8_summary", None)
    if summary is None:
        raise ValueError("qmodel has no int8_summary: pass a network returned by quantize_int8")
    portability = {"portable": bool(summary["portable"]), "fbgemm_input_bits": int(summary["fbgemm_input_bits"])}
    return _save_artifact(
        qmodel, example_input, path, "int8", summary["backend"], {**(metadata or {}), **portability}, method
    )


def fused_fp32_model(model: nn.Module) -> nn.Module:
    """Deep copy of an FP32 network (eval mode) with every local self-attention layer on the fused FP32 core."""
    from networks.blocks.local_self_attention import LocalSelfAttention
    from networks.quantization.quantize import ensure_fused_backend

    ensure_fused_backend()
    work = copy.deepcopy(model).cpu().eval()
    for module in work.modules():
        if isinstance(module, LocalSelfAttention):
            module.backend = "fused"
    return work


def save_fp32_artifact(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    *,
    metadata: dict[str, Any] | None = None,
    method: str = "auto",
) -> Path:
    """Save the FP32 "best path" artifact: ``model`` with the fused FP32 attention core, as TorchScript (atomically)."""
    return _save_artifact(fused_fp32_model(model), example_input, path, "fp32", None, metadata, method)


def read_artifact_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON description stored in an artifact (without loading the network)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"artifact not found: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(f"/extra/{_META_NAME}")]
            if not names:
                raise ArtifactError(f"{path} is a TorchScript file without MedAttnSlicer metadata")
            meta = json.loads(archive.read(names[0]).decode("utf-8"))
    except zipfile.BadZipFile as err:
        raise ArtifactError(f"artifact {path} is corrupt or not a TorchScript file: {err}") from err
    if meta.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{path} is not a MedAttnSlicer artifact (format {meta.get('format')!r})")
    return meta


def load_artifact(path: str | os.PathLike, *, expected_precision: str | None = None) -> torch.jit.ScriptModule:
    """Load an FP32 or INT8 artifact: kernel ops first, then ``torch.jit.load`` under the artifact's quantized engine.

    Returns the TorchScript module in eval mode; its description is :func:`read_artifact_metadata`.
    """
    from networks.kernels import load_kernels

    meta = read_artifact_metadata(path)
    if expected_precision is not None and meta.get("precision") != expected_precision:
        raise ArtifactError(f"{path} holds a {meta.get('precision')} network, expected {expected_precision}")
    load_kernels()
    if meta.get("precision") == "int8" and not meta.get("portable", False) and fbgemm_saturates():
        warnings.warn(
            f"{path} feeds 8-bit activations to FBGEMM's INT8 ops (made before portable artifacts, or with "
            "reduce_range=False); this CPU has no VNNI (or FBGEMM_ENABLE_INSTRUCTIONS forces AVX2), where their int16 "
            "pair sums saturate: expect wrong outputs. Re-quantise it with quantize_int8 (portable by default).",
            RuntimeWarning,
            stacklevel=2,
        )
    engine = meta.get("quantized_engine")
    try:
        if engine:
            with quantized_engine(engine):
                module = torch.jit.load(str(path), map_location="cpu")
        else:
            module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as err:
        raise ArtifactError(f"cannot load artifact {path}: {err}") from err
    return module.eval()


def load_int8_artifact(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """Load an INT8 artifact written by :func:`save_int8_artifact`."""
    return load_artifact(path, expected_precision="int8")


def load_fp32_artifact(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """Load an FP32 artifact written by :func:`save_fp32_artifact`."""
    return load_artifact(path, expected_precision="fp32")


def kernel_library_path() -> str:
    """Shared library registering the ``torch.ops.medattn`` ops: a process with bare torch runs an artifact after
    ``torch.ops.load_library(kernel_library_path())``."""
    from networks.kernels import kernel_library_path as _path

    return _path()

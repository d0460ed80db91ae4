# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Where each served network's files live, how they are loaded (and reloaded when they change), and how trained
networks are published.

Every model *family* (:mod:`networks.registry`) has two files per folder:

- ``<family>.pt``: FP32 checkpoint (:mod:`networks.checkpoint`: factory name + kwargs + weights + metadata);
- ``<family>_int8.pt``: INT8 TorchScript artifact (:mod:`networks.quantization`), when the family has one.

Two folders are searched, MONAI Label style (the last existing one is the latest): the bundled weights in the app
folder (``monailabel_app/model``) and the trained weights (``--conf model_dir``, default ``.data/trained``
outside the source tree: see :func:`monailabel_app.lib.app_config.default_model_dir`). Training publishes into the
trained folder only, so bundled weights are never overwritten and a failed run leaves whatever was served before.

Metadata every published file carries (``metadata["app"]``): ``labels`` ({name: class index}), ``preprocess``
(:class:`~monailabel_app.lib.preprocess.Preprocessing`), ``spatial_dims``, training provenance.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch

from networks.registry import FAMILIES, ModelFamily

__all__ = [
    "ModelSpec",
    "MODEL_SPECS",
    "ModelFiles",
    "NetworkCache",
    "file_version",
    "read_app_metadata",
    "load_network",
    "load_eager_network",
    "publish_files",
]

logger = logging.getLogger(__name__)


# The app's name for a registry entry: infer and train tasks take the family they serve.
ModelSpec = ModelFamily

MODEL_SPECS: Mapping[str, ModelFamily] = FAMILIES
"""Served families by name: the live view of :mod:`networks.registry` (the only place a family is described)."""


def file_version(path: str | None) -> dict[str, Any] | None:
    """``{"file", "sha256" (first 16 hex), "mtime"}`` of a model file, or None."""
    if not path or not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"file": os.path.basename(path), "sha256": digest.hexdigest()[:16], "mtime": int(os.stat(path).st_mtime)}


def _stat_key(path: str) -> tuple[str, int, int]:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_mtime_ns, st.st_size)


class ModelFiles:
    """The FP32/INT8 files of one family in the bundled and trained folders.

    Args:
        family: file stem.
        bundled_dir: folder of the weights shipped with the app.
        trained_dir: folder training publishes to.
    """

    def __init__(self, family: str, bundled_dir: str, trained_dir: str) -> None:
        self.family = family
        self.bundled_dir = os.path.realpath(bundled_dir)
        self.trained_dir = os.path.realpath(trained_dir)

    def filename(self, precision: str) -> str:
        if precision not in ("fp32", "int8"):
            raise ValueError(f"precision must be 'fp32' or 'int8', got {precision!r}.")
        return f"{self.family}.pt" if precision == "fp32" else f"{self.family}_int8.pt"

    def paths(self, precision: str) -> list[str]:
        """Candidate files, oldest first (MONAI Label's ``BasicInferTask.path`` convention)."""
        name = self.filename(precision)
        dirs = [self.bundled_dir] if self.bundled_dir == self.trained_dir else [self.bundled_dir, self.trained_dir]
        return [os.path.join(d, name) for d in dirs]

    def current(self, precision: str) -> str | None:
        """The file served now: the trained one when it exists, else the bundled one, else None."""
        for path in reversed(self.paths(precision)):
            if os.path.isfile(path):
                return path
        return None

    def publish_path(self, precision: str) -> str:
        return os.path.join(self.trained_dir, self.filename(precision))


def read_app_metadata(path: str) -> dict[str, Any]:
    """The ``metadata["app"]`` dictionary of an FP32 checkpoint or INT8 artifact (without building the network)."""
    if path.endswith("_int8.pt"):
        from networks.quantization import read_artifact_metadata

        meta = read_artifact_metadata(path)
    else:
        from networks.checkpoint import read_checkpoint

        meta = read_checkpoint(path)["metadata"]
    return dict(meta.get("app", {}))


def load_eager_network(path: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """An FP32 checkpoint rebuilt through the factory as plain PyTorch modules (eval mode) with its full metadata:
    differentiable and hookable, as Grad-CAM, attention rollout and class-attention maps need."""
    from networks.checkpoint import load_checkpoint

    model, metadata = load_checkpoint(path)
    return model.eval(), metadata


def load_network(path: str, precision: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a served network and its ``metadata["app"]``.

    FP32 checkpoints are rebuilt through the factory; their local self-attention layers run on the fused FP32 kernel
    when the kernel library is available (same maths, faster), else on the reference PyTorch code.
    """
    if precision == "int8":
        from networks.quantization import load_int8_artifact

        return load_int8_artifact(path), read_app_metadata(path)
    model, metadata = load_eager_network(path)
    try:
        from networks.quantization import fused_fp32_model

        model = fused_fp32_model(model)
    except Exception as err:  # no compiler / kernel library: the reference implementation is still correct
        logger.warning(f"fused FP32 attention unavailable for {path} ({err}); using the PyTorch reference code")
    return model.eval(), dict(metadata.get("app", {}))


class NetworkCache:
    """Thread-safe cache of one loaded network per file, reloaded when the file's mtime or size changes.

    Publishing replaces files with ``os.replace``, so a changed (path, mtime, size) means a new model: running
    inference picks it up on the next request without a restart.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[tuple, Any, dict]] = {}

    def get(self, path: str, loader: Callable[[str], tuple[Any, dict]], variant: str = "") -> tuple[Any, dict, bool]:
        """``(network, metadata, reloaded)`` for ``path``; ``loader(path)`` runs on first use or after a change.

        ``variant`` keeps several networks built from one file apart (e.g. ``"eager"``: the FP32 checkpoint without
        the fused attention kernel, which gradient-based explanations need).
        """
        entry = f"{path}#{variant}" if variant else path
        with self._lock:
            key = _stat_key(path)
            cached = self._entries.get(entry)
            if cached is not None and cached[0] == key:
                return cached[1], cached[2], False
            network, metadata = loader(path)
            # the file may have been replaced while loading: keying on the pre-load stat makes the next call reload
            self._entries[entry] = (key, network, metadata)
            if cached is not None:
                logger.info(f"reloaded {path}: new model file (mtime/size changed)")
            return network, metadata, True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def publish_files(staged: dict[str, str]) -> None:
    """Move staged files into place with ``os.replace`` (atomic per file), INT8 before FP32.

    Args:
        staged: final path -> temporary file in the same folder.

    A reader sees either the old or the new file, never a partial one; if this process is killed between the two
    renames the INT8 file is the newer one, which the FP32 twin comparison (``reference``) then shows.
    """
    order = sorted(staged, key=lambda p: 0 if p.endswith("_int8.pt") else 1)
    for final in order:
        os.replace(staged[final], final)
        logger.info(f"published {final}")

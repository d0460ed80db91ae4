# Copyright MedAttnSlicer contributors. Apache-2.0.
"""FP32 checkpoints that rebuild their network through :func:`networks.factory.create_model`.

A checkpoint is one ``torch.save`` file holding a plain dictionary::

    {"format": "medattnslicer-checkpoint", "version": 1,
     "factory_name": str, "factory_kwargs": dict, "state_dict": {name: Tensor}, "metadata": dict}

Only tensors and JSON-like Python values are stored, so :func:`load_checkpoint` reads it with
``torch.load(weights_only=True)`` (no pickled classes, no code execution on load).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from networks.atomic_file import atomic_open

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "save_checkpoint", "load_checkpoint", "atomic_torch_save"]

CHECKPOINT_FORMAT = "medattnslicer-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or not a MedAttnSlicer checkpoint."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` through the project's atomic writer (:mod:`atomic_io`).

    Readers therefore see either the old file or the complete new one, never a partial write.
    """
    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)
    return Path(path)


def _check_json_like(value: Any, what: str) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{what} must hold only JSON-serialisable values (str, int, float, bool, None, list, dict): {err}"
        ) from err


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    factory_name: str,
    factory_kwargs: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``'s state dict with the factory call that rebuilds it.

    Args:
        model: the network; its ``state_dict()`` must match ``create_model(factory_name, **factory_kwargs)``.
        path: destination file (parent folders are created); written atomically.
        factory_name: name understood by :func:`networks.factory.create_model`.
        factory_kwargs: keyword arguments of that call (JSON-like values).
        metadata: free-form JSON-like information (training config, metrics, label names, ...).

    Returns:
        the path written.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(factory_name, str) or not factory_name:
        raise ValueError(f"factory_name must be a non-empty string, got {factory_name!r}")
    factory_kwargs = dict(factory_kwargs or {})
    metadata = dict(metadata or {})
    _check_json_like(factory_kwargs, "factory_kwargs")
    _check_json_like(metadata, "metadata")
    state_dict = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "factory_name": factory_name,
        "factory_kwargs": factory_kwargs,
        "state_dict": state_dict,
        "metadata": metadata,
    }
    return atomic_torch_save(payload, path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a checkpoint file without building the network (returns the stored dictionary)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types (pickle, zip, RuntimeError) for damaged files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file: {type(err).__name__}: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a MedAttnSlicer checkpoint (missing format tag {CHECKPOINT_FORMAT!r})")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {payload.get('version')!r}; this code reads {CHECKPOINT_VERSION}"
        )
    for key in ("factory_name", "factory_kwargs", "state_dict", "metadata"):
        if key not in payload:
            raise CheckpointError(f"checkpoint {path} lacks the field {key!r}")
    return payload


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network stored by :func:`save_checkpoint` and load its weights.

    Returns:
        ``(model, metadata)`` with the model in eval mode on the CPU. ``metadata`` also carries
        ``factory_name`` and ``factory_kwargs`` so callers can rebuild or describe the network.
    """
    from networks.factory import create_model  # imported here: the factory pulls in every network

    payload = read_checkpoint(path)
    factory_name, factory_kwargs = payload["factory_name"], payload["factory_kwargs"]
    try:
        model = create_model(factory_name, **factory_kwargs)
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {path}: create_model({factory_name!r}, **{factory_kwargs}) failed: {err}"
        ) from err
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path}: weights do not fit {factory_name!r}: {err}") from err
    model.eval()
    metadata = dict(payload["metadata"])
    metadata.setdefault("factory_name", factory_name)
    metadata.setdefault("factory_kwargs", dict(factory_kwargs))
    return model, metadata

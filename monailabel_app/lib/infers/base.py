# Copyright MedAttnSlicer contributors. Apache-2.0.
"""What the app's infer tasks share: the served network (reloaded when its file changes), its preprocessing, the
input checks, and writing results on the input grid."""

from __future__ import annotations

import logging
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.transforms import Compose
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from monailabel_app.lib.errors import BadInputError, NotFoundError
from monailabel_app.lib.image_io import ImageHeader, check_finite_nifti, read_header
from monailabel_app.lib.model_store import ModelFiles, ModelSpec, NetworkCache, file_version, load_network
from monailabel_app.lib.preprocess import Preprocessing

__all__ = ["AppInferTask", "ServedModel", "served_labels"]

logger = logging.getLogger(__name__)


def served_labels(model_labels: dict[str, int], app_labels: dict[str, int]) -> dict[str, int]:
    """Output value of each class of a model: the app's (datastore's) value for that name, else the class index."""
    return {
        name: int(app_labels.get(name, index)) for name, index in sorted(model_labels.items(), key=lambda kv: kv[1])
    }


@dataclass(frozen=True)
class ServedModel:
    """One served model: what every infer task needs to know about the network it serves.

    Attributes:
        name: served model name (``sadnn_seg_int8``).
        spec: the network family.
        files: where its files live.
        precision: ``"fp32"`` or ``"int8"``.
        cache: shared network cache.
        app_labels: the app's ``{label name: datastore value}``.
        twin: name of the same network in the other precision, if served.
        default: whether clients should pick this model first.
        modality: ``"auto"``, ``"ct"`` or ``"mr"`` (overrides the model's preprocessing).
    """

    name: str
    spec: ModelSpec
    files: ModelFiles
    precision: str
    cache: NetworkCache
    app_labels: dict[str, int] = field(default_factory=dict)
    twin: str | None = None
    default: bool = False
    modality: str = "auto"


class AppInferTask(BasicInferTask):
    """Base of the app's infer tasks.

    Args:
        model: the served model.
        infer_type: MONAI Label infer type.
        config: extra user-visible request parameters.
    """

    def __init__(self, model: ServedModel, infer_type: InferType, config: dict[str, Any] | None = None) -> None:
        self.name = model.name
        self.spec = model.spec
        self.files = model.files
        self.precision = model.precision
        self.cache = model.cache
        self.app_labels = dict(model.app_labels)
        self.twin = model.twin
        self.default = model.default
        self.modality = model.modality
        labels = self._labels_from_metadata(self._current_metadata())
        precision_text = "INT8" if model.precision == "int8" else "FP32"
        super().__init__(
            path=model.files.paths(model.precision),
            network=None,
            type=infer_type,
            labels=labels,
            dimension=model.spec.spatial_dims,
            description=f"{model.spec.description} [{precision_text}]",
            config={"device": "cpu", "modality": model.modality, **(config or {})},
            load_strict=False,
        )

    # ----- model files -----
    def _current_metadata(self) -> dict[str, Any]:
        path = self.files.current(self.precision)
        if not path:
            return {}
        try:
            from monailabel_app.lib.model_store import read_app_metadata

            return read_app_metadata(path)
        except Exception as err:  # a damaged file must not stop the server: the model is reported as invalid
            logger.error(f"cannot read metadata of {path}: {err}")
            return {}

    @abstractmethod
    def _labels_from_metadata(self, metadata: dict[str, Any]) -> Any:
        """The ``labels`` shown in ``/info``: segmentation {name: value}, classification [class names]."""

    def is_valid(self) -> bool:
        return self.files.current(self.precision) is not None

    def model_path(self) -> str:
        path = self.files.current(self.precision)
        if not path:
            raise NotFoundError(
                f"model {self.name!r} has no weights file (looked for {self.files.paths(self.precision)})."
            )
        return path

    def load(self) -> tuple[torch.nn.Module, dict[str, Any], str]:
        """``(network, app metadata, path)`` of the current file, loading or reloading it when it changed."""
        path = self.model_path()

        def loader(p: str) -> tuple[Any, dict]:
            network, metadata = load_network(p, self.precision)
            metadata = dict(metadata)
            metadata["_version"] = file_version(p)
            return network, metadata

        network, metadata, reloaded = self.cache.get(path, loader)
        if reloaded:
            self.labels = self._labels_from_metadata(metadata)
        return network, metadata, path

    def preprocessing(self, metadata: dict[str, Any], data: dict[str, Any]) -> Preprocessing:
        prep = Preprocessing.from_dict(metadata.get("preprocess"))
        modality = str(data.get("modality") or self.modality or "auto").lower()
        if modality not in ("auto", "ct", "mr"):
            raise BadInputError(f"modality must be 'auto', 'ct' or 'mr', got {modality!r}.")
        return prep.with_modality(modality)

    # ----- request handling shared by subclasses -----
    def accepted_dims(self) -> tuple[int, ...]:
        return (2, 3) if self.spec.spatial_dims == 2 else (3,)

    def prepare(self, data: dict[str, Any]) -> tuple[ImageHeader, Preprocessing, list]:
        """Check the input header, resolve the network, build the pre-transforms; stashes them in ``data``."""
        image = data.get("image")
        if not isinstance(image, str):
            raise BadInputError(f"{self.name} needs an image file or datastore image id, got {type(image).__name__}.")
        header = read_header(image, "image")
        check_finite_nifti(image, "image")
        if header.dims not in self.accepted_dims():
            wanted = " or ".join(f"{n}D" for n in self.accepted_dims())
            raise BadInputError(
                f"{self.name} takes {wanted} images, but the image is {header.dims}D with size {header.size}."
            )
        network, metadata, path = self.load()
        prep = self.preprocessing(metadata, data)
        transforms = prep.transforms(
            header.dims, accept_dims=self.accepted_dims(), model_name=self.name, check_finite=header.is_float
        )
        data["_header"] = header
        data["_network"] = network
        data["_metadata"] = metadata
        data["_prep"] = prep
        data["_pre"] = Compose(transforms)
        return header, prep, transforms

    def _get_network(self, device, data):
        # the network was resolved in prepare(), so pre-processing and inference use the same file
        return data["_network"]

    def model_result(self, data: dict[str, Any]) -> dict[str, Any]:
        """Fields every result JSON carries."""
        metadata = data.get("_metadata", {})
        image_meta = getattr(data.get("image"), "meta", None) or {}
        return {
            "model": self.name,
            "precision": self.precision,
            "model_version": metadata.get("_version"),
            "modality": image_meta.get("modality"),
        }

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Classification infer task: per-class probabilities of a 2D image or one axial slice of a volume, with an
explanation map (RISE, Grad-CAM, attention rollout or class attention) written on the input grid (zero outside the
classified slice)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd
from monailabel.interfaces.tasks.infer_v2 import InferType

from monailabel_app.lib.errors import BadInputError, NotFoundError
from monailabel_app.lib.explanations import NEEDS_EAGER_FP32, explanation_map, resolve_explanation
from monailabel_app.lib.image_io import write_on_grid
from monailabel_app.lib.infers.base import AppInferTask, ServedModel
from monailabel_app.lib.model_store import file_version, load_eager_network
from monailabel_app.lib.transforms.resample import ResampleToInputGridd

__all__ = ["ClassificationInfer", "axial_axis", "working_slice_index"]

logger = logging.getLogger(__name__)


def axial_axis(affine: np.ndarray) -> int:
    """Index axis of an image (RAS ``affine``, 4x4) most aligned with the superior-inferior direction."""
    rotation = np.asarray(affine, dtype=np.float64)[:3, :3]
    directions = rotation / np.linalg.norm(rotation, axis=0, keepdims=True)
    return int(np.argmax(np.abs(directions[2])))


def working_slice_index(
    original_affine: np.ndarray,
    original_shape: tuple[int, ...],
    working_affine: np.ndarray,
    working_depth: int,
    index: int,
) -> int:
    """Axial index on the working (RAS, resampled) grid of the original slice ``index`` along the original axial axis.

    The centre voxel of the requested original slice is mapped through physical space into the working grid.
    """
    axis = axial_axis(original_affine)
    voxel = np.array([(s - 1) / 2.0 for s in original_shape] + [1.0])
    voxel[axis] = index
    world = np.asarray(original_affine, dtype=np.float64) @ voxel
    working = np.linalg.solve(np.asarray(working_affine, dtype=np.float64), world)
    return int(np.clip(np.rint(working[2]), 0, working_depth - 1))


class ClassificationInfer(AppInferTask):
    """Per-class (multi-label) probabilities and an explanation map.

    Request parameters (all optional): ``slice``: index along the volume's axial axis (the index axis closest to
    superior-inferior; default the middle slice); ``explain``: one of ``explanations`` (default
    ``default_explanation``); ``saliency_class``: class name or index explained (default the most probable class);
    ``rise_masks`` (default 256), ``rise_seed`` (default 0) for RISE.

    RISE explains the served network itself (an INT8 model's INT8 artifact); the other methods need gradients or
    attention weights, so they run on the eager FP32 checkpoint (for an INT8 model: its FP32 twin file).

    Args (beyond :class:`AppInferTask`'s):
        rise_masks: default RISE masks per map.
        explanations: request names of the methods that apply to this network (:mod:`monailabel_app.lib.explanations`).
        default_explanation: the method used when the request names none.
    """

    def __init__(
        self,
        model: ServedModel,
        rise_masks: int = 256,
        explanations: Sequence[str] = ("rise",),
        default_explanation: str = "rise",
    ) -> None:
        self.explanations = tuple(explanations)
        self.default_explanation = default_explanation
        super().__init__(
            model,
            InferType.CLASSIFICATION,
            config={
                "slice": -1,
                "explain": default_explanation,
                "saliency_class": "",
                "rise_masks": rise_masks,
                "rise_seed": 0,
            },
        )

    def _labels_from_metadata(self, metadata: dict[str, Any]) -> list[str]:
        classes = metadata.get("classes") or metadata.get("labels") or {}
        if isinstance(classes, dict):
            return [name for name, _ in sorted(classes.items(), key=lambda kv: kv[1])]
        return list(classes)

    def pre_transforms(self, data=None):
        # an unavailable method is refused before any image work
        data["_explain"] = resolve_explanation(
            data.get("explain"), self.explanations, self.default_explanation, self.name
        )
        header, _, transforms = self.prepare(data)
        if header.dims == 3:
            direction = np.asarray(header.direction, dtype=np.float64).reshape(3, 3)
            # LPS and RAS share the superior axis, so the LPS direction picks the same axial axis
            depth = header.size[int(np.argmax(np.abs(direction[2])))]
            requested = int(data.get("slice", -1) if data.get("slice") not in (None, "") else -1)
            index = depth // 2 if requested < 0 else requested
            if not 0 <= index < depth:
                raise BadInputError(f"slice {index} is outside the volume's {depth} axial slices (0..{depth - 1}).")
            data["_slice"] = index
        return transforms

    def _class_index(self, data: dict[str, Any], probabilities: torch.Tensor) -> int:
        wanted = data.get("saliency_class")
        if wanted in (None, "", -1):
            return int(torch.argmax(probabilities))
        classes = list(self.labels or [])
        if isinstance(wanted, str) and wanted in classes:
            return classes.index(wanted)
        try:
            index = int(wanted)
        except (TypeError, ValueError):
            raise BadInputError(f"saliency_class {wanted!r} is not one of {classes} nor an index.") from None
        if not 0 <= index < len(classes):
            raise BadInputError(f"saliency_class {index} is outside 0..{len(classes) - 1}.")
        return index

    def run_inferer(self, data, convert_to_batch=True, device="cpu"):
        network = data["_network"]
        image = torch.as_tensor(data["image"]).as_subclass(torch.Tensor).float()  # (1, H, W[, D])
        if image.ndim == 4:
            meta = data["image"].meta
            z = working_slice_index(
                np.asarray(meta["original_affine"]),
                tuple(data["_header"].size),
                np.asarray(data["image"].affine),
                image.shape[-1],
                data["_slice"],
            )
            data["_working_slice"] = z
            image = image[..., z]
        with torch.no_grad():
            probabilities = torch.sigmoid(network(image[None]).float())[0]
        index = self._class_index(data, probabilities)
        method = data["_explain"]
        if method in NEEDS_EAGER_FP32:
            explainer, data["_explainer"] = self._eager_fp32(), "fp32"
        else:
            explainer, data["_explainer"] = network, self.precision
        saliency, info = explanation_map(
            explainer,
            image,
            method,
            index,
            rise_masks=int(data.get("rise_masks") or 256),
            rise_seed=int(data.get("rise_seed") or 0),
        )  # (H, W)
        data["probabilities"] = probabilities
        data["_saliency_class"] = index
        data["_explain_info"] = info
        if data[self.input_key].ndim == 4:
            volume = torch.zeros(data[self.input_key].shape, dtype=torch.float32)
            volume[0, ..., data["_working_slice"]] = saliency
        else:
            volume = saliency[None]
        # a MetaTensor, so Invertd applies the inverse of the image's spatial transforms to it
        data["pred"] = MetaTensor(volume)
        return data

    def _eager_fp32(self) -> torch.nn.Module:
        """The current FP32 checkpoint as plain PyTorch modules (no fused kernel), cached and reloaded on change."""
        path = self.files.current("fp32")
        if not path:
            raise NotFoundError(
                f"{self.name}: the {', '.join(NEEDS_EAGER_FP32)} explanations need the FP32 checkpoint "
                f"{self.files.filename('fp32')}, which is missing; use explain 'rise'."
            )
        network, _, _ = self.cache.get(path, load_eager_network, variant="eager")
        return network

    def post_transforms(self, data=None):
        # the saliency goes back onto the input grid: volumes by physical-space resampling (only the classified
        # slice is non-zero), 2D images through the inverse of the spatial pre-transforms
        if data["_header"].dims == 3:
            return [ResampleToInputGridd(keys="pred", ref_key="image", threshold=0.0, margin=1)]
        return [Invertd(keys="pred", transform=data["_pre"], orig_keys="image", nearest_interp=False, to_tensor=True)]

    def writer(self, data, extension=None, dtype=None):
        saliency = torch.as_tensor(data["pred"]).float().numpy()[0]
        if data.get("_slice") is not None:
            # interpolation can leak ~1e-7 into the neighbouring slices: the map is defined on the classified one
            header = data["_header"]
            axis = int(np.argmax(np.abs(np.asarray(header.direction).reshape(3, 3)[2])))
            keep = np.zeros(saliency.shape[axis], dtype=bool)
            keep[data["_slice"]] = True
            shape = [1, 1, 1]
            shape[axis] = -1
            saliency = saliency * keep.reshape(shape)
        path = write_on_grid(saliency, data["_header"], dtype=np.float32)
        classes = list(self.labels or [])
        probabilities = data["probabilities"].tolist()
        result = self.model_result(data)
        result.update(
            {
                "probabilities": {name: round(float(p), 6) for name, p in zip(classes, probabilities)},
                "prediction": [name for name, p in zip(classes, probabilities) if p >= 0.5],
                "saliency_class": classes[data["_saliency_class"]] if classes else data["_saliency_class"],
                **self._explanation_result(data),
                "slice": data.get("_slice"),
                "image_size": list(data["_header"].size),
            }
        )
        return path, result

    def _explanation_result(self, data: dict[str, Any]) -> dict[str, Any]:
        """Result fields describing the explanation map: which method, on which network, class-specific or not."""
        info = data["_explain_info"]
        fields: dict[str, Any] = {
            "saliency": data["_explain"],
            "saliency_precision": data["_explainer"],
            "saliency_class_specific": bool(info.get("class_specific", True)),
        }
        if info.get("layer") is not None:
            fields["saliency_layer"] = info["layer"]
        if data["_explain"] == "rise":
            fields["rise_masks"] = info.get("num_masks")
        if data["_explainer"] != self.precision:
            twin = self.files.current("fp32")
            fields["saliency_model_version"] = file_version(twin)
            fields["saliency_note"] = (
                f"{data['_explain']} needs gradients or attention weights, which the INT8 TorchScript artifact does "
                f"not expose: the map was computed on the FP32 twin checkpoint ({file_version(twin)['file']}) of "
                "the same training run; the probabilities are the INT8 model's"
            )
        return fields

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Segmentation infer task: 2D networks slice by slice (MONAI ``SliceInferer``), 3D networks with a sliding window;
the label is written on the input image's exact grid; optional over/under-segmentation map against a reference."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SimpleInferer, SliceInferer, SlidingWindowInferer
from monai.transforms import Activationsd, Invertd
from monailabel.interfaces.tasks.infer_v2 import InferType

from monailabel_app.lib.comparison import OverUnderd
from monailabel_app.lib.errors import BadInputError
from monailabel_app.lib.image_io import read_array_on_grid, voxel_volume_ml, write_on_grid
from monailabel_app.lib.infers.base import AppInferTask, ServedModel, served_labels
from monailabel_app.lib.transforms.postprocess import ForegroundProbabilitiesd, ProbabilitiesToLabeld
from monailabel_app.lib.transforms.resample import ResampleToInputGridd

__all__ = ["SegmentationInfer"]

logger = logging.getLogger(__name__)


def _flag(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


class SegmentationInfer(AppInferTask):
    """Segment a 2D image or 3D volume and return a label map on the input grid.

    Request parameters (JSON ``params``, all optional):
        ``reference_path`` / ``reference_name`` (set by the app from ``reference``): compare with that label file
        and return the over/under map; ``reference_label``: the label name or value compared (default the first);
        ``largest_component`` (default true); ``sw_batch_size``: slices per network call; ``modality``.

    Args:
        batch_size: default slices per network call.
        model: the served model (:class:`~monailabel_app.lib.infers.base.ServedModel`).
    """

    def __init__(self, model: ServedModel, batch_size: int = 16) -> None:
        super().__init__(
            model,
            InferType.SEGMENTATION,
            config={"reference": "", "reference_label": "", "largest_component": True, "sw_batch_size": batch_size},
        )

    def _labels_from_metadata(self, metadata: dict[str, Any]) -> dict[str, int]:
        return served_labels(metadata.get("labels") or {}, self.app_labels)

    def label_value(self, data: dict[str, Any]) -> int:
        """The label value a comparison uses: ``reference_label`` as a name or a value, default the first label."""
        labels = self.labels or {}
        wanted = data.get("reference_label")
        if wanted in (None, ""):
            if not labels:
                raise BadInputError(f"{self.name} has no labels to compare.")
            return int(next(iter(labels.values())))
        if isinstance(wanted, str) and wanted in labels:
            return int(labels[wanted])
        try:
            value = int(wanted)
        except (TypeError, ValueError):
            raise BadInputError(
                f"reference_label {wanted!r} is neither a label of {self.name} ({sorted(labels)}) nor a number."
            ) from None
        if value not in labels.values():
            raise BadInputError(f"reference_label {value} is not a label value of {self.name} ({labels}).")
        return value

    # ----- MONAI Label pipeline -----
    def pre_transforms(self, data=None):
        _, _, transforms = self.prepare(data)
        if data.get("reference_path"):
            # the reference must share the image grid: checked (and read) before any work is done
            data["_reference_array"] = read_array_on_grid(data["reference_path"], data["_header"], "reference label")
            data["_reference_value"] = self.label_value(data)
        return transforms

    def inferer(self, data=None) -> Inferer:
        prep = data["_prep"]
        batch = max(1, int(data.get("sw_batch_size") or 16))
        image = data[self.input_key]
        if self.spec.spatial_dims == 2 and image.ndim == 4:
            # (C, H, W, D): the 2D network runs on the axial slices (last axis after RAS orientation) in batches
            return SliceInferer(roi_size=prep.roi_size, sw_batch_size=batch, spatial_dim=2, overlap=0.0)
        if self.spec.spatial_dims == 2:
            return SimpleInferer()
        return SlidingWindowInferer(roi_size=prep.roi_size, sw_batch_size=1, overlap=0.25, mode="gaussian")

    def run_inferer(self, data, convert_to_batch=True, device="cpu"):
        network = data["_network"]
        inferer = self.inferer(data)
        # plain tensors into the network: TorchScript artifacts do not take MetaTensor subclasses; the MetaTensor
        # stays in data["image"] for Invertd
        inputs = torch.as_tensor(data[self.input_key]).as_subclass(torch.Tensor).float()[None]
        with torch.no_grad():
            outputs = inferer(inputs, network)
        # a MetaTensor, so Invertd applies the inverse of the image's spatial transforms to it
        data["pred"] = MetaTensor(torch.as_tensor(outputs)[0].as_subclass(torch.Tensor))
        return data

    def predict_working_grid(
        self,
        image_path: str,
        *,
        flip_axes: tuple[int, ...] = (),
        intensity_scale: float = 1.0,
        max_slices: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Softmax probabilities on the network's working grid (after preprocessing), for active learning and
        agreement scores that need no output file.

        Args:
            image_path: image file.
            flip_axes: spatial axes (0 = first in-plane axis) flipped before the network and flipped back after
                (test-time augmentation).
            intensity_scale: multiplies the normalised intensities (test-time augmentation).
            max_slices: use at most this many evenly spaced axial slices of a volume (speed).

        Returns:
            ``(probabilities (C, *spatial), {"model_version", "slices"})``.
        """
        from monai.transforms import Compose

        data: dict[str, Any] = {"image": image_path, "modality": self.modality}
        _, _, transforms = self.prepare(data)
        data = Compose(transforms)(data)
        image = torch.as_tensor(data["image"]).as_subclass(torch.Tensor).float()
        slices = None
        if image.ndim == 4 and self.spec.spatial_dims == 2 and max_slices and image.shape[-1] > max_slices:
            slices = torch.linspace(0, image.shape[-1] - 1, int(max_slices)).round().long().unique()
            image = image[..., slices]
        image = image * float(intensity_scale)
        dims = [a + 1 for a in flip_axes]  # skip the channel axis
        if dims:
            image = torch.flip(image, dims)
        data["image"] = image
        with torch.no_grad():
            logits = self.inferer(data)(image[None], data["_network"])[0]
        probabilities = torch.softmax(torch.as_tensor(logits).as_subclass(torch.Tensor).float(), dim=0)
        if dims:
            probabilities = torch.flip(probabilities, dims)
        info = {
            "model_version": data["_metadata"].get("_version"),
            "slices": None if slices is None else slices.tolist(),
        }
        return probabilities, info

    def post_transforms(self, data=None):
        values = list(self.labels.values()) if isinstance(self.labels, dict) else []
        t = [
            Activationsd(keys="pred", softmax=True),
            ForegroundProbabilitiesd(keys="pred", largest_component=_flag(data.get("largest_component", True))),
            # back onto the input grid, interpolating probabilities: volumes by physical-space resampling of the
            # occupied region only (equal to inverting the pre-transforms, faster); 2D images by Invertd
            # a class can only win where its probability is >= 1 / (classes + 1), and bilinear interpolation never
            # exceeds its largest neighbour: resampling where it is below that threshold cannot change the label
            ResampleToInputGridd(keys="pred", ref_key="image", threshold=0.999 / (len(values) + 1))
            if data["_header"].dims == 3
            else Invertd(keys="pred", transform=data["_pre"], orig_keys="image", nearest_interp=False, to_tensor=True),
            ProbabilitiesToLabeld(keys="pred", label_values=values),
        ]
        if data.get("_reference_array") is not None:
            t.append(
                OverUnderd(
                    keys="pred",
                    reference_key="_reference_array",
                    label_value=data["_reference_value"],
                    voxel_ml=voxel_volume_ml(data["_header"]),
                    reference_name=str(data.get("reference_name") or "reference"),
                )
            )
        return t

    def writer(self, data, extension=None, dtype=None):
        pred = data["pred"]
        pred = pred.numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
        path = write_on_grid(pred, data["_header"], dtype=np.uint8, **_result_file(data.get("result_extension")))
        result = dict(data.get("result") or {})
        result.update(self.model_result(data))
        result["labels"] = self.labels
        result["image_size"] = list(data["_header"].size)
        if "comparison" not in result:
            counts = {name: int(np.count_nonzero(pred == value)) for name, value in (self.labels or {}).items()}
            ml = voxel_volume_ml(data["_header"])
            result["volumes_ml"] = {name: round(n * ml, 3) for name, n in counts.items()}
            result["voxels"] = counts
        return path, result


def _result_file(extension: str | None) -> dict:
    """``write_on_grid`` arguments for a requested ``result_extension``: ``.nrrd`` (OHIF's MONAI Label panel asks for
    it and cannot read NIfTI; written uncompressed, the form tests/test_ohif.py checks) or the default gzipped NIfTI."""
    if str(extension or "").lower() != ".nrrd":
        return {}
    import tempfile

    handle, path = tempfile.mkstemp(suffix=".nrrd", prefix="medattn_")
    os.close(handle)
    return {"path": path, "compress": False}

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Checks on loaded images that turn bad input into a 4xx error naming the problem."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from monailabel_app.lib.errors import BadInputError

__all__ = ["ValidateImaged", "ToSingleChanneld"]


class ValidateImaged(MapTransform):
    """Reject images with NaN/Inf values, no voxels, or a spatial dimension the model cannot take.

    Args:
        keys: image keys; arrays are channel-first ``(C, *spatial)``.
        spatial_dims: accepted numbers of spatial dimensions (e.g. ``(2, 3)`` for a slice model,
            ``(3,)`` for a native 3D model).
        model_name: named in the messages.
        check_finite: scan for NaN/Inf (False for integer source data, which cannot hold them: saves a pass over
            the whole volume).
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_dims: tuple[int, ...] = (2, 3),
        model_name: str = "model",
        check_finite: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = tuple(spatial_dims)
        self.model_name = model_name
        self.check_finite = check_finite

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key]).as_subclass(torch.Tensor)
            spatial = tuple(image.shape[1:])
            if len(spatial) not in self.spatial_dims:
                wanted = " or ".join(f"{n}D" for n in self.spatial_dims)
                raise BadInputError(
                    f"{self.model_name} takes {wanted} images, but the {key} is {len(spatial)}D with size {spatial}."
                )
            if image.numel() == 0 or min(spatial) < 1:
                raise BadInputError(f"the {key} has no voxels (size {spatial}).")
            if self.check_finite and image.is_floating_point() and not bool(torch.isfinite(image).all()):
                n_nan = int(torch.isnan(image).sum())
                n_inf = int(torch.isinf(image).sum())
                raise BadInputError(
                    f"the {key} contains {n_nan} NaN and {n_inf} infinite values; "
                    "replace them (e.g. by the background intensity) before inference."
                )
        return d


class ToSingleChanneld(MapTransform):
    """Average the channels of a multi-channel image (RGB screenshot, vector NRRD) into one: ``(C, *S) -> (1, *S)``."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.shape[0] > 1:
                d[key] = image.float().mean(dim=0, keepdim=True)
        return d

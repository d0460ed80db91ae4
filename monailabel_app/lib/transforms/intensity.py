# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Intensity normalisation that picks CT windowing or MR percentile scaling per image."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, ScaleIntensityRange, ScaleIntensityRangePercentiles

__all__ = ["detect_modality", "ModalityIntensityd", "MODALITIES"]

MODALITIES = ("auto", "ct", "mr")

# Air in a CT is about -1000 HU and every CT field of view holds some; MR and camera images are non-negative.
_CT_AIR_THRESHOLD = -500.0


def detect_modality(image: torch.Tensor) -> str:
    """``"ct"`` when the 0.5th intensity percentile is below -500 (Hounsfield air), else ``"mr"``.

    Args:
        image: any-shaped intensity tensor.
    """
    flat = image.detach().reshape(-1).float()
    if flat.numel() > 200_000:  # a strided subsample is plenty for a percentile and keeps this fast
        flat = flat[:: flat.numel() // 200_000 + 1]
    low = torch.quantile(flat, 0.005).item()
    return "ct" if low < _CT_AIR_THRESHOLD else "mr"


class ModalityIntensityd(MapTransform):
    """Scale intensities to about 0..1: CT by a Hounsfield window, anything else by intensity percentiles.

    Args:
        keys: image keys.
        modality: ``"ct"``, ``"mr"`` or ``"auto"`` (decided per image by :func:`detect_modality`).
        ct_window: (low, high) HU mapped to (0, 1), clipped.
        percentiles: (low, high) percentiles mapped to (0, 1), clipped, for non-CT images.

    The decision is stored as ``meta["modality"]`` when the image is a ``MetaTensor``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        modality: str = "auto",
        ct_window: Sequence[float] = (-200.0, 300.0),
        percentiles: Sequence[float] = (1.0, 99.0),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}.")
        self.modality = modality
        self.ct = ScaleIntensityRange(a_min=ct_window[0], a_max=ct_window[1], b_min=0.0, b_max=1.0, clip=True)
        self.mr = ScaleIntensityRangePercentiles(
            lower=percentiles[0], upper=percentiles[1], b_min=0.0, b_max=1.0, clip=True
        )

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            modality = detect_modality(image) if self.modality == "auto" else self.modality
            d[key] = self.ct(image) if modality == "ct" else self.mr(image)
            if isinstance(d[key], MetaTensor):
                d[key].meta["modality"] = modality
        return d

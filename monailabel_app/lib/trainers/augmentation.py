# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Sampling and augmentation shared by the train tasks (MONAI transforms)."""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import (
    RandAdjustContrastd,
    RandCropByPosNegLabeld,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SqueezeDimd,
)

from monailabel_app.lib.preprocess import Preprocessing

__all__ = ["intensity_augmentation", "foreground_weighted_slices"]


def intensity_augmentation(prep: Preprocessing, key: str = "image") -> list:
    """Random intensity changes: contrast-enhanced and plain CTs, different scanners and MR sequences differ by tens
    of HU / grey levels, so the networks must not key on absolute intensity alone (shifts up to 0.12 of the 0..1
    range = 60 HU in the CT window, expressed in the standardised units of ``prep``)."""
    unit = 1.0 / prep.standardize[1] if prep.standardize else 1.0
    return [
        RandScaleIntensityd(keys=key, factors=0.2, prob=0.8),
        RandShiftIntensityd(keys=key, offsets=0.12 * unit, prob=0.8),
        RandAdjustContrastd(keys=key, gamma=(0.7, 1.5), prob=0.3),
        RandGaussianNoised(keys=key, std=0.02 * unit, prob=0.2),
    ]


def foreground_weighted_slices(prep: Preprocessing, keys: Sequence[str], pos_ratio: float, num_samples: int) -> list:
    """Whole axial slices ``(C, H, W, D) -> num_samples x (C, H, W)`` (the in-plane size already is ``roi_size``),
    each centred on labelled foreground with probability ``pos_ratio``."""
    return [
        RandCropByPosNegLabeld(
            keys=list(keys),
            label_key="label",
            spatial_size=(*prep.roi_size, 1),
            pos=pos_ratio,
            neg=1.0 - pos_ratio,
            num_samples=num_samples,
            allow_smaller=True,
        ),
        SqueezeDimd(keys=list(keys), dim=-1),
    ]

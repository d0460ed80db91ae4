# Copyright MedAttnSlicer contributors. Apache-2.0.
"""The one definition of how images are prepared for the networks, shared by training and inference.

A :class:`Preprocessing` is stored in every checkpoint's metadata (``metadata["preprocess"]``) by the trainers and
read back by the infer tasks, so a model is always served with the preprocessing it was trained with.

Pipeline for volumes (3D images), 2D-slice networks::

    load (ITK) -> channel first -> average channels -> validate (NaN, dims) -> orient to RAS
    -> resample in-plane to ``spacing`` (slice axis untouched) -> intensity (CT: HU window -> 0..1,
    other: percentiles -> 0..1; after resampling, on the smaller grid) -> pad/crop in-plane to ``roi_size``
    (centred; padding is 0 = the bottom of the window) -> standardise ((x - 0.2) / 0.25)

Native 3D networks resample all three axes to ``spacing`` and are run with a sliding window of ``roi_size``.
2D images (PNG, JPEG, 2D NIfTI) have no reliable physical spacing: they are resized so the longest side is the
network's slice size, then padded. Every spatial step is a MONAI invertible transform, so predictions are mapped
back onto the input grid with ``monai.transforms.Invertd``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from monai.transforms import (
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    Spacingd,
)

from monailabel_app.lib.transforms.intensity import ModalityIntensityd
from monailabel_app.lib.transforms.labels import SelectLabelValuesd
from monailabel_app.lib.transforms.validate import ToSingleChanneld, ValidateImaged

__all__ = ["Preprocessing"]


@dataclass(frozen=True)
class Preprocessing:
    """Geometry and intensity settings of a network's input.

    Attributes:
        spacing: output spacing in mm: in-plane ``(x, y)`` for 2D-slice networks, ``(x, y, z)`` for 3D networks.
        roi_size: network input size: ``(H, W)`` slices or ``(H, W, D)`` windows; multiples of 16.
        ct_window: Hounsfield window mapped to 0..1 for CT.
        percentiles: intensity percentiles mapped to 0..1 for MR and other images.
        modality: ``"auto"`` (CT when the image holds air below -500), ``"ct"`` or ``"mr"``.
        axcodes: orientation volumes are brought to before slicing (slices are axial for ``"RAS"``).
        standardize: ``(mean, std)`` applied last, ``(x - mean) / std``: SaDNN's attention projections have no bias,
            so a constant 0 background would give all-zero features; shifting it to a non-zero value lets the
            first layers see it. ``None`` keeps 0..1 (checkpoints written before this field existed).
    """

    spacing: tuple[float, ...] = (3.0, 3.0)
    roi_size: tuple[int, ...] = (128, 128)
    ct_window: tuple[float, float] = (-200.0, 300.0)
    percentiles: tuple[float, float] = (1.0, 99.0)
    modality: str = "auto"
    axcodes: str = "RAS"
    standardize: tuple[float, float] | None = (0.2, 0.25)
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if len(self.roi_size) not in (2, 3):
            raise ValueError(f"roi_size must be 2D or 3D, got {self.roi_size!r}.")
        if len(self.spacing) != len(self.roi_size):
            raise ValueError(f"spacing {self.spacing!r} and roi_size {self.roi_size!r} must have the same length.")
        if any(int(s) % 16 for s in self.roi_size):
            raise ValueError(f"roi_size must be multiples of 16 (four 2x pools), got {self.roi_size!r}.")

    @property
    def spatial_dims(self) -> int:
        """2 for slice networks, 3 for native volume networks."""
        return len(self.roi_size)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Preprocessing:
        """Inverse of :meth:`to_dict`; missing keys take the defaults."""
        d = dict(d or {})
        names = ("spacing", "roi_size", "ct_window", "percentiles", "modality", "axcodes", "standardize")
        known = {k: d[k] for k in names if k in d}
        if d and "standardize" not in d:
            known["standardize"] = None  # stored before standardisation existed: the network was trained on 0..1
        for k in ("spacing", "roi_size", "ct_window", "percentiles", "standardize"):
            if known.get(k) is not None:
                known[k] = tuple(known[k])
        if "roi_size" in known:
            known["roi_size"] = tuple(int(s) for s in known["roi_size"])
        return cls(**known)

    def with_modality(self, modality: str) -> Preprocessing:
        return replace(self, modality=modality)

    def transforms(
        self,
        image_dims: int,
        *,
        image_key: str = "image",
        label_key: str | None = None,
        label_values: Sequence[int] | None = None,
        accept_dims: Sequence[int] = (2, 3),
        model_name: str = "model",
        load: bool = True,
        check_finite: bool = True,
    ) -> list:
        """MONAI transforms taking ``{"image": path[, "label": path]}`` to network-ready channel-first tensors.

        Args:
            image_dims: spatial dimensions of the input image (2 or 3), e.g. from its header.
            image_key: key of the image.
            label_key: key of a label map sharing the image grid, transformed alongside (nearest neighbour).
            label_values: datastore label value of each class; the label becomes class indices 0..n.
            accept_dims: image dimensions the model accepts (checked by ``ValidateImaged``).
            model_name: named in error messages.
            load: start with ``LoadImaged`` (False when the dictionary already holds tensors).
            check_finite: scan the image for NaN/Inf (False for integer-typed files).

        Returns:
            list of transforms; spatial ones are invertible (use them with ``Invertd``).
        """
        keys = [image_key] + ([label_key] if label_key else [])
        modes = ["bilinear"] + (["nearest"] if label_key else [])
        t: list = []
        if load:
            t.append(LoadImaged(keys=keys, reader="ITKReader", image_only=True))
        t += [
            EnsureChannelFirstd(keys=keys),
            ToSingleChanneld(keys=keys),
            ValidateImaged(
                keys=image_key, spatial_dims=tuple(accept_dims), model_name=model_name, check_finite=check_finite
            ),
        ]
        if label_key and label_values is not None:
            t.append(SelectLabelValuesd(keys=label_key, values=label_values))
        if image_dims == 3:
            # a 2D-slice network keeps the slice axis (pixdim <= 0 keeps the original spacing)
            pixdim = tuple(self.spacing) if self.spatial_dims == 3 else (*self.spacing, -1.0)
            size = tuple(self.roi_size) if self.spatial_dims == 3 else (*self.roi_size, -1)
            t += [
                Orientationd(keys=keys, axcodes=self.axcodes, labels=None),
                Spacingd(keys=keys, pixdim=pixdim, mode=modes),
            ]
            spatial = [] if self.spatial_dims == 3 else [ResizeWithPadOrCropd(keys=keys, spatial_size=size)]
        elif image_dims == 2:
            side = int(max(self.roi_size[:2]))
            t.append(Resized(keys=keys, spatial_size=side, size_mode="longest", mode=["area"] + modes[1:]))
            spatial = [ResizeWithPadOrCropd(keys=keys, spatial_size=tuple(self.roi_size[:2]))]
        else:
            raise ValueError(f"image_dims must be 2 or 3, got {image_dims!r}.")
        t.append(
            ModalityIntensityd(
                keys=image_key, modality=self.modality, ct_window=self.ct_window, percentiles=self.percentiles
            )
        )
        # padding after the intensity scaling pads with 0 = below the window (air) for CT
        t += spatial
        if self.standardize is not None:
            mean, std = self.standardize
            t.append(ScaleIntensityRanged(keys=image_key, a_min=mean, a_max=mean + std, b_min=0.0, b_max=1.0))
        t.append(EnsureTyped(keys=keys, dtype="float32", track_meta=True))
        return t

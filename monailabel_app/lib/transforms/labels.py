# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Label-map transforms: datastore label values to class indices, per-slice organ presence."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["SelectLabelValuesd", "PresenceTargetd", "organ_presence"]


class SelectLabelValuesd(MapTransform):
    """Map the label values ``values[i]`` to class ``i + 1`` and every other value to background 0.

    Unlike MONAI's ``MapLabelValued`` (which keeps unlisted values), this also clears the organs a model does not
    segment, so a full TotalSegmentator map (liver = 5 among 100 classes) can serve as a liver label.

    Args:
        keys: label keys.
        values: datastore label value of each class, in class order.
    """

    def __init__(self, keys: KeysCollection, values: Sequence[int], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.values = [int(v) for v in values]
        if not self.values:
            raise ValueError("values must name at least one label value.")

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            # float().clone() keeps a MetaTensor's meta data and applied operations (needed to invert later)
            out = torch.as_tensor(d[key]).float().clone()
            rounded = torch.round(out).as_subclass(torch.Tensor)
            out.zero_()
            for index, value in enumerate(self.values):
                out[rounded == value] = index + 1
            d[key] = out
        return d


def organ_presence(label: torch.Tensor, num_classes: int, axis: int = -1, min_voxels: int = 1) -> torch.Tensor:
    """Per-slice multi-label targets: which classes 1..num_classes occur in each slice of a class-index map.

    Args:
        label: class-index map ``(*spatial)`` or ``(1, *spatial)`` with values 0..num_classes.
        num_classes: number of foreground classes.
        axis: the slice axis of ``label``.
        min_voxels: a class is present in a slice with at least this many voxels.

    Returns:
        ``(n_slices, num_classes)`` float tensor of 0/1.
    """
    label = torch.as_tensor(label)
    label = torch.movedim(label, axis, 0)
    flat = label.reshape(label.shape[0], -1).round().long()
    present = torch.stack([(flat == c + 1).sum(dim=1) >= min_voxels for c in range(num_classes)], dim=1)
    return present.float()


class PresenceTargetd(MapTransform):
    """Class-index label map -> multi-label presence targets ("which organs are in this slice").

    ``(1, H, W)`` becomes ``(num_classes,)``; a volume ``(1, H, W, D)`` becomes ``(num_classes, D)`` (one target
    vector per slice along the last axis).

    Args:
        keys: label keys (class indices 0..num_classes, e.g. after :class:`SelectLabelValuesd`).
        num_classes: foreground classes.
        min_voxels: a class is present in a slice with at least this many voxels (ignores specks at organ tips).
    """

    def __init__(
        self, keys: KeysCollection, num_classes: int, min_voxels: int = 5, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_classes = int(num_classes)
        self.min_voxels = int(min_voxels)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = torch.as_tensor(d[key]).as_subclass(torch.Tensor)[0]
            if label.ndim == 2:
                d[key] = organ_presence(label[..., None], self.num_classes, axis=-1, min_voxels=self.min_voxels)[0]
            else:
                d[key] = organ_presence(label, self.num_classes, axis=-1, min_voxels=self.min_voxels).T.contiguous()
        return d

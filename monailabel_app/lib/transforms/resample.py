# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Map network-grid probabilities back onto the input image's grid, resampling only where they are non-zero."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, SpatialResample

__all__ = ["ResampleToInputGridd"]


class ResampleToInputGridd(MapTransform):
    """Resample working-grid maps ``(C, *S_w)`` onto the input image grid ``(C, *S_in)`` in physical space.

    Equivalent to inverting the spatial pre-transforms (orientation, spacing, pad/crop) with ``Invertd``, but the
    resampling (MONAI ``SpatialResample``, bilinear) covers only the bounding box of the voxels above
    ``threshold`` (plus a margin) mapped into the input grid; the rest of the output is 0. A liver occupies a small
    part of a 512 x 512 x 100 CT, so this is several times faster than resampling all 26 M voxels, and the label
    decided from it (probability > 0.5) is the same.

    Args:
        keys: keys of the working-grid maps (channel-first; a MetaTensor or tensor).
        ref_key: key of the preprocessed image (MetaTensor): its ``affine`` is the working grid and its
            ``meta["original_affine"]`` / ``meta["spatial_shape"]`` describe the input grid.
        threshold: values at or below it count as empty.
        margin: working-grid voxels added around the bounding box (covers interpolation support).
    """

    def __init__(
        self,
        keys: KeysCollection,
        ref_key: str = "image",
        threshold: float = 1e-3,
        margin: int = 2,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key
        self.threshold = float(threshold)
        self.margin = int(margin)
        self.resample = SpatialResample(mode="bilinear", padding_mode="zeros")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ref = d[self.ref_key]
        working_affine = torch.as_tensor(ref.affine, dtype=torch.float64)
        input_affine = torch.as_tensor(ref.meta["original_affine"], dtype=torch.float64)
        input_shape = [int(s) for s in np.asarray(ref.meta["spatial_shape"]).ravel()]
        dims = len(input_shape)
        for key in self.key_iterator(d):
            values = torch.as_tensor(d[key]).as_subclass(torch.Tensor).float()
            out = torch.zeros((values.shape[0], *input_shape), dtype=torch.float32)
            occupied = (values > self.threshold).any(dim=0)
            if bool(occupied.any()):
                start, stop = self._input_box(occupied, working_affine, input_affine, input_shape)
                if all(b > a for a, b in zip(start, stop)) and self._axis_aligned(working_affine, input_affine):
                    region = (slice(None),) + tuple(slice(a, b) for a, b in zip(start, stop))
                    out[region] = self._separable(values, working_affine, input_affine, start, stop)
                elif all(b > a for a, b in zip(start, stop)):
                    shift = torch.eye(dims + 1, dtype=torch.float64)
                    shift[:dims, dims] = torch.tensor(start, dtype=torch.float64)
                    source = MetaTensor(values, affine=working_affine)
                    box = self.resample(
                        source, dst_affine=input_affine @ shift, spatial_size=[b - a for a, b in zip(start, stop)]
                    )
                    region = (slice(None),) + tuple(slice(a, b) for a, b in zip(start, stop))
                    out[region] = torch.as_tensor(box).as_subclass(torch.Tensor).float()
            d[key] = out
        return d

    @staticmethod
    def _axis_aligned(working_affine: torch.Tensor, input_affine: torch.Tensor) -> bool:
        """True when each input index axis maps to the same working index axis (scaling, flips, shifts only)."""
        dims = working_affine.shape[0] - 1
        linear = torch.linalg.solve(input_affine, working_affine)[:dims, :dims]
        off_diagonal = linear - torch.diag(torch.diagonal(linear))
        return bool(off_diagonal.abs().max() <= 1e-6 * linear.abs().max())

    @staticmethod
    def _separable(
        values: torch.Tensor,
        working_affine: torch.Tensor,
        input_affine: torch.Tensor,
        start: list[int],
        stop: list[int],
    ) -> torch.Tensor:
        """Linear interpolation of ``values`` at the input voxels ``[start, stop)``, one axis at a time.

        For axis-aligned grids (the 2D-slice networks' working grid is the input grid rescaled in-plane, possibly
        flipped) this gives what ``SpatialResample`` gives (zero outside the working grid, linear in between) with
        1D gathers instead of a full ``affine_grid`` + ``grid_sample``: ~5x faster on a 512 x 512 x 100 CT.
        """
        dims = values.ndim - 1
        to_working = torch.linalg.solve(working_affine, input_affine)  # input index -> working index
        result = values
        for axis in range(dims):
            n = result.shape[axis + 1]
            scale, offset = float(to_working[axis, axis]), float(to_working[axis, dims])
            if abs(scale - 1.0) < 1e-9 and abs(offset - round(offset)) < 1e-6:
                # an axis the working grid shares with the input (the slice axis of 2D-slice networks): crop / pad
                first, count = start[axis] + round(offset), stop[axis] - start[axis]
                low, high = max(first, 0), min(first + count, n)
                if high <= low:
                    return torch.zeros((values.shape[0], *[b - a for a, b in zip(start, stop)]))
                part = result.narrow(axis + 1, low, high - low).movedim(axis + 1, -1)
                result = torch.nn.functional.pad(part, (low - first, first + count - high)).movedim(-1, axis + 1)
                continue
            index = torch.arange(start[axis], stop[axis], dtype=torch.float64)
            position = scale * index + offset
            low = torch.floor(position)
            weight = (position - low).float()
            # zero padding: one zero plane each side; indices beyond it read zeros as well
            padded = torch.nn.functional.pad(result.movedim(axis + 1, -1), (1, 1)).movedim(-1, axis + 1)
            low_index = (low.long() + 1).clamp(0, n + 1)
            high_index = (low.long() + 2).clamp(0, n + 1)
            shape = [1] * (dims + 1)
            shape[axis + 1] = -1
            lower = padded.index_select(axis + 1, low_index)
            upper = padded.index_select(axis + 1, high_index)
            blended = lower + (upper - lower) * weight.view(shape)
            outside = ((position < -1) | (position > n)).view(shape)
            result = blended.masked_fill(outside, 0.0)
        return result

    def _input_box(
        self, occupied: torch.Tensor, working_affine: torch.Tensor, input_affine: torch.Tensor, input_shape: list[int]
    ) -> tuple[list[int], list[int]]:
        """Index box ``[start, stop)`` of the input grid covering the occupied working-grid voxels."""
        dims = occupied.ndim
        nonzero = torch.nonzero(occupied)
        low = (nonzero.min(dim=0).values - self.margin).double()
        high = (nonzero.max(dim=0).values + self.margin).double()
        corners = torch.cartesian_prod(*[torch.stack([low[i], high[i]]) for i in range(dims)]).reshape(-1, dims)
        homogeneous = torch.cat([corners, torch.ones(len(corners), 1, dtype=torch.float64)], dim=1).T
        to_input = torch.linalg.solve(input_affine, working_affine)
        mapped = (to_input @ homogeneous)[:dims].T
        start = [max(0, int(np.floor(float(mapped[:, i].min())))) for i in range(dims)]
        stop = [min(input_shape[i], int(np.ceil(float(mapped[:, i].max()))) + 1) for i in range(dims)]
        return start, stop

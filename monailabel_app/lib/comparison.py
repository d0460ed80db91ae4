# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Over/under-segmentation maps (the SaDNN paper's Fig. 4): a prediction compared with a reference, voxel by voxel.

Map values: 0 background in both, 1 agreement (white), 2 over-segmentation = prediction only (green),
3 under-segmentation = reference only (red).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform

__all__ = ["AGREEMENT", "OVER", "UNDER", "COMPARISON_COLOURS", "over_under_map", "comparison_figures", "OverUnderd"]

AGREEMENT, OVER, UNDER = 1, 2, 3
COMPARISON_COLOURS = {
    "agreement": {"value": AGREEMENT, "rgb": [255, 255, 255]},
    "over": {"value": OVER, "rgb": [0, 200, 0]},
    "under": {"value": UNDER, "rgb": [220, 0, 0]},
}


def _as_bool(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask).astype(bool)


def over_under_map(prediction: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor) -> np.ndarray:
    """Comparison map of two binary masks of the same shape.

    Args:
        prediction: foreground mask of the model, any shape.
        reference: foreground mask of the reference, same shape.

    Returns:
        uint8 array of the same shape with values 0, 1 (both), 2 (prediction only), 3 (reference only).
    """
    p, r = _as_bool(prediction), _as_bool(reference)
    if p.shape != r.shape:
        raise ValueError(f"prediction shape {p.shape} and reference shape {r.shape} differ.")
    out = np.zeros(p.shape, dtype=np.uint8)
    out[p & r] = AGREEMENT
    out[p & ~r] = OVER
    out[~p & r] = UNDER
    return out


def comparison_figures(
    prediction: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor, voxel_ml: float
) -> dict[str, Any]:
    """Dice, voxel counts and volumes of a prediction against a reference (binary masks, same shape).

    Dice is 1.0 when both masks are empty.
    """
    p, r = _as_bool(prediction), _as_bool(reference)
    if p.shape != r.shape:
        raise ValueError(f"prediction shape {p.shape} and reference shape {r.shape} differ.")
    agreement = int(np.count_nonzero(p & r))
    over = int(np.count_nonzero(p & ~r))
    under = int(np.count_nonzero(~p & r))
    n_pred, n_ref = agreement + over, agreement + under
    dice = 1.0 if n_pred + n_ref == 0 else 2.0 * agreement / (n_pred + n_ref)
    return {
        "dice": float(dice),
        "agreement_voxels": agreement,
        "over_voxels": over,
        "under_voxels": under,
        "prediction_voxels": n_pred,
        "reference_voxels": n_ref,
        "voxel_ml": float(voxel_ml),
        "over_ml": float(over * voxel_ml),
        "under_ml": float(under * voxel_ml),
        "agreement_ml": float(agreement * voxel_ml),
        "prediction_ml": float(n_pred * voxel_ml),
        "reference_ml": float(n_ref * voxel_ml),
    }


class OverUnderd(MapTransform):
    """Replace a label prediction by its over/under-segmentation map against a reference label map.

    Args:
        keys: prediction keys (label maps on the image grid, ``(*spatial)`` or ``(1, *spatial)``).
        reference_key: key of the reference label map (same grid).
        label_value: label value compared (foreground = voxels equal to it in both maps).
        voxel_ml: volume of one voxel in ml.
        result_key: dictionary receiving ``{"comparison": figures}``.
        reference_name: recorded as ``comparison["reference"]``.
    """

    def __init__(
        self,
        keys: str,
        reference_key: str,
        label_value: int,
        voxel_ml: float,
        result_key: str = "result",
        reference_name: str = "reference",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reference_key = reference_key
        self.label_value = int(label_value)
        self.voxel_ml = float(voxel_ml)
        self.result_key = result_key
        self.reference_name = reference_name

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        reference = np.asarray(d[self.reference_key])
        for key in self.key_iterator(d):
            pred = d[key]
            pred = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
            squeeze = pred.ndim == reference.ndim + 1 and pred.shape[0] == 1
            pred = pred[0] if squeeze else pred
            pred_fg = np.rint(pred) == self.label_value
            ref_fg = np.rint(reference) == self.label_value
            figures = comparison_figures(pred_fg, ref_fg, self.voxel_ml)
            figures["reference"] = self.reference_name
            figures["label_value"] = self.label_value
            figures["values"] = {"agreement": AGREEMENT, "over": OVER, "under": UNDER}
            result = dict(d.get(self.result_key) or {})
            result["comparison"] = figures
            d[self.result_key] = result
            comparison = over_under_map(pred_fg, ref_fg)
            d[key] = comparison[None] if squeeze else comparison
        return d

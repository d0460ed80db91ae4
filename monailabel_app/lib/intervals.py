# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Bootstrap confidence intervals for the held-out figures in ``bundled_weights.json`` and the model cards.

Dice (segmentation, voxels) and F1 (organ presence, slice decisions) are the same pooled statistic,
``2 TP / (2 TP + FP + FN)`` over the counts of every slice. Resampling slices with replacement
(``scipy.stats.bootstrap``, percentile method) gives its spread over slices *of the volumes measured*: with one
held-out patient it says how much the figure depends on which slices were seen, not how it would vary over
patients. Say so next to the interval.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import bootstrap

__all__ = ["pooled_dice", "pooled_dice_interval"]

RESAMPLES = 2000


def pooled_dice(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, axis: int = -1) -> np.ndarray:
    """``2 TP / (2 TP + FP + FN)`` of the counts summed along ``axis``; 1.0 where nothing was expected or found."""
    tp, fp, fn = (np.asarray(a, dtype=np.float64).sum(axis=axis) for a in (tp, fp, fn))
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / np.where(denominator > 0, denominator, 1), 1.0)


def pooled_dice_interval(
    tp: Sequence[float],
    fp: Sequence[float],
    fn: Sequence[float],
    level: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict[str, float | int | str]:
    """The pooled Dice/F1 of per-slice counts and its bootstrap interval over slices.

    Args:
        tp, fp, fn: per-slice counts (voxels for a segmentation, class decisions for a classifier), one entry a slice.
        level: confidence level.
        resamples: bootstrap resamples.
        seed: seed of the resampling (the interval is reproducible).

    Returns:
        ``{"value", "low", "high", "level", "slices", "resamples", "method"}``; with fewer than two slices the
        interval is the value itself.

    Raises:
        ValueError: counts of different lengths, negative counts, or a level outside (0, 1).
    """
    arrays = [np.asarray(a, dtype=np.float64).ravel() for a in (tp, fp, fn)]
    if len({a.size for a in arrays}) != 1:
        raise ValueError(f"tp, fp and fn need one count per slice each, got {[a.size for a in arrays]}")
    if any((a < 0).any() for a in arrays):
        raise ValueError("counts cannot be negative")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    value = float(pooled_dice(*arrays))
    slices = int(arrays[0].size)
    low = high = value
    if slices >= 2 and len({tuple(t) for t in np.stack(arrays, axis=1)}) > 1:
        result = bootstrap(
            tuple(arrays),
            pooled_dice,
            paired=True,
            vectorized=True,
            confidence_level=level,
            n_resamples=resamples,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return {
        "value": round(value, 4),
        "low": round(low, 4),
        "high": round(high, 4),
        "level": level,
        "slices": slices,
        "resamples": resamples,
        "method": "percentile bootstrap over slices",
    }

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Bootstrap intervals of the held-out Dice/F1 (monailabel_app/lib/intervals.py)."""

from __future__ import annotations

import numpy as np
import pytest

from monailabel_app.lib.intervals import pooled_dice, pooled_dice_interval


def _counts(rng: np.random.Generator, slices: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return rng.integers(0, 200, slices), rng.integers(0, 40, slices), rng.integers(0, 40, slices)


def test_pooled_dice_sums_counts_over_slices_before_dividing():
    assert float(pooled_dice([10, 0], [0, 5], [0, 5])) == pytest.approx(20 / 30)  # not the mean of 1.0 and 0.0
    assert float(pooled_dice([0, 0], [0, 0], [0, 0])) == 1.0  # nothing expected, nothing found


def test_interval_matches_a_plain_resampling_loop():
    """The same percentile interval as resampling slice indices by hand (to Monte Carlo error)."""
    rng = np.random.default_rng(0)
    tp, fp, fn = _counts(rng, 30)
    figures = pooled_dice_interval(tp, fp, fn, resamples=4000, seed=1)
    assert figures["low"] <= figures["value"] <= figures["high"]
    loop = np.random.default_rng(2)
    draws = []
    for _ in range(4000):
        i = loop.integers(0, 30, 30)
        draws.append(2 * tp[i].sum() / (2 * tp[i].sum() + fp[i].sum() + fn[i].sum()))
    low, high = np.percentile(draws, [2.5, 97.5])
    assert figures["low"] == pytest.approx(low, abs=0.006) and figures["high"] == pytest.approx(high, abs=0.006)


def test_more_slices_give_a_narrower_interval_and_the_seed_reproduces_it():
    rng = np.random.default_rng(3)
    few = pooled_dice_interval(*_counts(rng, 10))
    many = pooled_dice_interval(*_counts(rng, 160))
    assert many["high"] - many["low"] < few["high"] - few["low"]
    tp, fp, fn = _counts(np.random.default_rng(4), 20)
    assert pooled_dice_interval(tp, fp, fn, seed=7) == pooled_dice_interval(tp, fp, fn, seed=7)


def test_one_slice_or_identical_slices_have_no_spread():
    assert pooled_dice_interval([5], [1], [0])["low"] == pooled_dice_interval([5], [1], [0])["high"]
    same = pooled_dice_interval([5, 5, 5], [1, 1, 1], [0, 0, 0])
    assert same["low"] == same["value"] == same["high"] == pytest.approx(10 / 11, abs=1e-4)


@pytest.mark.parametrize(
    ("counts", "level", "named"),
    [
        (([1, 2], [0], [0, 1]), 0.95, "one count per slice"),
        (([1, -2], [0, 0], [0, 1]), 0.95, "negative"),
        (([1, 2], [0, 0], [0, 1]), 1.5, "level"),
    ],
)
def test_bad_counts_are_named(counts, level, named):
    with pytest.raises(ValueError, match=named):
        pooled_dice_interval(*counts, level=level)

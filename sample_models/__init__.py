# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Small networks trained briefly on the sample CT (:mod:`sample_data`), shared by the tests and the benchmarks.

Benchmarks are production code and must not import the test suite; what both need lives here.

    >>> from sample_models import ct_slices, trained_model
    >>> model, config = trained_model("sadnn_seg_small_2d")

``python -m sample_models [--jobs N] [names]`` trains the models not cached yet, N at a time (``make test`` runs it
first, with one job per core).
"""

from .trained_models import (
    CONFIGS,
    CT_WINDOW_HU,
    ORGAN_CLASSES,
    CTData,
    TrainConfig,
    cache_dir,
    code_digest,
    ct_slices,
    ct_volume_crops,
    data_for,
    train,
    train_missing,
    trained_model,
)

__all__ = [
    "CONFIGS",
    "CT_WINDOW_HU",
    "ORGAN_CLASSES",
    "CTData",
    "TrainConfig",
    "cache_dir",
    "code_digest",
    "ct_slices",
    "ct_volume_crops",
    "data_for",
    "train",
    "train_missing",
    "trained_model",
]

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""A tiny extra model family, added the way docs/adding_a_model_family.md adds one: a network (here a factory entry
of a narrow SaDNN-seg) and one registry entry.

Importing this module registers both; a server started with ``MEDATTN_FAMILY_MODULES=tests.tiny_family`` serves the
family as ``tiny_seg_int8`` / ``tiny_seg_fp32`` (tests/test_registry.py).
"""

from __future__ import annotations

import torch

from networks.factory import register_model
from networks.nets.sadnn_seg import SaDNNSeg
from networks.registry import Int8Recipe, ModelFamily, NetworkVariant, TrainingRecipe, register_family

__all__ = ["TINY", "TINY_NETWORK", "TINY_FAMILY", "register"]

TINY = "tiny_seg"
TINY_NETWORK = "tiny_seg_net"


def tiny_seg_net(**overrides) -> torch.nn.Module:
    """SaDNN-seg four channels wide at every level (~4 k parameters)."""
    return SaDNNSeg(**{"features": (4, 4, 4, 4, 4), **overrides})


TINY_FAMILY = ModelFamily(
    family=TINY,
    task="segmentation",
    description="tiny SaDNN-seg (test family)",
    factory_name=TINY_NETWORK,
    paper=NetworkVariant(factory_name=TINY_NETWORK, input_shape=(1, 32, 32)),
    labels=("liver",),
    input_size=(32, 32),
    spacing=(8.0, 8.0),
    training=TrainingRecipe(max_epochs=1, num_samples=2, learning_rate=1e-3, pos_ratio=0.5),
    int8=Int8Recipe(calibration_slices=4),
)


def register() -> ModelFamily:
    """Register the network and the family (again, after a test removed the family)."""
    register_model(TINY_NETWORK, overwrite=True)(tiny_seg_net)
    return register_family(TINY_FAMILY, overwrite=True)


register()

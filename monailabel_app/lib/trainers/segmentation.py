# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Segmentation train task (MONAI Label ``BasicTrainTask``): 2D slices sampled from the labelled volumes,
foreground-weighted, MONAI ``DiceLoss`` (or ``DiceCELoss``); validation Dice on whole volumes slice by slice; at the
end the INT8 artifact is re-quantised on the datastore's labelled images and FP32 + INT8 are published atomically."""

from __future__ import annotations

import logging
from typing import Any

import torch
from monai.handlers import MeanDice, from_engine
from monai.inferers import SimpleInferer, SliceInferer
from monai.losses import DiceCELoss, DiceLoss
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    EnsureTyped,
    RandAffined,
    RandCropByPosNegLabeld,
    SpatialPadd,
)
from monailabel.tasks.train.basic_train import Context

from monailabel_app.lib.trainers.augmentation import foreground_weighted_slices, intensity_augmentation
from monailabel_app.lib.trainers.base import AppTrainTask

__all__ = ["SegmentationTrain"]

logger = logging.getLogger(__name__)


class SegmentationTrain(AppTrainTask):
    """Train a segmentation family on the datastore's ``final`` labels.

    Request parameters: those of :class:`~.base.AppTrainTask` (``learning_rate`` default 1e-3, ``pos_ratio``: the
    fraction of slices or patches centred on foreground, default 2/3), and ``loss`` (``"dice"``: MONAI ``DiceLoss``,
    default; ``"dicece"``: ``DiceCELoss``, Dice + cross-entropy, which trains SaDNN from scratch far more reliably).
    2D families sample whole slices, 3D families patches of the input size (2 per volume unless ``num_samples``).
    The network learns classes 1..n in the order of ``app_labels``.
    """

    BEST_METRIC_KEY = "best_val_dice"
    SOFTEN_RANDOM_ATTENTION = True
    DESCRIPTION = "Train {family} ({factory_name}) on the datastore's final labels, then re-quantise"
    REQUEST_DEFAULTS = {"learning_rate": 1e-3, "pos_ratio": 2.0 / 3.0, "loss": "dice", "query_init_scale": 0.1}

    def train_pre_transforms(self, context: Context):
        prep = self._prep(context)
        values = list(self.app_labels.values())
        keys = ["image", "label"]
        t = prep.transforms(3, label_key="label", label_values=values, accept_dims=(3,), model_name=self.spec.family)
        pos = float(context.request.get("pos_ratio", 2.0 / 3.0))
        if self.spec.spatial_dims == 2:
            t += foreground_weighted_slices(prep, keys, pos, int(context.request.get("num_samples", 8)))
        else:
            t += [
                # volumes thinner than the window (an MR with 15 slices at 4 mm) are padded first
                SpatialPadd(keys=keys, spatial_size=prep.roi_size),
                RandCropByPosNegLabeld(
                    keys=keys,
                    label_key="label",
                    spatial_size=prep.roi_size,
                    pos=pos,
                    neg=1.0 - pos,
                    num_samples=int(context.request.get("num_samples", 2)),
                    allow_smaller=False,
                ),
            ]
        t += [
            RandAffined(
                keys=keys,
                prob=0.5,
                rotate_range=0.15 if self.spec.spatial_dims == 2 else (0.1, 0.1, 0.1),
                scale_range=0.15,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            *intensity_augmentation(prep),
            EnsureTyped(keys=keys, dtype=(torch.float32, torch.float32), track_meta=False),
        ]
        return t

    def val_pre_transforms(self, context: Context):
        prep = self._prep(context)
        values = list(self.app_labels.values())
        t = prep.transforms(3, label_key="label", label_values=values, accept_dims=(3,), model_name=self.spec.family)
        return t + [EnsureTyped(keys=["image", "label"], track_meta=False)]

    def train_post_transforms(self, context: Context):
        n = len(self.app_labels) + 1
        return [
            Activationsd(keys="pred", softmax=True),
            AsDiscreted(keys=("pred", "label"), argmax=(True, False), to_onehot=(n, n)),
        ]

    # ----- network, loss, inferers -----
    def num_outputs(self) -> int:
        """Network output channels: background + one per label."""
        return len(self.app_labels) + 1

    def loss_function(self, context: Context):
        name = str(context.request.get("loss", "dice")).lower()
        options = dict(include_background=False, to_onehot_y=True, softmax=True, batch=True)
        if name == "dice":
            return DiceLoss(**options, smooth_nr=1e-5, smooth_dr=1e-5)
        if name == "dicece":
            return DiceCELoss(**options, smooth_nr=1e-5, smooth_dr=1e-5)
        raise ValueError(f"unknown loss {name!r}: use 'dice' or 'dicece'")

    def train_inferer(self, context: Context):
        return SimpleInferer()

    def val_inferer(self, context: Context):
        prep = self._prep(context)
        if self.spec.spatial_dims == 2:
            return SliceInferer(roi_size=prep.roi_size, sw_batch_size=16, spatial_dim=2, overlap=0.0)
        from monai.inferers import SlidingWindowInferer

        return SlidingWindowInferer(roi_size=prep.roi_size, sw_batch_size=1, overlap=0.25)

    def train_key_metric(self, context: Context):
        return {
            self.TRAIN_METRIC_MEAN_DICE: MeanDice(
                output_transform=from_engine(["pred", "label"]), include_background=False
            )
        }

    def val_key_metric(self, context: Context):
        return {
            self.VAL_METRIC_MEAN_DICE: MeanDice(
                output_transform=from_engine(["pred", "label"]), include_background=False
            )
        }

    def key_metric_names(self) -> tuple[str, str]:
        return self.TRAIN_METRIC_MEAN_DICE, self.VAL_METRIC_MEAN_DICE

    def task_metadata(self) -> dict[str, Any]:
        """What the published checkpoint records about its task: the network's label values and dimensionality."""
        return {
            "labels": {name: i + 1 for i, name in enumerate(self.app_labels)},
            "spatial_dims": self.spec.spatial_dims,
        }

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Classification train task: per-slice multi-label organ presence derived from the datastore's label maps
(a class is present in an axial slice when its label covers at least 5 voxels there), BCE-with-logits loss,
validation F1 (= Dice of the presence decisions) over every slice of the validation volumes; re-quantised and
published like the segmentation task."""

from __future__ import annotations

import logging
from typing import Any

import torch
from monai.handlers import ConfusionMatrix, from_engine
from monai.inferers import Inferer, SimpleInferer
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    EnsureTyped,
    RandAffined,
)
from monailabel.tasks.train.basic_train import Context

from monailabel_app.lib.trainers.augmentation import foreground_weighted_slices, intensity_augmentation
from monailabel_app.lib.trainers.base import AppTrainTask
from monailabel_app.lib.transforms.labels import PresenceTargetd

__all__ = ["ClassificationTrain", "SliceClassificationInferer"]

logger = logging.getLogger(__name__)


class SliceClassificationInferer(Inferer):
    """Apply a 2D classifier to every axial slice of a volume batch: ``(B, C, H, W, D) -> (B, classes, D)``.

    Args:
        batch_size: slices per classifier call.
    """

    def __init__(self, batch_size: int = 16) -> None:
        super().__init__()
        self.batch_size = int(batch_size)

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        b, c, h, w, depth = inputs.shape
        slices = torch.as_tensor(inputs).permute(0, 4, 1, 2, 3).reshape(b * depth, c, h, w)
        outputs = torch.cat([network(slices[i : i + self.batch_size]) for i in range(0, len(slices), self.batch_size)])
        return outputs.reshape(b, depth, -1).permute(0, 2, 1)


class ClassificationTrain(AppTrainTask):
    """Train a classifier family (SaDNN-cls, HCT, Scopeformer, PatchConvNet: the network comes from the family's
    :class:`ModelSpec`) on per-slice organ presence; classes are the app's labels (``--conf labels``).

    Request parameters: those of :class:`~.base.AppTrainTask`, with ``pos_ratio`` (default 0.5: half the slices
    drawn centred on an organ) and ``learning_rate`` (3e-4).
    """

    VAL_METRIC = "val_f1"
    TRAIN_METRIC = "train_f1"
    BEST_METRIC_KEY = "best_val_f1"
    # the bundled classifiers were trained from the default initialisation
    SOFTEN_RANDOM_ATTENTION = False

    DESCRIPTION = "Train {family} on per-slice organ presence from the final labels, then re-quantise"
    REQUEST_DEFAULTS = {"learning_rate": 3e-4, "pos_ratio": 0.5}

    def train_pre_transforms(self, context: Context):
        prep = self._prep(context)
        keys = ["image", "label"]
        pos = float(context.request.get("pos_ratio", 0.5))
        t = prep.transforms(3, label_key="label", label_values=list(self.app_labels.values()), accept_dims=(3,))
        return t + [
            *foreground_weighted_slices(prep, keys, pos, int(context.request.get("num_samples", 8))),
            PresenceTargetd(keys="label", num_classes=len(self.app_labels)),
            RandAffined(keys="image", prob=0.5, rotate_range=0.15, scale_range=0.1, padding_mode="zeros"),
            *intensity_augmentation(prep),
            EnsureTyped(keys=keys, dtype=(torch.float32, torch.float32), track_meta=False),
        ]

    def val_pre_transforms(self, context: Context):
        prep = self._prep(context)
        t = prep.transforms(3, label_key="label", label_values=list(self.app_labels.values()), accept_dims=(3,))
        return t + [
            PresenceTargetd(keys="label", num_classes=len(self.app_labels)),
            EnsureTyped(keys=["image", "label"], track_meta=False),
        ]

    def train_post_transforms(self, context: Context):
        return [Activationsd(keys="pred", sigmoid=True), AsDiscreted(keys="pred", threshold=0.5)]

    def num_outputs(self) -> int:
        """One logit per class (multi-label presence, no background)."""
        return len(self.app_labels)

    def loss_function(self, context: Context):
        return torch.nn.BCEWithLogitsLoss()

    def train_inferer(self, context: Context):
        return SimpleInferer()

    def val_inferer(self, context: Context):
        return SliceClassificationInferer(batch_size=16)

    def train_key_metric(self, context: Context):
        return {
            self.TRAIN_METRIC: ConfusionMatrix(
                include_background=True, metric_name="f1 score", output_transform=from_engine(["pred", "label"])
            )
        }

    def val_key_metric(self, context: Context):
        return {
            self.VAL_METRIC: ConfusionMatrix(
                include_background=True, metric_name="f1 score", output_transform=from_engine(["pred", "label"])
            )
        }

    def key_metric_names(self) -> tuple[str, str]:
        return self.TRAIN_METRIC, self.VAL_METRIC

    def task_metadata(self) -> dict[str, Any]:
        return {
            "classes": self.class_names(),
            "targets": "per-slice organ presence derived from the label maps (>= 5 voxels of the organ in the slice)",
            "spatial_dims": 2,
        }

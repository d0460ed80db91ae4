# Copyright MedAttnSlicer contributors. Apache-2.0.
"""What makes a run's weights independent of how many ranks train it (request fields ``seed_per_image`` and
``freeze_batchnorm``; both off by default).

DDP averages the ranks' gradients, so a step over N ranks equals a step of one process on the whole global batch
only when (a) every sample is drawn and augmented the same way whichever process draws it, and (b) the loss of the
global batch is the mean of per-sample terms. By default neither holds: each rank draws its samples from its own
random stream (``seed + rank``), and BatchNorm normalises each rank's batch with that batch's own statistics (DDP
keeps them per rank; ``torch.nn.SyncBatchNorm`` would share them, but it refuses CPU tensors). So:

- :class:`ImageSeededDataset` re-seeds the random transforms before each fetch from ``(seed, image, n-th fetch of
  that image)``: image X gets the same slices and augmentation in its k-th epoch whatever rank (or world size) takes it;
- :func:`freeze_batchnorm` makes BatchNorm layers normalise with their running statistics (as at inference) and leave
  them unchanged, which is also the usual way to fine-tune with batches of a few slices.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from monai.utils import MAX_SEED

from monailabel_app.lib.trainers.datalist import image_id_of

__all__ = ["ImageSeededDataset", "freeze_batchnorm", "request_flag"]


def request_flag(value: Any) -> bool:
    """A request's boolean field, given as JSON ``true``/``false`` or as text (``"false"`` is false)."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class ImageSeededDataset(torch.utils.data.Dataset):
    """A MONAI dataset whose random transforms are re-seeded per image and per fetch.

    Args:
        dataset: a MONAI ``Dataset`` (e.g. ``CacheDataset``) whose ``transform`` is a ``Compose``.
        datalist: its items (``{"image": path, ...}``), in the dataset's order.
        seed: the run's seed.

    The fetch counter lives in this process: use it with a loader of ``num_workers=0`` (the trainers' default).
    """

    def __init__(self, dataset: Any, datalist: Sequence[dict[str, Any]], seed: int) -> None:
        self.dataset = dataset
        self.image_ids = [image_id_of(d["image"]) for d in datalist]
        self.seed = int(seed)
        self._fetches = [0] * len(self.image_ids)

    def __len__(self) -> int:
        return len(self.dataset)

    def item_seed(self, index: int, fetch: int) -> int:
        """The seed of the ``fetch``-th draw of item ``index`` (a stable hash: the same in every process)."""
        key = f"{self.seed}/{self.image_ids[index]}/{fetch}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") % MAX_SEED

    def __getitem__(self, index: int) -> Any:
        fetch = self._fetches[index]
        self._fetches[index] += 1
        self.dataset.transform.set_random_state(seed=self.item_seed(index, fetch))
        return self.dataset[index]


def _normalise_with_running_statistics(module: torch.nn.Module, args: tuple) -> None:
    # the trainer switches the network to training mode every iteration; this runs just before each BN forward
    module.training = False


def freeze_batchnorm(network: torch.nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Make every BatchNorm layer of ``network`` use (and keep) its running statistics, also in training mode; its
    affine weights still train. Returns the hooks' handles (``handle.remove()`` undoes it)."""
    handles = []
    for module in network.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            handles.append(module.register_forward_pre_hook(_normalise_with_running_statistics))
    return handles

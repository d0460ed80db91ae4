# Copyright MedAttnSlicer contributors. Apache-2.0.
"""What every train task of the app shares (MONAI Label ``BasicTrainTask``): request defaults, the datastore's
training/validation roles, the starting network, optimiser and schedule, progress reporting, and the end of a run:
re-quantise on the training images and publish FP32 + INT8 atomically, in one process or as ``torchrun`` ranks.

A task (:class:`~.segmentation.SegmentationTrain`, :class:`~.classification.ClassificationTrain`) adds only what
differs: its sampling and augmentation, outputs, loss, inferers, metrics and checkpoint metadata. Neither derives
from the other, so a change to one task's training never changes the other's.
"""

from __future__ import annotations

import logging
import os
import shutil
from abc import abstractmethod
from typing import Any

import torch
from monai.handlers import LrScheduleHandler
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.basic_train import BasicTrainTask, Context

from monailabel_app.lib.errors import ConflictError
from monailabel_app.lib.image_io import read_header
from monailabel_app.lib.model_store import ModelFiles, ModelSpec, NetworkCache
from monailabel_app.lib.preprocess import Preprocessing
from monailabel_app.lib.trainers.common import TrainProgress, calibration_slices, initial_network, publish_trained
from monailabel_app.lib.trainers.data_parallel import DataParallelTrain
from monailabel_app.lib.trainers.datalist import image_id_of, read_training_roles, split_datalist
from monailabel_app.lib.trainers.reproducible import freeze_batchnorm, request_flag

__all__ = ["AppTrainTask"]

logger = logging.getLogger(__name__)


class AppTrainTask(DataParallelTrain, BasicTrainTask):
    """Base of the app's train tasks: trains a family on the datastore's ``final`` labels of 3D images.

    Request parameters shared by every task (``POST /train/<family>``): ``max_epochs`` (default 10),
    ``train_batch_size`` (volumes per step, default 2), ``num_samples`` (samples drawn per volume per step, default
    8), ``learning_rate``, ``val_split`` (0.2), ``pos_ratio`` (fraction of samples centred on foreground),
    ``calibration_slices`` (32), ``pretrained`` (start from the served weights, default true), ``seed`` (0),
    ``query_init_scale`` (multiplies the query projections of a network started from random weights, default 0.1;
    see :func:`networks.blocks.scale_query_init`; tasks with ``SOFTEN_RANDOM_ATTENTION``), ``seed_per_image`` and
    ``freeze_batchnorm`` (default false; both true: the same weights whatever the number of ranks, see
    :mod:`.reproducible`).

    Data-parallel training (:mod:`.data_parallel`): ``workers`` (ranks on this machine, default 1), ``nnodes``
    (machines, default 1), ``rdzv_endpoint`` (``HOST:PORT`` of the first machine; default 127.0.0.1 and a free
    port), ``rdzv_id``, ``join_timeout`` (seconds, default 300), ``threads`` (torch threads per rank, default cores //
    workers). ``train_batch_size`` is per rank.

    Args:
        spec: the family.
        files: its files (published into ``files.trained_dir``).
        app_labels: ``{name: datastore value}`` the network learns.
        cache: the app's network cache (unused in the training subprocess; kept for symmetry with infer tasks).
    """

    # key of the best validation metric in the published checkpoint's "trained" metadata
    BEST_METRIC_KEY: str
    # scale the query projections of a network started from random weights by ``query_init_scale``
    SOFTEN_RANDOM_ATTENTION: bool
    # ``description`` shown by /info (formatted with ``family`` and ``factory_name``)
    DESCRIPTION: str
    # the task's own request defaults (learning rate, foreground ratio, loss, ...)
    REQUEST_DEFAULTS: dict[str, Any]

    def __init__(
        self, spec: ModelSpec, files: ModelFiles, app_labels: dict[str, int], cache: NetworkCache | None = None
    ) -> None:
        self.spec = spec
        self.files = files
        self.app_labels = dict(app_labels)
        self._context: Context | None = None
        super().__init__(
            model_dir=os.path.join(files.trained_dir, "runs"),
            description=self.DESCRIPTION.format(family=spec.family, factory_name=spec.factory_name),
            config={
                "max_epochs": 10,
                "train_batch_size": 2,
                "val_batch_size": 1,
                "val_split": 0.2,
                "num_samples": 8,
                "calibration_slices": 32,
                **self.REQUEST_DEFAULTS,
                "seed": 0,
                "dataset": "CacheDataset",
                "dataloader": "DataLoader",
                "pretrained": True,
                "loss": "dice",
                "query_init_scale": 0.1,
                "multi_gpu": False,
                "tracking": "None",
            },
            amp=False,
            load_path=None,
            publish_path=None,
            stats_path=self.stats_path,
            train_save_interval=10_000,
            n_saved=1,
            labels=list(app_labels),
        )

    @property
    def stats_path(self) -> str:
        return os.path.join(self.files.trained_dir, f"{self.spec.family}_train_stats.json")

    def info(self):
        r = super().info()
        r["family"] = self.spec.family
        return r

    # ----- data -----
    def class_names(self) -> list[str]:
        return list(self.app_labels)

    def preprocessing(self) -> Preprocessing:
        """The preprocessing of the served checkpoint (a retrained model keeps it), else the family's input size and
        spacing (its :mod:`networks.registry` entry) with the default intensity settings."""
        path = self.files.current("fp32")
        if path:
            from monailabel_app.lib.model_store import read_app_metadata

            meta = read_app_metadata(path)
            if meta.get("preprocess"):
                return Preprocessing.from_dict(meta["preprocess"])
        return Preprocessing(spacing=self.spec.spacing, roi_size=self.spec.input_size)

    def pre_process(self, request, datastore: Datastore):
        # the datastore's notes may hold labelled images out of training (held out / derived): partition_datalist
        request["_studies_dir"] = getattr(datastore, "_datastore_path", None)
        datalist = []
        for item in datastore.datalist():
            dims = read_header(item["image"]).dims
            if dims != 3:
                logger.warning(f"skipping {item['image']}: {dims}D (segmentation training samples slices of volumes)")
                continue
            datalist.append(item)
        if not datalist:
            raise ConflictError("no labelled 3D image (labels/final) in the datastore to train on.")
        # the same order on every rank and machine: the ranks' shares are taken from it
        return sorted(datalist, key=lambda d: image_id_of(d["image"]))

    def _prep(self, context: Context) -> Preprocessing:
        if not hasattr(context, "prep"):
            context.prep = self.preprocessing()
        return context.prep

    # ----- network and optimisation -----
    def network(self, context: Context):
        model, factory_name, factory_kwargs, start_meta = initial_network(
            self.spec,
            self.files,
            num_outputs=self.num_outputs(),
            class_names=self.class_names(),
            pretrained=bool(context.request.get("pretrained", True)),
        )
        context.factory = (factory_name, factory_kwargs, start_meta)
        if not start_meta and self.SOFTEN_RANDOM_ATTENTION:
            # random weights: soften the initial attention (no effect on nets without SASA layers)
            from networks.blocks import scale_query_init

            scale_query_init(model, float(context.request.get("query_init_scale", 0.1)))
        context.batchnorm_hooks = []
        if request_flag(context.request.get("freeze_batchnorm", False)):
            context.batchnorm_hooks = freeze_batchnorm(model)  # removed after training, before publishing
        return model

    def optimizer(self, context: Context):
        lr = float(context.request.get("learning_rate", 1e-3))
        return torch.optim.Adam(context.network.parameters(), lr=lr, weight_decay=1e-5)

    def lr_scheduler_handler(self, context: Context):
        # cosine decay to 1/10 of the learning rate over the run, stepped every iteration
        steps_per_epoch = max(1, -(-self.rank_train_count(context) // max(1, int(context.train_batch_size))))
        total = max(1, int(context.max_epochs) * steps_per_epoch)
        lr = float(context.request.get("learning_rate", 1e-3))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(context.optimizer, T_max=total, eta_min=lr / 10)
        return LrScheduleHandler(scheduler, print_lr=False, epoch_level=False)

    # ----- what each task defines -----
    @abstractmethod
    def num_outputs(self) -> int:
        """Network output channels."""

    @abstractmethod
    def key_metric_names(self) -> tuple[str, str]:
        """``(training metric, validation metric)`` names, as the task's key metrics report them."""

    @abstractmethod
    def task_metadata(self) -> dict[str, Any]:
        """What the published checkpoint records about its task (labels or classes, dimensionality)."""

    def load_path(self, output_dir, pretrained=True):
        # initialisation from the served checkpoint happens in network(); never resume stale run checkpoints
        return None

    def partition_datalist(self, context: Context, shuffle=False):
        """Train on the labelled images the datastore's notes do not exclude, validate on its held-out images
        (``datastore_notes.json`` ``training``, see :mod:`.datalist`); without such notes MONAI Label's
        ``val_split`` partition. ``context.metric_note`` says what the validation metric is computed on."""
        request = context.request
        context.excluded_images = {}
        split = None
        if not request.get("val_ds") and not request.get("train_ds"):
            roles = read_training_roles(request.get("_studies_dir"))
            split = split_datalist(context.datalist, roles, float(request.get("val_split", 0.0) or 0.0))
        if split is not None:
            train, val, context.excluded_images, context.metric_note = split
            if not train:
                raise ConflictError(
                    "no labelled image left to train on: the datastore's notes (datastore_notes.json 'training') "
                    f"exclude {sorted(context.excluded_images)}; label another image."
                )
            logger.info(f"Total Records for Training: {len(train)}; Validation: {len(val)}; {context.metric_note}")
            return train, val
        train, val = super().partition_datalist(context, shuffle=shuffle)
        if not train:  # a single labelled volume: train on it, validate on it too
            train = val
            context.metric_note = "one labelled image: validated on the image it is trained on"
        elif val:
            context.metric_note = (
                f"validation metric computed on {', '.join(image_id_of(d['image']) for d in val)}, a val_split "
                "share of the labelled images, not trained on"
            )
        else:
            context.metric_note = "no validation split: the metric is the training metric, on the training images"
        return train, val

    # ----- run -----
    def finalize(self, context: Context):
        self._context = context
        context.progress = None
        distributed = self.gather_rank_roles(context)  # every rank takes part
        if context.local_rank != 0:  # the lead rank (MONAI Label's rank 0 here) alone reports progress
            return
        train_metric, val_metric = self.key_metric_names()
        metric = val_metric if context.evaluator else train_metric
        context.progress = TrainProgress(self.stats_path, self.spec.family, context.run_id, context.max_epochs, metric)
        context.progress.attach(context.trainer, context.evaluator)
        context.progress.write(**self._data_roles(context), distributed=distributed)

    @staticmethod
    def _data_roles(context: Context) -> dict[str, Any]:
        """What a run trained and validated on (train stats and checkpoint metadata)."""
        return {
            "train_images": [image_id_of(d["image"]) for d in context.train_datalist],
            "val_images": [image_id_of(d["image"]) for d in context.val_datalist] if context.evaluator else [],
            "excluded_images": dict(getattr(context, "excluded_images", {}) or {}),
            "metric_note": getattr(context, "metric_note", None),
        }

    def train(self, rank, world_size, request, datalist):
        """One run (in this process, or as one ``torchrun`` rank): train, then, on the lead rank only (rank 0 on one
        machine), re-quantise and publish. Ranks draw their augmentations from ``seed + rank``; DDP starts them all
        from rank 0's weights."""
        request = dict(request)
        request["name"] = f"{self.spec.family}_run"
        request["multi_gpu"] = False  # MONAI Label's CUDA/NCCL path; CPU ranks come from torchrun (join_ranks)
        ranks = self.join_ranks()
        try:
            if ranks is not None:
                # the lead rank (publishes) plays MONAI Label's rank 0; data shares follow the real ranks
                rank, world_size = self.role_rank(), ranks.world_size
                self.check_same_datalist(datalist)
            seed = int(request.get("seed", 0))
            torch.manual_seed(seed + rank)
            from monai.utils import set_determinism

            set_determinism(seed=seed + rank)
            run_dir = os.path.join(self._model_dir, request["name"])
            if rank == 0:
                shutil.rmtree(run_dir, ignore_errors=True)
            if ranks is not None:
                torch.distributed.barrier()  # nobody writes into the run folder before the lead has emptied it
            stats = super().train(rank, world_size, request, datalist)
            context = self._context
            for hook in getattr(context, "batchnorm_hooks", []):
                hook.remove()
            digests = self.check_replicas(context.network)
            if rank != 0:
                return stats
        finally:
            self.leave_ranks()
        progress: TrainProgress = context.progress
        try:
            # time in the training loop alone (no start-up, caching or quantisation): benchmarks compare it
            progress.write(
                train_seconds=round(float(context.trainer.state.times.get("COMPLETED") or 0.0), 3),
                iterations=context.trainer.state.iteration,
                replica_digests=digests,
            )
            progress.write(status="QUANTIZING")
            published = self.publish(context, datalist, stats)
        except BaseException as err:
            progress.write(status="FAILED", error=f"{type(err).__name__}: {err}")
            raise
        progress.write(status="PUBLISHED", published=published)
        stats["published"] = published
        return stats

    def publish(self, context: Context, datalist, stats: dict[str, Any]) -> dict[str, Any]:
        network = getattr(context.network, "module", context.network)  # a DDP replica: its module
        best = os.path.join(context.output_dir, self._key_metric_filename)
        if context.evaluator is not None and os.path.exists(best):
            # the weights of the best validation epoch (CheckpointSaver's key-metric file)
            state = torch.load(best, map_location="cpu", weights_only=True)
            network.load_state_dict(state.get(self._model_dict_key, state))
        prep = self._prep(context)
        factory_name, factory_kwargs, start_meta = context.factory
        calibration, used = (
            calibration_slices(
                context.train_datalist,  # never the held-out / excluded images
                prep,
                list(self.app_labels.values()),
                n_slices=int(context.request.get("calibration_slices", 32)),
                seed=int(context.request.get("seed", 0)),
            )
            if self.spec.int8
            else ([], [])
        )
        app_meta = {
            "family": self.spec.family,
            "task": self.spec.task,
            **self.task_metadata(),
            "datastore_label_values": dict(self.app_labels),
            "preprocess": prep.to_dict(),
            "trained": {
                "run_id": context.run_id,
                "epochs": stats.get("epoch"),
                self.BEST_METRIC_KEY: stats.get("best_metric"),
                "train_images": [os.path.basename(d["image"]) for d in context.train_datalist],
                "val_images": [os.path.basename(d["image"]) for d in context.val_datalist] if context.evaluator else [],
                "excluded_images": dict(getattr(context, "excluded_images", {}) or {}),
                "metric_note": getattr(context, "metric_note", None),
                "started_from": start_meta.get("trained", {}).get("run_id", "bundled" if start_meta else "random"),
                "world_size": max(1, int(context.world_size or 1)),  # ranks that trained it (DDP)
            },
            "calibration": {"slices": sum(len(b) for b in calibration), "images": [os.path.basename(p) for p in used]},
        }
        return publish_trained(
            self.spec, self.files, network, factory_name, factory_kwargs, app_meta, calibration, context.run_id
        )

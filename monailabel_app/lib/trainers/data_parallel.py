# Copyright MedAttnSlicer contributors. Apache-2.0.
"""What makes the app's train tasks data-parallel on CPU (a mixin before MONAI Label's ``BasicTrainTask``).

A request with ``workers`` > 1 (or ``nnodes`` > 1) is not trained in the calling process: :meth:`__call__` checks the
settings and the data, then starts ``torchrun`` (:func:`~.distributed.run_torchrun`) with every rank running
``python -m monailabel_app.train`` on the same datastore and app options. In each rank:

- the gloo process group is joined and the cores shared out (:func:`~.distributed.init_rank`);
- the training images are split between the ranks (MONAI ``partition_dataset``, :func:`~.distributed.rank_share`),
  validation images too (metrics are gathered over the ranks by MONAI's metric handlers);
- the network is wrapped in ``DistributedDataParallel``: every step all-reduces (averages) the gradients, so the
  global batch is ``workers x nnodes x train_batch_size`` volumes;
- at the end every rank's weight digest is compared and one rank alone re-quantises and publishes (see the
  task's ``train``): the lowest rank on the first machine (:func:`~.distributed.lead_rank`; rank 0 on one machine).
  MONAI Label's rank-0-only handlers (statistics, checkpoints) run on that rank: it is given rank 0 in the task's
  context, the others keep their own numbers (rank 0 takes the lead's).

MONAI Label's own ``multi_gpu`` path spawns one process per CUDA device and uses NCCL: it never starts on a CPU
server, so it stays off (``multi_gpu: False``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import Any

import torch
from monailabel.tasks.train.basic_train import Context

from monailabel_app.lib.errors import BadInputError
from monailabel_app.lib.json_files import atomic_write_json, read_json
from monailabel_app.lib.trainers.datalist import image_id_of
from monailabel_app.lib.trainers.distributed import (
    LAUNCH_KEYS,
    DistributedTrainingError,
    LaunchSettings,
    RankInfo,
    init_rank,
    is_first_machine,
    launch_fields,
    lead_rank,
    parameter_digest,
    rank_from_env,
    rank_share,
    run_torchrun,
)
from monailabel_app.lib.trainers.reproducible import ImageSeededDataset, request_flag

__all__ = ["DataParallelTrain"]

logger = logging.getLogger(__name__)


class DataParallelTrain:
    """Mixin: data-parallel training over ``torchrun`` ranks for a ``BasicTrainTask`` subclass.

    Attributes:
        app_dir: the app folder the ranks load (default: MONAI Label's ``MONAI_LABEL_APP_DIR``, i.e. the server's).
        app_conf: the app's ``--conf`` options the ranks use (default: the server's ``MONAI_LABEL_APP_CONF``).
    """

    app_dir: str | None = None
    app_conf: dict[str, Any] | None = None
    _rank_info: RankInfo | None = None
    _lead_rank: int = 0

    # ----- launcher side -----
    @staticmethod
    def launch_settings(request: dict[str, Any]) -> LaunchSettings | None:
        """The request's ``workers``/``nnodes``/``rdzv_*``/``join_timeout``/``threads``, checked; ``None`` for a run
        in one process (which then uses ``threads`` torch threads, when given).

        Raises:
            ValueError: a setting that cannot work, named.
        """
        given = launch_fields(request)
        if not given:
            return None
        settings = LaunchSettings(**given).validated()
        if settings.world_size > 1:
            return settings
        if settings.threads:  # one process: it trains here, with the threads asked for
            torch.set_num_threads(settings.threads)
        return None

    def __call__(self, request: dict[str, Any], datastore):
        if rank_from_env() is None:
            try:
                settings = self.launch_settings(request)
            except ValueError as err:
                self._write_failed(str(err))
                raise BadInputError(str(err)) from err
            if settings is not None:
                return self._run_ranks(settings, request, datastore)
        return super().__call__(request, datastore)

    def _run_ranks(self, settings: LaunchSettings, request: dict[str, Any], datastore) -> dict[str, Any]:
        from monailabel.config import settings as monailabel_settings

        family = self.spec.family
        studies = getattr(datastore, "_datastore_path", None)
        if not studies or not os.path.isdir(studies):
            raise BadInputError("distributed training needs a datastore folder every rank can read (not DICOMweb).")
        self.pre_process(dict(request), datastore)  # nothing to train on: fail here, before any rank starts
        app_dir = self.app_dir or monailabel_settings.MONAI_LABEL_APP_DIR
        app_dir = app_dir or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        conf = self.app_conf if self.app_conf is not None else dict(monailabel_settings.MONAI_LABEL_APP_CONF or {})
        rank_request = {k: v for k, v in request.items() if k not in LAUNCH_KEYS and not str(k).startswith("_")}
        rank_request["model"] = family
        args = [
            "--app-dir", str(app_dir),
            "--studies", str(studies),
            "--model", family,
            "--conf-json", json.dumps(conf),
            "--request-json", json.dumps(rank_request, default=str),
        ]  # fmt: skip
        logger.info(f"training {family} on {settings.world_size} ranks: {settings.describe()}")
        try:
            run_torchrun(settings, "monailabel_app.train", args)
        except DistributedTrainingError as err:
            self._write_failed(str(err), settings)
            raise
        if not is_first_machine(settings):
            return {"status": "DONE", "note": "the first machine (rdzv_endpoint's host) published the weights"}
        stats = self.stats()
        if stats.get("status") != "PUBLISHED":
            message = f"distributed training ended without publishing (train stats status {stats.get('status')!r})."
            self._write_failed(message, settings)
            raise DistributedTrainingError(message)
        return stats

    def _write_failed(self, message: str, settings: LaunchSettings | None = None) -> None:
        """Mark the run FAILED in the train stats (``/info`` ``train_stats``) with ``message``."""
        stats = read_json(self.stats_path) or {}
        if settings is None or stats.get("status") not in ("RUNNING", "QUANTIZING"):
            stats = {"task": self.spec.family}  # else: this run's stats, written by its rank 0 until it stopped
        stats.update({"status": "FAILED", "error": message})
        if settings is not None:
            stats.setdefault("distributed", {"world_size": settings.world_size})
        os.makedirs(os.path.dirname(self.stats_path), exist_ok=True)
        atomic_write_json(self.stats_path, stats)

    # ----- rank side -----
    def join_ranks(self) -> RankInfo | None:
        """Inside ``torchrun``: join the process group (gloo) and set this rank's threads; ``None`` otherwise."""
        info = rank_from_env()
        self._lead_rank = 0
        if info is not None:
            init_rank(info)
            self._lead_rank = lead_rank(info)
        self._rank_info = info
        return info

    def role_rank(self) -> int:
        """The rank number this process plays in MONAI Label's task (0: the lead, which reports and publishes)."""
        info = self._rank_info
        if info is None:
            return 0
        if info.rank == self._lead_rank:
            return 0
        return self._lead_rank if info.rank == 0 else info.rank

    def leave_ranks(self) -> None:
        if self._rank_info is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        self._rank_info = None

    def rank_train_count(self, context: Context) -> int:
        """Training images this rank iterates over per epoch."""
        info = self._rank_info
        if info is None:
            return len(context.train_datalist)
        return len(rank_share(context.train_datalist, info.rank, info.world_size, even=True))

    def _dataset(self, context: Context, datalist, is_train: bool, replace_rate: float = 0.25):
        info = self._rank_info
        if info is not None:
            datalist = rank_share(datalist, info.rank, info.world_size, even=is_train)
        dataset, datalist = super()._dataset(context, datalist, is_train, replace_rate)
        if is_train and request_flag(context.request.get("seed_per_image", False)):
            # samples drawn per image, not per rank: the same run whatever the world size (see .reproducible)
            dataset = ImageSeededDataset(dataset, datalist, int(context.request.get("seed", 0)))
        return dataset, datalist

    def _create_network_and_optimizer(self, context: Context):
        network, optimizer = super()._create_network_and_optimizer(context)
        if self._rank_info is not None:
            # CPU: no device ids; DDP broadcasts rank 0's weights now and averages gradients every step
            network = torch.nn.parallel.DistributedDataParallel(
                network, find_unused_parameters=self._find_unused_parameters
            )
        return network, optimizer

    def _create_evaluator(self, context: Context):
        # validation runs on the plain module: a DDP forward may broadcast buffers (a collective), and ranks may
        # hold different numbers of validation images; the metric handlers gather the results over the ranks
        wrapped = context.network
        context.network = getattr(wrapped, "module", wrapped)
        try:
            return super()._create_evaluator(context)
        finally:
            context.network = wrapped

    def gather_rank_roles(self, context: Context) -> dict[str, Any] | None:
        """Every rank's pid, host, threads and training images (a collective: every rank calls it); ``None`` in a
        run of one process."""
        info = self._rank_info
        if info is None:
            return None
        share = rank_share(context.train_datalist, info.rank, info.world_size, even=True)
        mine = {
            "rank": info.rank,
            "local_rank": info.local_rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "threads": torch.get_num_threads(),
            "publishes": info.rank == self._lead_rank,
            "train_images": [image_id_of(d["image"]) for d in share],
        }
        gathered: list[Any] = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, mine)
        return {"world_size": info.world_size, "backend": "gloo", "ranks": gathered}

    def check_replicas(self, network: torch.nn.Module) -> list[str] | None:
        """After training: every rank's parameter digest (a collective); raises if the replicas differ, which would
        mean the gradients were not all-reduced. ``None`` in a run of one process."""
        info = self._rank_info
        if info is None:
            return None
        digests: list[Any] = [None] * info.world_size
        torch.distributed.all_gather_object(digests, parameter_digest(getattr(network, "module", network)))
        if len(set(digests)) != 1:
            raise DistributedTrainingError(
                f"the ranks' weights differ after training ({digests}): gradients were not all-reduced; nothing "
                "was published."
            )
        return digests

    def check_same_datalist(self, datalist) -> None:
        """Every rank must see the same labelled images in the same order, or the shares overlap and miss images
        (a collective)."""
        info = self._rank_info
        if info is None:
            return
        mine = [image_id_of(d["image"]) for d in datalist]
        gathered: list[Any] = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, mine)
        differing = [r for r, ids in enumerate(gathered) if ids != gathered[0]]
        if differing:
            raise DistributedTrainingError(
                f"ranks {differing} see different labelled images than rank 0 ({gathered[differing[0]]} vs "
                f"{gathered[0]}): every machine needs the same datastore (a shared folder or identical copies)."
            )

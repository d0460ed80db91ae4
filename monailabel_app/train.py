# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Train a served family from a shell, without the server or Slicer, in one process or data-parallel on CPU.

    python -m monailabel_app.train --studies DIR --model sadnn_seg [--set max_epochs=10 ...] [--workers 2]

    # several machines: the same command on every machine (the first one's address as the endpoint)
    python -m monailabel_app.train --studies DIR --model sadnn_seg --workers 2 \\
        --nnodes 2 --rdzv-endpoint 10.0.0.1:29400 --rdzv-id liver_run

    # or torchrun directly (every rank runs this module)
    torchrun --nnodes 2 --nproc_per_node 2 --rdzv_backend c10d --rdzv_endpoint 10.0.0.1:29400 --rdzv_id liver_run \\
        -m monailabel_app.train --studies DIR --model sadnn_seg

It is the server's own train task (``POST /train/<family>``, :mod:`monailabel_app.lib.trainers`) with the app's
``--conf`` options: it trains on the datastore's ``final`` labels, re-quantises INT8 and publishes FP32 + INT8
atomically into ``--conf model_dir`` (default ``.data/trained``), where a running server picks them up. ``--set``
takes the train request's parameters (``max_epochs``, ``train_batch_size`` (per rank), ``learning_rate``,
``val_split``, ...). With ``--workers N`` (> 1) or ``--nnodes M`` it starts ``torchrun``; inside ``torchrun`` (``RANK``
set) it is one rank. Exit status: 0 published, 1 the run failed, 2 bad options or settings (the message names them).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

__all__ = ["main", "build_task", "parse_value"]

logger = logging.getLogger("monailabel_app.train")


def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON when it parses (numbers, true/false, lists), else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), parse_value(value.strip())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m monailabel_app.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", required=True, help="the datastore folder (images + labels/final)")
    p.add_argument("--model", required=True, help="the family to train: sadnn_seg, sadnn_cls, hct_cls, ...")
    p.add_argument("--app-dir", default=str(Path(__file__).resolve().parent), help="the app folder")
    p.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="the app's --conf options, as for the server (labels, model_dir, ...)")  # fmt: skip
    p.add_argument("--set", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="a train request parameter (max_epochs=5, learning_rate=1e-4, ...)")  # fmt: skip
    p.add_argument("--workers", type=parse_value, default=None, help="ranks on this machine (default 1)")
    p.add_argument("--nnodes", type=parse_value, default=None, help="machines taking part (default 1)")
    p.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the first machine (default 127.0.0.1:free)")
    p.add_argument("--rdzv-id", default=None, help="job id, the same on every machine")
    p.add_argument("--join-timeout", type=parse_value, default=None, help="seconds to wait for every machine (300)")
    p.add_argument("--threads", type=parse_value, default=None, help="torch threads per rank (cores // workers)")
    p.add_argument("--output", default=None, help="write the run's train stats (JSON) here")
    # how a launcher hands the server's options to its ranks
    p.add_argument("--conf-json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--request-json", default=None, help=argparse.SUPPRESS)
    return p


def build_task(app_dir: str, conf: dict[str, Any], family: str):
    """The app's train task for ``family`` with the app options ``conf`` (as the server builds it)."""
    from monailabel_app.lib.app_config import AppConfig
    from monailabel_app.lib.configs import CONFIGS
    from monailabel_app.lib.model_store import NetworkCache

    app_config = AppConfig.from_conf(app_dir, conf)
    config_class = CONFIGS.get(family)
    task = None
    if config_class is not None:
        config = config_class()
        config.init(family, app_config.model_dir, conf, None, app_config=app_config, cache=NetworkCache())
        task = config.trainer()
    if task is None:
        trainable = []
        for name, cls in CONFIGS.items():
            c = cls()
            c.init(name, app_config.model_dir, conf, None, app_config=app_config, cache=NetworkCache())
            if c.trainer() is not None:
                trainable.append(name)
        raise ValueError(f"--model {family!r} cannot be trained; trainable families: {trainable}")
    task.app_dir = app_dir
    task.app_conf = dict(conf)
    return task


def _datastore(studies: str):
    from monailabel.config import settings

    from monailabel_app.lib.datastore import SafeLocalDatastore

    if not os.path.isdir(studies):
        raise ValueError(f"--studies {studies!r} is not a folder.")
    return SafeLocalDatastore(
        os.path.abspath(studies), extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False
    )


def _stop_on_sigterm() -> None:
    """torchrun stops the other ranks with SIGTERM when one dies: turn it into ``SystemExit`` so that a rank 0
    caught publishing removes its staged files (the published ones are replaced atomically or not at all)."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from monailabel_app.lib.trainers.distributed import DistributedTrainingError, rank_from_env

    rank = rank_from_env()
    prefix = f"[rank {rank.rank}] " if rank else ""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s")
    conf = json.loads(args.conf_json) if args.conf_json else {k: v for k, v in args.conf}
    request: dict[str, Any] = json.loads(args.request_json) if args.request_json else {}
    request.update(dict(args.set))
    request["model"] = args.model
    if rank is None:
        launch = {
            "workers": args.workers,
            "nnodes": args.nnodes,
            "rdzv_endpoint": args.rdzv_endpoint,
            "rdzv_id": args.rdzv_id,
            "join_timeout": args.join_timeout,
            "threads": args.threads,
        }
        request.update({k: v for k, v in launch.items() if v is not None})
        from monailabel_app.lib.trainers.distributed import LaunchSettings

        try:  # a wrong rendezvous setting fails here, before the app and any rank start
            LaunchSettings(**{k: v for k, v in launch.items() if v is not None}).validated()
        except (TypeError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    else:
        _stop_on_sigterm()
    try:
        task = build_task(args.app_dir, conf, args.model)
        datastore = _datastore(args.studies)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from monailabel_app.lib.errors import AppError

    try:
        task(request, datastore)
    except (AppError, DistributedTrainingError) as err:
        # a rank names the error's type: the launcher quotes the line in its own message (explain_failure)
        print(f"error: {type(err).__name__ + ': ' if rank else ''}{err}", file=sys.stderr)
        return 2 if isinstance(err, AppError) and err.status_code in (400, 422) else 1
    if rank is not None and rank.rank != 0:
        return 0
    stats = task.stats()
    if args.output:
        from monailabel_app.lib.json_files import atomic_write_json

        atomic_write_json(args.output, stats)
    if rank is None:
        published = stats.get("published", {})
        print(json.dumps({"status": stats.get("status"), "published": published, "stats": task.stats_path}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

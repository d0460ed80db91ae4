# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Batch inference over a datastore in worker processes: every selected image gets a label in an output folder.

- ``workers`` processes (spawned), each loading the model once and running with ``cores / workers`` torch threads;
  images are handed out one at a time, so a slow image does not hold up another worker's share.
- Resumable: images whose output is finished are skipped; half-written outputs are done again
  (:class:`~monailabel_app.lib.batch.outputs.OutputFolder`).
- One bad image (unreadable, wrong dimensions, NaNs...) is reported and skipped; the batch goes on. If a
  worker process dies (crash, out of memory), the images in flight are tried again in a new pool; one that takes a
  worker down twice is reported as failed.
- The report (``batch_report.json`` in the output folder) lists what was done, skipped and failed, and why.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from typing import Any

from monailabel_app.lib.batch.outputs import OutputFolder, incomplete_image
from monailabel_app.lib.batch.server_task import failure_text
from monailabel_app.lib.batch.sources import DatastoreSource

__all__ = ["BatchReport", "build_infer_task", "plan_batch", "run_batch"]

logger = logging.getLogger(__name__)

REPORT_NAME = "batch_report.json"
_APP_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_infer_task(model: str, model_dir: str | None = None) -> Any:
    """The app's infer task serving ``model`` (as ``monailabel start_server --conf models <model>`` would), outside
    the server.

    Raises:
        ValueError: unknown model, or one without a weights file.
    """
    from monailabel_app.lib.app_config import FAMILY_OF, AppConfig
    from monailabel_app.lib.configs import CONFIGS
    from monailabel_app.lib.model_store import NetworkCache

    if model not in FAMILY_OF:
        raise ValueError(f"unknown model {model!r}; available: {sorted(FAMILY_OF)}.")
    conf = {"models": model, **({"model_dir": model_dir} if model_dir else {})}
    app_config = AppConfig.from_conf(_APP_DIR, conf)
    family = FAMILY_OF[model]
    config = CONFIGS[family]()
    config.init(family, app_config.model_dir, conf, None, app_config=app_config, cache=NetworkCache())
    task = config.infer()[model]
    if not task.is_valid():
        raise ValueError(f"model {model!r} has no weights file; train it or add its bundled weights.")
    return task


@dataclass
class BatchReport:
    """What a batch did.

    Attributes:
        model: the model name.
        studies: where the images came from.
        out: the output folder.
        workers: worker processes.
        selected: image ids selected.
        done: ids labelled by this run.
        skipped: ids already finished by an earlier run.
        redone: ids whose earlier output was half-written (done again).
        failed: ``{id: reason}``.
        seconds: wall time of this run.
    """

    model: str
    studies: str
    out: str
    workers: int
    selected: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    redone: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----- worker process -----
_WORKER: dict[str, Any] = {}


def _init_worker(model: str, model_dir: str | None, source: DatastoreSource, out: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.getLogger().setLevel(logging.WARNING)  # progress is the parent's tqdm bar, not MONAI Label's INFO lines
    _WORKER.update(task=build_infer_task(model, model_dir), datastore=source.open(scan=False), out=OutputFolder(out))


def _segment_one(image_id: str) -> tuple[str, float, str | None]:
    """Label one image in a worker; ``(id, seconds, error or None)``."""
    started = time.monotonic()
    try:
        uri = _WORKER["datastore"].get_image_uri(image_id)
        if not uri:
            raise FileNotFoundError(f"the datastore has no file for {image_id!r}")
        problem = incomplete_image(uri)
        if problem:
            raise ValueError(problem)
        label_file, result = _WORKER["task"]({"image": uri, "device": "cpu"})
        try:
            _WORKER["out"].write(image_id, label_file, result)
        finally:
            if label_file and os.path.exists(label_file):
                os.unlink(label_file)
    except Exception as err:  # one bad image never stops the batch: the parent reports it
        return image_id, time.monotonic() - started, failure_text(err)
    return image_id, time.monotonic() - started, None


# ----- parent process -----
def plan_batch(source: DatastoreSource, images: str, out: OutputFolder) -> tuple[list[str], list[str], list[str]]:
    """``(selected, to_do, half_written)`` image ids: the selection, those without a finished output, and those
    among them whose output was half-written."""
    from monailabel_app.lib.batch.sources import select_images

    selected = select_images(source.open(), images)
    states = {image_id: out.state(image_id) for image_id in selected}
    to_do = [i for i in selected if states[i] != "done"]
    return selected, to_do, [i for i in to_do if states[i] == "half-written"]


def run_batch(
    model: str,
    source: DatastoreSource,
    out_dir: str | os.PathLike,
    images: str = "all",
    workers: int = 1,
    threads: int | None = None,
    model_dir: str | None = None,
    on_progress: Callable[[str, float, str | None], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> BatchReport:
    """Label the selected images of ``source`` with ``model`` into ``out_dir`` in ``workers`` processes.

    Args:
        model: served model name (``sadnn_seg_int8``).
        source: the datastore.
        out_dir: output folder (created; finished outputs in it are kept and skipped).
        images: ``"all"``, ``"unlabeled"`` or a comma list of ids.
        workers: worker processes.
        threads: torch threads per worker (default: this process's cores divided by ``workers``, at least 1).
        model_dir: where trained weights live (default: the app's).
        on_progress: called in this process after each image with ``(id, seconds, error or None)``.
        on_start: called with the number of images to do, before any is started.

    Raises:
        ValueError: unknown model, no weights, bad ``images``, or another batch writes into ``out_dir``.
    """
    from filelock import FileLock, Timeout

    from monailabel_app.lib.serving.pool import machine_cores

    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}.")
    build_infer_task(model, model_dir)  # fail fast (unknown model, no weights) before starting processes
    out = OutputFolder(out_dir)
    lock = FileLock(str(out.root / ".batch.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ValueError(f"another batch inference is writing into {out.root} (lock {lock.lock_file}).") from None
    started = time.monotonic()
    try:
        out.remove_partials()
        selected, to_do, half_written = plan_batch(source, images, out)
        report = BatchReport(model, source.studies, str(out.root), workers, selected=selected)
        report.skipped = [i for i in selected if i not in set(to_do)]
        report.redone = half_written
        if on_start:
            on_start(len(to_do))
        threads = threads or max(1, machine_cores() // workers)
        _run_pool(model, model_dir, source, out, to_do, min(workers, max(1, len(to_do))), threads, report, on_progress)
        report.seconds = round(time.monotonic() - started, 3)
        out.write_json(out.root / REPORT_NAME, report.to_dict())
        return report
    finally:
        lock.release()


def _run_pool(
    model: str,
    model_dir: str | None,
    source: DatastoreSource,
    out: OutputFolder,
    to_do: list[str],
    workers: int,
    threads: int,
    report: BatchReport,
    on_progress: Callable[[str, float, str | None], None] | None,
) -> None:
    pending = list(reversed(to_do))  # pop() hands images out in sorted order
    crashes: dict[str, int] = {}
    context = multiprocessing.get_context("spawn")
    while pending:
        init = (model, model_dir, source, str(out.root), threads)
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=init) as pool:
            running: dict[Future, str] = {}
            while pending or running:
                while pending and len(running) < workers:
                    image_id = pending.pop()
                    running[pool.submit(_segment_one, image_id)] = image_id
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                broken = []
                for future in finished:
                    image_id = running.pop(future)
                    try:
                        _, seconds, error = future.result()
                    except BrokenProcessPool:
                        broken.append(image_id)
                        continue
                    _record(report, image_id, seconds, error, on_progress)
                if broken:
                    # a worker died (crash, out of memory) and took the pool down: which of the images in flight
                    # did it is unknown, so each is tried again in a new pool, and fails at its second crash
                    broken += list(running.values())
                    running.clear()
                    for image_id in broken:
                        crashes[image_id] = crashes.get(image_id, 0) + 1
                        if crashes[image_id] >= 2:
                            _record(report, image_id, 0.0, "the worker process died segmenting it (twice)", on_progress)
                        else:
                            pending.append(image_id)
                    break


def _record(
    report: BatchReport,
    image_id: str,
    seconds: float,
    error: str | None,
    on_progress: Callable[[str, float, str | None], None] | None,
) -> None:
    if error is None:
        report.done.append(image_id)
    else:
        report.failed[image_id] = error
        logger.warning(f"{image_id}: skipped ({error})")
    if on_progress:
        on_progress(image_id, seconds, error)

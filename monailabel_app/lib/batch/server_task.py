# Copyright MedAttnSlicer contributors. Apache-2.0.
"""``POST /batch/infer/<model>`` on a CPU server: MONAI Label's batch task without its CUDA device arithmetic.

MONAI Label 0.8.5's ``BatchInferTask`` spreads images over CUDA device ids (``idx % len(device_ids)``), a
``ZeroDivisionError`` on a CPU-only server. :class:`CpuBatchInferTask` runs the images one after the other on the
CPU (in the background process MONAI Label starts for the task, with all its torch threads), saves each label in
the datastore under ``label_tag`` (``original`` by default), reports one bad image (unreadable, or a truncated
``.nii.gz``, which ITK would read zero-filled) and goes on, and logs a progress
line after each image, which ``GET /batch/infer`` shows in ``details``::

    batch infer progress: 3/10 images, 1 failed, 12.3 s elapsed, ETA 28.7 s
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.batch_infer import BatchInferTask

from monailabel_app.lib.batch.outputs import incomplete_image

__all__ = ["CpuBatchInferTask", "failure_text", "progress_line"]

logger = logging.getLogger(__name__)

# request keys of MONAI Label's batch endpoint that describe the batch, not one image's inference
_BATCH_KEYS = ("images", "multi_gpu", "gpus", "max_workers", "max_batch_size", "labels")


def failure_text(err: Exception) -> str:
    """One line naming why an image failed (the app's HTTP errors carry their message in ``detail``)."""
    detail = getattr(err, "detail", None)
    return f"{type(err).__name__}: {detail if isinstance(detail, str) else err}"


def progress_line(done: int, failed: int, total: int, elapsed: float) -> str:
    """``batch infer progress: <done>/<total> images, <failed> failed, <s> s elapsed, ETA <s> s`` (the ETA from the
    mean time per image so far)."""
    finished = done + failed
    eta_text = f"{elapsed / finished * (total - finished):.1f} s" if finished else "unknown"
    return f"batch infer progress: {finished}/{total} images, {failed} failed, {elapsed:.1f} s elapsed, ETA {eta_text}"


class CpuBatchInferTask(BatchInferTask):
    """Batch inference over a datastore on the CPU; see the module docstring."""

    def __call__(self, request: dict[str, Any], datastore: Datastore, infer: Callable) -> dict[str, Any]:
        image_ids = sorted(self.get_images(request, datastore))
        limit = int(request.get("max_batch_size") or 0)
        if limit > 0:
            image_ids = image_ids[:limit]
        label_tag = request.get("label_tag") or DefaultLabelTag.ORIGINAL
        label_tag = getattr(label_tag, "value", label_tag)
        total = len(image_ids)
        logger.info(f"batch infer: {total} images with {request.get('model')}, labels saved as {label_tag!r}")
        results: dict[str, Any] = {}
        failed: dict[str, str] = {}
        started = time.monotonic()
        for image_id in image_ids:
            one = {k: v for k, v in request.items() if k not in _BATCH_KEYS}
            one.update(image=image_id, save_label=True, label_tag=label_tag, device="cpu")
            try:
                problem = incomplete_image(datastore.get_image_uri(image_id))
                if problem:
                    raise ValueError(problem)
                result = infer(one, datastore)
                temporary = result.get("file")
                if temporary and os.path.exists(temporary):
                    os.unlink(temporary)
                results[image_id] = {"label": result.get("label"), "tag": label_tag}
            except Exception as err:  # one bad image never stops the batch
                failed[image_id] = failure_text(err)
                logger.warning(f"batch infer: {image_id} skipped ({failed[image_id]})")
            logger.info(progress_line(len(results), len(failed), total, time.monotonic() - started))
        seconds = time.monotonic() - started
        logger.info(f"batch infer finished: {len(results)} labelled, {len(failed)} failed in {seconds:.1f} s")
        return {"labelled": results, "failed": failed, "seconds": round(seconds, 3)}

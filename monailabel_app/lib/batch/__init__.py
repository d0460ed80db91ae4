# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Batch inference over a datastore: the CLI's engine (:mod:`.runner`, worker processes, resumable output folder) and
the server's CPU ``/batch/infer`` task (:mod:`.server_task`)."""

from monailabel_app.lib.batch.outputs import OutputFolder
from monailabel_app.lib.batch.runner import BatchReport, build_infer_task, run_batch
from monailabel_app.lib.batch.server_task import CpuBatchInferTask, progress_line
from monailabel_app.lib.batch.sources import DatastoreSource, open_datastore, select_images

__all__ = [
    "BatchReport",
    "CpuBatchInferTask",
    "DatastoreSource",
    "OutputFolder",
    "build_infer_task",
    "open_datastore",
    "progress_line",
    "run_batch",
    "select_images",
]

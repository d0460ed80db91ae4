# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Running the Slicer panel's workflows in tests as the panel does: on a :class:`MedAttnSlicerLib.jobs.JobRunner`
worker thread, events delivered by polling."""

from __future__ import annotations

from typing import Any

from MedAttnSlicerLib.jobs import JobRunner, JobState

__all__ = ["run_workflow"]


def run_workflow(runner: JobRunner, function, *args, timeout_s: float = 300.0, **kwargs) -> Any:
    """Run ``function(*args, **kwargs)`` as a job and return its result; a failed job raises its error."""
    job = runner.wait(runner.submit(function.__name__, function, *args, **kwargs), timeout_s=timeout_s)
    if job.state == JobState.FAILED:
        raise job.error
    assert job.state == JobState.FINISHED, (job.state, job.message)
    return job.result

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Background jobs for the panel: a worker thread per job, results handed back on the caller's thread.

Slicer's scene and Qt widgets may only be touched from the main thread, and a blocked main thread
freezes the panel. So a job's function runs in a daemon thread and only *posts* events (progress,
finished, failed, cancelled) to a queue; the panel drains that queue with :meth:`JobRunner.poll`
from a ``qt.QTimer`` on the main thread, which is where the callbacks run.

Inside Slicer the main thread holds Python's GIL whenever it is in Qt's C++ event loop (PythonQt's thread
support is off), so a worker thread runs Python only while the main thread runs Python. While a job that moves
data runs, the panel therefore polls every :data:`BUSY_POLL_INTERVAL_MS` and each :meth:`JobRunner.poll` ends by
releasing the GIL for ``gil_release_s`` (a sleep): the worker gets it at least that often, and between those
moments the kernel moves its bytes (the client's bulk transfers need the GIL only a few times per transfer).
Jobs that mostly wait (a training followed for minutes) are submitted with ``transfers=False`` and polled at
:data:`IDLE_POLL_INTERVAL_MS` without the release. ``tests/test_slicer_gil.py`` measures it.

Cancelling sets the job's :class:`~MedAttnSlicerLib.cancel.CancelToken`; the client's requests
register socket shutdowns on that token, so a job waiting for a server answer stops waiting at once.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

from .cancel import CancelToken
from .errors import OperationCancelled

__all__ = ["JobRunner", "Job", "JobContext", "JobEvent", "JobState", "BUSY_POLL_INTERVAL_MS", "IDLE_POLL_INTERVAL_MS"]

#: Poll timer interval while a job that moves data runs (ms).
BUSY_POLL_INTERVAL_MS = 10
#: Poll timer interval while only jobs that mostly wait run (ms).
IDLE_POLL_INTERVAL_MS = 100
#: How long each poll releases the GIL to worker threads while a job that moves data runs (s).
GIL_RELEASE_S = 0.002


class JobState:
    """Job life cycle: QUEUED -> RUNNING -> one of FINISHED, FAILED, CANCELLED."""

    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"
    FINAL = (FINISHED, FAILED, CANCELLED)


@dataclass
class JobEvent:
    """Something that happened to a job, delivered by :meth:`JobRunner.poll`.

    Attributes:
        kind: ``"progress"``, ``"finished"``, ``"failed"`` or ``"cancelled"``.
        job: the job.
        fraction: progress in [0, 1], or None when unknown (``progress`` events).
        message: progress text, or the cancel/failure message.
        result: the function's return value (``finished``).
        error: the exception (``failed``, and ``cancelled`` when raised by the job).
        traceback: formatted traceback of a failure, for a "details" box or the log.
    """

    kind: str
    job: Job
    fraction: Optional[float] = None
    message: str = ""
    result: Any = None
    error: Optional[BaseException] = None
    traceback: str = ""


class Job:
    """Handle of a submitted job. Its state, result and error change only inside :meth:`JobRunner.poll`."""

    def __init__(self, job_id: int, name: str) -> None:
        self.id = job_id
        self.name = name
        self.state = JobState.QUEUED
        self.cancel_token = CancelToken()
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.fraction: Optional[float] = None
        self.message = ""
        self.callbacks: Dict[str, Optional[Callable[[JobEvent], Any]]] = {}
        self.thread: Optional[threading.Thread] = None
        #: True for jobs that move data (uploads, inference, downloads): polled often, with a GIL release.
        self.transfers = True
        #: True when the panel stopped *following* the job (module closing) rather than asking to stop
        #: the work itself: jobs that control server tasks then leave those tasks running.
        self.detached = False
        self._posted_final = threading.Event()

    @property
    def done(self) -> bool:
        return self.state in JobState.FINAL

    @property
    def cancelled(self) -> bool:
        return self.cancel_token.cancelled

    def cancel(self, reason: str = "Cancelled by the user.") -> None:
        """Ask the job to stop; the ``cancelled`` event follows through ``poll``."""
        self.cancel_token.cancel(reason)

    def detach(self, reason: str = "The panel stopped following this job.") -> None:
        """Stop waiting for the job without stopping what it started on the server.

        Closing Slicer or reloading the module must not stop a training or scoring task that may be
        shared with other annotators; only the user's explicit Stop/Cancel does that.
        """
        self.detached = True
        self.cancel_token.cancel(reason)

    def __repr__(self) -> str:
        return f"Job(id={self.id}, name={self.name!r}, state={self.state})"


class JobContext:
    """What a job function gets as its first argument: progress reporting and cancellation."""

    def __init__(self, job: Job, post: Callable[[JobEvent], None]) -> None:
        self._job = job
        self._post = post

    @property
    def cancel_token(self) -> CancelToken:
        return self._job.cancel_token

    @property
    def cancelled(self) -> bool:
        return self._job.cancel_token.cancelled

    @property
    def detached(self) -> bool:
        """True when the job was cancelled by :meth:`Job.detach` (leave server tasks running)."""
        return self._job.detached

    def raise_if_cancelled(self) -> None:
        self._job.cancel_token.raise_if_cancelled()

    def progress(self, fraction: Optional[float], message: str = "") -> None:
        """Report progress; ``fraction`` is clipped to [0, 1] (None: indeterminate)."""
        if fraction is not None:
            fraction = min(1.0, max(0.0, float(fraction)))
        self._post(JobEvent("progress", self._job, fraction=fraction, message=str(message)))

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, waking at once on cancel (then raises OperationCancelled)."""
        if self._job.cancel_token.wait(seconds):
            self._job.cancel_token.raise_if_cancelled()


JobFunction = Callable[..., Any]


class JobRunner:
    """Runs job functions in worker threads; :meth:`poll` hands events back to the calling thread.

    Args:
        callback_error_handler: called with (event, exception) when a callback raises inside
            ``poll``; when None the first such exception is re-raised after all events are handled.
        gil_release_s: how long :meth:`poll` sleeps (releasing the GIL) while a job that moves data runs.
    """

    def __init__(
        self,
        callback_error_handler: Optional[Callable[[JobEvent, BaseException], None]] = None,
        gil_release_s: float = GIL_RELEASE_S,
    ) -> None:
        self.gil_release_s = float(gil_release_s)
        self._events: queue.Queue[JobEvent] = queue.Queue()
        self._jobs: Dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.callback_error_handler = callback_error_handler

    def submit(
        self,
        name: str,
        function: JobFunction,
        *args: Any,
        on_progress: Optional[Callable[[JobEvent], Any]] = None,
        on_finished: Optional[Callable[[JobEvent], Any]] = None,
        on_failed: Optional[Callable[[JobEvent], Any]] = None,
        on_cancelled: Optional[Callable[[JobEvent], Any]] = None,
        transfers: bool = True,
        **kwargs: Any,
    ) -> Job:
        """Start ``function(context, *args, **kwargs)`` in a worker thread and return its handle.

        ``transfers=False`` for a job that mostly waits (see :attr:`poll_interval_ms`).
        """
        if not callable(function):
            raise TypeError(f"Job '{name}' needs a callable, got {type(function).__name__}")
        with self._lock:
            job = Job(next(self._ids), name)
            job.transfers = bool(transfers)
            self._jobs[job.id] = job
        job.callbacks = {
            "progress": on_progress,
            "finished": on_finished,
            "failed": on_failed,
            "cancelled": on_cancelled,
        }
        context = JobContext(job, self._events.put)
        job.thread = threading.Thread(
            target=self._run,
            args=(job, context, function, args, kwargs),
            name=f"medattn-job-{job.id}-{name}",
            daemon=True,
        )
        job.state = JobState.RUNNING
        job.thread.start()
        return job

    def _run(self, job: Job, context: JobContext, function: JobFunction, args: tuple, kwargs: dict) -> None:
        try:
            job.cancel_token.raise_if_cancelled()
            result = function(context, *args, **kwargs)
        except OperationCancelled as error:
            event = JobEvent("cancelled", job, message=str(error), error=error)
        except BaseException as error:  # noqa: BLE001 - every failure must reach the panel
            # Also after a cancel: the client turns aborted requests into OperationCancelled, so
            # anything else is a real failure (e.g. the server could not stop its training).
            event = JobEvent(
                "failed", job, message=str(error) or type(error).__name__, error=error, traceback=traceback.format_exc()
            )
        else:
            if job.cancel_token.cancelled:  # finished in the same instant it was cancelled: honour the cancel
                event = JobEvent("cancelled", job, message=job.cancel_token.reason or "Cancelled.")
            else:
                event = JobEvent("finished", job, fraction=1.0, result=result)
        self._events.put(event)
        job._posted_final.set()

    def poll(self) -> List[JobEvent]:
        """Deliver queued events on the calling thread: update job handles, run callbacks, return them."""
        delivered: List[JobEvent] = []
        first_error: Optional[BaseException] = None
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            job = event.job
            if job.done:  # nothing after a final event (e.g. progress racing the end)
                continue
            if event.kind == "progress":
                job.fraction, job.message = event.fraction, event.message
            else:
                job.state = {
                    "finished": JobState.FINISHED,
                    "failed": JobState.FAILED,
                    "cancelled": JobState.CANCELLED,
                }[event.kind]
                job.result, job.error, job.message = event.result, event.error, event.message
                with self._lock:
                    self._jobs.pop(job.id, None)
            delivered.append(event)
            callback = job.callbacks.get(event.kind)
            if callback is not None:
                try:
                    callback(event)
                except Exception as error:  # noqa: BLE001 - keep delivering the other events
                    if self.callback_error_handler is not None:
                        self.callback_error_handler(event, error)
                    elif first_error is None:
                        first_error = error
        if self.gil_release_s > 0 and self.transferring:
            # Under PythonQt this is the worker's chance to take the GIL (see the module docstring).
            time.sleep(self.gil_release_s)
        if first_error is not None:
            raise first_error
        return delivered

    def cancel(self, job: Union[Job, int], reason: str = "Cancelled by the user.") -> None:
        """Cancel a job (handle or id); unknown or finished jobs are ignored."""
        job_id = job.id if isinstance(job, Job) else int(job)
        with self._lock:
            target = self._jobs.get(job_id)
        if target is not None:
            target.cancel(reason)

    def cancel_all(self, reason: str = "Cancelled.") -> None:
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel(reason)

    @property
    def active_jobs(self) -> List[Job]:
        """Jobs whose final event has not been delivered by ``poll`` yet."""
        with self._lock:
            return list(self._jobs.values())

    @property
    def busy(self) -> bool:
        return bool(self.active_jobs)

    @property
    def transferring(self) -> bool:
        """True while a job that moves data (``transfers=True``) runs."""
        return any(job.transfers for job in self.active_jobs)

    @property
    def poll_interval_ms(self) -> int:
        """How often the panel should call :meth:`poll`: often while data moves, else at a relaxed pace."""
        return BUSY_POLL_INTERVAL_MS if self.transferring else IDLE_POLL_INTERVAL_MS

    def wait(self, job: Job, timeout_s: float = 60.0, poll_interval_s: float = 0.02) -> Job:
        """Block the caller, polling, until ``job`` is done (for scripts and tests, never the panel).

        Raises:
            TimeoutError: when the job is still running after ``timeout_s``.
        """
        if job._posted_final.wait(timeout_s):
            self.poll()
            if job.done:
                return job
        # Another thread may be polling; give it a moment before declaring a timeout.
        job._posted_final.wait(poll_interval_s)
        self.poll()
        if not job.done:
            raise TimeoutError(f"Job '{job.name}' still running after {timeout_s:g} s")
        return job

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Detach every job and wait up to ``timeout_s`` for their threads (module cleanup).

        Requests in flight are aborted, but server tasks (training, scoring) keep running: see
        :meth:`Job.detach`.
        """
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.detach("The module is closing.")
        for job in self.active_jobs:
            if job.thread is not None:
                job.thread.join(timeout_s)
        with contextlib.suppress(Exception):  # callbacks of a closing panel must not block cleanup
            self.poll()

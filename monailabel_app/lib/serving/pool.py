# Copyright MedAttnSlicer contributors. Apache-2.0.
"""A bounded first-come-first-served pool of worker threads that run request handlers off the server's event loop.

Each worker thread owns an asyncio event loop (so an ASGI handler can run there unchanged) and its own share of the
machine's cores: torch's intra-op threads are set per worker thread (``torch.set_num_threads`` sets the calling
thread's OpenMP team size), so ``workers x torch_threads`` never exceeds the cores the pool was sized for and
concurrent inferences do not oversubscribe the CPU.

Jobs wait in one FIFO queue shared by all workers; when ``max_waiting`` jobs already wait, :meth:`WorkerPool.submit`
refuses the job (the caller answers 503 with :meth:`WorkerPool.retry_after`) instead of letting latency grow without
limit.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["PoolFullError", "WorkerPool", "default_workers", "machine_cores"]

logger = logging.getLogger(__name__)

# the service time assumed for Retry-After before any job has finished
_FIRST_GUESS_S = 5.0


def machine_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_workers(cores: int) -> int:
    """Inference workers for ``cores`` cores: one per core up to 2 cores, then one per 2 cores.

    One inference gains little from a second core on 2-core machines (measured 1.2-1.4x), so two single-threaded
    workers serve two annotators at once for nearly the same single-request latency; on bigger machines two threads
    per worker keep memory (one activation set per worker) and latency in check.
    """
    return cores if cores <= 2 else cores // 2


class PoolFullError(RuntimeError):
    """The pool's queue is full; ``retry_after`` is the suggested wait in seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Job:
    run: Callable[[], Awaitable[Any]]
    done: asyncio.Future
    caller_loop: asyncio.AbstractEventLoop
    queued_at: float


class WorkerPool:
    """FIFO pool of ``workers`` threads, each with its own event loop and ``torch_threads`` torch threads.

    Args:
        name: pool name (thread names, messages).
        workers: worker threads (concurrent jobs).
        torch_threads: torch intra-op threads per worker (0: leave torch's setting alone).
        max_waiting: jobs allowed to wait for a free worker; one more is refused with :class:`PoolFullError`.
    """

    def __init__(self, name: str, workers: int, torch_threads: int, max_waiting: int) -> None:
        if workers < 1:
            raise ValueError(f"{name}: workers must be >= 1, got {workers}.")
        if max_waiting < 0:
            raise ValueError(f"{name}: the queue bound must be >= 0, got {max_waiting}.")
        self.name = name
        self.workers = workers
        self.torch_threads = torch_threads
        self.max_waiting = max_waiting
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._running = 0
        self._served = 0
        self._refused = 0
        self._service_ewma: float | None = None
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    # ----- caller side (the server's event loop) -----
    async def run(self, job: Callable[[], Awaitable[Any]]) -> Any:
        """Run the coroutine ``job()`` on a worker's event loop when a worker is free (FIFO) and return its result.

        Raises:
            PoolFullError: ``max_waiting`` jobs already wait.
        """
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        with self._lock:
            # running + waiting at most workers + max_waiting: a job that finds a free worker never counts as waiting
            if self._running + self._waiting >= self.workers + self.max_waiting:
                self._refused += 1
                raise PoolFullError(
                    f"the {self.name} queue is full ({self._waiting} requests waiting, {self._running} running on "
                    f"{self.workers} workers)",
                    self._retry_after_locked(),
                )
            self._waiting += 1
        self._queue.put(_Job(job, done, loop, time.monotonic()))
        return await done

    def retry_after(self) -> int:
        """Seconds until a worker is likely free for one more job: the queue ahead of it over the workers, times the
        recent mean service time; at least 1."""
        with self._lock:
            return self._retry_after_locked()

    def _retry_after_locked(self) -> int:
        service = self._service_ewma if self._service_ewma is not None else _FIRST_GUESS_S
        return max(1, math.ceil(service * (self._waiting + 1) / self.workers))

    def status(self) -> dict[str, Any]:
        """Counters for ``/info``: workers, torch threads each, running, waiting, the queue bound, served and refused
        requests, mean service seconds (exponentially weighted)."""
        with self._lock:
            return {
                "workers": self.workers,
                "torch_threads_per_worker": self.torch_threads,
                "running": self._running,
                "waiting": self._waiting,
                "max_waiting": self.max_waiting,
                "served": self._served,
                "refused": self._refused,
                "mean_service_s": None if self._service_ewma is None else round(self._service_ewma, 3),
            }

    def close(self) -> None:
        """Stop the workers after the jobs already queued."""
        for _ in self._threads:
            self._queue.put(None)

    # ----- worker side -----
    def _work(self) -> None:
        if self.torch_threads > 0:
            import torch

            # per thread: OpenMP's team size is a per-thread setting, so each worker gets its own share
            torch.set_num_threads(self.torch_threads)
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        while True:
            job = self._queue.get()
            if job is None:
                break
            with self._lock:
                self._waiting -= 1
                self._running += 1
            started = time.monotonic()
            try:
                result = loop.run_until_complete(job.run())
            except BaseException as err:  # noqa: BLE001 - handed to the awaiting request, which re-raises it
                self._finish(started)
                job.caller_loop.call_soon_threadsafe(_set_exception, job.done, err)
                continue
            self._finish(started)
            job.caller_loop.call_soon_threadsafe(_set_result, job.done, result)
        loop.close()

    def _finish(self, started: float) -> None:
        elapsed = time.monotonic() - started
        with self._lock:
            self._running -= 1
            self._served += 1
            self._service_ewma = elapsed if self._service_ewma is None else 0.7 * self._service_ewma + 0.3 * elapsed


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, err: BaseException) -> None:
    if not future.done():
        future.set_exception(err)

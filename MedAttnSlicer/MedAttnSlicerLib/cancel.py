# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Cancellation token shared between the panel (main thread) and a background job.

Waiting on a server can be blocked inside a socket read, where a flag alone is never looked at.
The token therefore also keeps *abort callbacks* (e.g. "shut this socket down") that ``cancel()``
runs at once, so a cancelled request stops waiting immediately instead of at the next timeout.
"""

from __future__ import annotations

import threading
from typing import Callable, List, Optional

from .errors import OperationCancelled

__all__ = ["CancelToken"]


class CancelToken:
    """A thread-safe cancel flag with abort callbacks.

    Callbacks run exactly once: on ``cancel()``, or immediately on registration when the token is
    already cancelled. Exceptions raised by a callback are swallowed, because cancelling must not fail.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: List[Callable[[], None]] = []
        self.reason: Optional[str] = None

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self, reason: str = "Cancelled by the user.") -> None:
        """Set the flag and run every registered abort callback (idempotent)."""
        with self._lock:
            if self._event.is_set():
                return
            self.reason = reason
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            _run_quietly(callback)

    def add_abort_callback(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Register ``callback``; returns a function that unregisters it."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return lambda: self._remove(callback)
        _run_quietly(callback)
        return lambda: None

    def _remove(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s`` seconds; return True as soon as the token is cancelled."""
        return self._event.wait(timeout_s)

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise OperationCancelled(self.reason or "Cancelled.")


def _run_quietly(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:  # noqa: BLE001 - an abort callback must never make cancel() fail
        pass

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Exceptions raised by the MedAttnSlicer client and job runner.

Every exception carries a message an annotator can read in the panel without a traceback:
what was attempted, against which URL, and what the server said.
"""

from __future__ import annotations

from typing import Optional

__all__ = [
    "MedAttnClientError",
    "ServerUnavailable",
    "ServerTimeout",
    "ServerError",
    "ProtocolError",
    "OperationCancelled",
    "TrainingFailed",
]


class MedAttnClientError(Exception):
    """Base class of every error the MedAttnSlicer library raises on purpose."""


class ServerUnavailable(MedAttnClientError):
    """The server could not be reached at all (connection refused, unknown host, network down).

    Args:
        url: the URL that was requested.
        reason: the operating system's reason (e.g. ``"connection refused"``).
    """

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(
            f"Cannot reach the MONAI Label server at {url} ({reason}). "
            "Check that the server is running and that the server URL is right."
        )


class ServerTimeout(MedAttnClientError):
    """The server accepted the connection but did not answer within the timeout.

    Args:
        url: the URL that was requested.
        timeout_s: the timeout that expired, in seconds.
    """

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        super().__init__(
            f"The MONAI Label server at {url} did not answer within {timeout_s:g} s. "
            "It may be busy (training or a large inference); try again or raise the timeout."
        )


class ServerError(MedAttnClientError):
    """The server answered with an HTTP error status (4xx or 5xx).

    Args:
        status: HTTP status code.
        detail: the server's explanation (FastAPI's ``detail`` field when present, else the body text).
        method: HTTP method of the request.
        url: the URL that was requested.
    """

    def __init__(self, status: int, detail: str, method: str, url: str) -> None:
        self.status = int(status)
        self.detail = detail
        self.method = method
        self.url = url
        kind = "rejected the request" if 400 <= self.status < 500 else "failed"
        super().__init__(f"Server {kind} ({self.status}) on {method} {url}: {detail}")


class ProtocolError(MedAttnClientError):
    """The server answered 2xx but the body is not what the MONAI Label API promises."""


class OperationCancelled(MedAttnClientError):
    """A running operation was cancelled by the user.

    Args:
        message: what was cancelled and what was done about it (e.g. "training stopped on the server").
    """

    def __init__(self, message: str = "Cancelled.") -> None:
        super().__init__(message)


class TrainingFailed(MedAttnClientError):
    """The server's training task ended in an error state.

    Args:
        task: the training task name.
        status: the final task status reported by the server (``"ERROR"``...).
        details: the last log lines the server kept for the task.
    """

    def __init__(self, task: str, status: str, details: Optional[list] = None) -> None:
        self.task = task
        self.status = status
        self.details = list(details or [])
        tail = "; ".join(str(line) for line in self.details[-3:])
        super().__init__(f"Training '{task}' ended with status {status}" + (f": {tail}" if tail else "."))

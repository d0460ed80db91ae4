# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Exceptions the app raises for bad requests.

They subclass FastAPI's ``HTTPException`` so that, raised anywhere below a MONAI Label endpoint (the app's
``infer``, the datastore's ``save_label``, an infer task's transforms), FastAPI answers with their status code and
``{"detail": message}`` instead of a 500. Outside a server (training subprocesses, scripts) they are ordinary
exceptions with a message naming the problem.
"""

from __future__ import annotations

from fastapi import HTTPException

__all__ = ["AppError", "NotFoundError", "BadInputError", "ConflictError"]


class AppError(HTTPException):
    """Base class: an HTTP status code and a message naming the problem."""

    status: int = 400

    def __init__(self, message: str) -> None:
        super().__init__(status_code=self.status, detail=message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NotFoundError(AppError):
    """An unknown image, label, model, strategy or scoring method (404)."""

    status = 404


class BadInputError(AppError):
    """A request whose content cannot be used: unreadable image, NaNs, wrong shape or dimension (422)."""

    status = 422


class ConflictError(AppError):
    """A request that conflicts with the server's state, e.g. no labelled image to train on (409)."""

    status = 409

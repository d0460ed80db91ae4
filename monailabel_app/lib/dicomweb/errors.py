# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Errors of the PACS datastore, as HTTP answers (see :mod:`monailabel_app.lib.errors`)."""

from __future__ import annotations

from monailabel_app.lib.errors import AppError

__all__ = ["PacsUnavailableError", "PacsRejectedError", "SegWriteError"]


class PacsUnavailableError(AppError):
    """The PACS cannot be reached, timed out, refused our credentials or failed (503: try again later)."""

    status = 503


class PacsRejectedError(AppError):
    """The PACS refused to store what we sent (502: the upstream server said no; the message says what was kept)."""

    status = 502


class SegWriteError(AppError):
    """A label that passed the checks could not be made into a DICOM SEG (500: our fault; the message says what was
    kept)."""

    status = 500

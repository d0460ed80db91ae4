# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Exceptions raised by :mod:`sample_data`; every message names the file, package or organ at fault."""

from __future__ import annotations

__all__ = ["SampleDataError", "DownloadError", "ChecksumError", "ArchiveContentError", "UnknownOrganError"]


class SampleDataError(RuntimeError):
    """Base class: fetching, verifying, extracting or converting the sample data failed."""


class DownloadError(SampleDataError):
    """``pip download`` failed or did not produce the expected file."""


class ChecksumError(SampleDataError):
    """A downloaded archive does not have the sha256 recorded in :mod:`sample_data.sources`."""

    def __init__(self, path: str, expected: str, actual: str, quarantined_to: str | None = None) -> None:
        where = f"; moved it to {quarantined_to} so the next run downloads it again" if quarantined_to else ""
        super().__init__(
            f"sha256 mismatch for {path}: expected {expected}, got {actual}; nothing was extracted from it{where}"
        )
        self.path = path
        self.expected = expected
        self.actual = actual
        self.quarantined_to = quarantined_to


class ArchiveContentError(SampleDataError):
    """An archive lacks a required member or holds an unsafe one (link, device, path escaping the target)."""


class UnknownOrganError(SampleDataError, ValueError):
    """An organ name is in none of the TotalSegmentator class maps used here."""

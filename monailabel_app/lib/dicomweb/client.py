# Copyright MedAttnSlicer contributors. Apache-2.0.
"""The DICOMweb client of the PACS datastore, and PACS failures as clear HTTP answers.

Credentials come from MONAI Label's settings (environment or ``.env``), never from the command line:
``MONAI_LABEL_DATASTORE_USERNAME`` / ``MONAI_LABEL_DATASTORE_PASSWORD`` (HTTP basic authentication; the older
``MONAI_LABEL_DICOMWEB_USERNAME`` / ``_PASSWORD`` also work) or ``MONAI_LABEL_DATASTORE_API_KEY`` (sent as
``Authorization: Bearer <token>``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient

from monailabel_app.lib.dicomweb.errors import PacsUnavailableError

__all__ = ["PacsCredentials", "make_client", "pacs_errors", "http_status"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PacsCredentials:
    """How to authenticate to the PACS: basic (``username``/``password``), a bearer ``token``, or nothing."""

    username: str = ""
    password: str = ""
    token: str = ""

    @classmethod
    def from_settings(cls, settings: Any) -> PacsCredentials:
        """From MONAI Label's ``settings`` (``monailabel.config.settings``)."""
        return cls(
            username=settings.MONAI_LABEL_DATASTORE_USERNAME or settings.MONAI_LABEL_DICOMWEB_USERNAME or "",
            password=settings.MONAI_LABEL_DATASTORE_PASSWORD or settings.MONAI_LABEL_DICOMWEB_PASSWORD or "",
            token=settings.MONAI_LABEL_DATASTORE_API_KEY or "",
        )

    def describe(self) -> str:
        if self.token:
            return "a bearer token (MONAI_LABEL_DATASTORE_API_KEY)"
        if self.username:
            return f"user {self.username!r} (MONAI_LABEL_DATASTORE_USERNAME / _PASSWORD)"
        return "no credentials"


class _TimeoutSession(requests.Session):
    """A session whose requests time out (dicomweb-client passes no timeout: an unroutable PACS would hang a
    request forever)."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        return super().request(*args, **kwargs)


def make_client(url: str, credentials: PacsCredentials, timeout: float = 60.0, settings: Any = None) -> DICOMwebClient:
    """A DICOMweb client for ``url`` (the DICOMweb root, e.g. ``http://pacs:8042/dicom-web``).

    Args:
        url: DICOMweb root URL.
        credentials: how to authenticate.
        timeout: seconds before a PACS request fails (connect and read).
        settings: MONAI Label settings, for the optional QIDO/WADO/STOW URL prefixes.
    """
    session = _TimeoutSession(timeout)
    if credentials.username:
        session.auth = (credentials.username, credentials.password)
    headers = {"Authorization": f"Bearer {credentials.token}"} if credentials.token else None
    client = DICOMwebClient(
        url=url,
        session=session,
        headers=headers,
        qido_url_prefix=getattr(settings, "MONAI_LABEL_QIDO_PREFIX", None),
        wado_url_prefix=getattr(settings, "MONAI_LABEL_WADO_PREFIX", None),
        stow_url_prefix=getattr(settings, "MONAI_LABEL_STOW_PREFIX", None),
    )
    # dicomweb-client retries every failed request (connection errors too) 5 times with exponential back-off: 30 s
    # per request while the PACS is down. Three retries within ~3.5 s ride out a busy PACS refusing connections (OHIF
    # loading frames through MONAI Label's proxy at the same time did that to Orthanc) without hanging requests.
    client.set_http_retry_params(retry=True, max_attempts=4, wait_exponential_multiplier=250)
    return client


def http_status(err: BaseException) -> int | None:
    """The HTTP status of a failed PACS request, or None when there was no answer."""
    response = getattr(err, "response", None)
    return int(response.status_code) if response is not None else None


def _answer_text(err: BaseException, limit: int = 300) -> str:
    response = getattr(err, "response", None)
    if response is None:
        return ""
    text = " ".join((response.text or "").split())
    return text[:limit]


@contextmanager
def pacs_errors(url: str, doing: str, credentials: PacsCredentials | None = None) -> Iterator[None]:
    """Turn a failed PACS request inside the block into :class:`PacsUnavailableError` (HTTP 503) naming the PACS,
    what we were doing and why; other exceptions pass through.

    Args:
        url: the PACS (DICOMweb root) URL.
        doing: what the request was for, e.g. ``"listing series"``.
        credentials: named in the message when the PACS refuses them.
    """
    try:
        yield
    except requests.HTTPError as err:
        status = http_status(err)
        if status in (401, 403):
            who = credentials.describe() if credentials else "our credentials"
            raise PacsUnavailableError(
                f"the PACS at {url} refused access (HTTP {status}) while {doing}, with {who}; set "
                "MONAI_LABEL_DATASTORE_USERNAME and MONAI_LABEL_DATASTORE_PASSWORD (or MONAI_LABEL_DATASTORE_API_KEY) "
                "for the server."
            ) from err
        body = _answer_text(err)
        raise PacsUnavailableError(
            f"the PACS at {url} failed while {doing}: HTTP {status}" + (f" ({body})" if body else "") + "."
        ) from err
    except (requests.ConnectionError, requests.Timeout) as err:
        kind = "timed out" if isinstance(err, requests.Timeout) else "cannot be reached"
        raise PacsUnavailableError(
            f"the PACS at {url} {kind} while {doing} ({type(err).__name__}); the server keeps running: try again "
            "once the PACS is back."
        ) from err

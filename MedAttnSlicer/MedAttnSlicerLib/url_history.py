# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Remembered server URLs: most recent first, without duplicates, bounded.

Pure logic; the panel keeps :meth:`ServerUrlHistory.to_setting` in ``QSettings`` and rebuilds the
history with :meth:`ServerUrlHistory.from_setting` (QSettings hands back a list, a single string or
None depending on platform and count, all accepted here).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable
from typing import Any, List, Optional

__all__ = ["ServerUrlHistory", "normalize_server_url", "DEFAULT_SERVER_URL"]

DEFAULT_SERVER_URL = "http://127.0.0.1:8000"


def normalize_server_url(url: str) -> str:
    """Canonical form of a server URL: scheme and host lower-case, no trailing slash, no query.

    ``localhost:8000`` becomes ``http://localhost:8000``.

    Raises:
        ValueError: when the URL is empty, not http(s), has no host, or has a bad port.
    """
    if url is None or not str(url).strip():
        raise ValueError("The server URL is empty")
    text = str(url).strip()
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"The server URL must start with http:// or https://, got '{url}'")
    if not parts.hostname:
        raise ValueError(f"The server URL has no host name: '{url}'")
    try:
        port = parts.port
    except ValueError as error:
        raise ValueError(f"The server URL has an invalid port: '{url}'") from error
    if parts.query or parts.fragment:
        raise ValueError(f"The server URL must not contain a query or fragment: '{url}'")
    host = parts.hostname.lower()
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    if parts.username:
        raise ValueError(f"The server URL must not contain a user name or password: '{url}'")
    path = parts.path.rstrip("/")
    return f"{scheme}://{netloc}{path}"


class ServerUrlHistory:
    """Most-recent-first list of server URLs.

    Args:
        urls: initial URLs, most recent first; invalid entries are dropped.
        max_size: how many URLs to keep (at least 1).
    """

    def __init__(self, urls: Iterable[str] = (), max_size: int = 10) -> None:
        if int(max_size) < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        self.max_size = int(max_size)
        self._urls: List[str] = []
        for url in urls:
            try:
                normalized = normalize_server_url(url)
            except ValueError:
                continue
            if normalized not in self._urls:
                self._urls.append(normalized)
        del self._urls[self.max_size :]

    @property
    def urls(self) -> List[str]:
        return list(self._urls)

    @property
    def most_recent(self) -> Optional[str]:
        return self._urls[0] if self._urls else None

    def add(self, url: str) -> str:
        """Put ``url`` first (moving it if already known); returns its normalised form."""
        normalized = normalize_server_url(url)
        if normalized in self._urls:
            self._urls.remove(normalized)
        self._urls.insert(0, normalized)
        del self._urls[self.max_size :]
        return normalized

    def remove(self, url: str) -> None:
        normalized = normalize_server_url(url)
        if normalized in self._urls:
            self._urls.remove(normalized)

    def to_setting(self) -> List[str]:
        return list(self._urls)

    @classmethod
    def from_setting(
        cls, value: Any, max_size: int = 10, default: Optional[str] = DEFAULT_SERVER_URL
    ) -> ServerUrlHistory:
        """Rebuild from a stored setting (list, tuple, one string, or None); ``default`` when empty."""
        if value is None:
            urls: List[str] = []
        elif isinstance(value, str):
            urls = [value] if value.strip() else []
        else:
            urls = [str(item) for item in value]
        history = cls(urls, max_size=max_size)
        if not history.urls and default:
            history.add(default)
        return history

    def __len__(self) -> int:
        return len(self._urls)

    def __iter__(self):
        return iter(list(self._urls))

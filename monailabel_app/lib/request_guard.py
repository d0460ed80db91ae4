# Copyright MedAttnSlicer contributors. Apache-2.0.
"""A small ASGI middleware answering 404 for unknown train tasks and scoring methods.

MONAI Label starts ``POST /train/{model}`` and ``POST /scoring/{method}`` as background subprocesses without
checking the name first, so an unknown name would return 200 and fail later in the subprocess. The app's own
methods (infer, next_sample, scoring, train) raise 404s for everything that runs in the server process; this guard
covers the two background endpoints. It is installed from ``main.py`` when the app starts inside MONAI Label's
FastAPI server (``monailabel.app``), by wrapping the server's built middleware stack.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["RequestGuard", "install_request_guard"]

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]

_PATTERNS = {
    "train": re.compile(r"^/train/(?P<name>[^/]+)/?$"),
    "scoring": re.compile(r"^/scoring/(?P<name>[^/]+)/?$"),
}


class RequestGuard:
    """ASGI wrapper: 404 for ``POST /train/<unknown>`` and ``POST /scoring/<unknown>``, else pass through.

    Args:
        inner: the wrapped ASGI application.
        known: ``kind -> callable returning the known names`` for ``"train"`` and ``"scoring"``.
        prefix: API prefix (``MONAI_LABEL_API_STR``).
    """

    def __init__(self, inner: ASGIApp, known: dict[str, Callable[[], set[str]]], prefix: str = "") -> None:
        self.inner = inner
        self.known = known
        self.prefix = prefix.rstrip("/")

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope.get("type") == "http" and scope.get("method") == "POST":
            path = scope.get("path", "")
            if self.prefix and path.startswith(self.prefix):
                path = path[len(self.prefix) :]
            for kind, pattern in _PATTERNS.items():
                match = pattern.match(path)
                if match and match.group("name") not in self.known[kind]():
                    names = sorted(self.known[kind]())
                    what = "train task" if kind == "train" else "scoring method"
                    detail = f"unknown {what} {match.group('name')!r}; available: {names}"
                    await self._reply(send, 404, {"detail": detail})
                    return
        await self.inner(scope, receive, send)

    @staticmethod
    async def _reply(send, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode("utf-8")
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def install_request_guard(known: dict[str, Callable[[], set[str]]]) -> bool:
    """Wrap the running MONAI Label server's middleware stack; False when not running inside that server."""
    import sys

    server = sys.modules.get("monailabel.app")
    if server is None or not hasattr(server, "app"):
        return False
    from monailabel.config import settings

    fastapi_app = server.app
    if fastapi_app.middleware_stack is None:
        fastapi_app.middleware_stack = fastapi_app.build_middleware_stack()
    if isinstance(fastapi_app.middleware_stack, RequestGuard):
        fastapi_app.middleware_stack.known = known
        return True
    fastapi_app.middleware_stack = RequestGuard(fastapi_app.middleware_stack, known, settings.MONAI_LABEL_API_STR)
    logger.info("request guard installed (404 for unknown train tasks / scoring methods)")
    return True

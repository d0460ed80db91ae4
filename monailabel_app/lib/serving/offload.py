# Copyright MedAttnSlicer contributors. Apache-2.0.
"""ASGI middleware that runs MONAI Label's heavy request handlers in worker pools, off the server's event loop.

MONAI Label 0.8.5 declares its endpoints ``async def`` and runs inference, label saving and synchronous scoring
inside them, on the event loop: while one inference runs nothing else is served, and finished answers are not even
sent until the loop is free. This middleware leaves MONAI Label's routes as they are and instead runs the whole
request (the FastAPI handler, its response and background tasks) on a worker thread's event loop
(:class:`~monailabel_app.lib.serving.pool.WorkerPool`); the request's ``receive`` and ``send`` are forwarded to the
server's loop, so every answer leaves as soon as its handler has produced it, and ``/info``, ``/datastore``,
``/train`` status keep answering while inferences run.

Two pools:

- ``infer``: ``POST /infer/...``, ``POST /activelearning/...``, and ``POST /scoring/...`` or ``POST /batch/infer/...``
  with ``run_sync=true`` (the ones that run networks in the server process); ``workers x torch threads`` = cores.
- ``io``: ``PUT /datastore/label``, ``PUT /datastore/image`` and ``PUT /session/`` (label and image uploads:
  reading and checking files), so a save is not queued behind inferences.

A request that finds its pool's queue full is answered ``503`` with ``Retry-After`` (seconds) and a ``detail``
naming the queue, after its body has been read (so the client sees the answer rather than a reset connection).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from monailabel_app.lib.serving.pool import PoolFullError, WorkerPool

__all__ = ["OffloadMiddleware", "offload_rules"]

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]

# (HTTP method, path pattern after the API prefix, pool name, only with ?run_sync=true)
_RULES: tuple[tuple[str, re.Pattern, str, bool], ...] = (
    ("POST", re.compile(r"^/infer/.+"), "infer", False),
    ("POST", re.compile(r"^/activelearning/.+"), "infer", False),
    ("POST", re.compile(r"^/scoring(/.*)?$"), "infer", True),
    ("POST", re.compile(r"^/batch/infer/.+"), "infer", True),
    ("PUT", re.compile(r"^/datastore/label/?$"), "io", False),
    ("PUT", re.compile(r"^/datastore(/image)?/?$"), "io", False),
    ("PUT", re.compile(r"^/session/?$"), "io", False),
)


def offload_rules() -> list[tuple[str, str, str]]:
    """``(method, path pattern, pool)`` of the offloaded requests (for documentation and ``/info``)."""
    return [(m, p.pattern + (" (run_sync=true)" if sync else ""), pool) for m, p, pool, sync in _RULES]


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


class OffloadMiddleware:
    """ASGI wrapper sending the heavy requests of ``inner`` to worker pools.

    Args:
        inner: the wrapped ASGI application (MONAI Label's FastAPI middleware stack).
        pools: ``{"infer": pool, "io": pool}``.
        prefix: API prefix (``MONAI_LABEL_API_STR``).
    """

    def __init__(self, inner: ASGIApp, pools: dict[str, WorkerPool], prefix: str = "") -> None:
        self.inner = inner
        self.pools = pools
        self.prefix = prefix.rstrip("/")

    def pool_for(self, scope: Scope) -> WorkerPool | None:
        """The pool that runs this request, or None to run it on the event loop as before."""
        if scope.get("type") != "http":
            return None
        path = scope.get("path", "")
        if self.prefix and path.startswith(self.prefix):
            path = path[len(self.prefix) :]
        method = scope.get("method")
        for rule_method, pattern, pool, sync_only in _RULES:
            if method != rule_method or not pattern.match(path):
                continue
            if sync_only:
                query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
                if not _truthy(query.get("run_sync", ["false"])[0]):
                    return None
            return self.pools.get(pool)
        return None

    async def __call__(self, scope: Scope, receive, send) -> None:
        pool = self.pool_for(scope)
        if pool is None:
            await self.inner(scope, receive, send)
            return
        server_loop = asyncio.get_running_loop()

        async def receive_from_server() -> dict:
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(receive(), server_loop))

        async def send_through_server(message: dict) -> None:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(send(message), server_loop))

        async def handle() -> None:
            await self.inner(scope, receive_from_server, send_through_server)

        try:
            await pool.run(handle)
        except PoolFullError as full:
            await _drain(receive)
            detail = f"server busy: {full}; retry in {full.retry_after} s."
            logger.warning(f"503 for {scope.get('method')} {scope.get('path')}: {detail}")
            body = json.dumps({"detail": detail}).encode("utf-8")
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(full.retry_after).encode()),
            ]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})


async def _drain(receive) -> None:
    """Read (and drop) the rest of the request body, so the client reads the answer instead of a reset."""
    while True:
        message = await receive()
        if message.get("type") != "http.request" or not message.get("more_body"):
            return

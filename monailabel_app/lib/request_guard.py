# Copyright MedAttnSlicer contributors. Apache-2.0.
"""A small ASGI middleware for what MONAI Label's own endpoints answer badly.

- MONAI Label starts ``POST /train/{model}`` and ``POST /scoring/{method}`` as background subprocesses without
  checking the name first, so an unknown name would return 200 and fail later in the subprocess: the guard answers
  404 listing the known names; a train request whose data-parallel settings cannot work (``workers``, ``nnodes``,
  ``rdzv_endpoint``, ...) is answered 422 naming the setting, before any process starts (``known["train_request"]``).
  (The app's own methods (infer, next_sample, scoring, train) raise 404s for
  everything that runs in the server process.)
- Error answers MONAI Label's endpoints raise themselves are rewritten to name the user's input: ``POST /infer``
  without ``image`` (MONAI Label: 500 "Neither Image nor File ...") becomes 422 naming the missing parameter;
  ``GET /datastore/image`` / ``GET /datastore/label`` of an unknown id ("Image NOT Found") say which id and what
  exists.
- Uploaded files reach the app as temporary files (``/tmp/tmpab12cd34.txt``); in any error answer of a request that
  uploaded files, the temporary names are replaced by the names the user sent (the multipart ``filename``).

It is installed from ``main.py`` when the app starts inside MONAI Label's FastAPI server (``monailabel.app``), by
wrapping the server's built middleware stack.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

__all__ = ["RequestGuard", "install_request_guard", "note_upload", "user_file_names"]

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]

_PATTERNS = {
    "train": re.compile(r"^/train/(?P<name>[^/]+)/?$"),
    "scoring": re.compile(r"^/scoring/(?P<name>[^/]+)/?$"),
}
_INFER = re.compile(r"^/infer/(?P<name>[^/]+)/?$")
# MONAI Label's message when /infer gets neither an image id, nor a file, nor a session
_NO_INFER_INPUT = "Neither Image nor File"
# multipart part headers: name="file"; filename="my scan.nii.gz"
_PART = re.compile(rb'name="(?P<field>[^"]*)"\s*;\s*filename="(?P<filename>[^"]*)"')
# tempfile.NamedTemporaryFile names: tmp + 8 of [a-z0-9_], then MONAI Label's suffix (the upload's extensions)
_TEMP_NAME = re.compile(r"(?:" + re.escape(tempfile.gettempdir()) + r"/)?tmp[a-z0-9_]{8}(?:\.[A-Za-z0-9]+)*")

# temporary upload file (basename) -> multipart field it came from ("file", "label"); filled by note_upload()
_UPLOAD_FIELDS: OrderedDict[str, str] = OrderedDict()


def note_upload(temp_path: str, field: str) -> None:
    """Record that ``temp_path`` holds the upload of multipart ``field`` (so error answers can name the user's
    file); called by the app where it receives uploads (infer, add_image, save_label)."""
    _UPLOAD_FIELDS[os.path.basename(temp_path)] = field
    while len(_UPLOAD_FIELDS) > 256:
        _UPLOAD_FIELDS.popitem(last=False)


def user_file_names(text: str, uploads: dict[str, str]) -> str:
    """``text`` with every temporary upload name replaced by the user's file name.

    Args:
        text: an error message.
        uploads: ``{multipart field: the user's file name}`` of the request.
    """
    if not uploads:
        return text

    def replace(match: re.Match) -> str:
        name = os.path.basename(match.group(0))
        field = _UPLOAD_FIELDS.get(name)
        if field in uploads:
            return uploads[field]
        if len(uploads) == 1:
            return next(iter(uploads.values()))
        suffix = "".join(re.findall(r"\.[A-Za-z0-9]+", name))
        same = [user for user in uploads.values() if suffix and user.endswith(suffix)]
        return same[0] if len(same) == 1 else match.group(0)

    return _TEMP_NAME.sub(replace, text)


async def _read_body(receive) -> bytes:
    """The whole request body (the train request's JSON is small)."""
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body") or b"")
        if not message.get("more_body"):
            return b"".join(chunks)


def _json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; ``{}`` when it is empty or not an object (MONAI Label answers those itself)."""
    try:
        value = json.loads(body.decode("utf-8")) if body.strip() else {}
    except (UnicodeDecodeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _replay(body: bytes, receive):
    """A ``receive`` that hands the already-read body to the wrapped app, then waits as the server's would."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> dict:
        return pending.pop() if pending else await receive()

    return replayed


class RequestGuard:
    """ASGI wrapper: 404 for ``POST /train/<unknown>`` and ``POST /scoring/<unknown>``, else pass through.

    Args:
        inner: the wrapped ASGI application.
        known: ``kind -> callable returning the known names`` for ``"train"`` and ``"scoring"``; optional
            ``"images"`` (datastore image ids) and ``"missing_image"`` (``id -> message`` for an unknown image id).
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
                if match and kind == "train" and "train_request" in self.known:
                    body = await _read_body(receive)
                    problem = self.known["train_request"](_json_object(body))
                    if problem:
                        await self._reply(send, 422, {"detail": problem})
                        return
                    receive = _replay(body, receive)
        if scope.get("type") != "http":
            await self.inner(scope, receive, send)
            return
        uploads: dict[str, str] = {}
        tail = b""

        async def receive_noting_uploads() -> dict:
            nonlocal tail
            message = await receive()
            body = message.get("body") or b""
            if body and b"filename=" in tail + body:
                for match in _PART.finditer(tail + body):
                    uploads[match.group("field").decode("utf-8", "replace")] = os.path.basename(
                        match.group("filename").decode("utf-8", "replace")
                    )
            tail = body[-512:]
            return message

        held: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def send_rewriting_errors(message: dict) -> None:
            if message["type"] == "http.response.start":
                if int(message.get("status", 200)) >= 400:
                    held["start"] = message  # hold error answers until their body is complete
                    return
            elif message["type"] == "http.response.body" and "start" in held:
                chunks.append(message.get("body") or b"")
                if message.get("more_body"):
                    return
                status, body = self._rewrite(scope, int(held["start"]["status"]), b"".join(chunks), uploads)
                headers = [(k, v) for k, v in held["start"].get("headers", []) if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({**held["start"], "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.inner(scope, receive_noting_uploads, send_rewriting_errors)

    def _rewrite(self, scope: Scope, status: int, body: bytes, uploads: dict[str, str]) -> tuple[int, bytes]:
        """The (status, body) of an error answer, with MONAI Label's generic messages replaced by ones naming the
        user's input."""
        try:
            payload = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            payload = None
        if not isinstance(payload, dict) or not isinstance(payload.get("detail"), str):
            return status, body
        detail = payload["detail"]
        path = scope.get("path", "")
        if self.prefix and path.startswith(self.prefix):
            path = path[len(self.prefix) :]
        query = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}
        method = scope.get("method")
        if method == "POST" and _INFER.match(path) and detail.startswith(_NO_INFER_INPUT):
            status = 422
            detail = (
                f"missing query parameter 'image': POST /infer/{_INFER.match(path).group('name')}?image=<image id> "
                "segments a datastore image (GET /datastore/?output=all lists the ids), or upload the image file in "
                "the multipart field 'file'."
            )
        elif (
            method == "GET"
            and path.rstrip("/") == "/datastore/image"
            and status == 404
            and "missing_image" in self.known
        ):
            image = query.get("image", "")
            detail = self.known["missing_image"](image) if image else "missing query parameter 'image' (an image id)."
        elif (
            method == "GET"
            and path.rstrip("/") == "/datastore/label"
            and status == 404
            and "missing_image" in self.known
        ):
            label, tag = query.get("label", ""), query.get("tag", "")
            images = set(self.known["images"]()) if "images" in self.known else set()
            if label not in images:
                detail = self.known["missing_image"](label)
            else:
                detail = f"image {label!r} has no {tag!r} label (GET /datastore/?output=all lists each image's labels)."
        detail = user_file_names(detail, uploads)
        if detail == payload["detail"]:
            return status, body
        payload["detail"] = detail
        return status, json.dumps(payload).encode("utf-8")

    @staticmethod
    async def _reply(send, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode("utf-8")
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def install_request_guard(known: dict[str, Callable[[], set[str]]]) -> bool:
    """Wrap the running MONAI Label server's middleware stack; False when not running inside that server."""
    from monailabel_app.lib.asgi import running_server_app

    running = running_server_app()
    if running is None:
        return False
    fastapi_app, prefix = running
    if isinstance(fastapi_app.middleware_stack, RequestGuard):
        fastapi_app.middleware_stack.known = known
        return True
    fastapi_app.middleware_stack = RequestGuard(fastapi_app.middleware_stack, known, prefix)
    logger.info(
        "request guard installed (404 for unknown train tasks / scoring methods, error messages naming the input)"
    )
    return True

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""HTTP plumbing of :class:`~MedAttnSlicerLib.client.MonaiLabelClient`: one request/response exchange over
urllib, cancellable from another thread, with bulk bodies moved in few, long system calls.

Why bulk bodies are special: inside Slicer, PythonQt never releases Python's GIL while the main thread is in
Qt's C++ event loop, so a worker thread runs Python only in the moments the main thread runs Python (the
panel's poll timer). A worker that reads a download in 1 MB ``read`` calls needs the GIL back after every
``recv`` and crawls at one chunk per timer tick. Here a large request body goes out in one blocking
``sendall`` and a large response body comes in with ``recv_into(..., MSG_WAITALL)`` blocks of
:data:`BULK_BLOCK_BYTES`: the kernel moves the bytes while the GIL is released, and the worker needs it only a
few times per transfer. Timeouts of those blocking calls are the kernel's (``SO_RCVTIMEO``/``SO_SNDTIMEO``);
cancelling shuts the socket down, which ends a blocked call at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import http.client
import json
import socket
import struct
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any, Callable, List, Optional

from .cancel import CancelToken
from .errors import OperationCancelled, ProtocolError, ServerError, ServerTimeout, ServerUnavailable

__all__ = ["BULK_BLOCK_BYTES", "Exchange", "build_opener", "parse_json", "query_url"]

#: Bytes a worker asks the kernel for in one blocking call (download block, minimum bulk upload).
BULK_BLOCK_BYTES = 16 << 20
_CHUNK_BYTES = 1 << 20
_WAITALL = getattr(socket, "MSG_WAITALL", 0)  # 0: recv_into returns what is there, the loop still completes
_TIMED_OUT = {errno.EAGAIN, errno.EWOULDBLOCK, getattr(errno, "WSAETIMEDOUT", errno.ETIMEDOUT), errno.ETIMEDOUT}


class _SocketRegistry:
    """Remembers the sockets a request opened and registers their shutdown with the cancel token."""

    def __init__(self, cancel: Optional[CancelToken]) -> None:
        self.cancel = cancel
        self.socket: Optional[socket.socket] = None
        self._unregister: List[Callable[[], None]] = []

    def track(self, sock: socket.socket) -> None:
        self.socket = sock
        if self.cancel is not None and sock is not None:
            self._unregister.append(self.cancel.add_abort_callback(lambda: _shutdown(sock)))

    def release(self) -> None:
        for unregister in self._unregister:
            unregister()
        self._unregister = []


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _KernelTimeouts:
    """Context: the socket blocks in the kernel (GIL released for the whole call) with kernel timeouts.

    Python's own socket timeouts make the socket non-blocking and wake the thread for every ``poll``; a blocking
    socket with ``SO_RCVTIMEO``/``SO_SNDTIMEO`` waits in one call. The Python timeout is restored afterwards.
    """

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        self.sock = sock
        self.timeout_s = timeout_s
        self.previous: Optional[float] = None

    def __enter__(self) -> socket.socket:
        self.previous = self.sock.gettimeout()
        self.sock.settimeout(None)
        if sys.platform == "win32":  # a DWORD of milliseconds
            value = struct.pack("L", max(1, int(self.timeout_s * 1000)))
        else:  # struct timeval
            seconds = int(self.timeout_s)
            value = struct.pack("ll", seconds, int((self.timeout_s - seconds) * 1e6))
        for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            self.sock.setsockopt(socket.SOL_SOCKET, option, value)
        return self.sock

    def __exit__(self, *exc_info: Any) -> None:
        with contextlib.suppress(OSError):  # shut down or closed meanwhile (cancel)
            self.sock.settimeout(self.previous)


def _tracking_connection(
    base: type, registry: _SocketRegistry, timeout_s: float
) -> Callable[..., http.client.HTTPConnection]:
    def make(host: str, **kwargs: Any) -> http.client.HTTPConnection:
        connection = base(host, **kwargs)
        plain_connect = connection.connect
        plain_send = connection.send

        def connect() -> None:
            plain_connect()
            registry.track(connection.sock)

        def send(data: Any) -> None:
            # A large body (an image upload) in one blocking sendall instead of one GIL round trip per buffer.
            plain_tcp = isinstance(connection.sock, socket.socket) and type(connection.sock) is socket.socket
            if plain_tcp and isinstance(data, (bytes, bytearray, memoryview)) and len(data) >= BULK_BLOCK_BYTES:
                with _KernelTimeouts(connection.sock, timeout_s) as sock:
                    sock.sendall(data)
            else:
                plain_send(data)

        connection.connect = connect  # type: ignore[method-assign]
        connection.send = send  # type: ignore[method-assign]
        return connection

    return make


class _TrackingHandler:
    """Mixin of the two handlers below: the connections they open are made by :func:`_tracking_connection`."""

    def __init__(self, registry: _SocketRegistry, timeout_s: float) -> None:
        super().__init__()
        self._registry = registry
        self._timeout_s = timeout_s

    def _connection_factory(self, base: type) -> Callable[..., http.client.HTTPConnection]:
        return _tracking_connection(base, self._registry, self._timeout_s)


class _CancellableHTTPHandler(_TrackingHandler, urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection_factory(http.client.HTTPConnection), req)


class _CancellableHTTPSHandler(_TrackingHandler, urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection_factory(http.client.HTTPSConnection), req, context=self._context)


def build_opener(registry: _SocketRegistry, timeout_s: float, use_system_proxy: bool) -> urllib.request.OpenerDirector:
    """An urllib opener whose connections register with ``registry`` (cancel) and send bulk bodies in one call."""
    handlers: List[urllib.request.BaseHandler] = [
        _CancellableHTTPHandler(registry, timeout_s),
        _CancellableHTTPSHandler(registry, timeout_s),
    ]
    if not use_system_proxy:
        handlers.append(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener(*handlers)


@dataclasses.dataclass(eq=False)
class Exchange:
    """One HTTP request/response with uniform error translation (context manager).

    Args:
        url: absolute URL with query.
        method: HTTP method.
        body: request body (None for none).
        request_headers: extra request headers (Content-Type, Authorization).
        timeout_s: socket timeout.
        cancel: token whose cancel aborts the exchange.
        use_system_proxy: honour ``http_proxy``-style variables.
    """

    url: str
    method: str
    body: Optional[bytes]
    request_headers: dict
    timeout_s: float
    cancel: Optional[CancelToken]
    use_system_proxy: bool = False
    registry: _SocketRegistry = dataclasses.field(init=False, repr=False)
    response: Optional[http.client.HTTPResponse] = dataclasses.field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.registry = _SocketRegistry(self.cancel)

    def __enter__(self) -> Exchange:
        if self.cancel is not None:
            self.cancel.raise_if_cancelled()
        request = urllib.request.Request(self.url, data=self.body, method=self.method)
        request.add_header("Accept", "application/json, multipart/form-data, */*")
        for key, value in self.request_headers.items():
            request.add_header(key, value)
        opener = build_opener(self.registry, self.timeout_s, self.use_system_proxy)
        try:
            self.response = opener.open(request, timeout=self.timeout_s)
        except Exception as error:
            self.registry.release()
            translated = self._translate(error)
            if translated is error:
                raise
            raise translated from error
        return self

    @property
    def headers(self) -> http.client.HTTPMessage:
        assert self.response is not None
        return self.response.headers

    def iter_chunks(self) -> Iterator[bytes]:
        """The response body in pieces; a body of known length on plain TCP in :data:`BULK_BLOCK_BYTES` blocks."""
        assert self.response is not None
        response = self.response
        sock = self.registry.socket
        length = response.length
        if length is None or response.chunked or sock is None or type(sock) is not socket.socket:
            yield from self._iter_buffered()
            return
        # What http.client read past the headers is in its buffer: read1 returns exactly that (or, when the
        # buffer is empty, what one recv gives); the rest is still in the socket.
        head = self._guard(response.fp.read1, min(length, 1 << 16)) if length else b""
        remaining = length - len(head)
        if head:
            yield head
        with _KernelTimeouts(sock, self.timeout_s):
            while remaining > 0:
                block = bytearray(min(remaining, BULK_BLOCK_BYTES))
                view = memoryview(block)
                received = 0
                while received < len(block):
                    count = self._guard(sock.recv_into, view[received:], len(block) - received, _WAITALL)
                    if count == 0:
                        self._raise_if_cancelled()
                        raise ServerUnavailable(self.url, "the server closed the connection before the end of the body")
                    received += count
                remaining -= received
                self._raise_if_cancelled()
                yield block
        response.length = 0  # consumed here; http.client must not wait for it again on close

    def _iter_buffered(self) -> Iterator[bytes]:
        assert self.response is not None
        while True:
            chunk = self._guard(self.response.read, _CHUNK_BYTES)
            self._raise_if_cancelled()
            if not chunk:
                return
            yield chunk

    def read_all(self) -> bytes:
        return b"".join(self.iter_chunks())

    def __exit__(self, *exc_info: Any) -> None:
        if self.response is not None:
            self.response.close()
        self.registry.release()

    def _raise_if_cancelled(self) -> None:
        if self.cancel is not None and self.cancel.cancelled:
            raise OperationCancelled(self.cancel.reason or "Cancelled.")

    def _guard(self, read: Callable[..., Any], *args: Any) -> Any:
        """``read(*args)`` with socket and HTTP errors translated."""
        try:
            return read(*args)
        except Exception as error:
            translated = self._translate(error)
            if translated is error:
                raise
            raise translated from error

    def _translate(self, error: BaseException) -> BaseException:
        """Map urllib/socket failures to the library's readable exceptions."""
        if self.cancel is not None and self.cancel.cancelled:
            return OperationCancelled(self.cancel.reason or "Cancelled.")
        if isinstance(error, urllib.error.HTTPError):
            try:
                payload = error.read()
            except Exception:  # noqa: BLE001 - the status alone is still worth reporting
                payload = b""
            finally:
                error.close()
            return ServerError(error.code, _error_detail(payload, error.reason), self.method, self.url)
        reason: Any = error.reason if isinstance(error, urllib.error.URLError) else error
        if isinstance(reason, (socket.timeout, TimeoutError)) or (
            isinstance(reason, OSError) and reason.errno in _TIMED_OUT
        ):
            return ServerTimeout(self.url, self.timeout_s)
        if isinstance(reason, (OSError, http.client.HTTPException)):
            return ServerUnavailable(self.url, _describe_os_error(reason))
        if isinstance(error, urllib.error.URLError):
            return ServerUnavailable(self.url, str(reason))
        return error


def _describe_os_error(error: BaseException) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, socket.gaierror):
        return f"unknown host: {error.strerror or error}"
    if isinstance(error, (ConnectionResetError, http.client.RemoteDisconnected)):
        return "the server closed the connection"
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return text


def _error_detail(payload: bytes, reason: Any) -> str:
    """The server's explanation: FastAPI's ``detail`` (string or validation list) or the body text."""
    text = payload.decode("utf-8", errors="replace").strip()
    try:
        parsed = json.loads(text) if text else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and "detail" in parsed:
        detail = parsed["detail"]
        if isinstance(detail, list):  # FastAPI request validation errors
            messages = []
            for item in detail:
                if isinstance(item, dict):
                    location = ".".join(str(x) for x in item.get("loc", []))
                    messages.append(f"{location}: {item.get('msg', item)}" if location else str(item.get("msg", item)))
                else:
                    messages.append(str(item))
            return "; ".join(messages)
        return str(detail)
    if text:
        return text[:500]
    return str(reason or "no detail")


def parse_json(data: bytes, what: str) -> Any:
    """JSON of a response body (None for an empty body); ProtocolError naming ``what`` when it is not JSON."""
    try:
        return json.loads(data.decode("utf-8")) if data.strip() else None
    except (ValueError, UnicodeDecodeError) as error:
        raise ProtocolError(f"{what} did not return valid JSON: {error}") from error


def query_url(server_url: str, path: str, query: Optional[dict] = None) -> str:
    """Absolute URL of ``path`` on ``server_url`` with an encoded query string (None values left out)."""
    url = server_url + path
    if query:
        url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
    return url

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Start the MedAttnSlicer MONAI Label server as a child process and wait until it answers.

Used by the tests, the benchmarks and anything else that needs a real server on a free port:

    from monailabel_app.launcher import start_server

    with start_server("studies/", {"models": "default", "model_dir": "/tmp/models"}) as server:
        info = server.get("/info/").json()

The server is ``monailabel start_server --app monailabel_app --studies DIR --conf ...`` in a subprocess (its own
process group) on an ephemeral 127.0.0.1 port; :func:`start_server` returns once ``GET /info/`` answers and
:meth:`ServerHandle.stop` ends the process group (the server and the training/scoring subprocesses it started).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_DIR = REPO_ROOT / "monailabel_app"
VENV_BIN = Path(sys.executable).parent

__all__ = [
    "APP_DIR",
    "ServerHandle",
    "ServerStartError",
    "free_port",
    "start_server",
    "stop_process_group",
    "wait_for_answer",
]


class ServerStartError(RuntimeError):
    """The server process exited or did not answer ``/info/`` in time (the message holds its log tail)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def stop_process_group(proc: subprocess.Popen, timeout: float) -> None:
    """End the process group ``proc`` leads (started with ``start_new_session=True``): SIGTERM, then SIGKILL when it
    has not exited after ``timeout`` seconds. The whole group goes, so also the children it started; a process that
    has already exited is left alone."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        # the group may have gone between the timeout and the kill
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def wait_for_answer(
    proc: subprocess.Popen,
    url: str,
    timeout: float,
    interval: float = 1.0,
    request_timeout: float = 30.0,
    **request_kwargs: Any,
) -> str | None:
    """Poll ``GET url`` every ``interval`` seconds until it answers 200, for as long as ``proc`` runs.

    Args:
        proc: the process that is to answer (a server starting up).
        url: what to request.
        timeout: how long to wait in all, in seconds.
        interval: seconds between requests.
        request_timeout: timeout of one request.
        request_kwargs: further ``requests.get`` arguments (e.g. ``auth``).

    Returns:
        None once it answered 200; otherwise why not, to end a sentence naming the process: ``"exited with code 1"``
        or ``"did not answer <url> within <timeout> s"``.
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return f"exited with code {proc.returncode}"
        try:
            if requests.get(url, timeout=request_timeout, **request_kwargs).status_code == 200:
                return None
        except requests.RequestException:
            pass  # not listening yet
        time.sleep(interval)
    return f"did not answer {url} within {timeout:.0f} s"


@dataclass
class ServerHandle:
    """A running server.

    Attributes:
        url: base URL (``http://127.0.0.1:<port>``).
        port: its port.
        proc: the ``monailabel start_server`` process (leader of its own process group).
        app_dir: the app folder served.
        studies: the datastore folder.
        conf: the ``--conf`` options.
        log_path: the server's stdout/stderr.
        model_dir: where the server writes trained models (the ``model_dir`` of ``conf``); None: the app's default.
    """

    url: str
    port: int
    proc: subprocess.Popen
    app_dir: Path
    studies: Path | str
    conf: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    model_dir: Path | None = None

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """``method`` on ``url + path`` with ``requests`` keyword arguments (a 600 s timeout unless one is given)."""
        kwargs.setdefault("timeout", 600)
        return requests.request(method, self.url + path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("PUT", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", path, **kwargs)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for_training(self, timeout: float = 600) -> dict:
        """Poll ``GET /train/`` until the run is neither SUBMITTED nor RUNNING; its last status."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.get("/train/", params={"check_if_running": "false"}).json()
            if status["status"] not in ("SUBMITTED", "RUNNING"):
                return status
            time.sleep(2)
        raise AssertionError(f"training did not finish in {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        """End the server's process group (SIGTERM, then SIGKILL after ``timeout`` seconds)."""
        stop_process_group(self.proc, timeout)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_server(
    studies_dir: str | os.PathLike,
    conf: dict[str, str] | None = None,
    *,
    app_dir: str | os.PathLike = APP_DIR,
    host: str = "127.0.0.1",
    port: int | None = None,
    timeout: float = 240.0,
    env: dict[str, str] | None = None,
    log_path: str | os.PathLike | None = None,
    ready_path: str = "/info/",
) -> ServerHandle:
    """Start ``monailabel start_server`` on ``studies_dir`` and wait until ``GET ready_path`` answers 200.

    Args:
        studies_dir: datastore folder (use a copy: the server writes into it), or a DICOMweb URL.
        conf: ``--conf`` key/values (default ``{"models": "all"}``).
        app_dir: the MONAI Label app folder.
        host: bind address.
        port: TCP port (default: a free ephemeral one).
        timeout: seconds to wait for ``ready_path``.
        env: extra environment variables.
        log_path: where the server's output goes (default a temporary file).
        ready_path: the request that must answer 200 (a server with auth enabled answers ``/info/`` only with a
            token: use an unprotected path such as ``/auth/``).

    Raises:
        ServerStartError: the server exited or did not answer in time.
    """
    conf = dict(conf or {"models": "all"})
    port = port or free_port(host)
    # a datastore folder, or a PACS's DICOMweb URL (http(s)://...), passed on as it is
    studies = str(studies_dir) if str(studies_dir).startswith(("http://", "https://")) else Path(studies_dir).resolve()
    log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="monailabel_server_", suffix=".log")[1])
    cmd = [
        str(VENV_BIN / "monailabel"),
        "start_server",
        "--app",
        str(Path(app_dir).resolve()),
        "--studies",
        str(studies),
        "--host",
        host,
        "--port",
        str(port),
    ]
    for key, value in conf.items():
        cmd += ["--conf", key, str(value)]
    environment = dict(os.environ)
    environment["PATH"] = f"{VENV_BIN}{os.pathsep}{environment.get('PATH', '')}"
    environment["MONAILABEL_PYEXE"] = sys.executable
    environment["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), environment.get("PYTHONPATH", "")) if p)
    environment.update(env or {})
    # the server's working folder is the log's folder: MONAI Label reads a stray ".env" from its working folder
    with open(log_path, "w") as log_handle:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            cmd,
            stdout=log_handle,
            stderr=subprocess.STDOUT,
            env=environment,
            cwd=str(log_path.parent),
            start_new_session=True,
        )
    model_dir = Path(conf["model_dir"]) if "model_dir" in conf else None
    handle = ServerHandle(
        f"http://{host}:{port}", port, proc, Path(app_dir).resolve(), studies, conf, log_path, model_dir=model_dir
    )
    problem = wait_for_answer(proc, handle.url + ready_path, timeout, interval=1.0, request_timeout=30.0)
    if problem is None:
        return handle
    handle.stop()
    raise ServerStartError(f"server {problem}:\n{handle.log_tail()}")

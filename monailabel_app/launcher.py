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

__all__ = ["APP_DIR", "ServerHandle", "ServerStartError", "free_port", "start_server"]


class ServerStartError(RuntimeError):
    """The server process exited or did not answer ``/info/`` in time (the message holds its log tail)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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
    """

    url: str
    port: int
    proc: subprocess.Popen
    app_dir: Path
    studies: Path | str
    conf: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 600)
        return requests.get(self.url + path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 600)
        return requests.post(self.url + path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 600)
        return requests.put(self.url + path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 600)
        return requests.delete(self.url + path, **kwargs)

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
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=timeout)

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
    handle = ServerHandle(f"http://{host}:{port}", port, proc, Path(app_dir).resolve(), studies, conf, log_path)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(f"server exited with code {proc.returncode}:\n{handle.log_tail()}")
        try:
            if requests.get(handle.url + ready_path, timeout=30).status_code == 200:
                return handle
        except requests.RequestException:
            pass
        time.sleep(1.0)
    handle.stop()
    raise ServerStartError(f"server did not answer {ready_path} within {timeout:.0f} s:\n{handle.log_tail()}")

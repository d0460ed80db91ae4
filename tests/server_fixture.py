# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Start the real MedAttnSlicer MONAI Label server for tests (and benchmarks), on a copy of a datastore.

    from tests.server_fixture import copy_sample_datastore, start_server

    studies = copy_sample_datastore(tmp_path / "studies")
    with start_server(studies, {"models": "all", "model_dir": str(tmp_path / "models")}) as server:
        info = server.get("/info/").json()

The server is ``monailabel start_server --app monailabel_app --studies DIR --conf ...`` in a subprocess (its own
process group) on an ephemeral 127.0.0.1 port; :func:`start_server` returns once ``GET /info/`` answers and
:meth:`ServerHandle.stop` ends the process group (the server and the training/scoring subprocesses it started).

Pytest fixtures (import them into a test module or ``conftest.py``):

- ``sample_studies`` (module scope): a fresh copy of the sample liver datastore (built with :mod:`sample_data`);
- ``monailabel_server`` (module scope): the server on ``sample_studies`` with ``--conf models all`` and a private
  ``model_dir``, so training never writes into the repository.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_DIR = REPO_ROOT / "monailabel_app"
VENV_BIN = Path(sys.executable).parent

__all__ = [
    "APP_DIR",
    "ServerHandle",
    "ServerStartError",
    "free_port",
    "copy_sample_datastore",
    "start_server",
    "sample_studies",
    "monailabel_server",
]


class ServerStartError(RuntimeError):
    """The server process exited or did not answer ``/info/`` in time (the message holds its log tail)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


_PRISTINE: Path | None = None


def _pristine_sample_datastore() -> Path:
    """The sample liver datastore built afresh by this test process into a temporary folder (once; ~3 s), never
    ``.data/datastore/liver``, which ``make serve`` users write labels and images into."""
    global _PRISTINE
    if _PRISTINE is None or not _PRISTINE.is_dir():
        import atexit

        from sample_data import build_datastore

        root = Path(tempfile.mkdtemp(prefix="medattn_pristine_datastore_"))
        atexit.register(shutil.rmtree, root, True)
        _PRISTINE = Path(build_datastore(("liver",), root / "liver").path)
    return _PRISTINE


def copy_sample_datastore(destination: str | os.PathLike, images: Sequence[str] | None = None) -> Path:
    """Copy the sample liver datastore (built by :mod:`sample_data` from the fetched sample data into a private
    temporary folder, not the user's ``.data/datastore/liver``) to ``destination``.

    Args:
        destination: new folder (must not exist or be empty).
        images: image ids to keep (default all); their ``labels/final`` files come along.

    Returns:
        the copy, ready to pass as ``--studies``.
    """
    source = _pristine_sample_datastore()
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    (destination / "labels" / "final").mkdir(parents=True, exist_ok=True)
    for image in sorted(source.glob("*.nii.gz")):
        image_id = image.name[: -len(".nii.gz")]
        if images is not None and image_id not in images:
            continue
        shutil.copy2(image, destination / image.name)
        label = source / "labels" / "final" / image.name
        if label.exists():
            shutil.copy2(label, destination / "labels" / "final" / image.name)
    notes = source / "datastore_notes.json"
    if notes.exists():
        shutil.copy2(notes, destination / notes.name)
    return destination


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
    studies: Path
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
) -> ServerHandle:
    """Start ``monailabel start_server`` on ``studies_dir`` and wait until ``GET /info/`` answers 200.

    Args:
        studies_dir: datastore folder (use a copy: the server writes into it).
        conf: ``--conf`` key/values (default ``{"models": "all"}``).
        app_dir: the MONAI Label app folder.
        host: bind address.
        port: TCP port (default: a free ephemeral one).
        timeout: seconds to wait for ``/info/``.
        env: extra environment variables.
        log_path: where the server's output goes (default a temporary file).

    Raises:
        ServerStartError: the server exited or did not answer in time.
    """
    conf = dict(conf or {"models": "all"})
    port = port or free_port(host)
    studies = Path(studies_dir).resolve()
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
    log_handle = open(log_path, "w")
    proc = subprocess.Popen(
        cmd,
        stdout=log_handle,
        stderr=subprocess.STDOUT,
        env=environment,
        cwd=str(log_path.parent),
        start_new_session=True,
    )
    log_handle.close()
    handle = ServerHandle(f"http://{host}:{port}", port, proc, Path(app_dir).resolve(), studies, conf, log_path)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(f"server exited with code {proc.returncode}:\n{handle.log_tail()}")
        try:
            if requests.get(handle.url + "/info/", timeout=30).status_code == 200:
                return handle
        except requests.RequestException:
            pass
        time.sleep(1.0)
    handle.stop()
    raise ServerStartError(f"server did not answer /info/ within {timeout:.0f} s:\n{handle.log_tail()}")


@pytest.fixture(scope="module")
def sample_studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the sample liver datastore for one test module."""
    return copy_sample_datastore(tmp_path_factory.mktemp("studies"))


@pytest.fixture(scope="module")
def monailabel_server(sample_studies: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """The real server on ``sample_studies`` serving every model; trained weights go to a temporary folder."""
    model_dir = tmp_path_factory.mktemp("trained_models")
    log = tmp_path_factory.mktemp("server_log") / "server.log"
    handle = start_server(sample_studies, {"models": "all", "model_dir": str(model_dir)}, log_path=log)
    try:
        yield handle
    finally:
        handle.stop()


def start_sample_server(
    tmp_path_factory: pytest.TempPathFactory, images: Sequence[str] | None = None, conf: dict[str, str] | None = None
) -> ServerHandle:
    """A server (use it as a context manager) over a fresh copy of the sample datastore (``images``), with
    ``--conf models all`` unless ``conf`` says otherwise and a fresh ``model_dir`` (``handle.model_dir``) for what
    training publishes, so tests never touch the bundled weights."""
    studies = copy_sample_datastore(tmp_path_factory.mktemp("studies"), images=images)
    model_dir = tmp_path_factory.mktemp("trained")
    log = tmp_path_factory.mktemp("log") / "server.log"
    handle = start_server(studies, {"models": "all", "model_dir": str(model_dir), **(conf or {})}, log_path=log)
    handle.model_dir = model_dir
    return handle


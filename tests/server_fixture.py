# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Pytest fixtures that start the real MedAttnSlicer MONAI Label server on a copy of the sample datastore.

    from tests.server_fixture import copy_sample_datastore, start_server

    studies = copy_sample_datastore(tmp_path / "studies")
    with start_server(studies, {"models": "all", "model_dir": str(tmp_path / "models")}) as server:
        info = server.get("/info/").json()

The launcher itself (:func:`start_server`, :class:`ServerHandle`) is :mod:`monailabel_app.launcher` and the datastore
copies :mod:`sample_data.datastore_copy` (the benchmarks use both too); this module adds the fixtures (import them
into a test module):

- ``sample_studies`` (module scope): a fresh copy of the sample liver datastore (built with :mod:`sample_data`);
- ``monailabel_server`` (module scope): the server on ``sample_studies`` with ``--conf models all`` and a private
  ``model_dir``, so training never writes into the repository.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from monailabel_app.launcher import (
    APP_DIR,
    REPO_ROOT,
    VENV_BIN,
    ServerHandle,
    ServerStartError,
    free_port,
    start_server,
)
from sample_data.datastore_copy import copy_sample_datastore

__all__ = [
    "REPO_ROOT",
    "VENV_BIN",
    "APP_DIR",
    "ServerHandle",
    "ServerStartError",
    "free_port",
    "copy_sample_datastore",
    "start_server",
    "sample_studies",
    "monailabel_server",
    "sample_server_fixture",
    "app_copy_with_held_out_dice",
]


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


def app_copy_with_held_out_dice(target: Path, held_out_dice: dict[str, float]) -> Path:
    """A copy of the app folder in ``target`` (the bundled weights linked, not copied) whose ``bundled_weights.json``
    states ``held_out_dice[family]`` as every held-out Dice of those segmentation families: how the server treats a
    model measured below its quality floor, seen over HTTP, while the shipped models all meet theirs."""
    app = Path(target) / "monailabel_app"
    ignore = shutil.ignore_patterns("*.pt", "__pycache__", "logs", "bundled_weights.json")
    shutil.copytree(APP_DIR, app, ignore=ignore)
    for weights in (APP_DIR / "model").glob("*.pt"):
        (app / "model" / weights.name).symlink_to(weights)
    report = json.loads((APP_DIR / "model" / "bundled_weights.json").read_text())
    for family, dice in held_out_dice.items():
        for image in report["families"][family]["held_out"].values():
            for figures in image.values():
                figures["dice"], figures["dice_interval"] = dice, [dice - 0.02, dice + 0.02]
    (app / "model" / "bundled_weights.json").write_text(json.dumps(report, indent=2))
    return app


def start_sample_server(
    tmp_path_factory: pytest.TempPathFactory,
    images: Sequence[str] | None = None,
    conf: dict[str, str] | None = None,
    app_dir: Path = APP_DIR,
) -> ServerHandle:
    """A server (use it as a context manager) of the app in ``app_dir`` over a fresh copy of the sample datastore
    (``images``), with ``--conf models all`` unless ``conf`` says otherwise and a fresh ``model_dir``
    (``handle.model_dir``) for what training publishes, so tests never touch the bundled weights."""
    studies = copy_sample_datastore(tmp_path_factory.mktemp("studies"), images=images)
    model_dir = tmp_path_factory.mktemp("trained")
    log = tmp_path_factory.mktemp("log") / "server.log"
    conf = {"models": "all", "model_dir": str(model_dir), **(conf or {})}
    handle = start_server(studies, conf, app_dir=app_dir, log_path=log)
    handle.model_dir = model_dir
    return handle


def sample_server_fixture(
    images: Sequence[str] | None = None,
    conf: dict[str, str] | None = None,
    *,
    name: str,
    scope: str = "module",
    doc: str | None = None,
):
    """A pytest fixture called ``name`` that yields :func:`start_sample_server` (``images``, ``conf``) for its
    ``scope`` and stops it afterwards. Assign it to a module-level variable of the same name::

        server = sample_server_fixture(STUDIES, name="server")
    """

    def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
        with start_sample_server(tmp_path_factory, images, conf) as handle:
            yield handle

    server.__doc__ = doc or f"A MONAI Label server over a fresh copy of the sample images {images or '(all)'}."
    return pytest.fixture(scope=scope, name=name)(server)

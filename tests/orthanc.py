# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Pytest fixtures: a real PACS (Debian's Orthanc + DICOMweb plugin) on an ephemeral 127.0.0.1 port with a temporary
storage folder, holding the sample DICOM CT series (fresh UIDs where its anonymisation blanked them) and an RGB
secondary capture; and the MedAttnSlicer server on it.

    from tests.orthanc import orthanc_pacs, pacs_server   # noqa: F401  (fixtures)

Tests that need Orthanc skip, with the install command, where it is not installed (``.ci/run`` installs it as root).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from scripts.local_pacs import Orthanc, find_orthanc, prepare_sample_series, secondary_capture_rgb
from tests.server_fixture import ServerHandle, start_server

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

__all__ = [
    "PacsHandle",
    "orthanc_pacs",
    "pacs_server",
    "require_orthanc",
    "start_pacs",
    "start_pacs_server",
]

PACS_USER, PACS_PASSWORD = "annotator", "pacs-secret"


def require_orthanc() -> None:
    """Skip the calling test where Orthanc with the DICOMweb plugin is not installed."""
    if find_orthanc() is None:
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)")


@dataclass
class PacsHandle:
    """A running Orthanc and what it holds.

    Attributes:
        orthanc: the server (``.dicomweb_url``, ``.get()``, ``.stop()``).
        ct_series: Series Instance UID of the sample CT.
        ct_study: its Study Instance UID.
        sc_series: Series Instance UID of the RGB secondary capture (modality OT).
        ct_files: the uploaded CT files (with their filled-in UIDs).
    """

    orthanc: Orthanc
    ct_series: str
    ct_study: str
    sc_series: str
    ct_files: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.orthanc.dicomweb_url


def start_pacs(storage: Path, gdcm: bool = False, users: dict[str, str] | None = None) -> PacsHandle:
    """Start Orthanc in ``storage`` and upload the sample CT series and an RGB secondary capture."""
    import pydicom

    orthanc = Orthanc(storage / "orthanc", gdcm=gdcm, users=users).start()
    try:
        files = prepare_sample_series(storage / "ct")
        orthanc.upload(files)
        sc = secondary_capture_rgb(storage / "sc.dcm")
        orthanc.upload([sc])
    except Exception:
        orthanc.stop()
        raise
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    sc_uid = str(pydicom.dcmread(sc, stop_before_pixels=True).SeriesInstanceUID)
    return PacsHandle(orthanc, str(first.SeriesInstanceUID), str(first.StudyInstanceUID), sc_uid, files)


@pytest.fixture(scope="module")
def orthanc_pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsHandle]:
    """Orthanc (no transcoding plugin, as the sample's JPEG 2000 needs) with the sample series, for one module."""
    require_orthanc()
    handle = start_pacs(tmp_path_factory.mktemp("pacs"))
    try:
        yield handle
    finally:
        handle.orthanc.stop()


def start_pacs_server(
    pacs_url: str, workdir: Path, conf: dict[str, str] | None = None, env: dict[str, str] | None = None, **kwargs
) -> ServerHandle:
    """The MedAttnSlicer server with ``--studies <pacs_url>``, a private cache and model folder under ``workdir``,
    and no network route to anything but the PACS it needs (``dcmqi`` is never downloaded)."""
    environment = {
        "MONAI_LABEL_DATASTORE_CACHE_PATH": str(workdir / "pacs_cache"),
        # an unroutable proxy: any attempt to download something (e.g. dcmqi from GitHub) fails instead of working
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    environment.update(env or {})
    workdir.mkdir(parents=True, exist_ok=True)
    conf = {"models": "sadnn_seg", "model_dir": str(workdir / "models"), **(conf or {})}
    return start_server(pacs_url, conf, env=environment, log_path=workdir / "server.log", **kwargs)


@pytest.fixture(scope="module")
def pacs_server(orthanc_pacs: PacsHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """The server on ``orthanc_pacs`` serving SaDNN-seg (INT8 and FP32)."""
    workdir = tmp_path_factory.mktemp("pacs_server")
    handle = start_pacs_server(orthanc_pacs.url, workdir)
    try:
        yield handle
    finally:
        handle.stop()

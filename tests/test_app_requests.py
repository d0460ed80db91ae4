# Copyright MedAttnSlicer contributors. Apache-2.0.
"""The server as a newcomer meets it (issue 16): the README's "Try it without Slicer" requests, run verbatim against
the real MONAI Label server on a private copy of the whole sample datastore (what ``make serve`` serves); every bad
request a 4xx naming the user's input; ``DELETE /datastore/label`` keeping a copy; ``/train`` never using the
held-out or cropped images; runtime output outside the source tree.

Tests run in file order: the training test comes last.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.server_fixture import REPO_ROOT, VENV_BIN, ServerHandle, app_copy_with_held_out_dice, start_sample_server

README = REPO_ROOT / "README.md"
SECTION = "## Try it without Slicer"
SEG = "sadnn_seg_int8"


# the shipped models all meet their floors: this server's copy of the app states a held-out Dice below the floor
# for the UNet baseline (not the default model), to show how /info marks such a model
BELOW_FLOOR = {"unet_seg": 0.5}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    app = app_copy_with_held_out_dice(tmp_path_factory.mktemp("app"), BELOW_FLOOR)
    with start_sample_server(tmp_path_factory, app_dir=app) as handle:  # every sample image, --conf models all
        yield handle


# ---------------------------------------------------------------------------------------------- the README
def readme_commands(readme: Path = README) -> list[str]:
    """The commands of the first ``bash`` block of the README's "Try it without Slicer" section, one per entry
    (comments dropped, ``\\`` continuations joined)."""
    text = readme.read_text()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"{SECTION} has no bash block"
    commands, current = [], ""
    for line in block.group(1).splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands


def run_readme_commands(url: str, workdir: Path) -> list[dict]:
    """Run the README commands one by one with bash in ``workdir`` (``URL`` set to ``url``, shell variables
    assigned by earlier commands carried over); returns ``[{"command", "stdout", "stderr", "rc", "seconds"}]``."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # python3 = the venv's, as after `make setup`
    variables: dict[str, str] = {}
    results = []
    for command in readme_commands():
        assignment = re.match(r"^([A-Z_]+)=(.*)$", command)
        if assignment and assignment.group(1) == "URL":
            variables["URL"] = url  # the README's 127.0.0.1:8000 -> this test's server
            continue
        prelude = "".join(f"{k}={shlex.quote(v)}; " for k, v in variables.items())
        script = f"set -eo pipefail; {prelude}{command}"
        if assignment:
            script += f'; printf "\\n@@%s" "${assignment.group(1)}"'
        start = time.perf_counter()
        proc = subprocess.run(["bash", "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - start
        stdout = proc.stdout
        if assignment and proc.returncode == 0:
            stdout, value = stdout.rsplit("\n@@", 1)
            variables[assignment.group(1)] = value
        results.append(
            {"command": command, "stdout": stdout, "stderr": proc.stderr, "rc": proc.returncode, "seconds": seconds}
        )
        assert proc.returncode == 0, (
            f"README command failed ({proc.returncode}): {command}\n{proc.stdout}\n{proc.stderr}"
        )
    return results


def test_readme_commands_run_against_the_server(server: ServerHandle, tmp_path: Path):
    results = run_readme_commands(server.url, tmp_path)
    for r in results:  # the figures the README's table quotes (pytest -s shows them)
        print(f"{r['seconds']:7.2f} s  {r['command'][:100]}")
    by_word = lambda word: next(r for r in results if word in r["command"])  # noqa: E731

    # 1. /info/: default model, every model, strategies, trainers
    info_line = by_word("/info/")["stdout"]
    assert info_line.startswith(f"{SEG} [") and "'unet_seg_fp32'" in info_line and "'sadnn_seg'" in info_line
    # 2. the first unlabelled image of the sample datastore
    assert "next image: CTChest4" in by_word("next image")["stdout"]
    # 3. a label map on the exact input grid
    image = sitk.ReadImage(str(server.studies / "CTChest4.nii.gz"))
    label = sitk.ReadImage(str(tmp_path / "CTChest4_liver.nii.gz"))
    assert label.GetSize() == image.GetSize() and np.allclose(label.GetOrigin(), image.GetOrigin())
    assert set(np.unique(sitk.GetArrayFromImage(label))) <= {0, 1}
    # 4. over/under figures, then the map
    figures = by_word("output=json")["stdout"]
    assert "'dice':" in figures and "'over_ml':" in figures and "'under_ml':" in figures
    over_under = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "example_ct_dicom_over_under.nii.gz")))
    assert set(np.unique(over_under)) <= {0, 1, 2, 3} and (over_under == 1).any()
    # 5. the label was stored, 7. then removed with a copy kept
    saved = json.loads(by_word("PUT")["stdout"])
    assert saved["image"] == "CTChest4" and saved["label"] == "CTChest4"
    assert not (server.studies / "labels" / "final" / "CTChest4.nii.gz").exists()
    history = list((server.studies / ".label_history" / "final").glob("CTChest4.*.nii.gz"))
    assert len(history) == 1 and history[0].read_bytes() == (tmp_path / "CTChest4_liver.nii.gz").read_bytes()
    # 6. training started, then stopped
    started = json.loads(by_word('POST "$URL/train/')["stdout"])
    assert started.get("status") in ("SUBMITTED", "RUNNING"), started
    stopped = json.loads(by_word('DELETE "$URL/train/')["stdout"])
    assert stopped.get("status") == "STOPPED", stopped
    assert server.wait_for_training(60)["status"] == "STOPPED"
    assert not (server.model_dir / "sadnn_seg.pt").exists()  # a stopped run publishes nothing


def test_readme_names_host_and_port():
    text = README.read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    assert "make serve HOST=" in section and "PORT=" in section
    assert text.index("## The two commands") < text.index(SECTION) < text.index("## Layout")


# ---------------------------------------------------------------------------------------------- 4xx answers
def test_infer_without_image_is_422_naming_the_parameter(server: ServerHandle):
    for kwargs in ({}, {"files": {"params": (None, "{}")}}):
        r = server.post(f"/infer/{SEG}", **kwargs)
        assert r.status_code == 422, (r.status_code, r.text)
        detail = r.json()["detail"]
        assert "missing query parameter 'image'" in detail and "/datastore/" in detail and "'file'" in detail
    r = server.post(f"/infer/{SEG}?image=")
    assert r.status_code == 422 and "'image'" in r.json()["detail"]


def test_train_with_settings_that_cannot_work_is_422_naming_them(server: ServerHandle):
    """Data-parallel settings are checked before MONAI Label starts the run in the background: a 422 naming the
    setting, the task stays idle, and a correct request afterwards is accepted as before."""
    name = sorted(server.get("/info/").json()["trainers"])[0]
    for bad, named in (
        ({"workers": 0}, "workers must be at least 1"),
        ({"workers": 2, "rdzv_endpoint": "127.0.0.1"}, "HOST:PORT"),
        ({"workers": 2, "nnodes": 2}, "needs rdzv_endpoint"),
    ):
        r = server.post(f"/train/{name}", json={**bad, "max_epochs": 1})
        assert r.status_code == 422, r.text
        assert named in r.json()["detail"]
    # MONAI Label answers 404 "no training task is running": nothing was started
    assert server.get("/train/", params={"check_if_running": "true"}).status_code == 404
    assert server.alive()


def test_upload_errors_name_the_users_file(server: ServerHandle):
    not_an_image = b"this is not an image\n"
    cases = [
        ("POST", f"/infer/{SEG}", {"file": ("my scan.txt", not_an_image)}),
        ("PUT", "/datastore/image?image=upload_test", {"file": ("my scan.txt", not_an_image)}),
        ("PUT", "/datastore/label?image=example_mr_sm&tag=final", {"label": ("my label.txt", not_an_image)}),
    ]
    for method, path, files in cases:
        r = server.put(path, files=files) if method == "PUT" else server.post(path, files=files)
        assert r.status_code == 422, (path, r.status_code, r.text)
        detail = r.json()["detail"]
        user_name = next(iter(files.values()))[0]
        assert user_name in detail and not re.search(r"tmp[a-z0-9_]{8}", detail), (path, detail)
    # two uploads in one request: each error names its own file
    image = (server.studies / "example_mr_sm.nii.gz").read_bytes()
    r = server.post(
        f"/infer/{SEG}",
        files={
            "file": ("mr.nii.gz", image),
            "label": ("bad_label.txt", not_an_image),
            "params": (None, '{"reference": "upload"}'),
        },
    )
    assert r.status_code == 422 and "bad_label.txt" in r.json()["detail"], r.text
    assert not (server.studies / "upload_test.nii.gz").exists()


def test_unknown_image_ids_say_which_and_what_exists(server: ServerHandle):
    r = server.post(f"/infer/{SEG}?image=no_such_image")
    assert r.status_code == 404
    detail = r.json()["detail"]
    assert "'no_such_image'" in detail and "example_ct_dicom" in detail and "GET /datastore/" in detail
    r = server.post(f"/infer/{SEG}?image=example_ct.nii.gz")
    assert r.status_code == 404 and "use 'example_ct'" in r.json()["detail"]
    r = server.get("/datastore/image", params={"image": "no_such_image"})
    assert r.status_code == 404
    assert "'no_such_image'" in r.json()["detail"] and "example_mr_sm" in r.json()["detail"]
    r = server.get("/datastore/label", params={"label": "no_such_image", "tag": "final"})
    assert r.status_code == 404 and "'no_such_image'" in r.json()["detail"]
    r = server.get("/datastore/label", params={"label": "CTChest4", "tag": "final"})
    assert r.status_code == 404 and "'CTChest4' has no 'final' label" in r.json()["detail"]
    assert server.get("/datastore/image", params={"image": "example_mr_sm"}).status_code == 200


def test_delete_label_keeps_a_copy_in_the_history(server: ServerHandle):
    stored = server.studies / "labels" / "final" / "example_mr_sm.nii.gz"
    content = stored.read_bytes()
    history = server.studies / ".label_history" / "final"
    before = set(history.glob("example_mr_sm.*")) if history.exists() else set()
    r = server.delete("/datastore/label", params={"id": "example_mr_sm", "tag": "final"})
    assert r.status_code == 200, r.text
    assert not stored.exists()
    kept = set(history.glob("example_mr_sm.*")) - before
    assert len(kept) == 1 and next(iter(kept)).read_bytes() == content
    r = server.delete("/datastore/label", params={"id": "example_mr_sm", "tag": "final"})
    assert r.status_code == 404 and "has no 'final' label" in r.json()["detail"]
    r = server.delete("/datastore/label", params={"id": "no_such_image", "tag": "final"})
    assert r.status_code == 404 and "'no_such_image'" in r.json()["detail"]
    # put it back for the tests below (the label's own bytes, from the history copy)
    r = server.put(
        "/datastore/label",
        params={"image": "example_mr_sm", "tag": "final"},
        files={"label": ("example_mr_sm.nii.gz", content)},
    )
    assert r.status_code == 200 and stored.exists()


# ---------------------------------------------------------------------------------------------- runtime output
def test_runtime_output_is_outside_the_source_tree_and_ignored():
    from monailabel_app.lib.app_config import AppConfig
    from sample_data.paths import default_data_dir

    config = AppConfig.from_conf(str(REPO_ROOT / "monailabel_app"), {})
    model_dir = Path(config.model_dir)
    assert model_dir == default_data_dir() / "trained"
    assert not model_dir.is_relative_to(REPO_ROOT / "monailabel_app")
    for path in (
        model_dir / "runs" / "x",
        model_dir / ".model_cards.json",
        REPO_ROOT / ".data/datastore/liver/labels/final/x",
        REPO_ROOT / "monailabel_app/model/trained/sadnn_seg.pt",
    ):
        if path.is_relative_to(REPO_ROOT):
            rel = path.relative_to(REPO_ROOT)
            assert subprocess.run(["git", "check-ignore", "-q", str(rel)], cwd=REPO_ROOT).returncode == 0, rel


def test_tests_use_a_pristine_datastore_not_the_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import sample_data
    from sample_data import datastore_copy
    from sample_data.paths import default_data_dir

    built = []
    real_build = sample_data.build_datastore

    def recording_build(organs=("liver",), out_dir=None, **kwargs):
        result = real_build(organs, out_dir, **kwargs)
        built.append(Path(result.path))
        return result

    monkeypatch.setattr(sample_data, "build_datastore", recording_build)
    monkeypatch.setattr(datastore_copy, "_PRISTINE", None)
    copy = datastore_copy.copy_sample_datastore(tmp_path / "studies")
    # built afresh outside the user's .data/datastore (which `make serve` users label into), then copied
    assert built and all(not p.is_relative_to(default_data_dir()) and not p.is_relative_to(REPO_ROOT) for p in built)
    assert not list((copy / "labels" / "final").glob("CTChest4*"))  # as built: CTChest4 unlabelled
    notes = json.loads((copy / "datastore_notes.json").read_text())
    assert "example_ct_dicom" in notes["training"]["exclude"] and notes["training"]["validate_on"] == [
        "example_ct_dicom"
    ]
    assert notes["training"]["derived_from"]["example_ct_sm"]["source"] == "example_ct"


# ---------------------------------------------------------------------------------------------- training roles
def test_split_datalist_rules():
    from monailabel_app.lib.trainers.datalist import TrainingRoles, split_datalist

    roles = TrainingRoles(
        exclude={"example_ct_dicom": "held out"},
        validate_on=("example_ct_dicom",),
        derived_from={"example_ct_sm": ("example_ct", "crop")},
    )
    items = lambda *ids: [{"image": f"/s/{i}.nii.gz", "label": f"/s/labels/final/{i}.nii.gz"} for i in ids]  # noqa: E731
    ids = lambda ds: [Path(d["image"]).name[: -len(".nii.gz")] for d in ds]  # noqa: E731
    train, val, excluded, note = split_datalist(
        items("example_ct", "example_ct_sm", "example_mr_sm", "example_ct_dicom"), roles, 0.2
    )
    assert ids(train) == ["example_ct", "example_mr_sm"] and ids(val) == ["example_ct_dicom"]
    assert set(excluded) == {"example_ct_sm", "example_ct_dicom"} and "example_ct_dicom" in note
    train, val, excluded, _ = split_datalist(items("example_ct", "example_ct_dicom"), roles, 0.0)
    assert ids(train) == ["example_ct"] and val == [] and set(excluded) == {"example_ct_dicom"}
    # the crop without its source image is an ordinary image; nothing held out: MONAI Label's own partition
    assert split_datalist(items("example_ct_sm", "example_mr_sm"), roles, 0.5) is None


def test_train_never_uses_the_held_out_or_cropped_images(server: ServerHandle):
    from monailabel_app.lib.model_store import read_app_metadata

    request = {"max_epochs": 1, "num_samples": 2, "train_batch_size": 2, "calibration_slices": 8}
    r = server.post("/train/sadnn_seg", json=request)
    assert r.status_code == 200, r.text
    status = server.wait_for_training(900)
    assert status["status"] == "DONE", "\n".join(status.get("details", [])[-30:])
    stats = server.get("/info/").json()["train_stats"]["sadnn_seg"]
    assert stats["status"] == "PUBLISHED"
    assert sorted(stats["train_images"]) == ["example_ct", "example_mr_sm"], stats
    assert stats["val_images"] == ["example_ct_dicom"] and stats["metric_name"] == "val_mean_dice"
    assert set(stats["excluded_images"]) == {"example_ct_dicom", "example_ct_sm"}
    assert "example_ct_dicom" in stats["metric_note"] and "never trained on" in stats["metric_note"]
    trained = read_app_metadata(str(server.model_dir / "sadnn_seg.pt"))["trained"]
    assert sorted(trained["train_images"]) == ["example_ct.nii.gz", "example_mr_sm.nii.gz"]
    assert trained["val_images"] == ["example_ct_dicom.nii.gz"]
    calibration = read_app_metadata(str(server.model_dir / "sadnn_seg.pt"))["calibration"]["images"]
    assert set(calibration) <= {"example_ct.nii.gz", "example_mr_sm.nii.gz"}
    log = server.log_path.read_text(errors="replace")
    assert "Total Records for Training: 2; Validation: 1" in log


# ------------------------------------------------------------------------------------------- quality floor (issue 11)


def _bundle_with(tmp_path: Path, figures: dict[str, float]) -> Path:
    """An app folder whose bundled_weights.json gives each segmentation family the held-out Dice in ``figures``."""
    model = tmp_path / "app" / "model"
    model.mkdir(parents=True)
    families = {
        family: {
            "held_out": {
                "example_ct_dicom": {
                    "fp32": {"dice": dice, "dice_interval": [dice - 0.05, dice + 0.03]},
                    "int8": {"dice": dice + 0.01},
                },
                "other_ct": {"fp32": {"dice": dice + 0.05, "dice_interval": [0.1, 0.99]}},  # better: not the worst
            }
        }
        for family, dice in figures.items()
    }
    families["hct_cls"] = {"held_out": {"example_ct_dicom": {"int8": {"f1": 0.5, "f1_interval": [0.3, 0.7]}}}}
    (model / "bundled_weights.json").write_text(json.dumps({"families": families, "labels_are": "model outputs"}))
    return model.parent


def test_models_below_the_quality_floor_are_served_only_on_request(tmp_path: Path):
    from monailabel_app.lib.app_config import AppConfig
    from monailabel_app.lib.quality import bundled_quality
    from networks.registry import get_family

    floor = get_family("sadnn_seg").quality_floor.value
    assert get_family("unet_seg").quality_floor.value == floor
    app = _bundle_with(tmp_path, {"sadnn_seg": floor - 0.001, "unet_seg": floor})
    default = AppConfig.from_conf(str(app), {}).models
    assert "sadnn_seg_int8" not in default and "sadnn_seg_fp32" not in default  # 0.001 below
    assert {"unet_seg_int8", "unet_seg_fp32", "hct_cls_int8"} <= set(default)  # at the floor / no floor
    assert "sadnn_seg_int8" in AppConfig.from_conf(str(app), {"models": "all"}).models
    assert AppConfig.from_conf(str(app), {"models": "sadnn_seg"}).models == ["sadnn_seg_int8", "sadnn_seg_fp32"]
    quality = bundled_quality("sadnn_seg", str(app / "model"))
    assert quality["experimental"] and quality["worst"] == pytest.approx(floor - 0.001)
    assert quality["values"] == pytest.approx({"fp32": floor - 0.001, "int8": floor + 0.009})
    # the worst image's interval, none where the figures have none
    assert quality["intervals"] == {"fp32": pytest.approx([floor - 0.051, floor + 0.029])}
    # a family without a floor still reports its figure, and is never experimental
    classifier = bundled_quality("hct_cls", str(app / "model"))
    assert classifier["floor"] is None and classifier["experimental"] is False and "F1" in classifier["metric"]
    assert classifier["values"] == {"int8": 0.5} and classifier["intervals"] == {"int8": [0.3, 0.7]}
    assert bundled_quality("patchconvnet_cls", str(app / "model")) is None  # no figures


def test_shipped_models_and_what_is_served_by_default():
    """The shipped figures: every bundled model meets its floor and is served by default (the 2D SaDNN-seg measured
    0.87, the UNet 0.90); the 3D SaDNN-seg ships no weights (its recipe measured 0.14: it labelled most of the
    body), so it is served only on request, to be trained on the server, and make weights does not train it."""
    from monailabel_app.lib.app_config import AppConfig
    from monailabel_app.lib.quality import below_floor
    from networks.registry import FAMILIES

    bundled = REPO_ROOT / "monailabel_app" / "model"
    assert not FAMILIES["sadnn_seg3d"].bundled and not list(bundled.glob("sadnn_seg3d*"))
    shipped = [f for f, spec in FAMILIES.items() if spec.bundled]
    assert not [f for f in shipped if below_floor(f, str(bundled))]
    models = AppConfig.from_conf(str(REPO_ROOT / "monailabel_app"), {}).models
    assert "sadnn_seg3d_fp32" not in models
    assert {"sadnn_seg_int8", "sadnn_seg_fp32", "unet_seg_int8", "unet_seg_fp32"} <= set(models)
    assert "sadnn_seg3d_fp32" in AppConfig.from_conf(str(REPO_ROOT / "monailabel_app"), {"models": "all"}).models


def test_info_marks_experimental_models_and_never_defaults_to_one(server: ServerHandle):
    info = server.get("/info/").json()  # this server runs --conf models all, its app states unet_seg below floor
    models = info["models"]
    for name in ("unet_seg_int8", "unet_seg_fp32"):
        assert models[name]["experimental"] is True
        quality = models[name]["quality"]
        assert quality["worst"] == BELOW_FLOOR["unet_seg"] < quality["floor"] == 0.8
        assert "example_ct_dicom" in quality["measured_on"]
    assert "sadnn_seg3d_fp32" not in models  # shipped without weights: listed once trained on the server
    assert models["sadnn_seg_int8"]["experimental"] is False and models["sadnn_seg_int8"]["quality"]["worst"] >= 0.8
    classifier = models["hct_cls_int8"]["quality"]  # measured, with no floor: never experimental
    assert (
        classifier["floor"] is None and classifier["values"]["int8"] > 0 and not models["hct_cls_int8"]["experimental"]
    )
    assert info["default_model"] == "sadnn_seg_int8"

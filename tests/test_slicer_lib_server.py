# Copyright MedAttnSlicer contributors. Apache-2.0.
"""MedAttnSlicerLib against the real MedAttnSlicer MONAI Label server.

The panel's library (its client, job runner and workflows; never ``requests`` or MONAI Label's client) drives one
``monailabel start_server`` per module (:mod:`tests.server_fixture`, ephemeral 127.0.0.1 port) on a copy of three
sample studies: two with a ``final`` liver label and CTChest4 without one. Labels are read back with SimpleITK on
the image grid. Tests run in file order: read-only round trips first, then the ones that change the datastore,
training last. Only the 5xx test uses a stand-in: a stdlib ``http.server`` answering 500, because the real server
is not made to fail on purpose. The client's normal paths are tested here, not against stand-ins, so it cannot
drift from the server.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedAttnSlicerLib import (
    CLASSIFICATION,
    SEGMENTATION,
    JobRunner,
    JobState,
    MonaiLabelClient,
    OperationCancelled,
    ServerError,
    ServerUnavailable,
    compose_label_map,
    default_model,
    explanation_key,
    formatting,
    heat_map_colors,
    heat_map_from_saliency,
    heat_map_indices,
    label_values,
    model_cards,
    overlay_from_comparison_map,
    overlay_from_masks,
    split_label_map,
    workflows,
)
from tests.image_checks import assert_same_grid, read_array
from tests.server_fixture import ServerHandle, free_port, sample_server_fixture
from tests.slicer_jobs import run_workflow

pytestmark = pytest.mark.slow

STUDIES = ("example_ct_sm", "example_mr_sm", "CTChest4")
UNLABELED = "CTChest4"
SEG_INT8, SEG_FP32 = "sadnn_seg_int8", "sadnn_seg_fp32"
CLS_INT8 = "sadnn_cls_int8"
RISE_MASKS = 32  # enough for a map, cheap on 2 cores


# --------------------------------------------------------------------------------------------- fixtures
server = sample_server_fixture(STUDIES, name="server")


@pytest.fixture(scope="module")
def client(server: ServerHandle, tmp_path_factory: pytest.TempPathFactory) -> MonaiLabelClient:
    return MonaiLabelClient(
        server.url, timeout_s=60.0, client_id="pytest", download_dir=str(tmp_path_factory.mktemp("downloads"))
    )


@pytest.fixture(scope="module")
def runner():
    jobs = JobRunner()
    yield jobs
    jobs.shutdown(timeout_s=30.0)


@pytest.fixture(scope="module")
def info(client: MonaiLabelClient, runner: JobRunner) -> dict:
    return run_workflow(runner, workflows.connect, client)


def _spacing_kji(image: sitk.Image) -> tuple[float, ...]:
    """Spacing in the numpy (K, J, I) axis order the lib's overlay maths expects."""
    return tuple(reversed(image.GetSpacing()))


def _cards(info: dict, task: str) -> dict:
    return {card.name: card for card in model_cards(info, task)}


# ------------------------------------------------------------------------------------------ connect, info
def test_connect_lists_models_with_formatted_cards(server: ServerHandle, info: dict):
    seg = _cards(info, SEGMENTATION)
    cls = _cards(info, CLASSIFICATION)
    assert {SEG_INT8, SEG_FP32} <= set(seg) and CLS_INT8 in cls
    assert default_model(list(seg.values()), SEGMENTATION).name == info["default_model"] == SEG_INT8
    assert seg[SEG_INT8].twin == SEG_FP32 and seg[SEG_FP32].twin == SEG_INT8
    assert label_values(seg[SEG_INT8].labels) == {"liver": 1}
    for card in (*seg.values(), *cls.values()):
        raw = info["models"][card.name]["model_card"]
        assert card.precision == info["models"][card.name]["precision"] in ("int8", "fp32")
        assert card.params == raw["params"] > 0
        size = raw["int8_size_bytes"] if card.is_int8 else raw["fp32_size_bytes"]
        energy = raw["energy_int8_j"] if card.is_int8 else raw["energy_fp32_j"]
        text = formatting.model_picker_text(card)
        assert text.split(" | ")[:5] == [
            card.name,
            card.precision.upper(),
            f"{formatting.format_count(raw['params'])} params",
            formatting.format_bytes(size),
            f"{formatting.format_energy(energy)}/pass"
            + ("  (experimental)" if card.experimental else "")
            + ("  (default)" if card.default else ""),
        ]
        assert ("(INT8 " in formatting.model_card_text(card)) == (raw["int8_size_bytes"] is not None)
        # the measured held-out quality travels from the server's bundled figures to the card text
        assert card.experimental == info["models"][card.name]["experimental"]
        assert bool(formatting.quality_lines(card)) == (info["models"][card.name].get("quality") is not None)
    # INT8 is the smaller and cheaper twin
    assert seg[SEG_INT8].size_bytes < seg[SEG_FP32].size_bytes and seg[SEG_INT8].energy_j < seg[SEG_FP32].energy_j
    # classifiers: explanation methods from /info/, RISE when the app lists none
    entry = info["models"][CLS_INT8]
    listed = [explanation_key(m) for m in entry.get("explanations") or []]
    assert cls[CLS_INT8].explanations == (listed or ["rise"])
    assert cls[CLS_INT8].default_explanation in cls[CLS_INT8].explanations
    status = formatting.app_status_text(info)
    assert f"{len(info['models'])} models" in status and f"{len(STUDIES)} images, 2 labelled" in status


# ------------------------------------------------------------------------------------------ next sample
AIR = "AAA_air"  # sorts before CTChest4


def _wait_for_total(client: MonaiLabelClient, total: int) -> None:
    """The datastore reloads from its folder in the background: wait until it lists ``total`` images."""
    deadline = time.monotonic() + 60
    while client.datastore("stats")["total"] != total:
        assert time.monotonic() < deadline, client.datastore("stats")
        time.sleep(0.5)


@pytest.fixture
def air_study(server: ServerHandle, client: MonaiLabelClient, tmp_path: Path):
    """A second unlabelled study the model is sure of: CTChest4's grid filled with air (no liver under any
    test-time variant; INT8 and FP32 both find nothing), uploaded for one test and removed after it."""
    chest = sitk.ReadImage(str(server.studies / f"{UNLABELED}.nii.gz"))
    air = sitk.GetImageFromArray(np.full(sitk.GetArrayFromImage(chest).shape, -1000, np.int16))
    air.CopyInformation(chest)
    sitk.WriteImage(air, str(tmp_path / f"{AIR}.nii.gz"))
    total = client.datastore("stats")["total"]
    assert client.upload_image(str(tmp_path / f"{AIR}.nii.gz"), image_id=AIR) == AIR
    _wait_for_total(client, total + 1)
    try:
        yield AIR
    finally:
        assert server.delete("/datastore/image", params={"id": AIR}).status_code == 200
        _wait_for_total(client, total)


def test_next_sample_with_every_strategy(
    server: ServerHandle, client: MonaiLabelClient, runner: JobRunner, info: dict, tmp_path: Path, air_study: str
):
    """Two unlabelled studies with a known order: the air volume sorts first and the model is certain on it, while
    CTChest4 has a body; ``first`` takes the air, the app's model-based strategies take CTChest4."""
    strategies = list(info["strategies"])
    assert set(strategies) == {"random", "first", "tta_uncertainty", "int8_disagreement"}
    expected = {"first": air_study, "tta_uncertainty": UNLABELED, "int8_disagreement": UNLABELED}
    for strategy in strategies:
        sample = run_workflow(
            runner,
            workflows.fetch_next_sample,
            client,
            strategy,
            dest_dir=str(tmp_path / strategy),
            params={"max_slices": 6},
        )
        assert sample.strategy == strategy and sample.image_id in (air_study, UNLABELED), (strategy, sample.info)
        assert sample.image_id == expected.get(strategy, sample.image_id), (strategy, sample.info)
        stored = (server.studies / f"{sample.image_id}.nii.gz").read_bytes()
        assert Path(sample.image_path).read_bytes() == stored  # the downloaded image is the stored one
        if strategy == "tta_uncertainty":
            assert sample.info["candidates"] == {air_study: 0.0, UNLABELED: pytest.approx(sample.info["score"])}
            assert sample.info["score"] > 0.01
        if strategy == "int8_disagreement":
            assert sample.info["candidates"][air_study] == 1.0 > sample.info["candidates"][UNLABELED]
    # the download names the file as the server does and reports its progress to the end
    fractions: list[float] = []
    path = client.download_image(UNLABELED, str(tmp_path / "direct"), progress=lambda f, m: fractions.append(f))
    assert Path(path).name == f"{UNLABELED}.nii.gz" and Path(path).parent == tmp_path / "direct"
    assert Path(path).read_bytes() == (server.studies / f"{UNLABELED}.nii.gz").read_bytes()
    assert fractions and fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------- segment
@pytest.mark.parametrize("model", [SEG_INT8, SEG_FP32])
def test_segment_int8_and_fp32(
    server: ServerHandle, client: MonaiLabelClient, runner: JobRunner, info: dict, model: str
):
    card = _cards(info, SEGMENTATION)[model]
    result = run_workflow(runner, workflows.segment, client, model, image_id="example_mr_sm")
    label, label_image = read_array(result.label_path)
    _, image = read_array(server.studies / "example_mr_sm.nii.gz")
    assert_same_grid(label_image, image)
    assert result.params["model"] == model and result.params["precision"] == card.precision
    segments = split_label_map(label, card.labels, include_absent=True)
    assert [(s.name, s.value) for s in segments] == [("liver", 1)]
    assert segments[0].voxels == result.params["voxels"]["liver"] > 0
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    assert result.params["volumes_ml"]["liver"] == pytest.approx(segments[0].voxels * voxel_ml, rel=1e-3)


# ------------------------------------------------------------------------------------------- compare
def _check_same_figures(local, served: dict) -> None:
    for key in ("agreement_voxels", "over_voxels", "under_voxels"):
        assert local.summary()[key] == served[key], key
    assert local.dice == pytest.approx(served["dice"], abs=1e-6)
    assert local.over_ml == pytest.approx(served["over_ml"], rel=1e-4, abs=1e-6)
    assert local.under_ml == pytest.approx(served["under_ml"], rel=1e-4, abs=1e-6)


def test_compare_on_server_matches_the_lib_overlay(client: MonaiLabelClient, runner: JobRunner, info: dict):
    image_id = "example_mr_sm"
    int8_card = _cards(info, SEGMENTATION)[SEG_INT8]
    int8_label, grid = read_array(
        run_workflow(runner, workflows.segment, client, SEG_INT8, image_id=image_id).label_path
    )
    fp32_label, _ = read_array(run_workflow(runner, workflows.segment, client, SEG_FP32, image_id=image_id).label_path)
    final, _ = read_array(client.download_label(image_id, "final"))

    for choice, reference_map in ((workflows.REFERENCE_FINAL, final), (workflows.REFERENCE_TWIN, fp32_label)):
        reference = workflows.server_reference(choice, int8_card)
        served = run_workflow(runner, workflows.compare_on_server, client, SEG_INT8, image_id, reference)
        assert served.comparison["reference"] == reference
        comparison, comparison_image = read_array(served.label_path)
        assert_same_grid(comparison_image, grid)
        from_server = overlay_from_comparison_map(comparison, _spacing_kji(grid), reference, served.comparison)
        _check_same_figures(from_server, served.comparison)
        # the lib's own overlay from the two label maps draws the same over/under segments
        local = overlay_from_masks(int8_label, reference_map, _spacing_kji(grid), 1, 1, reference)
        assert np.array_equal(local.comparison, comparison)
        _check_same_figures(local, served.comparison)
        assert formatting.comparison_text(local) == formatting.comparison_text(from_server)
        assert f"Dice {served.comparison['dice']:.3f} vs {reference}" in formatting.comparison_text(local)
        assert [row[0] for row in formatting.comparison_rows(local)] == [
            "Agreement",
            "Over-segmentation",
            "Under-segmentation",
        ]
        # independent figures from the two label maps and the voxel spacing (numpy only, none of the lib's code)
        predicted, wanted = int8_label == 1, reference_map == 1
        voxel_ml = float(np.prod(grid.GetSpacing())) / 1000.0
        over, under, agree = predicted & ~wanted, wanted & ~predicted, predicted & wanted
        assert np.array_equal(comparison == 1, agree) and np.array_equal(comparison == 2, over)
        assert np.array_equal(comparison == 3, under)
        assert served.comparison["agreement_voxels"] == int(agree.sum())
        assert served.comparison["dice"] == pytest.approx(2 * agree.sum() / (predicted.sum() + wanted.sum()), abs=1e-6)
        assert served.comparison["over_ml"] == pytest.approx(over.sum() * voxel_ml, rel=1e-4)
        assert served.comparison["under_ml"] == pytest.approx(under.sum() * voxel_ml, rel=1e-4)
        if choice == workflows.REFERENCE_FINAL:
            # the model is good but not perfect on this study: both kinds of error are present
            assert over.any() and under.any() and 0.5 < served.comparison["dice"] < 1.0


# ------------------------------------------------------------------------------------ classification
def test_classify_probabilities_and_heat_map_for_every_method(
    server: ServerHandle, client: MonaiLabelClient, runner: JobRunner, info: dict
):
    card = _cards(info, CLASSIFICATION)[CLS_INT8]
    _, image = read_array(server.studies / "example_mr_sm.nii.gz")
    for method in card.explanations:
        result = run_workflow(
            runner,
            workflows.classify,
            client,
            CLS_INT8,
            image_id="example_mr_sm",
            slice_index=7,
            explain=method,
            params={"rise_masks": RISE_MASKS},
        )
        assert result.explanation == method and result.params["slice"] == 7
        rows = formatting.probability_rows(result.probabilities)
        assert [name for name, _, _ in rows] == sorted(card.labels, key=lambda c: (-result.probabilities[c], c))
        assert all(float(p.rstrip(" %")) <= 100 for _, p, _ in rows)
        saliency, saliency_image = read_array(result.label_path)
        assert_same_grid(saliency_image, image)
        heat = heat_map_from_saliency(
            saliency, result.explanation, saliency_image.GetDirection(), result.params["slice"]
        )
        assert (heat.array_axis, heat.slice_index) == (0, 7) and heat.peak[0] == 7
        assert heat.values.min() == 0.0 and heat.values.max() == pytest.approx(1.0)
        assert heat.shown.sum() == saliency[7].size
        indices = heat_map_indices(heat, 256)
        assert indices[7].min() >= 1 and indices[7].max() == 255 and not indices[:7].any() and not indices[8:].any()
        colors = heat_map_colors(256)
        assert (
            colors[0, 3] == 0.0 and tuple(colors[1, :3]) == (0.0, 0.0, 1.0) and tuple(colors[-1, :3]) == (1.0, 0.0, 0.0)
        )


def test_classify_slice_counts_along_the_axial_axis(
    client: MonaiLabelClient, runner: JobRunner, tmp_path: Path, server: ServerHandle
):
    """An upload whose first index axis is superior-inferior: the slice and the heat map follow that axis."""
    original = sitk.ReadImage(str(server.studies / "example_mr_sm.nii.gz"))
    permuted = sitk.PermuteAxes(original, [2, 0, 1])  # index axis 0 is now the axial one
    sitk.WriteImage(permuted, str(tmp_path / "permuted.nii.gz"))
    params = {"rise_masks": RISE_MASKS}
    upright = run_workflow(
        runner, workflows.classify, client, CLS_INT8, image_id="example_mr_sm", slice_index=5, params=params
    )
    turned = run_workflow(
        runner,
        workflows.classify,
        client,
        CLS_INT8,
        image_file=str(tmp_path / "permuted.nii.gz"),
        slice_index=5,
        params=params,
    )
    saliency, saliency_image = read_array(turned.label_path)
    assert_same_grid(saliency_image, permuted)
    heat = heat_map_from_saliency(saliency, turned.explanation, saliency_image.GetDirection(), turned.params["slice"])
    assert (
        heat.array_axis == 2
        and heat.slice_index == 5
        and heat.shown[:, :, 5].all()
        and heat.shown.sum() == saliency[:, :, 5].size
    )
    with pytest.raises(ValueError, match="off the classified slice"):  # read along the wrong axis
        heat_map_from_saliency(saliency, "rise", original.GetDirection(), 5)
    for name, p in upright.probabilities.items():  # the same physical slice was classified
        assert turned.probabilities[name] == pytest.approx(p, abs=0.02), name


# ----------------------------------------------------------------------------------------------- errors
def test_4xx_errors_carry_the_server_detail(client: MonaiLabelClient, runner: JobRunner, tmp_path: Path):
    with pytest.raises(ServerError) as raised:
        client.infer("no_such_model", image_id="example_mr_sm")
    assert raised.value.status == 404 and "no_such_model" in raised.value.detail
    text = formatting.error_text(raised.value)
    assert text.startswith("The server answered 404:") and "no_such_model" in text and "Traceback" not in text

    job = runner.wait(runner.submit("segment", workflows.segment, client, SEG_INT8, image_id="no_such_image"), 120)
    assert job.state == JobState.FAILED and isinstance(job.error, ServerError) and job.error.status == 404
    assert "no_such_image" in formatting.error_text(job.error) and "Traceback" not in job.message

    wrong = sitk.GetImageFromArray(np.ones((5, 7, 9), np.uint8))
    sitk.WriteImage(wrong, str(tmp_path / "wrong.nii.gz"))
    for call, status, words in (
        (lambda: client.save_label("example_mr_sm", str(tmp_path / "wrong.nii.gz")), 422, "size"),
        (lambda: client.next_sample("no_such_strategy"), 404, "no_such_strategy"),
        (lambda: client.train_start("no_such_task"), 404, "no_such_task"),
        (lambda: client.infer(SEG_INT8, "example_mr_sm", {"reference": "no_such_reference"}), 422, "no_such_reference"),
    ):
        with pytest.raises(ServerError) as raised:
            call()
        assert raised.value.status == status and words in raised.value.detail, (
            raised.value.status,
            raised.value.detail,
        )

    job = runner.wait(
        runner.submit(
            "classify", workflows.classify, client, CLS_INT8, image_id="example_mr_sm", explain="no_such_method"
        ),
        120,
    )
    assert job.state == JobState.FAILED and isinstance(job.error, ServerError), (job.state, job.message)
    assert job.error.status == 422 and "no_such_method" in job.error.detail


def test_server_down_is_a_readable_error(runner: JobRunner):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    failures = []
    client = MonaiLabelClient(url, timeout_s=5.0)
    job = runner.wait(runner.submit("connect", workflows.connect, client, on_failed=failures.append), 30)
    assert job.state == JobState.FAILED and isinstance(job.error, ServerUnavailable)
    text = formatting.error_text(job.error)
    assert url in text and "connection refused" in text and "Traceback" not in text
    assert job.message == text  # what the panel shows
    assert "Traceback" in failures[0].traceback  # the details still reach the log


class _Failing(BaseHTTPRequestHandler):
    """Answers 500 with FastAPI's JSON ``detail`` on GET, and a non-JSON 502 page on POST."""

    def do_GET(self):  # noqa: N802 - http.server API
        self._reply(500, "application/json", json.dumps({"detail": "Internal error: model file is corrupt"}).encode())

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._reply(502, "text/html", b"<html><body>502 Bad Gateway</body></html>")

    def _reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_5xx_errors_are_readable(runner: JobRunner):
    failing = ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    threading.Thread(target=failing.serve_forever, daemon=True).start()
    try:
        client = MonaiLabelClient(f"http://127.0.0.1:{failing.server_address[1]}", timeout_s=10.0)
        job = runner.wait(runner.submit("connect", workflows.connect, client), 30)
        assert job.state == JobState.FAILED and job.error.status == 500
        assert job.error.detail == "Internal error: model file is corrupt"
        assert formatting.error_text(job.error).endswith("model file is corrupt (see the server log for the cause)")
        with pytest.raises(ServerError) as raised:
            client.infer(SEG_INT8, image_id="example_mr_sm")
        assert raised.value.status == 502 and "502 Bad Gateway" in raised.value.detail
    finally:
        failing.shutdown()
        failing.server_close()


def test_cancel_a_running_inference(client: MonaiLabelClient, runner: JobRunner, server: ServerHandle):
    """Cancel stops waiting at once (the socket is shut down); the server stays up and keeps answering."""
    job = runner.submit(
        "classify", workflows.classify, client, CLS_INT8, image_id="example_mr_sm", params={"rise_masks": 1024}
    )
    deadline = time.monotonic() + 30
    while job.message.find("Running") < 0 and time.monotonic() < deadline:  # the request is on its way
        runner.poll()
        time.sleep(0.02)
    time.sleep(0.5)
    runner.poll()
    assert not job.done, "the inference finished before it could be cancelled"
    cancelled_at = time.monotonic()
    job.cancel("Cancelled by the test.")
    runner.wait(job, timeout_s=10)
    assert time.monotonic() - cancelled_at < 3.0
    assert job.state == JobState.CANCELLED and isinstance(job.error, OperationCancelled), (job.state, job.message)
    assert job.message == "Cancelled by the test." and job.result is None
    assert server.alive() and "models" in client.info()
    quick = run_workflow(
        runner, workflows.classify, client, CLS_INT8, image_id="example_mr_sm", params={"rise_masks": 8}
    )
    assert quick.probabilities


# ------------------------------------------------------------------------------------------------ submit
def test_submit_label_as_final_and_read_it_back(
    server: ServerHandle, client: MonaiLabelClient, runner: JobRunner, info: dict, tmp_path: Path
):
    labels = _cards(info, SEGMENTATION)[SEG_INT8].labels
    image_id = "example_ct_sm"
    total = client.datastore("stats")["total"]
    final, grid = read_array(client.download_label(image_id, "final", dest_dir=str(tmp_path / "original")))
    shutil.copy(server.studies / "labels" / "final" / f"{image_id}.nii.gz", tmp_path / "original_final.nii.gz")
    edited_mask = final == 1
    edited_mask[: edited_mask.shape[0] // 2] = False  # the annotator erased the upper half
    edited = compose_label_map([("Liver", edited_mask)], labels)  # a Slicer segment named "Liver"
    assert set(np.unique(edited)) <= {0, 1}
    label_image = sitk.GetImageFromArray(edited)
    label_image.CopyInformation(grid)
    sitk.WriteImage(label_image, str(tmp_path / "edited.nii.gz"))

    answer = run_workflow(runner, workflows.submit_label, client, str(tmp_path / "edited.nii.gz"), image_id=image_id)
    assert answer["image"] == image_id
    saved, saved_image = read_array(client.download_label(image_id, "final", dest_dir=str(tmp_path / "back")))
    assert_same_grid(saved_image, grid)
    assert np.array_equal(saved, edited)
    stored_label = client.datastore("all")["objects"][image_id]["labels"]["final"]
    assert stored_label["info"]["client_id"] == "pytest"  # the client's id reaches the datastore with the label

    # a volume that is not in the datastore yet is uploaded first, then labelled
    shutil.copy(server.studies / "example_mr_sm.nii.gz", tmp_path / "new_case.nii.gz")
    mr_final, _ = read_array(server.studies / "labels" / "final" / "example_mr_sm.nii.gz")
    sitk.WriteImage(
        sitk.ReadImage(str(server.studies / "labels" / "final" / "example_mr_sm.nii.gz")),
        str(tmp_path / "new_label.nii.gz"),
    )
    answer = run_workflow(
        runner,
        workflows.submit_label,
        client,
        str(tmp_path / "new_label.nii.gz"),
        image_path=str(tmp_path / "new_case.nii.gz"),
    )
    new_id = answer["image"]
    assert new_id and new_id not in STUDIES
    back, _ = read_array(client.download_label(new_id, "final", dest_dir=str(tmp_path / "back_new")))
    assert np.array_equal(back, mr_final)
    _wait_for_total(client, total + 1)
    # leave the datastore as this test found it, so the other tests do not depend on the order they run in
    assert server.delete("/datastore/image", params={"id": new_id}).status_code == 200
    _wait_for_total(client, total)
    client.save_label(image_id, str(tmp_path / "original_final.nii.gz"))
    assert np.array_equal(read_array(server.studies / "labels" / "final" / f"{image_id}.nii.gz")[0], final)


# ----------------------------------------------------------------------------------------------- scoring
_VOXEL_KEYS = ("agreement_voxels", "over_voxels", "under_voxels", "prediction_voxels", "reference_voxels")


def test_score_with_each_method_and_show_the_stored_figures(client: MonaiLabelClient, runner: JobRunner, info: dict):
    """Score as the panel does: the app's methods run as background tasks on the server, the lib follows each to
    DONE, reads the per-image figures back from the datastore and formats them for the scores table."""
    assert set(info["scoring"]) == {"over_under", "int8_agreement"}
    started = int(time.time()) - 1  # stored figures carry a whole-second ``ts``
    listing = run_workflow(runner, workflows.run_scoring, client, "over_under", poll_interval_s=0.5, timeout_s=180)
    objects = listing["objects"]
    labelled = sorted(i for i, o in objects.items() if "final" in (o.get("labels") or {}))
    assert UNLABELED in objects and UNLABELED not in labelled and len(labelled) >= 2
    over_under = formatting.scores_by_image(listing, "over_under")
    assert sorted(over_under) == labelled  # only images with a final label are scored
    for image_id, figures in over_under.items():
        assert figures["ts"] >= started and figures["model"] == info["default_model"] == SEG_INT8, image_id
        assert 0.0 <= figures["dice"] <= 1.0 and figures["over_ml"] >= 0 and figures["under_ml"] >= 0, figures
        assert all(isinstance(figures[k], int) and figures[k] >= 0 for k in _VOXEL_KEYS), figures
        assert figures["agreement_voxels"] + figures["over_voxels"] == figures["prediction_voxels"] > 0
    # the stored figures of an image are what the panel's Compare with its final label shows
    image_id = "example_mr_sm"
    served = run_workflow(runner, workflows.compare_on_server, client, SEG_INT8, image_id, "final").comparison
    stored = over_under[image_id]
    assert {k: stored[k] for k in _VOXEL_KEYS} == {k: served[k] for k in _VOXEL_KEYS}
    for key in ("dice", "over_ml", "under_ml", "agreement_ml"):
        assert stored[key] == pytest.approx(served[key], rel=1e-6, abs=1e-9), key
    assert client.image_info(image_id)["scores"]["over_under"] == stored  # /datastore/image/info agrees
    rows = formatting.score_rows(listing, "over_under")
    assert rows == [
        (
            i,
            f"{over_under[i]['dice']:.3f}",
            formatting.format_ml(over_under[i]["over_ml"]),
            formatting.format_ml(over_under[i]["under_ml"]),
        )
        for i in labelled
    ]
    assert all(len(row) == len(formatting.score_headers("over_under")) for row in rows)
    mean = sum(f["dice"] for f in over_under.values()) / len(over_under)
    summary = formatting.score_summary_text(listing, "over_under")
    assert summary.startswith(f"over_under: {len(labelled)} images, mean Dice {mean:.3f} (")

    # INT8 vs FP32 agreement: every image, labelled or not; the over_under scores stay
    listing = run_workflow(
        runner, workflows.run_scoring, client, "int8_agreement", {"max_slices": 4}, poll_interval_s=0.5, timeout_s=180
    )
    agreement = formatting.scores_by_image(listing, "int8_agreement")
    assert sorted(agreement) == sorted(objects)
    for image_id, figures in agreement.items():
        assert figures["ts"] >= started and figures["max_slices"] == 4, (image_id, figures)  # this run's figures
        assert 0.0 <= figures["dice"] <= 1.0 and (figures["int8_model"], figures["fp32_model"]) == (SEG_INT8, SEG_FP32)
        assert all(isinstance(figures[k], int) and figures[k] >= 0 for k in _VOXEL_KEYS), figures
        assert figures["dice"] == pytest.approx(
            2 * figures["agreement_voxels"] / (figures["prediction_voxels"] + figures["reference_voxels"])
            if figures["prediction_voxels"] + figures["reference_voxels"]
            else 1.0
        )
    assert formatting.scores_by_image(listing, "over_under") == over_under
    rows = formatting.score_rows(listing, "int8_agreement")
    assert [row[0] for row in rows] == sorted(objects)
    assert all(
        row[1:]
        == (
            f"{agreement[row[0]]['dice']:.3f}",
            str(agreement[row[0]]["over_voxels"]),
            str(agreement[row[0]]["under_voxels"]),
        )
        for row in rows
    )
    assert len(formatting.score_headers("int8_agreement")) == len(rows[0])
    assert formatting.score_summary_text(listing, "int8_agreement").startswith(f"int8_agreement: {len(objects)} images")

    # an unknown method fails at once with the server's 404 detail, readable in the panel
    job = runner.wait(runner.submit("score", workflows.run_scoring, client, "no_such_method"), 30)
    assert job.state == JobState.FAILED and isinstance(job.error, ServerError), (job.state, job.message)
    assert job.error.status == 404 and "no_such_method" in job.error.detail
    text = formatting.error_text(job.error)
    assert text.startswith("The server answered 404:") and "no_such_method" in text and "Traceback" not in text
    assert "over_under" in job.error.detail and "Traceback" not in job.message  # the detail lists what exists


# ---------------------------------------------------------------------------------------------- training
training_server = sample_server_fixture(
    STUDIES,
    name="training_server",
    scope="function",
    doc="A server of its own for training: what training publishes would change every other test's segmentations.",
)


def test_train_briefly_then_train_and_stop(training_server: ServerHandle, runner: JobRunner, tmp_path: Path):
    server = training_server
    client = MonaiLabelClient(server.url, timeout_s=60.0, client_id="pytest", download_dir=str(tmp_path))
    tiny = {"max_epochs": 1, "num_samples": 2, "train_batch_size": 2, "val_split": 0.34, "calibration_slices": 8}
    messages: list[str] = []
    fractions: list[float] = []

    def on_progress(event) -> None:
        messages.append(event.message)
        if event.fraction is not None:
            fractions.append(event.fraction)

    job = runner.submit(
        "train", workflows.run_training, client, "sadnn_seg", tiny, poll_interval_s=0.5, on_progress=on_progress
    )
    runner.wait(job, timeout_s=240)
    assert job.state == JobState.FINISHED, (job.message, server.log_tail())
    outcome = job.result
    assert outcome.status == "DONE" and outcome.stats["epoch"] == outcome.stats["total_epochs"] == 1
    assert 0.0 <= outcome.stats["best_metric"] <= 1.0 and formatting.training_fraction(outcome.stats) == 1.0
    assert "epoch 1/1, best validation Dice" in formatting.training_text("sadnn_seg", outcome.status, outcome.stats)
    assert any("RUNNING" in m for m in messages)
    assert fractions == sorted(fractions) and fractions[-1] == 1.0, fractions
    published = outcome.stats["published"]["int8"]["sha256"]
    result = run_workflow(runner, workflows.segment, client, SEG_INT8, image_id="example_mr_sm")
    assert result.params["model_version"]["sha256"] == published  # the panel's next segmentation uses it

    # a long run, stopped from the panel once training has really started
    second: list[str] = []
    job = runner.submit(
        "train",
        workflows.run_training,
        client,
        "sadnn_seg",
        dict(tiny, max_epochs=50),
        poll_interval_s=0.5,
        on_progress=lambda event: second.append(event.message),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not job.done and "epoch" not in (job.message or ""):
        runner.poll()
        time.sleep(0.1)
    assert not job.done and "epoch" in job.message, (job.state, job.message)
    job.cancel("Training stopped by the test.")
    runner.wait(job, timeout_s=60)
    assert job.state == JobState.CANCELLED and "stopped on the server" in job.message, (job.state, job.message)
    assert all("epoch 1/1" not in m for m in second), second  # the finished run's stats are not this run's
    assert client.train_status(check_if_running=True) is None
    assert client.info()["train_stats"]["sadnn_seg"]["status"] == "STOPPED"
    assert server.alive()

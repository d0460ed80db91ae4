# Copyright MedAttnSlicer contributors. Apache-2.0.
"""MedAttnSlicerLib without Slicer and without our app server.

The HTTP tests talk to tiny stdlib ``http.server`` instances on 127.0.0.1:0 that stand in for
MONAI Label 0.8.5 (a third-party server): they answer with MONAI Label's paths, status codes and
body formats (multipart results built with requests_toolbelt, the encoder MONAI Label itself uses;
uploads checked with python-multipart, the parser FastAPI uses). Our own app is tested for real
in tests/test_slicer_lib_server.py, and so are the client's normal paths: stand-ins here only inject what
the real server is not made to do (4xx/5xx, timeouts, broken or empty answers, a failed stop, other annotators).
"""

import gzip
import io
import json
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import python_multipart
from requests_toolbelt import MultipartEncoder
from scipy.spatial.distance import dice as dice_dissimilarity

from MedAttnSlicerLib import (
    AGREEMENT,
    OVER_SEGMENTATION,
    UNDER_SEGMENTATION,
    JobRunner,
    JobState,
    ModelCard,
    MonaiLabelClient,
    OperationCancelled,
    ProtocolError,
    ServerError,
    ServerTimeout,
    ServerUnavailable,
    ServerUrlHistory,
    TrainingFailed,
    compose_label_map,
    default_model,
    formatting,
    heatmap,
    label_values,
    model_cards,
    normalize_server_url,
    overlay_from_comparison_map,
    overlay_from_masks,
    split_label_map,
    workflows,
)
from MedAttnSlicerLib.multipart import encode_multipart_formdata, file_suffix, parse_multipart

# --------------------------------------------------------------------------- fixtures and helpers


def _sadnn_info(train_stats=None):
    """An /info/ answer shaped like docs/server_api.md."""
    card = {
        "name": "SaDNN-seg",
        "params": 7971298,
        "macs": 123_000_000_000,
        "fp32_size_bytes": 31_950_000,
        "int8_size_bytes": 8_409_088,
        "energy_fp32_j": 7.13,
        "energy_int8_j": 0.35,
        "precision": "int8",
        "input_shape": [1, 1, 256, 256],
    }
    return {
        "name": "MedAttnSlicer",
        "version": "0.1.0",
        "models": {
            "sadnn_seg_fp32": {
                "type": "segmentation",
                "labels": {"liver": 1},
                "dimension": 3,
                "precision": "fp32",
                "twin": "sadnn_seg_int8",
                "default": False,
                "model_card": dict(card, precision="fp32"),
            },
            "sadnn_seg_int8": {
                "type": "segmentation",
                "labels": {"liver": 1},
                "dimension": 3,
                "precision": "int8",
                "twin": "sadnn_seg_fp32",
                "default": True,
                "model_card": card,
            },
            "sadnn_cls_int8": {
                "type": "classification",
                "labels": ["liver", "spleen"],
                "dimension": 2,
                "precision": "int8",
                "twin": "sadnn_cls_fp32",
                "default": True,
                "model_card": {},
            },
        },
        "trainers": {"sadnn_seg": {}},
        "strategies": {"random": {}, "int8_disagreement": {}},
        "scoring": {"over_under": {}},
        "train_stats": train_stats or {},
        "datastore": {"total": 4, "completed": 1, "label_tags": {"final": 1}},
    }


class FakeMonaiLabel:
    """A stdlib HTTP server answering like MONAI Label; ``routes[(method, path)](request)`` -> response.

    A route returns (status, content_type, body bytes[, extra headers]). Requests are recorded.
    """

    def __init__(self, routes):
        self.routes = routes
        self.requests = []
        self.release = threading.Event()  # lets slow routes finish at teardown
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                parsed = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                request = {
                    "method": self.command,
                    "path": parsed.path,
                    "query": dict(urllib.parse.parse_qsl(parsed.query)),
                    "headers": dict(self.headers),
                    "body": self.rfile.read(length) if length else b"",
                }
                fake.requests.append(request)
                route = fake.routes.get((self.command, parsed.path))
                if route is None:
                    answer = (404, "application/json", json.dumps({"detail": "Not Found"}).encode())
                else:
                    answer = route(request)
                status, content_type, body = answer[:3]
                extra = answer[3] if len(answer) > 3 else {}
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(body)))
                    for key, value in extra.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def find(self, method, path):
        return [r for r in self.requests if r["method"] == method and r["path"] == path]


@pytest.fixture
def fake_server():
    servers = []

    def start(routes):
        server = FakeMonaiLabel(routes)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def _json(status, payload):
    return lambda request: (status, "application/json", json.dumps(payload).encode())


def _parse_upload(request):
    """Parse an upload with python-multipart, the parser behind FastAPI's Form/File."""
    fields, files = {}, {}

    def on_field(field):
        fields[field.field_name.decode()] = field.value.decode()

    def on_file(file):
        file.file_object.seek(0)
        files[file.field_name.decode()] = (file.file_name.decode(), file.file_object.read())

    headers = {"Content-Type": request["headers"]["Content-Type"], "Content-Length": str(len(request["body"]))}
    python_multipart.parse_form(headers, io.BytesIO(request["body"]), on_field, on_file)
    return fields, files


def _closed_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(predicate, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


# --------------------------------------------------------------------------- overlay maths


def test_overlay_counts_dice_and_anisotropic_ml():
    prediction = np.zeros((2, 2, 3), np.uint8)
    reference = np.zeros((2, 2, 3), np.uint8)
    prediction[0, 0, :] = 1  # 3 voxels
    prediction[1, 1, 0] = 1  # 1 voxel, not in reference
    reference[0, 0, :2] = 1  # 2 voxels shared
    reference[1, 0, :] = 1  # 3 voxels missed
    spacing = (3.0, 0.5, 2.0)  # 3 mm^3 = 0.003 ml per voxel
    overlay = overlay_from_masks(prediction, reference, spacing, reference_name="final label")

    assert [s.voxels for s in overlay.segments] == [2, 2, 3]  # agreement, over, under
    assert overlay.dice == pytest.approx(2 * 2 / (4 + 5))
    assert overlay.voxel_ml == pytest.approx(0.003)
    assert overlay.agreement_ml == pytest.approx(0.006)
    assert overlay.over_ml == pytest.approx(0.006)
    assert overlay.under_ml == pytest.approx(0.009)
    assert overlay.prediction_ml == pytest.approx(4 * 0.003)
    assert overlay.reference_ml == pytest.approx(5 * 0.003)
    assert overlay.comparison.dtype == np.uint8
    assert overlay.comparison[0, 0, 2] == OVER_SEGMENTATION
    assert overlay.comparison[1, 0, 1] == UNDER_SEGMENTATION
    assert overlay.comparison[0, 0, 0] == AGREEMENT
    summary = overlay.summary()
    assert summary["over_voxels"] == 2 and summary["under_voxels"] == 3 and summary["reference"] == "final label"


def test_overlay_segment_names_colours_and_masks():
    overlay = overlay_from_masks(np.array([[1, 1, 0]]), np.array([[1, 0, 1]]), (1.0, 1.0))
    styles = [(s.name, s.value, s.color) for s in overlay.segments]
    assert styles == [
        ("Agreement", 1, (1.0, 1.0, 1.0)),
        ("Over-segmentation", 2, (0.0, 1.0, 0.0)),
        ("Under-segmentation", 3, (1.0, 0.0, 0.0)),
    ]
    np.testing.assert_array_equal(overlay.segment(OVER_SEGMENTATION).mask(overlay.comparison), [[0, 1, 0]])
    np.testing.assert_array_equal(overlay.segment(UNDER_SEGMENTATION).mask(overlay.comparison), [[0, 0, 1]])


def test_overlay_dice_matches_scipy_on_random_masks():
    # the server's map of the same masks (the Slicer module cannot import the app: it computes its own, on purpose)
    from monailabel_app.lib.comparison import over_under_map

    rng = np.random.default_rng(0)
    for _ in range(5):
        p = rng.random((6, 7, 5)) > 0.6
        r = rng.random((6, 7, 5)) > 0.5
        overlay = overlay_from_masks(p, r, (1.5, 0.8, 0.8))
        np.testing.assert_array_equal(overlay.comparison, over_under_map(p, r))
        assert overlay.dice == pytest.approx(1.0 - dice_dissimilarity(p.ravel(), r.ravel()))
        again = overlay_from_comparison_map(overlay.comparison, (1.5, 0.8, 0.8))
        assert again.dice == pytest.approx(overlay.dice)
        assert [s.volume_ml for s in again.segments] == pytest.approx([s.volume_ml for s in overlay.segments])


def test_overlay_label_selection_and_empty_masks():
    prediction = np.array([[2, 2, 1, 0]])
    reference = np.array([[2, 0, 2, 1]])
    overlay = overlay_from_masks(prediction, reference, (1.0, 1.0), prediction_label=2, reference_label=2)
    assert [s.voxels for s in overlay.segments] == [1, 1, 1]
    empty = overlay_from_masks(np.zeros((3, 3)), np.zeros((3, 3)), (1.0, 1.0))
    assert empty.dice == 1.0 and empty.over_ml == 0.0


def test_overlay_from_server_map_accepts_float_and_rejects_bad_input():
    cmap = np.array([[0.0, 1.0, 2.0], [3.0, 3.0, 0.0]], dtype=np.float32)
    overlay = overlay_from_comparison_map(cmap, (2.0, 2.0), "sadnn_seg_fp32", {"dice": 0.4})
    assert overlay.dice == pytest.approx(2 * 1 / (2 * 1 + 1 + 2))
    assert overlay.server_figures == {"dice": 0.4}
    assert overlay.under_ml == pytest.approx(2 * 4 / 1000)
    with pytest.raises(ValueError, match=r"values \[5\]"):
        overlay_from_comparison_map(np.array([[0, 5]]), (1.0, 1.0))
    with pytest.raises(ValueError, match="NaN"):
        overlay_from_comparison_map(np.array([[0.0, np.nan]]), (1.0, 1.0))
    with pytest.raises(ValueError, match="non-integer"):
        overlay_from_comparison_map(np.array([[0.5, 1.0]]), (1.0, 1.0))
    with pytest.raises(ValueError, match="3-D array"):
        overlay_from_comparison_map(np.zeros((2, 2, 2)), (1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        overlay_from_masks(np.ones((2, 2)), np.ones((2, 2)), (1.0, -1.0))
    with pytest.raises(ValueError, match="same grid"):
        overlay_from_masks(np.ones((2, 2)), np.ones((2, 3)), (1.0, 1.0))
    with pytest.raises(ValueError, match="NaN"):
        overlay_from_masks(np.array([[np.nan, 1.0]]), np.ones((1, 2)), (1.0, 1.0))


# --------------------------------------------------------------------------- labels


def test_label_values_split_and_compose_round_trip():
    assert label_values(["liver", "spleen"]) == {"liver": 1, "spleen": 2}
    assert label_values({"background": 0, "liver": 5}) == {"liver": 5}
    with pytest.raises(ValueError, match="more than one"):
        label_values({"a": 1, "b": 1})

    label_map = np.array([[0, 5, 5], [7, 0, 0]], np.uint8)
    segments = split_label_map(label_map, {"liver": 5, "spleen": 1}, include_absent=True)
    assert [(s.name, s.value, s.voxels) for s in segments] == [("spleen", 1, 0), ("liver", 5, 2), ("Label 7", 7, 1)]
    assert [s.name for s in split_label_map(label_map, {"liver": 5})] == ["liver", "Label 7"]
    with pytest.raises(ValueError, match="saliency"):
        split_label_map(np.array([[0.2, 0.7]]), None)

    masks = [("Liver", label_map == 5), ("tumour", label_map == 7)]
    composed = compose_label_map(masks, {"liver": 5})
    np.testing.assert_array_equal(composed, np.array([[0, 5, 5], [6, 0, 0]]))
    overlapping = compose_label_map([("a", np.array([1, 1])), ("b", np.array([0, 1]))], ["a", "b"])
    np.testing.assert_array_equal(overlapping, [1, 2])  # the later segment wins
    with pytest.raises(ValueError, match="shape"):
        compose_label_map([("a", np.ones(2)), ("b", np.ones(3))])
    with pytest.raises(ValueError, match="empty"):
        compose_label_map([])


# --------------------------------------------------------------------------- model cards and formatting


def test_model_cards_and_picker_text():
    cards = model_cards(_sadnn_info(), "segmentation")
    assert [c.name for c in cards] == ["sadnn_seg_int8", "sadnn_seg_fp32"]  # default first
    int8 = cards[0]
    assert int8.precision == "int8" and int8.twin == "sadnn_seg_fp32"
    assert int8.size_bytes == 8_409_088 and int8.energy_j == pytest.approx(0.35)
    assert cards[1].size_bytes == 31_950_000 and cards[1].energy_j == pytest.approx(7.13)
    assert default_model(cards, "segmentation").name == "sadnn_seg_int8"
    assert formatting.model_picker_text(int8) == (
        "sadnn_seg_int8 | INT8 | 7.97 M params | 8.02 MiB | 0.35 J/pass  (default)"
    )
    assert formatting.model_picker_text(cards[1]) == "sadnn_seg_fp32 | FP32 | 7.97 M params | 30.47 MiB | 7.13 J/pass"
    card_text = formatting.model_card_text(int8)
    assert "INT8 3.8x smaller" in card_text and "INT8 20.4x less" in card_text and "1x1x256x256" in card_text
    bare = ModelCard.from_info("other", {"type": "segmentation"})
    assert formatting.model_picker_text(bare) == "other | ? | n/a params | n/a | energy n/a"
    assert formatting.quality_lines(bare) == [] and "Floor" not in formatting.model_card_text(bare)


def test_measured_quality_and_experimental_models_are_shown():
    """/info's quality (lib/quality.py): the figure per precision with its interval, the floor, what it was measured
    on; a model below its floor is marked in the picker and warned about first in its card."""
    quality = {
        "metric": "held-out Dice",
        "values": {"int8": 0.1355, "fp32": 0.1402},
        "intervals": {"fp32": [0.09, 0.2]},
        "floor": 0.8,
        "experimental": True,
        "measured_on": "example_ct_dicom (held out)",
        "labels_are": "TotalSegmentator model outputs, not manual ground truth",
    }
    entry = {"type": "segmentation", "precision": "fp32", "quality": quality, "experimental": True}
    card = ModelCard.from_info("sadnn_seg3d_fp32", entry)
    assert card.experimental and formatting.model_picker_text(card).endswith("energy n/a  (experimental)")
    lines = formatting.quality_lines(card)
    assert lines == [
        "EXPERIMENTAL: measured below its quality floor (0.80); check every result.",
        "Held-out Dice: FP32 0.140 (95 % CI 0.090-0.200), INT8 0.136",
        "Floor: 0.80; measured on example_ct_dicom (held out)",
        "Reference labels: TotalSegmentator model outputs, not manual ground truth",
    ]
    assert formatting.model_card_text(card).endswith("\n".join(lines))
    no_floor = ModelCard.from_info("hct_cls_int8", {"quality": {**quality, "floor": None, "experimental": False}})
    assert not no_floor.experimental and formatting.quality_lines(no_floor)[1].startswith("Floor: none;")
    with pytest.raises(ValueError, match="quality must be a dict"):
        ModelCard.from_info("bad", {"quality": 0.9})
    with pytest.raises(ValueError, match="params must be a number"):
        ModelCard.from_info("bad", {"model_card": {"params": "many"}})
    with pytest.raises(ValueError, match="models"):
        model_cards({"name": "x"})


def test_number_formats():
    assert formatting.format_count(7_971_298) == "7.97 M"
    assert formatting.format_count(950) == "950"
    assert formatting.format_bytes(8_409_088) == "8.02 MiB"
    assert formatting.format_bytes(512) == "512 B"
    assert formatting.format_energy(0.35) == "0.35 J"
    assert formatting.format_energy(0.0123) == "12.3 mJ"
    assert formatting.format_energy(4.2e-6) == "4.2 uJ"
    assert formatting.format_ml(12.345) == "12.35 ml"
    with pytest.raises(ValueError):
        formatting.format_energy(float("nan"))


def test_probability_rows():
    rows = formatting.probability_rows({"spleen": 0.2, "liver": 0.873, "kidney": 0.5})
    assert rows == [("liver", "87.3 %", "yes"), ("kidney", "50.0 %", "yes"), ("spleen", "20.0 %", "no")]
    with pytest.raises(ValueError, match="outside"):
        formatting.probability_rows({"liver": 1.2})
    with pytest.raises(ValueError, match="not a number"):
        formatting.probability_rows({"liver": "high"})


def test_comparison_training_scores_and_status_text():
    overlay = overlay_from_masks(np.array([[1, 1, 0]]), np.array([[1, 0, 1]]), (10.0, 10.0))
    assert formatting.comparison_text(overlay) == ("Dice 0.500 | over 0.10 ml | under 0.10 ml | agreement 0.10 ml")
    assert formatting.comparison_rows(overlay)[1] == ("Over-segmentation", (0.0, 1.0, 0.0), "1", "0.10 ml")
    stats = {"epoch": 3, "total_epochs": 10, "best_metric": 0.8123}
    assert formatting.training_fraction(stats) == pytest.approx(0.3)
    assert formatting.training_fraction({}) is None
    assert formatting.training_text("sadnn_seg", "RUNNING", stats) == (
        "sadnn_seg: RUNNING, epoch 3/10, best validation Dice 0.812"
    )
    datastore = {
        "objects": {
            "b": {"image": {"info": {"scores": {"over_under": {"dice": 0.9, "over_ml": 1.5, "under_ml": 0.25}}}}},
            "a": {"image": {"info": {"scores": {"int8_agreement": {"dice": 0.99}}}}},
        }
    }
    assert formatting.score_rows(datastore, "over_under") == [("b", "0.900", "1.50 ml", "0.25 ml")]
    assert formatting.score_rows(datastore, "int8_agreement") == [("a", "0.990", "n/a", "n/a")]
    datastore["objects"]["c"] = {
        "image": {"info": {"scores": {"int8_agreement": {"dice": 0.5, "over_voxels": 7, "under_voxels": 0}}}}
    }
    assert formatting.score_rows(datastore, "int8_agreement")[1] == ("c", "0.500", "7", "0")
    assert len(formatting.score_headers("int8_agreement")) == 4 and len(formatting.score_headers("over_under")) == 4
    assert list(formatting.scores_by_image(datastore, "int8_agreement")) == ["a", "c"]
    assert (
        formatting.score_summary_text(datastore, "int8_agreement")
        == "int8_agreement: 2 images, mean Dice 0.745 (0.500 .. 0.990)"
    )
    assert formatting.score_summary_text(datastore, "over_under") == "over_under: 1 image, mean Dice 0.900"
    assert formatting.score_summary_text(datastore, "other") == "other: 0 images scored"
    assert formatting.app_status_text(_sadnn_info()) == "MedAttnSlicer 0.1.0 | 3 models | 4 images, 1 labelled"
    with pytest.raises(ValueError, match="output=all"):
        formatting.score_rows({"total": 3}, "over_under")


def test_error_text_is_readable():
    assert "connection refused" in formatting.error_text(ServerUnavailable("http://h:1/info/", "connection refused"))
    text = formatting.error_text(ServerError(404, "Image 'x' not found", "POST", "http://h/infer/m"))
    assert text == "The server answered 404: Image 'x' not found (unknown image, label, model, strategy or method?)"
    assert "already running" in formatting.error_text(ServerError(429, "busy", "POST", "u"))
    assert formatting.error_text(OperationCancelled("Training stopped")) == "Training stopped"
    assert formatting.error_text(KeyError("k")) == "KeyError: 'k'"


# --------------------------------------------------------------------------- server URL history


def test_url_history_most_recent_first_dedup_bounded():
    history = ServerUrlHistory(max_size=3)
    history.add("http://a:8000")
    history.add("b:8000/")
    history.add("HTTP://A:8000/")  # same as the first, moves to the front
    assert history.urls == ["http://a:8000", "http://b:8000"]
    history.add("http://c:1")
    history.add("http://d:2")
    assert history.urls == ["http://d:2", "http://c:1", "http://a:8000"]
    assert history.most_recent == "http://d:2"
    restored = ServerUrlHistory.from_setting(history.to_setting(), max_size=3)
    assert restored.urls == history.urls


def test_url_history_settings_forms_and_validation():
    assert ServerUrlHistory.from_setting(None).urls == ["http://127.0.0.1:8000"]
    assert ServerUrlHistory.from_setting("http://x:9").urls == ["http://x:9"]
    assert ServerUrlHistory.from_setting(["ftp://bad", "http://ok:1"]).urls == ["http://ok:1"]
    assert normalize_server_url(" https://Host.example/monai/ ") == "https://host.example/monai"
    for bad, message in (
        ("", "empty"),
        ("ftp://h", "http"),
        ("http://", "host"),
        ("http://h:99999", "port"),
        ("http://h/?q=1", "query"),
    ):
        with pytest.raises(ValueError, match=message):
            normalize_server_url(bad)
    with pytest.raises(ValueError):
        ServerUrlHistory(max_size=0)


# --------------------------------------------------------------------------- job runner


def test_job_results_only_through_poll_on_caller_thread():
    runner = JobRunner()
    seen = []
    job = runner.submit(
        "answer", lambda ctx, x: x * 2, 21, on_finished=lambda e: seen.append((e.result, threading.get_ident()))
    )
    assert job._posted_final.wait(5)
    assert job.state == JobState.RUNNING and job.result is None and seen == []  # nothing delivered yet
    events = runner.poll()
    assert [e.kind for e in events] == ["finished"]
    assert seen == [(42, threading.get_ident())]
    assert job.state == JobState.FINISHED and job.result == 42 and not runner.busy


def test_job_progress_in_order_and_clipped():
    runner = JobRunner()
    progress = []

    def work(ctx):
        for fraction in (0.25, 0.5, 1.7):
            ctx.progress(fraction, f"step {fraction}")
        return "done"

    job = runner.submit("steps", work, on_progress=lambda e: progress.append((e.fraction, e.message)))
    runner.wait(job, timeout_s=5)
    assert progress == [(0.25, "step 0.25"), (0.5, "step 0.5"), (1.0, "step 1.7")]
    assert job.result == "done"


def test_job_error_propagates_with_traceback():
    runner = JobRunner()
    failures = []

    def broken(ctx):
        raise ValueError("image 'x' has NaNs")

    job = runner.submit("broken", broken, on_failed=failures.append)
    runner.wait(job, timeout_s=5)
    assert job.state == JobState.FAILED and isinstance(job.error, ValueError)
    assert failures[0].message == "image 'x' has NaNs" and "ValueError" in failures[0].traceback


def test_job_cancel_wakes_a_waiting_job_at_once():
    runner = JobRunner()
    job = runner.submit("sleeper", lambda ctx: ctx.sleep(30))
    time.sleep(0.05)
    started = time.monotonic()
    runner.cancel(job, "Stop now")
    runner.wait(job, timeout_s=5)
    assert time.monotonic() - started < 1.0
    assert job.state == JobState.CANCELLED and job.message == "Stop now"


def test_job_callback_errors_do_not_lose_other_events():
    runner = JobRunner()
    delivered = []

    def bad_callback(event):
        raise RuntimeError("widget exploded")

    first = runner.submit("a", lambda ctx: 1, on_finished=bad_callback)
    second = runner.submit("b", lambda ctx: 2, on_finished=lambda e: delivered.append(e.result))
    assert first._posted_final.wait(5) and second._posted_final.wait(5)
    with pytest.raises(RuntimeError, match="widget exploded"):
        runner.poll()
    assert delivered == [2] and first.done and second.done
    handled = []
    runner.callback_error_handler = lambda event, error: handled.append(str(error))
    runner.wait(runner.submit("c", lambda ctx: 3, on_finished=bad_callback), timeout_s=5)
    assert handled == ["widget exploded"]


def test_job_wait_times_out():
    runner = JobRunner()
    job = runner.submit("slow", lambda ctx: ctx.sleep(10))
    with pytest.raises(TimeoutError, match="slow"):
        runner.wait(job, timeout_s=0.1)
    runner.shutdown(timeout_s=2)
    assert job.state == JobState.CANCELLED


# --------------------------------------------------------------------------- multipart


def test_multipart_round_trip_with_binary_content():
    rng = np.random.default_rng(1)
    payload = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes() + b"\r\n--\r\n\r\n"
    content_type, body = encode_multipart_formdata({"params": '{"tag": "final"}'}, {"label": ("seg.nii.gz", payload)})
    parts = parse_multipart(body, content_type)
    assert [(p.name, p.filename) for p in parts] == [("params", None), ("label", "seg.nii.gz")]
    assert parts[0].text() == '{"tag": "final"}' and parts[1].data == payload
    assert parts[1].content_type == "application/octet-stream"  # the server goes by the file suffix


def test_multipart_parses_monai_label_style_answer():
    nifti_like = gzip.compress(b"\x00\r\n--not-a-boundary\r\n" * 50)
    encoder = MultipartEncoder(
        fields={
            "params": (None, json.dumps({"comparison": {"dice": 0.91}}), "application/json"),
            "image": ("tmpab12.nii.gz", io.BytesIO(nifti_like), "application/gzip"),
        }
    )
    parts = parse_multipart(encoder.to_string(), encoder.content_type)
    by_name = {p.name: p for p in parts}
    assert json.loads(by_name["params"].data) == {"comparison": {"dice": 0.91}}
    assert by_name["image"].filename == "tmpab12.nii.gz" and by_name["image"].data == nifti_like


def test_multipart_encoding_is_what_fastapi_parses():
    content_type, body = encode_multipart_formdata({"params": '{"a": 1}'}, {"file": ("img.nrrd", b"\r\n\x00abc")})
    fields, files = _parse_upload({"headers": {"Content-Type": content_type}, "body": body})
    assert fields == {"params": '{"a": 1}'} and files == {"file": ("img.nrrd", b"\r\n\x00abc")}


def test_multipart_malformed_bodies_raise():
    with pytest.raises(ProtocolError, match="boundary"):
        parse_multipart(b"--x\r\n", "multipart/form-data")
    with pytest.raises(ProtocolError, match="closing boundary"):
        parse_multipart(
            b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\nvalue', "multipart/form-data; boundary=b"
        )
    with pytest.raises(ProtocolError, match="multipart"):
        parse_multipart(b"{}", "application/json")
    with pytest.raises(ValueError, match="Invalid character"):
        encode_multipart_formdata({'bad"name': "x"}, {})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        encode_multipart_formdata({}, {"file": "/nonexistent/image.nii.gz"})
    assert file_suffix("a/b/case.nii.gz") == ".nii.gz" and file_suffix("x.seg.nrrd") == ".seg.nrrd"


# --------------------------------------------------------------------------- client errors


def test_client_server_down_names_the_url():
    port = _closed_port()
    client = MonaiLabelClient(f"http://127.0.0.1:{port}", timeout_s=5)
    with pytest.raises(ServerUnavailable) as raised:
        client.info()
    assert raised.value.url == f"http://127.0.0.1:{port}/info/"
    assert "connection refused" in str(raised.value) and f"127.0.0.1:{port}" in str(raised.value)


def test_client_4xx_5xx_carry_status_and_detail(fake_server):
    validation = {"detail": [{"loc": ["query", "image"], "msg": "field required", "type": "missing"}]}
    server = fake_server(
        {
            ("POST", "/infer/sadnn_seg_int8"): _json(404, {"detail": "Image 'nope' not found"}),
            ("GET", "/datastore/image/info"): _json(422, validation),
            ("GET", "/info/"): lambda r: (500, "text/plain; charset=utf-8", b"Internal Server Error"),
            ("POST", "/train/sadnn_seg"): _json(429, {"detail": "++++++++++ Train Task is Already Running"}),
            ("GET", "/train/"): _json(404, {"detail": "No Train Tasks Found"}),
        }
    )
    client = MonaiLabelClient(server.url, timeout_s=5)
    with pytest.raises(ServerError) as raised:
        client.infer("sadnn_seg_int8", image_id="nope")
    assert raised.value.status == 404 and raised.value.detail == "Image 'nope' not found"
    assert raised.value.method == "POST" and "/infer/sadnn_seg_int8?" in raised.value.url
    assert "rejected" in str(raised.value) and "Image 'nope' not found" in str(raised.value)
    with pytest.raises(ServerError) as raised:
        client.image_info("x")
    assert raised.value.status == 422 and raised.value.detail == "query.image: field required"
    with pytest.raises(ServerError) as raised:
        client.info()
    assert raised.value.status == 500 and raised.value.detail == "Internal Server Error"
    assert "failed (500)" in str(raised.value)
    with pytest.raises(ServerError) as raised:
        client.train_start("sadnn_seg", {"max_epochs": 1})
    assert raised.value.status == 429
    assert client.train_status() is None  # 404 means "no training task"


def test_client_timeout_and_non_json(fake_server):
    def slow(request):
        server.release.wait(5)
        return 200, "application/json", b"{}"

    server = fake_server({("GET", "/info/"): slow, ("GET", "/datastore/"): lambda r: (200, "text/html", b"<html>")})
    client = MonaiLabelClient(server.url, timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(ServerTimeout, match="0.3 s"):
        client.info()
    assert time.monotonic() - started < 3
    with pytest.raises(ProtocolError, match="valid JSON"):
        client.datastore()
    with pytest.raises(ValueError, match="output"):
        client.datastore("everything")
    with pytest.raises(ValueError, match="image_id"):
        client.infer("m")


# --------------------------------------------------------------------------- client against MONAI Label's formats


# The normal paths (infer with a label and a comparison, uploads, save_label, next_sample, download_image with
# progress) run against the real server in tests/test_slicer_lib_server.py, so the client cannot drift from it;
# stand-ins here only inject faults.


def test_workflows_reject_answers_without_an_image_or_probabilities(fake_server, tmp_path):
    """Injected faults: a strategy with nothing to offer, a classifier answer without probabilities. (The normal
    next-sample, segment, compare, classify and submit paths run on the real server: test_slicer_lib_server.py.)"""
    server = fake_server(
        {
            ("POST", "/activelearning/int8_disagreement"): _json(200, {}),
            ("POST", "/infer/sadnn_cls_int8"): _json(200, {"slice": 4}),
        }
    )
    client = MonaiLabelClient(server.url, timeout_s=5, download_dir=str(tmp_path))
    runner = JobRunner()

    def run(function, *args, **kwargs):
        job = runner.wait(runner.submit(function.__name__, function, client, *args, **kwargs), timeout_s=10)
        if job.state == JobState.FAILED:
            raise job.error
        return job.result

    with pytest.raises(Exception, match="returned no image"):
        run(workflows.fetch_next_sample, "int8_disagreement")
    with pytest.raises(ProtocolError, match="no class probabilities"):
        run(workflows.classify, "sadnn_cls_int8", image_id="c1", slice_index=4)
    assert json.loads(_parse_upload(server.find("POST", "/infer/sadnn_cls_int8")[0])[0]["params"]) == {"slice": 4}

    card = ModelCard.from_info("sadnn_seg_int8", _sadnn_info()["models"]["sadnn_seg_int8"])
    assert workflows.server_reference(workflows.REFERENCE_TWIN, card) == "sadnn_seg_fp32"
    assert workflows.server_reference(workflows.REFERENCE_FINAL, card) == "final"
    with pytest.raises(ValueError, match="no twin"):
        workflows.server_reference(workflows.REFERENCE_TWIN, ModelCard(name="solo"))


# --------------------------------------------------------------------------- cancel really stops waiting


def test_cancel_running_infer_stops_waiting_immediately(fake_server, tmp_path):
    def never_answers(request):
        server.release.wait(30)
        return 200, "application/json", b"{}"

    server = fake_server({("POST", "/infer/sadnn_seg_int8"): never_answers})
    client = MonaiLabelClient(server.url, timeout_s=5, infer_timeout_s=60, download_dir=str(tmp_path))
    runner = JobRunner()
    cancelled = []
    job = runner.submit(
        "segment", workflows.segment, client, "sadnn_seg_int8", image_id="c1", on_cancelled=cancelled.append
    )
    assert _wait_for(lambda: server.find("POST", "/infer/sadnn_seg_int8"))  # the server is now "computing"
    started = time.monotonic()
    job.cancel()
    runner.wait(job, timeout_s=5)
    assert time.monotonic() - started < 1.0
    assert job.state == JobState.CANCELLED and isinstance(job.error, OperationCancelled)
    assert cancelled and cancelled[0].message == "Cancelled by the user."


class _TrainingServer:
    """MONAI Label's /train/ and /info/ behaviour for one task, advancing an epoch per status poll."""

    def __init__(self, final_status="DONE", total_epochs=3):
        self.final_status = final_status
        self.total_epochs = total_epochs
        self.epoch = 0
        self.status = None
        self.lock = threading.Lock()

    def routes(self):
        return {
            ("GET", "/info/"): self.info,
            ("POST", "/train/sadnn_seg"): self.start,
            ("GET", "/train/"): self.task_status,
            ("DELETE", "/train/"): self.stop,
        }

    def _record(self):
        return {
            "id": "task-1",
            "status": self.status,
            "request": {"model": "sadnn_seg"},
            "details": ["epoch line", "Traceback: CUDA not found"] if self.status == "ERROR" else [],
        }

    def info(self, request):
        stats = {"sadnn_seg": {"start_ts": 100, "epoch": 9, "total_epochs": 9, "best_metric": 0.5}}  # old run
        with self.lock:
            if self.status is not None:
                stats = {
                    "sadnn_seg": {
                        "start_ts": 200,
                        "epoch": self.epoch,
                        "total_epochs": self.total_epochs,
                        "best_metric": 0.1 * self.epoch,
                    }
                }
        return 200, "application/json", json.dumps(_sadnn_info(stats)).encode()

    def start(self, request):
        with self.lock:
            self.status = "RUNNING"
            return 200, "application/json", json.dumps({"id": "task-1", "status": "SUBMITTED"}).encode()

    def task_status(self, request):
        with self.lock:
            if self.status is None:
                return 404, "application/json", b'{"detail": "No Train Tasks Found"}'
            if request["query"].get("check_if_running") == "true":
                if self.status != "RUNNING":
                    return 404, "application/json", b'{"detail": "No Train Tasks are currently Running"}'
                return 200, "application/json", json.dumps(self._record()).encode()
            if self.status == "RUNNING":
                self.epoch += 1
                if self.epoch >= self.total_epochs:
                    self.status = self.final_status
            body = [self._record()] if request["query"].get("all") == "true" else self._record()
            return 200, "application/json", json.dumps(body).encode()

    def stop(self, request):
        with self.lock:
            self.status = "STOPPED"
            return 200, "application/json", json.dumps(self._record()).encode()


def test_training_error_raises_training_failed(fake_server):
    server = fake_server(_TrainingServer("ERROR", total_epochs=1).routes())
    runner = JobRunner()
    job = runner.submit(
        "train", workflows.run_training, MonaiLabelClient(server.url, timeout_s=5), "sadnn_seg", poll_interval_s=0.02
    )
    runner.wait(job, timeout_s=10)
    assert job.state == JobState.FAILED and isinstance(job.error, TrainingFailed)
    assert "ERROR" in job.message and "CUDA not found" in job.message


def _long_training_running(fake_server, edit_routes=None):
    """A stand-in server with a long training and this panel's job that started it (status RUNNING):
    ``(training, server, runner, job)``. ``edit_routes(training, routes)`` may change the server's routes first."""
    training = _TrainingServer("DONE", total_epochs=10_000)
    routes = training.routes()
    if edit_routes is not None:
        edit_routes(training, routes)
    server = fake_server(routes)
    runner = JobRunner()
    job = runner.submit(
        "train", workflows.run_training, MonaiLabelClient(server.url, timeout_s=5), "sadnn_seg", poll_interval_s=30.0
    )
    assert _wait_for(lambda: training.status == "RUNNING")
    return training, server, runner, job


def test_cancel_training_stops_it_on_the_server(fake_server):
    training, server, runner, job = _long_training_running(fake_server)
    started = time.monotonic()
    job.cancel()
    runner.wait(job, timeout_s=5)
    assert time.monotonic() - started < 2.0  # did not sit out the 30 s poll interval
    assert job.state == JobState.CANCELLED and job.message == "Training 'sadnn_seg' stopped on the server"
    assert len(server.find("DELETE", "/train/")) == 1 and training.status == "STOPPED"


def test_cancel_training_reports_a_failed_stop(fake_server):
    def failing_stop(training, routes):
        routes[("DELETE", "/train/")] = _json(500, {"detail": "kill failed"})

    training, server, runner, job = _long_training_running(fake_server, failing_stop)
    job.cancel()
    runner.wait(job, timeout_s=5)
    assert job.state == JobState.FAILED
    assert "stopping it on the server failed" in job.message and "kill failed" in job.message


# --------------------------------------------------------------------------- explanation heat maps


def test_explanation_methods_from_info_with_rise_fallback():
    assert heatmap.explanation_methods({}) == ["rise"] and heatmap.default_explanation(None) == "rise"
    entry = {
        "type": "classification",
        "explanations": ["RISE", "Grad-CAM", "attention_rollout", "class_attention"],
        "default_explanation": "grad_cam",
    }
    assert heatmap.explanation_methods(entry) == ["rise", "grad_cam", "attention_rollout", "class_attention"]
    assert heatmap.default_explanation(entry) == "grad_cam"
    assert heatmap.default_explanation(dict(entry, default_explanation="lime")) == "rise"  # not offered
    card = ModelCard.from_info("cls", entry)
    assert card.explanations[1] == "grad_cam" and card.default_explanation == "grad_cam"
    assert ModelCard.from_info("cls", {"type": "classification"}).explanations == ["rise"]
    assert ModelCard.from_info("seg", {"type": "segmentation"}).explanations == []
    with pytest.raises(ValueError, match="Model 'cls'.*list of method names"):
        ModelCard.from_info("cls", {"type": "classification", "explanations": "rise"})
    assert [heatmap.explanation_title(m) for m in ("grad_cam", "RISE", "lime")] == [
        "Grad-CAM",
        "RISE (random masks)",
        "lime",
    ]


def test_axial_axis_follows_the_direction_matrix():
    assert heatmap.axial_index_axis(np.eye(3).ravel()) == 2 and heatmap.axial_array_axis(np.eye(3).ravel()) == 0
    assert heatmap.axial_index_axis([-1, 0, 0, 0, -1, 0, 0, 0, 1]) == 2  # LPS vs RAS: same superior axis
    sagittal_first = np.eye(3)[:, [2, 0, 1]]  # index axis 0 runs superior-inferior
    assert (
        heatmap.axial_index_axis(sagittal_first.ravel()) == 0 and heatmap.axial_array_axis(sagittal_first.ravel()) == 2
    )
    oblique = np.array([[1, 0, 0], [0, 0.8, 0.6], [0, -0.6, 0.8]])
    assert heatmap.axial_index_axis(oblique.ravel()) == 2
    with pytest.raises(ValueError, match="9 finite"):
        heatmap.axial_index_axis([1, 0, 0])
    with pytest.raises(ValueError, match="zero column"):
        heatmap.axial_index_axis([1, 0, 0, 0, 0, 0, 0, 0, 0])


def test_heat_map_rescales_the_classified_slice():
    saliency = np.zeros((4, 3, 5), np.float32)
    saliency[2] = np.linspace(0.4, 0.9, 15).reshape(3, 5)
    heat = heatmap.heat_map_from_saliency(saliency, "RISE", np.eye(3).ravel(), 2)
    assert heat.method == "rise" and (heat.array_axis, heat.slice_index) == (0, 2)
    assert (heat.low, heat.high) == (pytest.approx(0.4), pytest.approx(0.9)) and heat.peak == (2, 2, 4)
    np.testing.assert_allclose(heat.slice_values(), (saliency[2] - 0.4) / 0.5, atol=1e-6)
    assert heat.shown[2].all() and not heat.shown[[0, 1, 3]].any()
    indices = heatmap.heat_map_indices(heat, 256)
    assert indices.dtype == np.uint8 and indices[2].min() == 1 and indices[2].max() == 255 and not indices[:2].any()
    clipped = heatmap.heat_map_from_saliency(saliency, "rise", np.eye(3).ravel(), 2, clip_percentiles=(10, 90))
    assert clipped.low > 0.4 and clipped.high < 0.9 and clipped.values.max() == 1.0
    flat = np.zeros((1, 4, 4), np.float32)
    flat[0] = 0.25
    assert heatmap.heat_map_from_saliency(flat, "grad_cam", np.eye(3).ravel(), 0).values.min() == 1.0
    two_d = heatmap.heat_map_from_saliency(np.arange(12, dtype=np.float32).reshape(3, 4), "grad_cam")
    assert two_d.slice_index is None and two_d.values[0, 0] == 0.0 and two_d.values[-1, -1] == 1.0
    assert (
        formatting.saliency_text(heat, {"saliency_class": "liver"})
        == "RISE (random masks) of liver, slice 2: blue 0.4 .. red 0.9"
    )


def test_heat_map_rejects_bad_maps_and_the_wrong_axis():
    saliency = np.zeros((4, 3, 5), np.float32)
    saliency[:, :, 1] = 1.0 + np.arange(12).reshape(4, 3)  # defined on index axis 0 = array axis 2
    sagittal_first = np.eye(3)[:, [2, 0, 1]].ravel()
    assert heatmap.heat_map_from_saliency(saliency, "rise", sagittal_first, 1).array_axis == 2
    with pytest.raises(ValueError, match="off the classified slice 1"):
        heatmap.heat_map_from_saliency(saliency, "rise", np.eye(3).ravel(), 1)
    with pytest.raises(ValueError, match="outside the volume's 5 axial slices"):
        heatmap.heat_map_from_saliency(saliency, "rise", sagittal_first, 5)
    with pytest.raises(ValueError, match="needs the image direction"):
        heatmap.heat_map_from_saliency(saliency, "rise", None, 1)
    with pytest.raises(ValueError, match="zero everywhere"):
        heatmap.heat_map_from_saliency(np.zeros((2, 3, 3)), "rise", np.eye(3).ravel(), 1)
    with pytest.raises(ValueError, match="NaN"):
        heatmap.heat_map_from_saliency(np.full((2, 2), np.nan), "rise")
    with pytest.raises(ValueError, match="empty"):
        heatmap.heat_map_from_saliency(np.zeros((0, 3)), "rise")
    colors = heatmap.heat_map_colors(5)
    np.testing.assert_allclose(colors[:, 3], [0, 1, 1, 1, 1])
    np.testing.assert_allclose(colors[1, :3], [0, 0, 1])
    np.testing.assert_allclose(colors[-1, :3], [1, 0, 0])
    assert heatmap.heat_map_colors(4, transparent_first=False)[0, 3] == 1.0
    with pytest.raises(ValueError, match="at least 3"):
        heatmap.heat_map_colors(2)


def test_classify_sends_explain_and_rejects_another_method(fake_server, tmp_path):
    def infer_cls(request):
        params = json.loads(_parse_upload(request)[0]["params"])
        encoder = MultipartEncoder(
            fields={
                # a server that knows only RISE ignores "explain"
                "params": (
                    None,
                    json.dumps({"probabilities": {"liver": 0.9}, "saliency": "RISE", "slice": 1}),
                    "application/json",
                ),
                "image": ("saliency.nii.gz", io.BytesIO(json.dumps(params).encode()), "application/gzip"),
            }
        )
        return 200, encoder.content_type, encoder.to_string()

    server = fake_server({("POST", "/infer/sadnn_cls_int8"): infer_cls})
    client = MonaiLabelClient(server.url, timeout_s=5, download_dir=str(tmp_path))
    runner = JobRunner()
    job = runner.wait(
        runner.submit(
            "c", workflows.classify, client, "sadnn_cls_int8", image_id="c1", explain="RISE", params={"rise_masks": 8}
        ),
        timeout_s=10,
    )
    assert job.state == JobState.FINISHED and job.result.explanation == "rise"
    assert json.loads(Path(job.result.label_path).read_text()) == {"rise_masks": 8, "explain": "rise"}
    job = runner.wait(
        runner.submit("c", workflows.classify, client, "sadnn_cls_int8", image_id="c1", explain="grad_cam"),
        timeout_s=10,
    )
    assert job.state == JobState.FAILED and isinstance(job.error, ProtocolError)
    assert "asked for a 'grad_cam' explanation but answered with 'rise'" in str(job.error)


def test_module_shutdown_leaves_the_servers_training_running(fake_server):
    # Closing Slicer or reloading the module (JobRunner.shutdown from Logic.cleanup) must not stop a
    # training on a server other annotators may share.
    training, server, runner, job = _long_training_running(fake_server)
    runner.shutdown(timeout_s=5)
    assert job.state == JobState.CANCELLED and job.message == "Training 'sadnn_seg' left running on the server"
    assert server.find("DELETE", "/train/") == [] and training.status == "RUNNING"


def test_cancel_does_not_stop_another_annotators_training_of_the_same_model(fake_server):
    def someone_elses_training(training, routes):
        # The server runs someone else's training of the same model (another task id) when ours is cancelled.
        routes[("GET", "/train/")] = lambda request: (
            (
                200,
                "application/json",
                json.dumps(
                    {"id": "task-of-someone-else", "status": "RUNNING", "request": {"model": "sadnn_seg"}}
                ).encode(),
            )
            if request["query"].get("check_if_running") == "true"
            else training.task_status(request)
        )

    training, server, runner, job = _long_training_running(fake_server, someone_elses_training)
    job.cancel()
    runner.wait(job, timeout_s=5)
    assert job.state == JobState.CANCELLED and "another training task on the server was left running" in job.message
    assert server.find("DELETE", "/train/") == []

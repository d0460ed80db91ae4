# Copyright MedAttnSlicer contributors. Apache-2.0.
"""The served classifiers of issue 5 (HCT, Efficient Scopeformer, PatchConvNet) next to SaDNN-cls, through the real
MedAttnSlicer MONAI Label server over HTTP: /info (cards, explanation methods), INT8 and FP32 inference with every
explanation method a model allows (maps on the input grid), refused methods, and retraining one of them.

One server for the module (``--conf models hct_cls,scopeformer_cls,patchconvnet_cls,sadnn_cls``) on a copy of two
labelled sample studies; trained weights go to a temporary ``model_dir``. Tests run in file order, training last.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from monailabel.client import MONAILabelClient

from tests.server_fixture import ServerHandle, start_sample_server

pytestmark = pytest.mark.slow

STUDIES = ("example_ct_sm", "example_mr_sm")
IMAGE = "example_ct_sm"  # LPS-stored CT (negative direction cosines): the map must come back on that grid
SLICE = 12
ORGANS = ["liver", "spleen", "kidney_right", "kidney_left", "stomach"]  # classes of the bundled classifiers
# family -> (explanations offered, default): the contract of docs/server_api.md
EXPLANATIONS = {
    "sadnn_cls": (["rise", "grad_cam"], "rise"),
    "hct_cls": (["grad_cam", "rise"], "grad_cam"),
    "scopeformer_cls": (["grad_cam", "attention_rollout", "rise"], "grad_cam"),
    "patchconvnet_cls": (["class_attention", "grad_cam", "rise"], "class_attention"),
}
MODELS = [f"{family}_{precision}" for family in EXPLANATIONS for precision in ("int8", "fp32")]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with start_sample_server(
        tmp_path_factory, STUDIES, {"models": ",".join(EXPLANATIONS), "rise_masks": "32"}
    ) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server: ServerHandle, tmp_path_factory: pytest.TempPathFactory) -> MONAILabelClient:
    return MONAILabelClient(server.url, tmpdir=str(tmp_path_factory.mktemp("client")))


def _family(model: str) -> str:
    return model.rsplit("_", 1)[0]


def _check_map_on_input_grid(server: ServerHandle, map_file: str, image_id: str, slice_index: int) -> np.ndarray:
    """The explanation map: float32, the input's exact grid, values in [0, 1], non-zero on the classified slice only."""
    reference = sitk.ReadImage(str(server.studies / f"{image_id}.nii.gz"))
    saliency_image = sitk.ReadImage(map_file)
    assert saliency_image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(saliency_image.GetSpacing(), reference.GetSpacing(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(saliency_image.GetOrigin(), reference.GetOrigin(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(saliency_image.GetDirection(), reference.GetDirection(), rtol=0, atol=1e-6)
    saliency = sitk.GetArrayFromImage(saliency_image)  # (z, y, x): z is the axial axis of these studies
    assert saliency.dtype == np.float32
    assert float(saliency.min()) >= 0.0 and float(saliency.max()) <= 1.0 + 1e-5
    nonzero_slices = np.flatnonzero(np.abs(saliency).reshape(saliency.shape[0], -1).max(axis=1) > 0)
    assert nonzero_slices.tolist() == [slice_index]
    plane = saliency[slice_index]
    assert float(plane.max()) > 0.5 and float(plane.std()) > 0.01  # a map, not a constant
    return plane


# ----------------------------------------------------------------------------------------------- info
def test_info_lists_classifiers_with_cards_and_explanations(server: ServerHandle, client: MONAILabelClient):
    info = client.info()
    models = info["models"]
    assert sorted(models) == sorted(MODELS)
    for name in MODELS:
        model = models[name]
        family, precision = _family(name), name.rsplit("_", 1)[1]
        assert model["type"] == "classification" and model["task"] == "classification"
        assert model["family"] == family and model["precision"] == precision
        assert model["twin"] == f"{family}_{'fp32' if precision == 'int8' else 'int8'}"
        assert model["labels"] == ORGANS
        explanations, default = EXPLANATIONS[family]
        assert model["explanations"] == explanations and model["default_explanation"] == default
        assert model["config"]["explain"] == default
        card = model["model_card"]
        fields = ("params", "macs", "fp32_size_bytes", "int8_size_bytes", "energy_fp32_j", "precision", "input_shape")
        for field in fields:
            assert card[field] is not None, (name, field)
        assert card["precision"] == precision and card["input_shape"] == [1, 1, 128, 128]
        assert card["int8_size_bytes"] > 0 and card["params"] > 10_000
    assert models["hct_cls_fp32"]["model_card"]["factory_name"] == "hct_small"
    assert models["scopeformer_cls_fp32"]["model_card"]["factory_name"] == "scopeformer_tiny"
    assert models["patchconvnet_cls_fp32"]["model_card"]["factory_name"] == "patchconvnet_small"
    assert set(info["trainers"]) == set(EXPLANATIONS)


# ------------------------------------------------------------------------------------------- inference
@pytest.mark.parametrize("model", MODELS)
def test_infer_default_explanation_on_input_grid(server: ServerHandle, client: MONAILabelClient, model: str):
    map_file, result = client.infer(model, IMAGE, {"slice": SLICE})
    family, precision = _family(model), model.rsplit("_", 1)[1]
    assert result["model"] == model and result["precision"] == precision and result["slice"] == SLICE
    assert list(result["probabilities"]) == ORGANS
    assert all(0.0 <= p <= 1.0 for p in result["probabilities"].values())
    assert result["prediction"] == [c for c, p in result["probabilities"].items() if p >= 0.5]
    default = EXPLANATIONS[family][1]
    assert result["saliency"] == default
    if default == "rise":
        # RISE is black-box: it explains the served network itself, INT8 included
        assert result["saliency_precision"] == precision and result["rise_masks"] == 32
    else:
        assert result["saliency_precision"] == "fp32"
    if precision == "int8" and default != "rise":
        # gradients / attention weights come from the FP32 twin of the same training run, and the result says so
        assert "FP32 twin" in result["saliency_note"]
        twin = client.infer(f"{family}_fp32", IMAGE, {"slice": SLICE})[1]
        assert result["saliency_model_version"]["sha256"] == twin["model_version"]["sha256"]
    # the explained class is the most probable one unless the request names it
    probabilities = result["probabilities"]
    assert result["saliency_class"] == max(probabilities, key=probabilities.get)
    _check_map_on_input_grid(server, map_file, IMAGE, SLICE)


ALLOWED = [
    (f"{family}_{precision}", method)
    for family, (methods, default) in EXPLANATIONS.items()
    for method in methods
    if method != default
    for precision in ("int8", "fp32")
]


@pytest.mark.parametrize("model,method", ALLOWED)
def test_every_allowed_explanation(server: ServerHandle, client: MONAILabelClient, model: str, method: str):
    map_file, result = client.infer(model, IMAGE, {"slice": SLICE, "explain": method, "saliency_class": "liver"})
    assert result["saliency"] == method and result["saliency_class"] == "liver"
    assert result["saliency_class_specific"] is (method in ("rise", "grad_cam"))
    if method == "grad_cam":
        assert result["saliency_layer"]
    expected_network = model.rsplit("_", 1)[1] if method == "rise" else "fp32"
    assert result["saliency_precision"] == expected_network
    _check_map_on_input_grid(server, map_file, IMAGE, SLICE)


def test_rise_parameters_and_reproducibility(server: ServerHandle, client: MONAILabelClient):
    params = {"slice": SLICE, "explain": "rise", "rise_masks": 24, "rise_seed": 3, "saliency_class": 1}
    first_file, first = client.infer("patchconvnet_cls_int8", IMAGE, params)
    again_file, _ = client.infer("patchconvnet_cls_int8", IMAGE, params)
    other_file, _ = client.infer("patchconvnet_cls_int8", IMAGE, {**params, "rise_seed": 4})
    assert first["rise_masks"] == 24 and first["saliency_class"] == ORGANS[1]
    maps = [_check_map_on_input_grid(server, f, IMAGE, SLICE) for f in (first_file, again_file, other_file)]
    np.testing.assert_array_equal(maps[0], maps[1])
    assert not np.array_equal(maps[0], maps[2])


@pytest.mark.parametrize(
    "model,method",
    [
        ("hct_cls_fp32", "class_attention"),
        ("hct_cls_int8", "attention_rollout"),
        ("patchconvnet_cls_int8", "attention_rollout"),
        ("sadnn_cls_fp32", "class_attention"),
        ("scopeformer_cls_fp32", "lime"),
    ],
)
def test_unavailable_explanation_is_refused(server: ServerHandle, model: str, method: str):
    multipart = {"params": (None, json.dumps({"explain": method}))}
    r = server.post(f"/infer/{model}", params={"image": IMAGE, "output": "json"}, files=multipart)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    explanations, default = EXPLANATIONS[_family(model)]
    assert repr(method) in detail and model in detail
    assert f"allowed: {', '.join(explanations)} (default {default})" in detail


@pytest.mark.parametrize("model,method", [("hct_cls_int8", "grad_cam"), ("scopeformer_cls_fp32", "attention_rollout")])
def test_uploaded_2d_image(server: ServerHandle, tmp_path: Path, model: str, method: str):
    """A 2D image (one CT slice as 2D NIfTI, uploaded) is classified directly; the map is on its grid."""
    volume = sitk.ReadImage(str(server.studies / f"{IMAGE}.nii.gz"))
    slice2d = volume[:, :, SLICE]
    sitk.WriteImage(slice2d, str(tmp_path / "slice.nii.gz"))
    multipart = {
        "params": (None, json.dumps({"explain": method})),
        "file": ("slice.nii.gz", (tmp_path / "slice.nii.gz").read_bytes()),
    }
    r = server.post(f"/infer/{model}", params={"output": "image"}, files=multipart)
    assert r.status_code == 200, r.text
    (tmp_path / "map.nii.gz").write_bytes(r.content)
    saliency_image = sitk.ReadImage(str(tmp_path / "map.nii.gz"))
    assert saliency_image.GetSize() == slice2d.GetSize()
    np.testing.assert_allclose(saliency_image.GetSpacing(), slice2d.GetSpacing(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(saliency_image.GetOrigin(), slice2d.GetOrigin(), rtol=0, atol=1e-5)
    saliency = sitk.GetArrayFromImage(saliency_image)
    assert saliency.dtype == np.float32 and saliency.min() >= 0.0 and 0.5 < saliency.max() <= 1.0 + 1e-5


# ------------------------------------------------------------------------------------------- training
def test_training_publishes_fp32_and_int8_and_the_model_reloads(server: ServerHandle, client: MONAILabelClient):
    family = "patchconvnet_cls"
    bundled = {m: server.get(f"/model/info/{m}").json()["checksum"] for m in (f"{family}_int8", f"{family}_fp32")}
    request = {"max_epochs": 2, "num_samples": 2, "train_batch_size": 2, "val_split": 0.5, "calibration_slices": 8}
    client.train_start(family, request)
    status = server.wait_for_training()
    assert status["status"] == "DONE", "\n".join(status.get("details", []))
    stats = server.get("/info/").json()["train_stats"][family]
    assert stats["status"] == "PUBLISHED" and stats["metric_name"] == "val_f1" and stats["total_epochs"] == 2
    published = stats["published"]
    assert (server.model_dir / f"{family}.pt").exists() and (server.model_dir / f"{family}_int8.pt").exists()
    for precision in ("int8", "fp32"):
        model = f"{family}_{precision}"
        assert server.get(f"/model/info/{model}").json()["checksum"] != bundled[model]
        map_file, result = client.infer(model, "example_mr_sm", {"slice": 10})  # same process: reloaded
        # trained on the app's labels (--conf labels: liver), so the retrained classifier has one class
        assert list(result["probabilities"]) == ["liver"]
        assert result["model_version"]["sha256"] == published[precision]["sha256"]
        assert result["saliency"] == "class_attention"
        if precision == "int8":  # the explanation follows the new FP32 twin too
            assert result["saliency_model_version"]["sha256"] == published["fp32"]["sha256"]
        _check_map_on_input_grid(server, map_file, "example_mr_sm", 10)
    info = server.get("/info/").json()["models"]
    assert info[f"{family}_int8"]["labels"] == ["liver"]
    int8_file = server.model_dir / f"{family}_int8.pt"
    assert info[f"{family}_int8"]["model_card"]["int8_size_bytes"] == int8_file.stat().st_size

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Unit tests of the app's building blocks (no server): over/under maps, labels, explanations, preprocessing geometry,
the safe datastore, --conf parsing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from monailabel_app.lib.app_config import AppConfig, parse_labels
from monailabel_app.lib.comparison import AGREEMENT, OVER, UNDER, OverUnderd, comparison_figures, over_under_map
from monailabel_app.lib.errors import BadInputError, NotFoundError
from monailabel_app.lib.explanations import check_explanations, explanation_map, resolve_explanation
from monailabel_app.lib.transforms.labels import PresenceTargetd, SelectLabelValuesd, organ_presence
from monailabel_app.lib.transforms.postprocess import ForegroundProbabilitiesd, ProbabilitiesToLabeld


def test_over_under_map_and_figures():
    prediction = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], bool)
    reference = np.array([[1, 0, 0, 1], [1, 0, 1, 0]], bool)
    expected = np.array([[AGREEMENT, OVER, 0, UNDER], [AGREEMENT, 0, UNDER, 0]], np.uint8)
    np.testing.assert_array_equal(over_under_map(prediction, reference), expected)
    f = comparison_figures(prediction, reference, voxel_ml=0.5)
    assert (f["agreement_voxels"], f["over_voxels"], f["under_voxels"]) == (2, 1, 2)
    assert f["dice"] == pytest.approx(2 * 2 / (3 + 4))
    assert f["over_ml"] == pytest.approx(0.5) and f["under_ml"] == pytest.approx(1.0)
    assert comparison_figures(np.zeros(3, bool), np.zeros(3, bool), 1.0)["dice"] == 1.0
    with pytest.raises(ValueError, match="shape"):
        over_under_map(np.zeros(3), np.zeros(4))


def test_over_under_transform_compares_one_label_value():
    pred = np.array([[[0, 1, 2, 1]]], np.uint8)  # (1, 1, 4) with a channel
    ref = np.array([[1, 1, 1, 0]], np.uint8)
    d = OverUnderd("pred", "ref", label_value=1, voxel_ml=1.0)({"pred": pred, "ref": ref})
    np.testing.assert_array_equal(d["pred"][0], [[UNDER, AGREEMENT, UNDER, OVER]])
    assert d["result"]["comparison"]["dice"] == pytest.approx(2 * 1 / (2 + 3))


def test_parse_labels_forms_and_errors():
    assert parse_labels(None) == {"liver": 1}
    assert parse_labels("liver,spleen") == {"liver": 1, "spleen": 2}
    assert parse_labels("liver=5, spleen=1") == {"liver": 5, "spleen": 1}
    assert parse_labels('{"liver": 3}') == {"liver": 3}
    for bad in ("liver=1,spleen=1", "liver=0", "liver,,spleen"):
        with pytest.raises(ValueError):
            parse_labels(bad)


def test_app_config_selects_models(tmp_path):
    c = AppConfig.from_conf(str(tmp_path), {"models": "sadnn_seg,unet_seg_fp32", "labels": "liver"})
    assert c.models == ["sadnn_seg_int8", "sadnn_seg_fp32", "unet_seg_fp32"]
    assert AppConfig.from_conf(str(tmp_path), {}).models[0] == "sadnn_seg_int8"
    with pytest.raises(ValueError, match="unknown model"):
        AppConfig.from_conf(str(tmp_path), {"models": "resnet"})


def test_label_selection_and_presence():
    label = torch.tensor([[[0, 5, 1], [5, 2, 0]]])  # (1, 2, 3): values 5 -> class 1, 2 -> class 2, 1 dropped
    classes = SelectLabelValuesd("l", [5, 2])({"l": label})["l"]
    np.testing.assert_array_equal(classes.numpy(), [[[0, 1, 0], [1, 2, 0]]])
    volume = torch.zeros(1, 4, 4, 3)
    volume[0, :2, :2, 0] = 1  # 4 voxels of class 1 in slice 0
    volume[0, 0, 0, 2] = 2  # 1 voxel of class 2 in slice 2
    presence = PresenceTargetd("l", num_classes=2, min_voxels=1)({"l": volume})["l"]
    np.testing.assert_array_equal(presence.numpy(), [[1, 0, 0], [0, 0, 1]])
    assert organ_presence(volume[0], 2, axis=-1, min_voxels=5).sum() == 0


def test_probabilities_to_label_and_largest_component():
    probs = torch.zeros(2, 6, 6)
    probs[1, 0:2, 0:2] = 0.9  # small blob
    probs[1, 3:6, 3:6] = 0.8  # large blob
    probs[0] = 1 - probs[1]
    fg = ForegroundProbabilitiesd("p", largest_component=True)({"p": probs})["p"]
    label = ProbabilitiesToLabeld("p", label_values=[7])({"p": fg})["p"]
    assert label.dtype == torch.uint8
    assert int((label == 7).sum()) == 9 and int(label[0, 0]) == 0
    three = torch.softmax(torch.randn(3, 5, 5), 0)
    label3 = ProbabilitiesToLabeld("p", label_values=[4, 9])({"p": three[1:]})["p"]
    np.testing.assert_array_equal(label3.numpy(), np.array([0, 4, 9])[three.argmax(0).numpy()])


class _QuadrantClassifier(torch.nn.Module):
    """Class 0 looks at the top-left quadrant, class 1 at the bottom-right (multi-label logits)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[:, 0, :16, :16].mean((1, 2)), x[:, 0, 16:, 16:].mean((1, 2))], 1) * 8 - 4


def test_rise_explanation_highlights_the_evidence_region():
    """The app's RISE (networks.explain underneath) finds each class's quadrant and is reproducible per seed."""
    image = torch.ones(1, 32, 32)
    top_left, info = explanation_map(_QuadrantClassifier(), image, "rise", 0, rise_masks=200, rise_seed=1)
    bottom_right, _ = explanation_map(_QuadrantClassifier(), image, "rise", 1, rise_masks=200, rise_seed=1)
    assert top_left.shape == (32, 32) and info["method"] == "rise" and info["num_masks"] == 200
    assert float(top_left.min()) >= 0.0 and float(top_left.max()) <= 1.0
    assert top_left[:16, :16].mean() > top_left[16:, 16:].mean() + 0.2
    assert bottom_right[16:, 16:].mean() > bottom_right[:16, :16].mean() + 0.2
    again, _ = explanation_map(_QuadrantClassifier(), image, "rise", 0, rise_masks=200, rise_seed=1)
    torch.testing.assert_close(top_left, again)
    other_seed, _ = explanation_map(_QuadrantClassifier(), image, "rise", 0, rise_masks=200, rise_seed=2)
    assert not torch.equal(top_left, other_seed)


def test_explanation_method_checks():
    allowed = check_explanations(("class_attention", "grad_cam", "rise"), "class_attention")
    assert resolve_explanation(None, allowed, "class_attention", "m") == "class_attention"
    assert resolve_explanation("", allowed, "class_attention", "m") == "class_attention"
    assert resolve_explanation("Grad_CAM", allowed, "class_attention", "m") == "grad_cam"
    with pytest.raises(BadInputError, match="not available for m; allowed: class_attention, grad_cam, rise") as err:
        resolve_explanation("attention_rollout", allowed, "class_attention", "m")
    assert err.value.status_code == 422
    with pytest.raises(BadInputError, match="is not an explanation method"):
        resolve_explanation("lime", allowed, "class_attention", "m")
    with pytest.raises(ValueError, match="subset"):
        check_explanations(("rise", "lime"), "rise")
    with pytest.raises(ValueError, match="default explanation"):
        check_explanations(("rise",), "grad_cam")
    # a method the network cannot give is a 422 naming the problem, not a server error
    with pytest.raises(BadInputError, match="class-attention map is PatchConvNet's"):
        explanation_map(_QuadrantClassifier(), torch.ones(1, 32, 32), "class_attention", 0)


def _oblique_volume(path, size=(40, 36, 12)):
    rng = np.random.default_rng(0)
    array = rng.normal(0, 300, size[::-1]).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.3, 0.9, 2.5))
    image.SetOrigin((12.5, -30.25, 100.0))
    a = math.radians(25)
    rotation = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    image.SetDirection((rotation @ np.diag([-1.0, 1.0, 1.0])).ravel().tolist())
    sitk.WriteImage(image, str(path))
    return image


def test_preprocessing_inverts_onto_the_input_grid(tmp_path):
    """Transforms + Invertd bring a working-grid result back onto an oblique, flipped input grid exactly."""
    from monai.transforms import Compose, Invertd

    from monailabel_app.lib.image_io import read_header, write_on_grid
    from monailabel_app.lib.preprocess import Preprocessing

    path = tmp_path / "oblique.nii.gz"
    original = _oblique_volume(path)
    prep = Preprocessing(spacing=(3.0, 3.0), roi_size=(32, 32))
    header = read_header(str(path))
    pre = Compose(prep.transforms(header.dims))
    d = pre({"image": str(path)})
    assert tuple(d["image"].shape) == (1, 32, 32, 12)
    # An asymmetric pattern on the working grid: the octant of each voxel, 1..8, so a flipped or permuted
    # inverse puts the wrong values in the wrong places.
    working = d["image"].shape[1:]
    centre = [(n - 1) / 2 for n in working]
    i, j, k = np.meshgrid(*[np.arange(n) for n in working], indexing="ij")
    pattern = 1 + (i > centre[0]) + 2 * (j > centre[1]) + 4 * (k > centre[2])
    d["pred"] = d["image"].clone()
    d["pred"][0] = torch.as_tensor(pattern, dtype=d["image"].dtype)
    working_affine = np.asarray(d["image"].affine, dtype=np.float64)  # working index -> RAS mm
    back = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True)(d)["pred"]
    assert tuple(back.shape[1:]) == header.size
    out = sitk.ReadImage(write_on_grid(back.numpy()[0], header, str(tmp_path / "out.nii.gz")))
    assert out.GetSize() == original.GetSize()
    np.testing.assert_allclose(out.GetSpacing(), original.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(out.GetOrigin(), original.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(out.GetDirection(), original.GetDirection(), atol=1e-6)

    # Independently: where does each input voxel's centre fall on the working grid? (ITK index -> LPS mm ->
    # RAS mm -> working index, from the two grids' geometry only.) The label there is the expected value.
    got = sitk.GetArrayFromImage(out).transpose(2, 1, 0)  # (x, y, z) index order
    index = np.stack(np.meshgrid(*[np.arange(n) for n in original.GetSize()], indexing="ij"), axis=-1).reshape(-1, 3)
    direction = np.array(original.GetDirection()).reshape(3, 3)
    lps = np.array(original.GetOrigin()) + (index * np.array(original.GetSpacing())) @ direction.T
    ras = lps * np.array([-1.0, -1.0, 1.0])
    continuous = (ras - working_affine[:3, 3]) @ np.linalg.inv(working_affine[:3, :3]).T
    margin = 0.6  # nearest-neighbour rounding is ambiguous within half a voxel of an octant border or the edge
    inside = np.all((continuous > -0.5 + margin) & (continuous < np.array(working) - 0.5 - margin), axis=1)
    clear = inside & np.all(np.abs(continuous - np.array(centre)) > margin, axis=1)
    expected = (
        1 + (continuous[:, 0] > centre[0]) + 2 * (continuous[:, 1] > centre[1]) + 4 * (continuous[:, 2] > centre[2])
    )
    values = got.reshape(-1)[clear]
    assert clear.sum() > 0.3 * len(clear) and set(np.unique(expected[clear])) == set(range(1, 9))
    np.testing.assert_array_equal(values, expected[clear])


def test_safe_datastore_validates_and_keeps_history(tmp_path):
    from monailabel_app.lib.datastore import SafeLocalDatastore

    studies = tmp_path / "studies"
    studies.mkdir()
    image = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16))
    sitk.WriteImage(image, str(studies / "img.nii.gz"))
    store = SafeLocalDatastore(str(studies), extensions=("*.nii.gz",))
    first, second = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    label = sitk.GetImageFromArray(np.ones((4, 5, 6), np.uint8))
    sitk.WriteImage(label, str(first))
    label2 = sitk.GetImageFromArray(np.full((4, 5, 6), 2, np.uint8))
    sitk.WriteImage(label2, str(second))
    store.save_label("img", str(first), "final", {})
    store.save_label("img", str(second), "final", {})
    current = sitk.GetArrayFromImage(sitk.ReadImage(store.get_label_uri("img", "final")))
    assert current.max() == 2
    history = store.label_history("img", "final")
    assert len(history) == 1 and sitk.GetArrayFromImage(sitk.ReadImage(history[0])).max() == 1

    wrong = tmp_path / "wrong.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 5, 7), np.uint8)), str(wrong))
    with pytest.raises(BadInputError, match="size"):
        store.save_label("img", str(wrong), "final", {})
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"this is not an image")
    with pytest.raises(BadInputError, match="not a readable image"):
        store.save_label("img", str(corrupt), "final", {})
    with pytest.raises(NotFoundError):
        store.save_label("nope", str(first), "final", {})
    assert sitk.GetArrayFromImage(sitk.ReadImage(store.get_label_uri("img", "final"))).max() == 2
    assert len(store.label_history("img", "final")) == 1

    nan_image = tmp_path / "nan.nii.gz"
    nan_array = np.zeros((3, 3, 3), np.float32)
    nan_array[1, 1, 1] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(nan_array), str(nan_image))
    with pytest.raises(BadInputError, match="NaN"):
        store.add_image("nan", str(nan_image), {})
    assert store.list_images() == ["img"]
    store.update_scores("img", "a", {"dice": 0.5})
    store.update_scores("img", "b", {"dice": 0.7})
    assert store.get_image_info("img")["scores"] == {"a": {"dice": 0.5}, "b": {"dice": 0.7}}


@pytest.mark.parametrize("flip", [False, True])
def test_resample_to_input_grid_fast_path_matches_spatial_resample(flip: bool):
    """The separable path for axis-aligned grids gives MONAI SpatialResample's values (the general path)."""
    from monai.data import MetaTensor

    from monailabel_app.lib.transforms.resample import ResampleToInputGridd

    class GeneralPath(ResampleToInputGridd):
        @staticmethod
        def _axis_aligned(working_affine, input_affine) -> bool:
            return False

    torch.manual_seed(0)
    # input grid: 0.8 x 0.8 x 3 mm, 90 x 70 x 12 voxels (x flipped when ``flip``); working grid: 3 mm in-plane,
    # 24 x 19 x 12, the slice axis shared (shifted by two slices)
    input_affine = torch.diag(torch.tensor([-0.8 if flip else 0.8, 0.8, 3.0, 1.0], dtype=torch.float64))
    input_affine[:3, 3] = torch.tensor([71.2 if flip else 0.0, 0.0, 0.0], dtype=torch.float64)
    working_affine = torch.diag(torch.tensor([3.0, 3.0, 3.0, 1.0], dtype=torch.float64))
    working_affine[:3, 3] = torch.tensor([0.5, -1.0, -6.0], dtype=torch.float64)
    values = torch.zeros(1, 24, 19, 12)
    values[0, 5:15, 4:12, 3:11] = torch.rand(10, 8, 8)
    ref = MetaTensor(torch.zeros(1, 24, 19, 12), affine=working_affine)
    ref.meta["original_affine"] = input_affine
    ref.meta["spatial_shape"] = np.array([90, 70, 12])
    assert ResampleToInputGridd._axis_aligned(working_affine, input_affine)
    fast = ResampleToInputGridd(keys="p")({"p": values.clone(), "image": ref})["p"]
    general = GeneralPath(keys="p")({"p": values.clone(), "image": ref})["p"]
    assert fast.shape == general.shape == (1, 90, 70, 12)
    assert float(general.abs().sum()) > 0
    torch.testing.assert_close(fast, general, atol=1e-4, rtol=0)

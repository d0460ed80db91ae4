# Copyright MedAttnSlicer contributors. Apache-2.0.
"""How the bundled models' quality is measured: recipes chosen on a validation split of the training volumes
(``monailabel_app.select_recipe``), leave-one-volume-out figures per recipe (``train_bundled --leave-one-out``), and
what ``bundled_weights.json`` records of both."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from monailabel_app.select_recipe import TIE, choose, parse_candidate, split_datastores
from monailabel_app.train_bundled import HELD_OUT_IMAGES, LABELLED_VOLUMES, TRAIN_IMAGES, _keeps_leave_one_out
from monailabel_app.train_bundled import train_request as bundled_request
from networks.registry import FAMILIES

BUNDLED = Path(__file__).resolve().parent.parent / "monailabel_app" / "model"
REPORT = json.loads((BUNDLED / "bundled_weights.json").read_text())


def test_candidates_parse_as_request_parameters():
    assert parse_candidate("max_epochs=1000, learning_rate=1e-3,loss=dicece") == {
        "max_epochs": 1000,
        "learning_rate": 0.001,
        "loss": "dicece",
    }
    with pytest.raises(ValueError, match="not key=value"):
        parse_candidate("max_epochs")


def _candidate(steps: int, dice: float) -> dict:
    return {"request": {"max_epochs": steps}, "validation": {"fp32": {"dice": dice}}}


def test_the_best_validation_figure_wins_and_a_near_tie_goes_to_fewer_steps():
    assert choose([_candidate(300, 0.70), _candidate(1000, 0.80), _candidate(2000, 0.79)], "dice") == 1
    assert choose([_candidate(300, 0.80 - TIE / 2), _candidate(1000, 0.80)], "dice") == 0
    assert choose([_candidate(300, 0.80 - 2 * TIE), _candidate(1000, 0.80)], "dice") == 1


def test_the_validation_split_cuts_the_training_ct_and_never_touches_the_held_out_ct(tmp_path: Path):
    fit, validation, split = split_datastores(tmp_path, ("liver",))
    original = sitk.ReadImage(str(tmp_path / "train_liver" / "example_ct.nii.gz"))
    array = sitk.GetArrayFromImage(original)
    # every slice of the training CT in exactly one block; each image stacks its blocks in order
    ranges = {role: [range(*b) for b in split[f"{role}_blocks"]] for role in ("fit", "validation")}
    assert sorted(i for blocks in ranges.values() for b in blocks for i in b) == list(range(len(array)))
    for role, folder in (("fit", fit), ("validation", validation)):
        stacked = sitk.ReadImage(str(folder / f"example_ct_{role}.nii.gz"))
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(stacked), np.concatenate([array[b.start : b.stop] for b in ranges[role]])
        )
        assert stacked.GetSpacing() == original.GetSpacing() and stacked.GetDirection() == original.GetDirection()
    # about a third of the slices, and of the liver's, validate; the MR only fits; the held-out CT is nowhere
    validation_slices = {i for b in ranges["validation"] for i in b}
    liver = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "train_liver/labels/final/example_ct.nii.gz"))) == 1
    liver_slices = set(np.flatnonzero(liver.reshape(len(array), -1).any(axis=1)))
    assert 0.25 < len(validation_slices) / len(array) < 0.4
    assert 0.2 < len(liver_slices & validation_slices) / len(liver_slices) < 0.45
    assert split["fit"] == ["example_ct_fit", "example_mr_sm"] and split["validation"] == ["example_ct_validation"]
    names = {p.name for p in (*fit.glob("*.nii.gz"), *validation.glob("*.nii.gz"))}
    assert names == {"example_ct_fit.nii.gz", "example_mr_sm.nii.gz", "example_ct_validation.nii.gz"}
    assert split["never_seen"] == list(HELD_OUT_IMAGES)


def test_a_fold_trains_on_every_volume_it_names_even_the_sample_datastores_held_out_ct(tmp_path: Path):
    """The sample datastore's notes keep example_ct_dicom out of training; a leave-one-volume-out fold that names it
    as a training volume must train on it (the app's train task reads the same notes)."""
    from monailabel_app.lib.trainers.datalist import read_training_roles, split_datalist
    from monailabel_app.train_bundled import build_datastores

    train_dir, held_dir = build_datastores(tmp_path, ("liver",), ("example_ct", "example_ct_dicom"), ("example_mr_sm",))
    datalist = [{"image": str(p)} for p in sorted(train_dir.glob("*.nii.gz"))]
    assert len(datalist) == 2
    assert split_datalist(datalist, read_training_roles(str(train_dir)), val_split=0.0) is None  # all trained on
    assert [p.name for p in held_dir.glob("*.nii.gz")] == ["example_mr_sm.nii.gz"]


def test_leave_one_out_figures_describe_a_recipe_not_one_set_of_weights():
    figures = {"request": {"max_epochs": 300, "lr": 0.002}, "int8_recipe": {"calibration_slices": 32}}
    entry = {"request": {"lr": 0.002, "max_epochs": 300}, "int8_recipe": {"calibration_slices": 32}}
    assert _keeps_leave_one_out({"leave_one_volume_out": figures}, entry)
    assert not _keeps_leave_one_out({"leave_one_volume_out": figures}, {**entry, "request": {"max_epochs": 600}})
    assert not _keeps_leave_one_out({"leave_one_volume_out": figures}, {**entry, "int8_recipe": {"other": 1}})
    assert not _keeps_leave_one_out({}, entry)


SHIPPED = [f for f, spec in FAMILIES.items() if spec.bundled]


@pytest.mark.parametrize("family", SHIPPED)
def test_every_shipped_family_reports_leave_one_volume_out_figures_of_its_recipe(family: str):
    figures = REPORT["families"][family]["leave_one_volume_out"]
    assert figures["request"] == bundled_request(FAMILIES[family], REPORT["seed"])
    assert set(figures["folds"]) == set(LABELLED_VOLUMES) == {*TRAIN_IMAGES, *HELD_OUT_IMAGES}
    metric = figures["metric"]
    for held, fold in figures["folds"].items():
        assert held not in fold["trained_on"] and set(fold["trained_on"]) | {held} == set(LABELLED_VOLUMES)
        for precision, summary in figures["summary"].items():
            assert summary["min"] <= fold[precision][metric] <= summary["max"]


def test_a_recorded_recipe_selection_is_the_registry_recipe():
    """Where bundled_weights.json records how a family's recipe was chosen, the registry trains with that choice."""
    selected = {f: e["recipe_selection"] for f, e in REPORT["families"].items() if "recipe_selection" in e}
    assert "sadnn_seg" in selected
    for family, selection in selected.items():
        request = bundled_request(FAMILIES[family], REPORT["seed"])
        assert {k: request[k] for k in selection["chosen"]} == selection["chosen"], family
        assert selection["split"]["never_seen"] == list(HELD_OUT_IMAGES)
        assert (
            selection["candidates"][choose(selection["candidates"], selection["metric"])]["overrides"]
            == (selection["chosen"])
        )

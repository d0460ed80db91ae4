# Copyright MedAttnSlicer contributors. Apache-2.0.
"""The model-family registry is the one place a family is described (issue 12).

- every table of the app, the bundled-weights trainer, the model cards and the benchmarks is derived from it;
- it describes the bundled weights as they are (networks, keywords, preprocessing, labels, recipes they record);
- no other module writes a family's sizes, keywords, recipe or model lists as literals (an AST scan);
- a family registered later (one entry, here a tiny network registered with the factory) appears in the served
  names, the task configs, the trainer and the cards without any other edit, and is served with a card.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from networks.registry import (
    FAMILIES,
    Int8Recipe,
    ModelFamily,
    TrainingRecipe,
    card_variants,
    default_model_order,
    get_family,
    list_families,
    register_family,
    served_model_names,
    unregister_family,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED = REPO_ROOT / "monailabel_app" / "model"


# ------------------------------------------------------------------------------------------- derived tables
def test_app_tables_are_the_registry():
    from monailabel_app.lib.app_config import FAMILY_OF, MODEL_NAMES
    from monailabel_app.lib.configs import CONFIGS, ClassificationConfig, SegmentationConfig
    from monailabel_app.lib.model_store import MODEL_SPECS

    families = list_families()
    assert list(MODEL_SPECS) == [f.family for f in families] and all(MODEL_SPECS[f.family] is f for f in families)
    assert dict(MODEL_NAMES) == served_model_names()
    assert dict(FAMILY_OF) == {name: family for name, (family, _) in served_model_names().items()}
    # every family is served in FP32, INT8 too exactly when it has an INT8 recipe; INT8 is listed first
    for f in families:
        names = [n for n, (family, _) in MODEL_NAMES.items() if family == f.family]
        assert names == ([f"{f.family}_int8"] if f.int8 else []) + [f"{f.family}_fp32"]
    assert {name: cls for name, cls in CONFIGS.items()} == {
        f.family: ClassificationConfig if f.task == "classification" else SegmentationConfig for f in families
    }


def test_default_order_follows_the_ranks():
    order = default_model_order()
    ranked = sorted((f for f in list_families() if f.default_rank is not None), key=lambda f: f.default_rank)
    assert [n.rsplit("_", 1)[0] for n in order] == [f.family for f in ranked for _ in f.precisions]
    assert order[0].endswith("_int8") and order[0] == ranked[0].served_name("int8")
    assert all(get_family(n.rsplit("_", 1)[0]).task == "segmentation" for n in order)


def test_app_default_order_is_the_registry_order():
    import importlib
    import sys

    sys.path.insert(0, str(REPO_ROOT / "monailabel_app"))
    try:
        main = importlib.import_module("monailabel_app.main")
    finally:
        sys.path.remove(str(REPO_ROOT / "monailabel_app"))
    assert default_model_order() == main._DEFAULT_ORDER


def test_trainer_recipes_are_the_registry_recipes():
    from monailabel_app.train_bundled import train_request

    for f in list_families():
        request = train_request(f, seed=3)
        assert request["model"] == f.family and request["seed"] == 3 and request["pretrained"] is False
        assert {k: request[k] for k in f.training.request()} == f.training.request()
        assert request["train_batch_size"] == f.training.train_batch_size
        assert request["calibration_slices"] == (f.int8 or Int8Recipe()).calibration_slices


def test_card_models_are_the_registry_variants():
    from networks.model_card import CARD_MODELS

    variants = card_variants()
    assert list(CARD_MODELS) == list(variants)
    for name, (kwargs, shape, calibration) in CARD_MODELS.items():
        v = variants[name]
        assert kwargs == v.factory_kwargs and shape == (1, *v.input_shape) and calibration == (1, *v.calibration_input)
    # every family with a paper-size default has a card of it
    assert {f.paper.factory_name for f in list_families() if f.paper} <= set(CARD_MODELS)


def test_benchmark_lists_are_registry_variants():
    from benchmarks import int8_portability, quantization

    assert set(int8_portability.FAMILIES) == {f.family for f in list_families() if f.int8}
    paper = {(f.paper.factory_name, tuple(f.paper.input_shape)) for f in list_families() if f.paper}
    assert {(s.factory_name, s.input_shape[1:]) for s in quantization.FULL_SPECS} <= paper
    small = {f.small.factory_name: f.small for f in list_families() if f.small}
    for spec in quantization.QUICK_SPECS:
        assert spec.factory_kwargs == small[spec.factory_name].factory_kwargs


# ------------------------------------------------------------------------------- the registry describes the bundle
def _listify(value):
    if isinstance(value, (tuple, list)):
        return [_listify(v) for v in value]
    if isinstance(value, dict):
        return {k: _listify(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("family", [f.family for f in list_families() if f.bundled])
def test_registry_describes_the_bundled_weights(family: str):
    """The bundled checkpoint of each family is the registry's network, preprocessing and labels, and the INT8
    artifact exists exactly for families with an INT8 recipe."""
    from networks.checkpoint import read_checkpoint

    entry = get_family(family)
    checkpoint = read_checkpoint(BUNDLED / f"{family}.pt")
    app = checkpoint["metadata"]["app"]
    assert checkpoint["factory_name"] == entry.factory_name
    kwargs = dict(checkpoint["factory_kwargs"])
    assert kwargs.pop("out_channels") == len(entry.labels) + (1 if entry.task == "segmentation" else 0)
    assert kwargs == _listify(entry.factory_kwargs)
    assert app["preprocess"]["spacing"] == list(entry.spacing)
    assert app["preprocess"]["roi_size"] == list(entry.input_size)
    assert app["spatial_dims"] == entry.spatial_dims
    classes = app.get("labels") or app.get("classes")
    assert (list(classes) if isinstance(classes, dict) else classes) == list(entry.labels)
    assert (BUNDLED / f"{family}_int8.pt").is_file() == (entry.int8 is not None)


def test_bundled_report_records_the_registry_recipes():
    """``bundled_weights.json`` records the request each family was trained with: exactly the registry recipe, so
    ``make weights`` retrains what is shipped."""
    from monailabel_app.train_bundled import train_request

    report = json.loads((BUNDLED / "bundled_weights.json").read_text())
    assert set(report["families"]) == {f for f, spec in FAMILIES.items() if spec.bundled}
    for family, recorded in report["families"].items():
        entry = get_family(family)
        assert recorded["organs"] == list(entry.labels)
        expected = train_request(entry, report["seed"])
        assert recorded["request"] == expected, family


# ------------------------------------------------------------------------------------- no other place names them
SCANNED = ("networks", "monailabel_app", "benchmarks", "tests", "sample_data", "sample_models", "MedAttnSlicer")
# trained_models.py holds the test suite's and benchmarks' own small training configurations (not families; the
# registry's ``small`` variants are their card and benchmark sizes)
NOT_SCANNED = {
    "networks/registry.py",
    "sample_models/trained_models.py",
    "tests/test_registry.py",
}
# the tables the registry replaced: bound elsewhere only to something derived, never to a literal
DERIVED_NAMES = {
    "MODEL_SPECS",
    "MODEL_NAMES",
    "FAMILY_OF",
    "RECIPES",
    "CARD_MODELS",
    "_DEFAULT_ORDER",
    "QUALITY_FLOORS",
    "FAMILIES",
}


def _sources() -> Iterator[tuple[str, ast.Module]]:
    for top in SCANNED:
        for path in sorted((REPO_ROOT / top).rglob("*.py")):
            rel = path.relative_to(REPO_ROOT).as_posix()
            if rel not in NOT_SCANNED:
                yield rel, ast.parse(path.read_text(), filename=rel)


def _literal(node: ast.AST):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _fingerprints() -> tuple[list[dict], set[tuple], list[dict], set[frozenset]]:
    """What only the registry may write: network keywords, long size tuples, recipes, family lists."""
    families = list_families()
    kwargs = []
    for f in families:
        for k in [f.factory_kwargs] + [v.factory_kwargs for v in (f.paper, f.small, *f.baselines) if v is not None]:
            if len(k) >= 2 or any(isinstance(v, (tuple, list)) and len(v) >= 3 for v in k.values()):
                kwargs.append(_listify(k))
    # the served networks' widths and the 3D spacing (the small variants' keywords are checked as whole dicts above:
    # their strides also configure the test suite's own networks)
    tuples = {
        tuple(v)
        for f in families
        for v in _listify(f.factory_kwargs).values()
        if isinstance(v, list) and len(v) >= 3 and all(isinstance(x, (int, float)) for x in v)
    }
    tuples |= {tuple(f.spacing) for f in families if f.spatial_dims == 3}
    recipes = [f.training.request() for f in families]
    lists = {
        frozenset(f.family for f in families),
        frozenset(f.family for f in families if f.int8),
        frozenset(f.family for f in families if f.server_training),
        frozenset(default_model_order()),
    }
    lists |= {frozenset(f.family for f in list_families(task)) for task in ("segmentation", "classification")}
    return kwargs, tuples, recipes, lists


def _hashable(values) -> bool:
    return all(isinstance(v, (int, float, str, bool)) or v is None for v in values)


def _same_recipe(literal: dict, recipe: dict) -> bool:
    """A literal with a recipe's steps, learning rate and samples per volume (other keys may differ)."""
    keys = ("max_epochs", "learning_rate", "num_samples")
    return all(k in literal and literal[k] == recipe[k] for k in keys)


def _findings(rel: str, tree: ast.Module, fingerprints) -> list[str]:
    kwargs, tuples, recipes, lists = fingerprints
    found = []
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', '?')}"
        literal_table = (ast.Dict, ast.Tuple, ast.List, ast.Set, ast.DictComp)
        if (
            isinstance(node, ast.Assign)
            and any(getattr(t, "id", None) in DERIVED_NAMES for t in node.targets)
            and isinstance(node.value, literal_table)
        ):
            found.append(f"{where}: a literal table the registry derives")
        if isinstance(node, ast.Dict):
            value = _literal(node)
            if isinstance(value, dict):
                value = _listify(value)
                if value in kwargs:
                    found.append(f"{where}: a family's network keywords {value}")
                if "max_epochs" in value and any(_same_recipe(value, r) for r in recipes):
                    found.append(f"{where}: a family's training recipe {value}")
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            value = _literal(node)
            if value is None:
                continue
            if isinstance(value, (tuple, list)) and _hashable(value) and tuple(value) in tuples:
                found.append(f"{where}: a family's sizes {value}")
            if len(value) >= 2 and all(isinstance(v, str) for v in value) and frozenset(value) in lists:
                found.append(f"{where}: a list of families or served models {sorted(value)}")
    return found


def test_no_other_module_hard_codes_family_facts():
    fingerprints = _fingerprints()
    found = [f for rel, tree in _sources() for f in _findings(rel, tree, fingerprints)]
    assert not found, "family facts outside networks/registry.py:\n" + "\n".join(found)


# what the registry replaced, as it was written before (model_store.py, train_bundled.py, main.py, preprocess.py,
# benchmarks/int8_portability.py): each line must be flagged
_OLD_DEFINITIONS = """
MODEL_SPECS = {"unet": ModelSpec("unet_seg", "segmentation", "unet_baseline", {"features": (8, 16, 32, 64, 128, 8)})}
spec = ModelSpec("sadnn_seg3d", "segmentation", "sadnn_seg_small", {"spatial_dims": 3, "features": (4, 8, 16, 32, 32)})
recipe = Recipe("sadnn_seg", ("liver",), {"max_epochs": 600, "num_samples": 6, "learning_rate": 2e-3, "pos_ratio": 0.5})
order = ("sadnn_seg_int8", "sadnn_seg_fp32", "unet_seg_int8", "unet_seg_fp32", "sadnn_seg3d_fp32")
volume = Preprocessing(spacing=(6.0, 6.0, 6.0), roi_size=(64, 64, 64), features=[8, 16, 32, 64, 128, 8])
int8_families = ("sadnn_seg", "sadnn_cls", "unet_seg", "hct_cls", "scopeformer_cls", "patchconvnet_cls")
"""


def test_the_scan_flags_the_old_definitions():
    found = _findings("old.py", ast.parse(_OLD_DEFINITIONS), _fingerprints())
    flagged_lines = {int(f.split(":")[1]) for f in found}
    assert flagged_lines == set(range(2, 8)), found


# --------------------------------------------------------------------------------------- adding a family
@pytest.fixture
def tiny_family() -> Iterator[ModelFamily]:
    """One extra family registered in this process (tests/tiny_family.py: a factory entry and one registry entry)."""
    from tests import tiny_family as module

    entry = module.register()
    try:
        yield entry
    finally:
        unregister_family(entry.family)


def test_a_registered_family_appears_everywhere(tiny_family: ModelFamily, tmp_path: Path):
    family, network_name = tiny_family.family, tiny_family.factory_name
    from monailabel_app.lib.app_config import FAMILY_OF, MODEL_NAMES, AppConfig
    from monailabel_app.lib.configs import CONFIGS, SegmentationConfig
    from monailabel_app.lib.model_store import MODEL_SPECS, NetworkCache
    from monailabel_app.train_bundled import train_request
    from networks.model_card import CARD_MODELS

    assert MODEL_NAMES[f"{family}_int8"] == (family, "int8") and FAMILY_OF[f"{family}_fp32"] == family
    assert MODEL_SPECS[family] is tiny_family and CONFIGS[family] is SegmentationConfig
    assert train_request(tiny_family, 0)["max_epochs"] == 1 and train_request(tiny_family, 0)["calibration_slices"] == 4
    assert CARD_MODELS[network_name] == ({}, (1, 1, 32, 32), (1, 1, 32, 32))
    app_dir = tmp_path / "app"
    (app_dir / "model").mkdir(parents=True)
    config = AppConfig.from_conf(str(app_dir), {"models": family, "model_dir": str(tmp_path / "trained")})
    assert config.models == [f"{family}_int8", f"{family}_fp32"]
    assert f"{family}_int8" in AppConfig.from_conf(str(app_dir), {"model_dir": str(tmp_path / "trained")}).models
    task_config = CONFIGS[family]()
    task_config.init(family, config.model_dir, {}, None, app_config=config, cache=NetworkCache())
    infers = task_config.infer()
    assert set(infers) == {f"{family}_int8", f"{family}_fp32"} and infers[f"{family}_int8"].twin == f"{family}_fp32"
    assert task_config.trainer() is not None  # server_training defaults to True


def _publish_random_weights(entry: ModelFamily, app_dir: Path, model_dir: Path):
    """Publish random FP32 + INT8 weights of ``entry`` into ``model_dir`` through the trainers' own code (as a
    training run ends); returns the family's task config, its FP32 network and the published versions."""
    from monailabel_app.lib.app_config import AppConfig
    from monailabel_app.lib.configs import CONFIGS
    from monailabel_app.lib.model_store import NetworkCache
    from monailabel_app.lib.preprocess import Preprocessing
    from monailabel_app.lib.trainers.common import initial_network, publish_trained

    torch.manual_seed(0)
    (app_dir / "model").mkdir(parents=True, exist_ok=True)
    config = AppConfig.from_conf(str(app_dir), {"models": entry.family, "model_dir": str(model_dir)})
    task_config = CONFIGS[entry.family]()
    task_config.init(entry.family, config.model_dir, {}, None, app_config=config, cache=NetworkCache())
    labels = {name: i + 1 for i, name in enumerate(entry.labels)}
    network, factory_name, factory_kwargs, _ = initial_network(entry, task_config.files, 2, list(labels), False)
    prep = Preprocessing(spacing=entry.spacing, roi_size=entry.input_size)
    app_meta = {"labels": labels, "preprocess": prep.to_dict(), "spatial_dims": entry.spatial_dims}
    calibration = [torch.rand(2, 1, *entry.input_size) for _ in range(2)]
    published = publish_trained(
        entry, task_config.files, network.eval(), factory_name, factory_kwargs, app_meta, calibration, "test"
    )
    return task_config, network, published


@pytest.mark.slow
def test_a_registered_family_is_served_with_a_card(tiny_family: ModelFamily, tmp_path: Path):
    """Weights for the new family (random, published as the trainer publishes them) are served: the app's infer
    tasks load both precisions and the app's model cards describe them; the cards CLI cards its paper variant."""
    from monailabel_app.lib.model_cards import ModelCards
    from networks.model_card import registered_model_cards

    family, network_name = tiny_family.family, tiny_family.factory_name
    task_config, network, published = _publish_random_weights(tiny_family, tmp_path / "app", tmp_path / "trained")
    assert published["fp32"] and published["int8"]
    cards = ModelCards(str(tmp_path / "cards.json"))
    for precision in ("int8", "fp32"):
        name = f"{family}_{precision}"
        task = task_config.infer()[name]
        assert task.is_valid()
        card = cards.get(name, task.files, precision, bool(tiny_family.int8))
        assert card["precision"] == precision and card["factory_name"] == network_name
        assert card["params"] == sum(p.numel() for p in network.parameters())
        assert card["int8_size_bytes"] == (tmp_path / "trained" / f"{family}_int8.pt").stat().st_size
    [paper_card] = registered_model_cards([network_name], out_dir=tmp_path / "cards")
    assert paper_card["name"] == network_name and paper_card["input_shape"] == [1, 1, 32, 32]


@pytest.mark.slow
def test_a_family_module_is_served_by_a_real_server(tiny_family: ModelFamily, tmp_path: Path):
    """A server started with ``MEDATTN_FAMILY_MODULES=tests.tiny_family`` (no edit of the project) lists the new
    family's models with their cards and train task in ``/info/`` and segments a sample volume with them."""
    from monailabel.client import MONAILabelClient

    from tests.image_checks import assert_same_grid, read_array
    from tests.server_fixture import copy_sample_datastore, start_server

    family = tiny_family.family
    model_dir = tmp_path / "trained"
    _publish_random_weights(tiny_family, tmp_path / "app", model_dir)
    studies = copy_sample_datastore(tmp_path / "studies", images=["example_mr_sm"])
    server = start_server(
        studies,
        {"models": f"{family},sadnn_seg_int8", "model_dir": str(model_dir)},
        env={"MEDATTN_FAMILY_MODULES": "tests.tiny_family"},
    )
    try:
        info = server.get("/info/").json()
        assert set(info["models"]) == {f"{family}_int8", f"{family}_fp32", "sadnn_seg_int8"}
        for precision in ("int8", "fp32"):
            model = info["models"][f"{family}_{precision}"]
            assert model["family"] == family and model["precision"] == precision and model["type"] == "segmentation"
            assert model["model_card"]["factory_name"] == tiny_family.factory_name
            assert model["model_card"]["input_shape"] == [1, 1, *tiny_family.input_size]
        assert info["default_model"] == "sadnn_seg_int8"  # the tiny family has no default rank
        assert family in info["trainers"]
        label_file, params = MONAILabelClient(server.url).infer(f"{family}_int8", "example_mr_sm", {})
        label, label_image = read_array(label_file)
        _, image = read_array(server.studies / "example_mr_sm.nii.gz")
        assert_same_grid(label_image, image)  # back on the input grid through the family's own 32 x 32 slices
        assert params["model"] == f"{family}_int8" and params["precision"] == "int8"
        assert set(np.unique(label)) <= {0, 1}
    finally:
        server.stop()


def test_registry_rejects_inconsistent_entries():
    base = dict(
        family="x_seg",
        task="segmentation",
        description="",
        factory_name="sadnn_seg_small",
        labels=("liver",),
        input_size=(32, 32),
        spacing=(1.0, 1.0),
        training=TrainingRecipe(max_epochs=1, num_samples=1, learning_rate=1e-3, pos_ratio=0.5),
    )
    with pytest.raises(ValueError, match="task"):
        ModelFamily(**{**base, "task": "detection"})
    with pytest.raises(ValueError, match="_int8/_fp32"):
        ModelFamily(**{**base, "family": "x_int8"})
    with pytest.raises(ValueError, match="2D or 3D alike"):
        ModelFamily(**{**base, "spacing": (1.0, 1.0, 1.0)})
    with pytest.raises(ValueError, match="explanations"):
        ModelFamily(**{**base, "task": "classification"})
    with pytest.raises(ValueError, match="explanations apply"):
        ModelFamily(**{**base, "explanations": ("rise",)})
    with pytest.raises(TypeError):
        ModelFamily("x_seg", "segmentation")  # keyword fields only
    with pytest.raises(ValueError, match="already registered"):
        register_family(get_family("sadnn_seg"))
    with pytest.raises(KeyError, match="unknown model family"):
        get_family("no_such_family")
    with pytest.raises(ValueError, match="not served at"):
        get_family("sadnn_seg3d").served_name("int8")


def test_family_lists_on_command_lines_name_only_known_families():
    import argparse

    from networks.registry import family_list

    parse = family_list(["sadnn_seg", "unet_seg"])
    assert parse("sadnn_seg, unet_seg,") == ["sadnn_seg", "unet_seg"]
    with pytest.raises(argparse.ArgumentTypeError, match=r"unknown families \['nope'\]"):
        parse("sadnn_seg,nope")

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Train the weights bundled with the app (``make weights``), reproducibly, on the sample data.

    python -m monailabel_app.train_bundled [--out monailabel_app/model] [--families sadnn_seg,unet_seg,...]

What it does (fixed seeds, CPU, the app's own train tasks so bundled and server-trained models share one code
path):

1. fetches the sample data and builds two MONAI Label datastores with :mod:`sample_data`:
   training = ``example_ct`` (CT) + ``example_mr_sm`` (MR); held out = ``example_ct_dicom``, another patient.
   ``example_ct_sm`` is a crop of ``example_ct`` (``datastore_notes.json``), so it is neither trained on nor used
   for evaluation. Labels are TotalSegmentator model outputs, not manual ground truth.
2. trains each family with the app's train task (``SegmentationTrain`` / ``ClassificationTrain``) with no
   validation split (no data to spare: the final weights are kept), re-quantises it on real labelled slices and
   publishes FP32 + INT8 into a work folder;
3. evaluates every model on the held-out CT through the app's infer tasks (Dice against the TotalSegmentator
   label on the input grid; for the classifier, per-slice F1 of organ presence);
4. copies the files into ``--out`` and writes ``bundled_weights.json`` (command, seeds, data, times, held-out
   figures).

Families: every entry of :mod:`networks.registry`, which holds each one's recipe (``labels``: the organs trained
on; ``training``: the train task's request; ``int8``: the calibration); :func:`train_request` assembles the request.
Segmentation families learn the liver, the classifiers per-slice presence of liver, spleen, kidneys and stomach.
A run of some families (``--families hct_cls,scopeformer_cls,patchconvnet_cls``) replaces only their files and
their entries in ``bundled_weights.json``. ``--requantize`` trains nothing: it re-quantises the bundled FP32 weights
(INT8 families) the way a training run ends and re-evaluates them (``make requantize``), e.g. after a change of
the INT8 recipe.

``--leave-one-out`` trains nothing that is bundled: for each family it trains the recipe on all labelled volumes but
one (:data:`LABELLED_VOLUMES`: two CTs of different patients, ``example_ct`` native-phase by TotalSegmentator's own
phase prediction with its liver at a median 46 HU, ``example_ct_dicom`` contrast-enhanced at 93 HU, and one MR) and
evaluates on that one, and records each fold and the range under ``leave_one_volume_out`` (the fold holding out
``example_ct_dicom`` is the bundled model). The figures stay in ``bundled_weights.json`` while the family's train
request and INT8 recipe do. ``make weights`` runs both. How a recipe is chosen: :mod:`monailabel_app.select_recipe`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from monailabel_app.lib.model_store import ModelFiles, NetworkCache, file_version  # noqa: E402
from networks.isa import cpu_best_isa  # noqa: E402
from networks.registry import FAMILIES, Int8Recipe, ModelFamily, family_list  # noqa: E402

logger = logging.getLogger("train_bundled")

TRAIN_IMAGES = ("example_ct", "example_mr_sm")
HELD_OUT_IMAGES = ("example_ct_dicom",)
# every distinct labelled volume the registries reach (sample_data); the folds of --leave-one-out
LABELLED_VOLUMES = (*TRAIN_IMAGES, *HELD_OUT_IMAGES)


QUICK_EPOCHS = 2


def _datastore(path: Path):
    from monailabel.datastore.local import LocalDatastore

    return LocalDatastore(str(path), extensions=("*.nii.gz", "*.nii", "*.nrrd"), auto_reload=False)


def build_datastores(
    work: Path,
    organs: tuple[str, ...],
    train_images: tuple[str, ...] = TRAIN_IMAGES,
    held_out_images: tuple[str, ...] = HELD_OUT_IMAGES,
) -> tuple[Path, Path]:
    """(training datastore, held-out datastore) for ``organs`` under ``work``. The train task trains on every image
    of the training datastore: its notes' ``training`` roles (which leave ``example_ct_dicom`` out of training in
    the sample datastore, :mod:`monailabel_app.lib.trainers.datalist`) are replaced, so a leave-one-volume-out fold
    trains on the volumes it says."""
    from sample_data import build_datastore
    from sample_data.datastore import NOTES_FILENAME

    name = "_".join(organs)
    train = Path(build_datastore(organs, work / f"train_{name}", image_ids=train_images).path)
    held = Path(build_datastore(organs, work / f"heldout_{name}", image_ids=held_out_images).path)
    notes = json.loads((train / NOTES_FILENAME).read_text())
    notes["training"] = {
        "exclude": {},
        "validate_on": [],
        "derived_from": {},
        "note": f"train_bundled: trained on every image here ({', '.join(train_images)}); held out elsewhere",
    }
    write_report(train / NOTES_FILENAME, notes)
    return train, held


def train_request(family: ModelFamily, seed: int) -> dict[str, Any]:
    """The train task's request of ``family``'s recipe: from scratch, no validation split, on the CPU."""
    # a family without INT8 records the default calibration size, which its train task does not use
    int8 = family.int8 or Int8Recipe()
    return {
        "model": family.family,
        "train_batch_size": family.training.train_batch_size,
        "val_split": 0.0,
        "pretrained": False,
        "seed": seed,
        "calibration_slices": int8.calibration_slices,
        "device": "cpu",
        **family.training.request(),
    }


def run_train_task(family: ModelFamily, work: Path, request: dict[str, Any], datastore_dir: Path) -> dict[str, Any]:
    """Run the app's train task of ``family`` with ``request`` on the datastore in ``datastore_dir``, publishing into
    ``work / "models"``; returns the task's stats (with ``published``, ``train_seconds`` and ``request``)."""
    from monailabel_app.lib.trainers.classification import ClassificationTrain
    from monailabel_app.lib.trainers.segmentation import SegmentationTrain

    files = ModelFiles(family.family, str(work / "no_bundled_weights"), str(work / "models"))
    labels = {organ: i + 1 for i, organ in enumerate(family.labels)}
    task_type = ClassificationTrain if family.task == "classification" else SegmentationTrain
    task = task_type(family, files, labels)
    start = time.time()
    stats = task(dict(request), _datastore(datastore_dir))
    stats["train_seconds"] = round(time.time() - start, 1)
    stats["request"] = request
    return stats


def train_family(
    family: ModelFamily, work: Path, quick: bool, seed: int, train_images: tuple[str, ...] = TRAIN_IMAGES
) -> dict[str, Any]:
    """Train one family with the app's train task on ``train_images``; returns the task's stats (with
    ``published``)."""
    held_out = tuple(i for i in LABELLED_VOLUMES if i not in train_images)
    train_dir, _ = build_datastores(work, family.labels, train_images, held_out)
    request = train_request(family, seed)
    if quick:
        request["max_epochs"] = QUICK_EPOCHS
    return run_train_task(family, work, request, train_dir)


def requantize_family(family: ModelFamily, bundled: Path, work: Path, seed: int) -> dict[str, Any]:
    """Re-quantise the bundled FP32 weights of one family without training, exactly as a training run ends
    (calibration slices of the training datastore with the checkpoint's own preprocessing, then
    ``publish_trained``); the FP32 weights are published unchanged. Returns ``{"published": ...}``."""
    from monailabel_app.lib.preprocess import Preprocessing
    from monailabel_app.lib.trainers.common import calibration_slices, publish_trained
    from networks.checkpoint import load_checkpoint

    if not family.int8:
        raise ValueError(f"{family.family} has no INT8 variant to re-quantise")
    model, metadata = load_checkpoint(bundled / ModelFiles(family.family, str(bundled), str(bundled)).filename("fp32"))
    app_meta = dict(metadata["app"])
    train_dir, _ = build_datastores(work, family.labels)
    store = _datastore(train_dir)
    datalist = [
        {"image": store.get_image_uri(i), "label": store.get_label_uri(i, "final")}
        for i in sorted(store.get_labeled_images())
    ]
    labels = {organ: i + 1 for i, organ in enumerate(family.labels)}
    prep = Preprocessing.from_dict(app_meta["preprocess"])
    n_slices = family.int8.calibration_slices
    calibration, used = calibration_slices(datalist, prep, list(labels.values()), n_slices=n_slices, seed=seed)
    app_meta["calibration"] = {
        "slices": sum(len(b) for b in calibration),
        "images": [os.path.basename(p) for p in used],
    }
    files = ModelFiles(family.family, str(work / "no_bundled_weights"), str(work / "models"))
    published = publish_trained(
        family,
        files,
        model,
        metadata["factory_name"],
        metadata["factory_kwargs"],
        app_meta,
        calibration,
        f"requantize-{int(time.time())}",
    )
    return {"published": published}


def _infer_task(family: str, precision: str, work: Path, labels: dict[str, int]):
    from monailabel_app.lib.infers.base import ServedModel
    from monailabel_app.lib.infers.classification import ClassificationInfer
    from monailabel_app.lib.infers.segmentation import SegmentationInfer

    spec = FAMILIES[family]
    files = ModelFiles(family, str(work / "no_bundled_weights"), str(work / "models"))
    cls = ClassificationInfer if spec.task == "classification" else SegmentationInfer
    return cls(ServedModel(spec.served_name(precision), spec, files, precision, NetworkCache(), labels))


def _per_slice(comparison_map: Any) -> np.ndarray:
    """The over/under map the infer task returns (:mod:`monailabel_app.lib.comparison` values) as
    ``(voxels of a slice, slices)``, slices along its last axis."""
    values = np.asarray(comparison_map.detach().cpu() if isinstance(comparison_map, torch.Tensor) else comparison_map)
    return values.reshape(-1, values.shape[-1])


def _slice_interval(values: np.ndarray, dice: float) -> dict[str, Any]:
    """Bootstrap 95 % interval over slices of a volume's Dice against its reference, from :func:`_per_slice`."""
    from monailabel_app.lib.comparison import AGREEMENT, OVER, UNDER
    from monailabel_app.lib.intervals import pooled_dice_interval

    interval = pooled_dice_interval(*((values == v).sum(axis=0) for v in (AGREEMENT, OVER, UNDER)))
    # the same voxels as the task's own figure, or the map is not what this function takes it for
    if abs(interval["value"] - dice) > 1e-3:
        raise RuntimeError(f"per-slice counts give Dice {interval['value']}, the task reported {dice:.4f}")
    return interval


def _twin_agreement(fp32_map: np.ndarray, int8_map: np.ndarray) -> dict[str, Any]:
    """INT8 vs FP32 agreement Dice of the two predictions (foreground: agreement or over-segmentation in each map)
    with its bootstrap 95 % interval over slices."""
    from monailabel_app.lib.comparison import AGREEMENT, OVER
    from monailabel_app.lib.intervals import pooled_dice_interval

    a, b = np.isin(fp32_map, (AGREEMENT, OVER)), np.isin(int8_map, (AGREEMENT, OVER))
    interval = pooled_dice_interval((a & b).sum(axis=0), (b & ~a).sum(axis=0), (a & ~b).sum(axis=0))
    return {"dice": interval["value"], "dice_interval": [interval["low"], interval["high"]]}


def evaluate_segmentation(family: str, work: Path, datastore_dir: Path) -> dict[str, Any]:
    """Dice against the TotalSegmentator label (the family's one organ) of every image in ``datastore_dir``, FP32
    and INT8, with its bootstrap 95 % interval over the image's slices."""
    spec = FAMILIES[family]
    store = _datastore(datastore_dir)
    result: dict[str, Any] = {}
    maps: dict[tuple[str, str], np.ndarray] = {}
    for precision in ("fp32", "int8") if spec.int8 else ("fp32",):
        task = _infer_task(family, precision, work, {organ: i + 1 for i, organ in enumerate(spec.labels)})
        for image_id in sorted(store.get_labeled_images()):
            start = time.time()
            _, data = task(
                {
                    "image": store.get_image_uri(image_id),
                    "reference_path": store.get_label_uri(image_id, "final"),
                    "reference_name": "TotalSegmentator",
                    "skip_writer": True,
                    "logging": "WARNING",
                }
            )
            figures = data["result"]["comparison"]
            maps[image_id, precision] = _per_slice(data["pred"])
            interval = _slice_interval(maps[image_id, precision], figures["dice"])
            result.setdefault(image_id, {})[precision] = {
                "dice": round(figures["dice"], 4),
                "dice_interval": [interval["low"], interval["high"]],
                "over_ml": round(figures["over_ml"], 1),
                "under_ml": round(figures["under_ml"], 1),
                "reference_ml": round(figures["reference_ml"], 1),
                "seconds": round(time.time() - start, 2),
            }
    for image_id, figures in result.items():
        if "int8" in figures:
            figures["int8"]["agreement_with_fp32"] = _twin_agreement(maps[image_id, "fp32"], maps[image_id, "int8"])
    return result


def evaluate_classification(family: str, work: Path, datastore_dir: Path, organs: tuple[str, ...]) -> dict[str, Any]:
    """Per-slice organ-presence F1 (pooled over classes and every slice) of FP32 and INT8 on ``datastore_dir``, with
    its bootstrap 95 % interval over the slices."""
    from monai.transforms import Compose

    from monailabel_app.lib.intervals import pooled_dice_interval
    from monailabel_app.lib.model_store import load_network
    from monailabel_app.lib.preprocess import Preprocessing
    from monailabel_app.lib.transforms.labels import PresenceTargetd

    files = ModelFiles(family, str(work / "no_bundled_weights"), str(work / "models"))
    store = _datastore(datastore_dir)
    result: dict[str, Any] = {}
    decided: dict[tuple[str, str], torch.Tensor] = {}
    for precision in ("fp32", "int8"):
        network, meta = load_network(files.current(precision), precision)
        prep = Preprocessing.from_dict(meta["preprocess"])
        for image_id in sorted(store.get_labeled_images()):
            transforms = prep.transforms(3, label_key="label", label_values=list(range(1, len(organs) + 1)))
            d = Compose([*transforms, PresenceTargetd(keys="label", num_classes=len(organs))])(
                {"image": store.get_image_uri(image_id), "label": store.get_label_uri(image_id, "final")}
            )
            image = torch.as_tensor(d["image"]).as_subclass(torch.Tensor)[0].permute(2, 0, 1)[:, None]
            with torch.no_grad():
                decisions = torch.sigmoid(network(image.float())) >= 0.5  # (slices, classes)
            targets = torch.as_tensor(d["label"]).T.bool()
            decided[image_id, precision] = decisions
            per_slice = [(decisions & targets).sum(1), (decisions & ~targets).sum(1), (~decisions & targets).sum(1)]
            tp, fp, fn = (int(c.sum()) for c in per_slice)
            interval = pooled_dice_interval(*(c.numpy() for c in per_slice))
            per_class = {}
            for c, organ in enumerate(organs):
                t, p = targets[:, c], decisions[:, c]
                denominator = int(2 * (t & p).sum() + (p & ~t).sum() + (~p & t).sum())
                per_class[organ] = round(2 * int((t & p).sum()) / denominator, 4) if denominator else 1.0
            result.setdefault(image_id, {})[precision] = {
                "f1": round(2 * tp / (2 * tp + fp + fn), 4) if (tp + fp + fn) else 1.0,
                "f1_interval": [interval["low"], interval["high"]],
                "accuracy": round(float((decisions == targets).float().mean()), 4),
                "per_class_f1": per_class,
                "slices": int(image.shape[0]),
            }
    for image_id, figures in result.items():  # INT8 vs FP32: the share of equal presence decisions
        same = decided[image_id, "fp32"] == decided[image_id, "int8"]
        figures["int8"]["agreement_with_fp32"] = {"decisions": round(float(same.float().mean()), 4)}
    return result


def evaluate(family: str, work: Path, datastore_dir: Path) -> dict[str, Any]:
    """Held-out figures of ``family``'s models published under ``work`` on every image of ``datastore_dir``."""
    registered = FAMILIES[family]
    if registered.task == "classification":
        return evaluate_classification(family, work, datastore_dir, registered.labels)
    return evaluate_segmentation(family, work, datastore_dir)


def _same_request(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two train requests are the same recipe (compared as the JSON they are recorded as)."""
    return a is not None and b is not None and json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def leave_one_volume_out(
    family: ModelFamily, work: Path, seed: int, bundled_entry: dict[str, Any] | None = None, quick: bool = False
) -> dict[str, Any]:
    """Leave-one-volume-out figures of ``family``'s recipe: for each of :data:`LABELLED_VOLUMES`, train on the
    others with the bundled recipe and evaluate on it (FP32, INT8, INT8 vs FP32 agreement), then their range.

    The fold that holds out :data:`HELD_OUT_IMAGES` is the bundled model itself: its figures are taken from
    ``bundled_entry`` (its ``bundled_weights.json`` entry) when that was trained with the same request, otherwise
    it is trained like the others. Nothing here is published or bundled."""
    request = train_request(family, seed)
    if quick:
        request["max_epochs"] = QUICK_EPOCHS
    metric = "dice" if family.task == "segmentation" else "f1"
    folds: dict[str, Any] = {}
    for held in LABELLED_VOLUMES:
        train_images = tuple(v for v in LABELLED_VOLUMES if v != held)
        bundled_figures = ((bundled_entry or {}).get("held_out") or {}).get(held)
        if (held,) == HELD_OUT_IMAGES and bundled_figures and _same_request(bundled_entry.get("request"), request):
            figures, seconds, source = bundled_figures, bundled_entry.get("train_seconds"), "the bundled model"
        else:
            logger.info(f"--- {family.family}: training on {train_images}, holding out {held} ---")
            fold_work = work / "leave_one_out" / family.family / held
            shutil.rmtree(fold_work / "models", ignore_errors=True)
            stats = train_family(family, fold_work, quick, seed, train_images)
            _, held_dir = build_datastores(fold_work, family.labels, train_images, (held,))
            figures, seconds, source = (
                evaluate(family.family, fold_work, held_dir)[held],
                stats["train_seconds"],
                "trained",
            )
        folds[held] = {"trained_on": list(train_images), "model": source, "train_seconds": seconds, **figures}
    summary = {}
    for precision in ("fp32", "int8") if family.int8 else ("fp32",):
        values = [float(fold[precision][metric]) for fold in folds.values()]
        summary[precision] = {"min": min(values), "max": max(values), "mean": round(float(np.mean(values)), 4)}
    int8_recipe = family.int8.describe() if family.int8 else None
    return {"request": request, "int8_recipe": int8_recipe, "metric": metric, "folds": folds, "summary": summary}


def _keeps_leave_one_out(previous_entry: dict[str, Any], entry: dict[str, Any]) -> bool:
    """Whether ``previous_entry``'s leave-one-volume-out figures still describe ``entry``'s recipe (same train
    request and INT8 recipe): they describe a recipe, not one set of weights."""
    figures = previous_entry.get("leave_one_volume_out")
    return (
        bool(figures)
        and _same_request(figures.get("request"), entry.get("request"))
        and (figures.get("int8_recipe") == entry.get("int8_recipe"))
    )


def write_report(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def publish_bundle(work: Path, out: Path, families: list[str]) -> dict[str, Any]:
    """Copy the trained files into ``out`` (temp file, then rename) and return their versions."""
    out.mkdir(parents=True, exist_ok=True)
    versions: dict[str, Any] = {}
    for family in families:
        files = ModelFiles(family, str(work / "no_bundled_weights"), str(work / "models"))
        for precision in ("fp32", "int8") if FAMILIES[family].int8 else ("fp32",):
            source = files.current(precision)
            if source is None:
                raise FileNotFoundError(f"{family} {precision}: training published no file")
            size = os.path.getsize(source)
            if size > 3 * 1024 * 1024:
                raise ValueError(f"{source} is {size / 2**20:.2f} MiB; bundled weights must stay under 3 MB")
            target = out / os.path.basename(source)
            tmp = out / f".{target.name}.tmp"
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
            versions[target.name] = {**file_version(str(target)), "bytes": size}
    return versions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "model"), help="bundled weights folder")
    parser.add_argument("--work", default=str(REPO_ROOT / "runs" / "bundled"), help="scratch folder")
    shipped = [f for f, spec in FAMILIES.items() if spec.bundled]
    parser.add_argument(
        "--families",
        type=family_list(FAMILIES),
        default=",".join(shipped),
        help="comma list of " + ", ".join(FAMILIES) + " (default: the shipped)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epochs per family (a smoke test)")
    parser.add_argument(
        "--leave-one-out",
        action="store_true",
        help="do not touch the bundled weights: add each family's leave-one-volume-out figures (its recipe trained "
        "on all labelled volumes but one, evaluated on that one) to bundled_weights.json",
    )
    parser.add_argument(
        "--requantize",
        action="store_true",
        help="do not train: re-quantise the FP32 weights already in --out (INT8 families) and re-evaluate them",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    families = args.families
    if args.requantize:
        families = [f for f in families if FAMILIES[f].int8]
    work = Path(args.work).resolve()
    shutil.rmtree(work / "models", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    notes = Path(args.out).resolve() / "bundled_weights.json"
    previous_report = json.loads(notes.read_text()) if notes.exists() else {}

    command = "python -m monailabel_app.train_bundled " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.leave_one_out:
        if not previous_report:
            parser.error(f"--leave-one-out adds to {notes}, which does not exist: run make weights first")
        for family in families:
            entry = previous_report["families"].get(family, {})
            figures = leave_one_volume_out(FAMILIES[family], work, args.seed, entry, args.quick)
            report = json.loads(notes.read_text())  # read again: another run may have written meanwhile
            report["families"].setdefault(family, {})["leave_one_volume_out"] = {
                "command": command,
                "threads": args.threads,
                **figures,
            }
            write_report(notes, report)  # after each family: a long run keeps what it finished
            logger.info(f"{family}: leave-one-volume-out {json.dumps(figures['summary'])}")
        return 0

    report: dict[str, Any] = {
        "command": command,
        "seed": args.seed,
        "threads": args.threads,
        "quick": args.quick,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "labels_are": "TotalSegmentator model outputs (its test-suite reference files), NOT manual ground truth",
        "train_images": list(TRAIN_IMAGES),
        "held_out_images": list(HELD_OUT_IMAGES),
        "excluded": {"example_ct_sm": "a crop of example_ct (same voxels): neither trained on nor evaluated"},
        "families": {},
    }
    for family in families:
        registered = FAMILIES[family]
        if args.requantize:
            logger.info(f"=== re-quantising the bundled {family} ===")
            stats = requantize_family(registered, Path(args.out).resolve(), work, args.seed)
        else:
            logger.info(f"=== training {family} on {TRAIN_IMAGES} ({registered.labels}) ===")
            stats = train_family(registered, work, args.quick, args.seed)
        train_dir, held_dir = build_datastores(work, registered.labels)
        held_out, training = evaluate(family, work, held_dir), evaluate(family, work, train_dir)
        entry = {
            # per family: a run of some families keeps the others' entries (merged below) and their own commands
            "command": report["command"],
            "threads": args.threads,
            "organs": list(registered.labels),
            "request": stats.get("request"),
            "train_seconds": stats.get("train_seconds"),
            "final_train_metric": stats.get("best_metric"),
            "int8_agreement_on_calibration": (stats.get("published") or {}).get("int8_agreement"),
            "int8_recipe": registered.int8.describe() if registered.int8 else None,
            "held_out": held_out,
            "training_images": training,
        }
        previous_entry = previous_report.get("families", {}).get(family, {})
        if args.requantize:  # the training facts stay those of the run that made the FP32 weights
            entry.update(
                {key: previous_entry.get(key) for key in ("command", "request", "train_seconds", "final_train_metric")}
            )
            entry["requantized"] = {"command": report["command"], "machine_isa": cpu_best_isa()}
        if _keeps_leave_one_out(previous_entry, entry):
            entry["leave_one_volume_out"] = previous_entry["leave_one_volume_out"]
        if "recipe_selection" in previous_entry:  # how the recipe was chosen (python -m monailabel_app.select_recipe)
            entry["recipe_selection"] = previous_entry["recipe_selection"]
        report["families"][family] = entry
        logger.info(f"{family}: held-out {json.dumps(held_out)}")
    report["files"] = publish_bundle(work, Path(args.out).resolve(), families)
    report["total_seconds"] = round(time.time() - started, 1)
    previous = previous_report
    if previous and set(families) != set(previous.get("families", {})):
        merged_families = dict(previous.get("families", {}))
        merged_families.update(report["families"])
        merged_files = dict(previous.get("files", {}))
        merged_files.update(report["files"])
        report["families"], report["files"] = merged_families, merged_files
    write_report(notes, report)
    print(json.dumps({f: v["held_out"] for f, v in report["families"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

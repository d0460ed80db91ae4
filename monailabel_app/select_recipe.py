# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Choose a family's training recipe on a validation split of the training volumes, never on held-out data.

    python -m monailabel_app.select_recipe --family sadnn_seg --candidate max_epochs=300 --candidate max_epochs=1000

The split: the training CT (``example_ct``) is cut across its slices into blocks of 8 slices; every third block goes
to the validation image, the others to the fit image (each stacked into one volume). Each candidate (the registry
recipe with some request parameters changed) is trained by the app's train task on the fit image and the training
MR, then evaluated through the app's infer tasks on the validation image, FP32 and INT8. The held-out CT
(``example_ct_dicom``) is never seen. 2D segmentation families only.

The result goes into ``bundled_weights.json`` under the family's ``recipe_selection`` (protocol, every candidate's
validation figures, the chosen one: the best FP32 validation figure, the fewest steps among those within 0.005 of
it). Copy the chosen parameters into the family's ``training`` recipe in :mod:`networks.registry`
(``tests/test_evaluation_protocol.py`` checks that the registry recipe is the recorded choice). Then ``make weights``
trains the bundled model with it and ``train_bundled --leave-one-out`` reports its leave-one-volume-out figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from monailabel_app.train_bundled import (  # noqa: E402
    HELD_OUT_IMAGES,
    TRAIN_IMAGES,
    build_datastores,
    evaluate,
    run_train_task,
    train_request,
    write_report,
)
from networks.registry import FAMILIES, ModelFamily  # noqa: E402

logger = logging.getLogger("select_recipe")

SPLIT_IMAGE = "example_ct"
# blocks of 8 slices (24 mm at 3 mm), every third one validation: a validation slice is at most 8 slices from the
# nearest fit slice, and both cover the whole scanned range (chest, liver, abdomen, pelvis). One slab at one end
# would leave anatomy the model never saw as negatives: 300 steps measured Dice 0 on such a slab (767 ml called liver)
BLOCK_SLICES = 8
VALIDATION_EVERY = 3
# candidates whose validation figure is within this of the best count as equal: the one with fewer steps wins
TIE = 0.005


def parse_candidate(text: str) -> dict[str, Any]:
    """``"max_epochs=1000,learning_rate=1e-3"`` -> ``{"max_epochs": 1000, "learning_rate": 0.001}`` (numbers parsed,
    anything else kept as text)."""
    overrides: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"candidate parameter {part!r} is not key=value")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value.strip()
    return overrides


def _write_volume(image: Any, label: Any, folder: Path, name: str) -> None:
    import SimpleITK as sitk

    (folder / "labels" / "final").mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))
    sitk.WriteImage(label, str(folder / "labels" / "final" / f"{name}.nii.gz"))


def _stack(image: Any, ranges: list[tuple[int, int]]) -> Any:
    """The slices ``ranges`` of ``image`` stacked into one volume with its spacing, direction and the first block's
    origin: the networks chosen for are 2D and see slices, so the gaps between blocks do not matter to them, and one
    image keeps the recipe's steps what they are (the train task draws per image, an epoch is a pass over images)."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image)
    stacked = sitk.GetImageFromArray(np.concatenate([array[start:stop] for start, stop in ranges]))
    stacked.SetSpacing(image.GetSpacing())
    stacked.SetDirection(image.GetDirection())
    stacked.SetOrigin(image.TransformIndexToPhysicalPoint((0, 0, ranges[0][0])))
    return stacked


def split_datastores(work: Path, organs: tuple[str, ...]) -> tuple[Path, Path, dict[str, Any]]:
    """(fit datastore, validation datastore, what the split is) under ``work / "validation_split"``: the training
    datastore with :data:`SPLIT_IMAGE` cut into blocks of :data:`BLOCK_SLICES` slices, every
    :data:`VALIDATION_EVERY`-th block (counting from the second) stacked into the validation image, the others into
    the fit image that replaces it."""
    import SimpleITK as sitk

    train_dir, _ = build_datastores(work, organs, TRAIN_IMAGES, HELD_OUT_IMAGES)
    root = work / "validation_split"
    shutil.rmtree(root, ignore_errors=True)
    fit, validation = root / "fit", root / "validation"
    image = sitk.ReadImage(str(train_dir / f"{SPLIT_IMAGE}.nii.gz"))
    label = sitk.ReadImage(str(train_dir / "labels" / "final" / f"{SPLIT_IMAGE}.nii.gz"))
    depth = image.GetSize()[2]
    blocks: dict[str, list[tuple[int, int]]] = {"fit": [], "validation": []}
    for number, start in enumerate(range(0, depth, BLOCK_SLICES)):
        role = "validation" if number % VALIDATION_EVERY == 1 else "fit"
        blocks[role].append((start, min(start + BLOCK_SLICES, depth)))
    names = {"fit": f"{SPLIT_IMAGE}_fit", "validation": f"{SPLIT_IMAGE}_validation"}
    for role, folder in (("fit", fit), ("validation", validation)):
        _write_volume(_stack(image, blocks[role]), _stack(label, blocks[role]), folder, names[role])
    for other in (i for i in TRAIN_IMAGES if i != SPLIT_IMAGE):
        _write_volume(
            sitk.ReadImage(str(train_dir / f"{other}.nii.gz")),
            sitk.ReadImage(str(train_dir / "labels" / "final" / f"{other}.nii.gz")),
            fit,
            other,
        )
    split = {
        "split_image": SPLIT_IMAGE,
        "block_slices": BLOCK_SLICES,
        "validation_every": VALIDATION_EVERY,
        "fit_blocks": [list(b) for b in blocks["fit"]],
        "validation_blocks": [list(b) for b in blocks["validation"]],
        "fit": [names["fit"], *(i for i in TRAIN_IMAGES if i != SPLIT_IMAGE)],
        "validation": [names["validation"]],
        "never_seen": list(HELD_OUT_IMAGES),
    }
    return fit, validation, split


def _train_candidate(family: ModelFamily, fit: Path, work: Path, request: dict[str, Any]) -> dict[str, Any]:
    shutil.rmtree(work / "models", ignore_errors=True)
    stats = run_train_task(family, work, request, fit)
    return {"train_seconds": stats["train_seconds"], "final_train_metric": stats.get("best_metric")}


def choose(candidates: list[dict[str, Any]], metric: str) -> int:
    """Index of the chosen candidate: the best FP32 validation figure; among those within :data:`TIE` of it, the
    fewest steps (then the earliest listed)."""
    values = [float(c["validation"]["fp32"][metric]) for c in candidates]
    best = max(values)
    close = [i for i, v in enumerate(values) if v >= best - TIE]
    return min(close, key=lambda i: (int(candidates[i]["request"]["max_epochs"]), i))


def select_recipe(family: ModelFamily, candidates: list[dict[str, Any]], work: Path, seed: int) -> dict[str, Any]:
    """Train and validate every candidate (request overrides of the registry recipe); returns the record kept in
    ``bundled_weights.json``."""
    if family.task != "segmentation" or family.spatial_dims != 2:
        raise ValueError(f"{family.family}: recipes are chosen this way for 2D segmentation families only")
    fit, validation, split = split_datastores(work, family.labels)
    results = []
    for overrides in candidates:
        request = {**train_request(family, seed), **overrides}
        logger.info(f"--- {family.family}: candidate {overrides} ---")
        run_work = work / "candidate"
        trained = _train_candidate(family, fit, run_work, request)
        figures = evaluate(family.family, run_work, validation)[split["validation"][0]]
        results.append({"overrides": overrides, "request": request, **trained, "validation": figures})
        logger.info(f"{family.family} {overrides}: validation {json.dumps(figures)}")
    chosen = choose(results, "dice")
    return {
        "protocol": __doc__.split("\n\n")[2].replace("\n", " "),  # the docstring paragraph "The split: ..."
        "split": split,
        "metric": "dice",
        "tie": TIE,
        "candidates": results,
        "chosen": results[chosen]["overrides"],
        "chosen_request": results[chosen]["request"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shipped_segmentation = [
        f for f, spec in FAMILIES.items() if spec.bundled and spec.task == "segmentation" and spec.spatial_dims == 2
    ]
    parser.add_argument("--family", required=True, choices=shipped_segmentation)
    parser.add_argument(
        "--candidate",
        action="append",
        required=True,
        help="request parameters changed from the registry recipe, e.g. max_epochs=1000,learning_rate=1e-3; repeat",
    )
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "model"), help="bundled weights folder")
    parser.add_argument("--work", default=str(REPO_ROOT / "runs" / "select_recipe"), help="scratch folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    try:
        candidates = [parse_candidate(c) for c in args.candidate]
    except ValueError as err:
        parser.error(str(err))
    notes = Path(args.out).resolve() / "bundled_weights.json"
    if not notes.exists():
        parser.error(f"{notes} does not exist: run make weights first")
    work = Path(args.work).resolve() / args.family
    record = select_recipe(FAMILIES[args.family], candidates, work, args.seed)
    record["command"] = "python -m monailabel_app.select_recipe " + " ".join(argv if argv is not None else sys.argv[1:])
    record["threads"] = args.threads
    report = json.loads(notes.read_text())  # read again: another run may have written meanwhile
    report["families"].setdefault(args.family, {})["recipe_selection"] = record
    write_report(notes, report)
    print(
        json.dumps(
            {
                "chosen": record["chosen"],
                "candidates": [
                    {**c["overrides"], "validation_fp32": c["validation"]["fp32"][record["metric"]]}
                    for c in record["candidates"]
                ],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

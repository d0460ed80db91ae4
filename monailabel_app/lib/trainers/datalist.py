# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Which labelled images a train task trains and validates on.

A datastore may say, in ``<studies>/datastore_notes.json`` (written by ``python -m sample_data``), that some labelled
images must never be trained on::

    "training": {"exclude": {"example_ct_dicom": "held out: ..."},
                 "validate_on": ["example_ct_dicom"],
                 "derived_from": {"example_ct_sm": {"source": "example_ct", "why": "a crop of example_ct ..."}}}

``exclude`` images stay labelled (for evaluation, the over/under map, scoring) but are left out of training;
``validate_on`` images are the validation set, so the validation metric the server reports is computed on images
never trained on; a ``derived_from`` image (a crop of another) is left out of training and validation whenever its
source image is labelled in the same datastore (training on both counts the source twice; validating on the crop
validates on training data). A datastore without that entry trains on every labelled image (MONAI Label's ``val_split``
partition, as before).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["NOTES_FILENAME", "TrainingRoles", "read_training_roles", "image_id_of", "split_datalist"]

logger = logging.getLogger(__name__)

NOTES_FILENAME = "datastore_notes.json"
_EXTENSIONS = (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".mha", ".mhd", ".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class TrainingRoles:
    """``exclude``: ``{image id: reason}`` never trained on; ``validate_on``: held-out ids validated on;
    ``derived_from``: ``{image id: (source id, reason)}``."""

    exclude: dict[str, str] = field(default_factory=dict)
    validate_on: tuple[str, ...] = ()
    derived_from: dict[str, tuple[str, str]] = field(default_factory=dict)
    source: str | None = None


def image_id_of(path: str) -> str:
    """The datastore id of an image path (its file name without the image extension)."""
    name = os.path.basename(path)
    for ext in _EXTENSIONS:
        if name.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def read_training_roles(studies_dir: str | None) -> TrainingRoles:
    """The ``training`` entry of ``<studies_dir>/datastore_notes.json`` (empty roles when there is none)."""
    if not studies_dir:
        return TrainingRoles()
    path = os.path.join(studies_dir, NOTES_FILENAME)
    if not os.path.isfile(path):
        return TrainingRoles()
    try:
        with open(path) as handle:
            entry = (json.load(handle) or {}).get("training") or {}
    except (OSError, ValueError) as err:
        logger.warning(f"ignoring {path}: {err}")
        return TrainingRoles()
    exclude = {str(k): str(v) for k, v in (entry.get("exclude") or {}).items()}
    validate_on = tuple(str(i) for i in entry.get("validate_on") or ())
    derived = {}
    for image, item in (entry.get("derived_from") or {}).items():
        item = item if isinstance(item, dict) else {"source": item}
        derived[str(image)] = (str(item.get("source")), str(item.get("why") or f"derived from {item.get('source')}"))
    return TrainingRoles(exclude=exclude, validate_on=validate_on, derived_from=derived, source=path)


def split_datalist(
    datalist: Sequence[dict[str, Any]], roles: TrainingRoles, val_split: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, str], str] | None:
    """``(train, val, excluded {id: reason}, note)`` when ``roles`` exclude or validate on an image of
    ``datalist``; ``None`` when they concern none of them (then the caller partitions as MONAI Label does).

    ``val`` is the ``validate_on`` images (none when ``val_split`` is 0); ``train`` every other labelled image not
    excluded. ``note`` says what the validation metric is computed on.
    """
    ids = [image_id_of(d["image"]) for d in datalist]
    reasons = {i: "held out for validation" for i in roles.validate_on}
    reasons.update(roles.exclude)
    reasons.update({i: why for i, (source, why) in roles.derived_from.items() if source in ids})
    held = set(reasons)
    if not held & set(ids):
        return None
    excluded = {i: reasons[i] for i in ids if i in held}
    train = [d for d, i in zip(datalist, ids) if i not in held]
    val = [d for d, i in zip(datalist, ids) if i in roles.validate_on] if val_split > 0 else []
    val_ids = [image_id_of(d["image"]) for d in val]
    if val_ids:
        note = (
            f"validation metric computed on {', '.join(val_ids)}: held out, never trained on "
            f"(datastore_notes.json 'training'); excluded from training: {', '.join(sorted(excluded))}"
        )
    else:
        note = (
            "no validation image (val_split 0 or no held-out image): the metric is the training metric, on the "
            f"training images; excluded from training: {', '.join(sorted(excluded))}"
        )
    return train, val, excluded, note

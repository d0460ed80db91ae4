# Copyright MedAttnSlicer contributors. Apache-2.0.
"""MONAI Label's local datastore with input checks and label history.

- Uploaded images must be readable images without NaNs; uploaded labels must be readable label maps on their
  image's grid (same size, spacing, origin, direction). Otherwise a 4xx error names the problem and nothing in the
  datastore changes.
- Saving a label over an existing one of the same tag, or deleting it (``DELETE /datastore/label``), first copies
  the old file to ``<studies>/.label_history/<tag>/<image id>.<UTC time>.<ext>``: no submitted label is ever lost.
  MONAI Label's ``original`` (model output) and ``final`` (submitted) tags are kept as they are.
- An unknown image id is a 404 that lists the datastore's ids (or says how to list them).
- Scores written by the app's scoring methods are merged into ``image info["scores"]`` (never replacing other
  methods' scores).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import numpy as np
import SimpleITK as sitk
from filelock import FileLock
from monailabel.datastore.local import LocalDatastore, LocalDatastoreModel

from monailabel_app.lib.errors import BadInputError, NotFoundError
from monailabel_app.lib.image_io import check_finite_nifti, read_array_on_grid, read_header
from monailabel_app.lib.request_guard import note_upload

__all__ = ["SafeLocalDatastore", "HISTORY_DIR"]

logger = logging.getLogger(__name__)

HISTORY_DIR = ".label_history"
# image extensions a user may append to an id by mistake
_IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".dcm")
_LIST_AT_MOST = 20


def unknown_image_message(image_id: str, known: list[str]) -> str:
    """A 404 message for ``image_id``: which id, the ids that exist (at most 20) or how to list them, and the id
    without its file extension when that one exists."""
    known = sorted(known)
    message = f"image {image_id!r} is not in the datastore"
    for ext in _IMAGE_EXTENSIONS:
        if image_id.endswith(ext) and image_id[: -len(ext)] in known:
            return f"{message}; image ids have no file extension: use {image_id[: -len(ext)]!r}."
    if not known:
        return f"{message}, which holds no image; upload one with PUT /datastore/image."
    listed = ", ".join(known[:_LIST_AT_MOST]) + (f", ... ({len(known)} in all)" if len(known) > _LIST_AT_MOST else "")
    return f"{message}; its ids: {listed} (GET /datastore/?output=all lists them with their labels)."


class SafeLocalDatastore(LocalDatastore):
    """``LocalDatastore`` that validates uploads, keeps every replaced label and merges scores."""

    def unknown_image_message(self, image_id: str) -> str:
        """The 404 message for an image id that is not in this datastore (lists the ids that are)."""
        return unknown_image_message(image_id, self.list_images())

    def _require_image(self, image_id: str) -> str:
        uri = self.get_image_uri(image_id)
        if not uri or not os.path.exists(uri):
            raise NotFoundError(self.unknown_image_message(image_id))
        return uri

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        note_upload(image_filename, "file")
        header = read_header(image_filename, "uploaded image")
        check_finite_nifti(image_filename, "uploaded image")
        try:
            values = sitk.GetArrayFromImage(sitk.ReadImage(image_filename))
        except RuntimeError as err:
            raise BadInputError(f"the uploaded image could not be read: {err}") from err
        if np.issubdtype(values.dtype, np.floating):
            n_bad = int(np.count_nonzero(~np.isfinite(values)))
            if n_bad:
                raise BadInputError(f"the uploaded image contains {n_bad} NaN or infinite values.")
        if image_id and image_id in self._datastore.objects:
            raise BadInputError(f"an image with id {image_id!r} is already in the datastore; choose another id.")
        logger.info(f"adding image {image_id or image_filename} of size {header.size}")
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        note_upload(label_filename, "label")
        image_uri = self._require_image(image_id)
        if not label_tag or os.sep in label_tag or label_tag.startswith("."):
            raise BadInputError(f"label tag {label_tag!r} is not a valid folder name.")
        values = read_array_on_grid(label_filename, read_header(image_uri, "image"), "uploaded label")
        if np.issubdtype(values.dtype, np.floating) and not np.allclose(values, np.rint(values)):
            raise BadInputError("the uploaded label has non-integer values; a label map holds integer label values.")
        if values.size and (values.min() < 0 or values.max() > 255):
            raise BadInputError(
                f"the uploaded label has values {values.min()}..{values.max()}; label values are 0..255."
            )
        self._archive_existing(image_id, label_tag)
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        """``DELETE /datastore/label``: keep a copy of the label in the history folder, then remove it (404 when the
        image or its label of that tag does not exist)."""
        self._require_image(label_id)
        current = self.get_label_uri(label_id, label_tag)
        if not current or not os.path.exists(current):
            tags = sorted(self.get_labels_by_image_id(label_id) or {})
            raise NotFoundError(f"image {label_id!r} has no {label_tag!r} label; its labels: {tags}.")
        self._archive_existing(label_id, label_tag)
        super().remove_label(label_id, label_tag)

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        # scores may have been written by a scoring subprocess: re-read the datastore file if it changed
        self._init_from_datastore_file()
        return super().get_image_info(image_id)

    def _archive_existing(self, image_id: str, tag: str) -> str | None:
        """Move the current ``tag`` label of ``image_id`` into the history folder; returns its new path."""
        current = self.get_label_uri(image_id, tag)
        if not current or not os.path.exists(current):
            return None
        _, ext = self._to_id(os.path.basename(current))
        history = os.path.join(self._datastore_path, HISTORY_DIR, tag)
        os.makedirs(history, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"{time.time() % 1:.6f}"[1:]
        target = os.path.join(history, f"{image_id}.{stamp}{ext}")
        shutil.copy2(current, target)
        logger.info(f"kept previous {tag} label of {image_id} as {target}")
        return target

    def label_history(self, image_id: str, tag: str) -> list[str]:
        """Earlier labels of ``image_id`` with ``tag``, oldest first."""
        history = os.path.join(self._datastore_path, HISTORY_DIR, tag)
        if not os.path.isdir(history):
            return []
        return sorted(os.path.join(history, f) for f in os.listdir(history) if f.startswith(f"{image_id}."))

    def update_scores(self, image_id: str, method: str, figures: dict[str, Any]) -> None:
        """Store ``figures`` as ``info["scores"][method]`` of ``image_id``, keeping other methods' scores."""
        self._require_image(image_id)
        with FileLock(self._lock_file):
            # re-read under the same lock (another process may have stored scores), update, write back
            self._reload_locked()
            obj = self._datastore.objects.get(image_id)
            if obj is None:
                raise NotFoundError(self.unknown_image_message(image_id))
            scores = dict(obj.image.info.get("scores") or {})
            scores[method] = figures
            obj.image.info["scores"] = scores
            self._update_datastore_file(lock=False)

    def _reload_locked(self) -> None:
        """``_init_from_datastore_file`` for a caller already holding the datastore lock."""
        path = self._datastore_config_path
        if os.path.exists(path):
            ts = os.stat(path).st_mtime
            if ts != self._config_ts:
                with open(path) as handle:
                    self._datastore = LocalDatastoreModel.model_validate_json(handle.read())
                self._datastore.base_path = self._datastore_path
                self._config_ts = ts

    def refresh_from_disk(self) -> None:
        """Re-read ``datastore_v2.json`` (written by scoring/training subprocesses)."""
        self._init_from_datastore_file()

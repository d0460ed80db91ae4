# Copyright MedAttnSlicer contributors. Apache-2.0.
"""MONAI Label's local datastore with input checks and label history.

- Uploaded images must be readable images without NaNs; uploaded labels must be readable label maps on their
  image's grid (same size, spacing, origin, direction). Otherwise a 4xx error names the problem and nothing in the
  datastore changes.
- Saving a label over an existing one of the same tag first moves the old file to
  ``<studies>/.label_history/<tag>/<image id>.<UTC time>.<ext>``: no submitted label is ever lost. MONAI Label's
  ``original`` (model output) and ``final`` (submitted) tags are kept as they are.
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

__all__ = ["SafeLocalDatastore", "HISTORY_DIR"]

logger = logging.getLogger(__name__)

HISTORY_DIR = ".label_history"


class SafeLocalDatastore(LocalDatastore):
    """``LocalDatastore`` that validates uploads, keeps every replaced label and merges scores."""

    def _require_image(self, image_id: str) -> str:
        uri = self.get_image_uri(image_id)
        if not uri or not os.path.exists(uri):
            raise NotFoundError(f"image {image_id!r} is not in the datastore.")
        return uri

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
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
        image_uri = self._require_image(image_id)
        if not label_tag or os.sep in label_tag or label_tag.startswith("."):
            raise BadInputError(f"label tag {label_tag!r} is not a valid folder name.")
        values = read_array_on_grid(label_filename, read_header(image_uri, "image"), "uploaded label")
        if np.issubdtype(values.dtype, np.floating) and not np.allclose(values, np.rint(values)):
            raise BadInputError("the uploaded label has non-integer values; a label map holds integer label values.")
        if values.size and (values.min() < 0 or values.max() > 255):
            raise BadInputError(f"the uploaded label has values {values.min()}..{values.max()}; label values are 0..255.")
        self._archive_existing(image_id, label_tag)
        return super().save_label(image_id, label_filename, label_tag, label_info)

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
                raise NotFoundError(f"image {image_id!r} is not in the datastore.")
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


# Copyright MedAttnSlicer contributors. Apache-2.0.
"""The output folder of a batch inference: one label (and one result JSON) per image, written atomically.

Per image ``<id>`` the folder holds ``<id>.nii.gz`` (the label on the image's grid; absent for classifiers) and
``<id>.json`` (the model's result: model, version, volumes or class scores). Each file is first written to a hidden
``.<id>...partial`` file in the same folder, flushed to disk and then renamed into place (``os.replace``), the label
before the JSON: a present, readable JSON whose label is present and readable is a finished image. Anything else
(leftover ``.partial`` files of a stopped run, a label without its JSON, a file that does not read back) is a
half-written output and the image is done again.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any

import SimpleITK as sitk

__all__ = ["OutputFolder", "incomplete_image", "output_stem"]

_PARTIAL = ".partial"
_LABEL_EXT = ".nii.gz"


def output_stem(image_id: str) -> str:
    """File name stem of an image id (ids with path separators keep one flat folder)."""
    return image_id.replace(os.sep, "__").replace("/", "__")


def incomplete_image(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a complete image file, or None when it is: the whole gzip stream must decompress (ITK
    reads a truncated ``.nii.gz`` without an error, zero-filling what is missing) and ITK must read it."""
    path = Path(path)
    if path.is_dir():
        return None  # a DICOM series folder: ITK's series reader checks its files
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as stream:
                while stream.read(1 << 20):
                    pass
        sitk.ReadImage(str(path))
    except (EOFError, zlib.error) as err:
        return f"{path.name} is truncated or corrupt ({err})"
    except (OSError, RuntimeError) as err:
        return f"{path.name} does not read as an image ({str(err).strip().splitlines()[-1] if str(err) else err})"
    return None


class OutputFolder:
    """Finished and half-written outputs of a batch in ``root`` (created if missing).

    Args:
        root: the ``--out`` folder.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def label_path(self, image_id: str) -> Path:
        return self.root / f"{output_stem(image_id)}{_LABEL_EXT}"

    def result_path(self, image_id: str) -> Path:
        return self.root / f"{output_stem(image_id)}.json"

    def remove_partials(self) -> list[Path]:
        """Delete the ``.partial`` files a stopped run left behind; the deleted paths."""
        removed = []
        for path in self.root.glob(f".*{_PARTIAL}"):
            path.unlink(missing_ok=True)
            removed.append(path)
        return removed

    def state(self, image_id: str) -> str:
        """``"done"``, ``"missing"`` or ``"half-written"`` (a label without its result, or a file that does not read
        back)."""
        result, label = self.result_path(image_id), self.label_path(image_id)
        if not result.exists():
            return "half-written" if label.exists() else "missing"
        try:
            record = json.loads(result.read_text())
        except (OSError, ValueError):
            return "half-written"
        if not isinstance(record, dict):
            return "half-written"
        if record.get("label") and incomplete_image(label) is not None:
            return "half-written"
        return "done"

    def write(self, image_id: str, label_file: str | None, result: dict[str, Any]) -> None:
        """Publish ``label_file`` (moved, may be None) and ``result`` for ``image_id``, each atomically, the label
        first."""
        record = dict(result)
        record["image"] = image_id
        record["label"] = None
        if label_file:
            target = self.label_path(image_id)
            partial = self._partial(target)
            with open(label_file, "rb") as source, open(partial, "wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
                sink.flush()
                os.fsync(sink.fileno())
            os.replace(partial, target)
            record["label"] = target.name
        self.write_json(self.result_path(image_id), record)

    def write_json(self, target: Path, payload: Any) -> None:
        """``payload`` as JSON at ``target``, atomically."""
        partial = self._partial(target)
        with open(partial, "w") as sink:
            json.dump(payload, sink, indent=2, default=str)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(partial, target)

    def _partial(self, target: Path) -> Path:
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=_PARTIAL, dir=self.root)
        os.close(handle)
        return Path(name)

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Where a batch inference reads its images: any MONAI Label :class:`~monailabel.interfaces.datastore.Datastore`.

The batch code only calls ``list_images``, ``get_unlabeled_images`` and ``get_image_uri`` (a local file or folder
the infer task reads), so any datastore works. Worker processes open their own datastore from a picklable
:class:`DatastoreSource` rather than sharing one object across processes. A folder opens as the app's local
datastore; another kind (DICOMweb) plugs in as a ``"package.module:function"`` opener (``--datastore-opener``, or
:data:`URL_OPENER` for URLs).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

from monailabel.interfaces.datastore import Datastore

__all__ = ["URL_OPENER", "DatastoreSource", "open_datastore", "select_images"]

# "module:function" opening a URL (DICOMweb) as a Datastore; None until a DICOMweb datastore is part of the app
URL_OPENER: str | None = "monailabel_app.lib.dicomweb.factory:open_pacs"


def _import(dotted: str) -> Callable[[str], Datastore]:
    module, _, name = dotted.partition(":")
    if not module or not name:
        raise ValueError(f"datastore opener {dotted!r} must be 'package.module:function'.")
    return getattr(importlib.import_module(module), name)


def open_datastore(studies: str, opener: str | None = None, scan: bool = True) -> Datastore:
    """The datastore of ``studies``: ``opener`` (``"package.module:function"``, called with ``studies``) if given,
    or for a URL :data:`URL_OPENER`; else a folder of images (the app's local datastore, not watched).

    ``scan``: a folder is scanned for new or removed images (updating its ``datastore_v2.json``, as the server
    does at start-up); False reads that file only (worker processes, after the parent has scanned).

    Raises:
        ValueError: ``studies`` is a URL and no opener is known, or not an existing folder.
    """
    opener = opener or (URL_OPENER if studies.startswith(("http://", "https://")) else None)
    if opener:
        return _import(opener)(studies)
    if studies.startswith(("http://", "https://")):
        raise ValueError(
            f"--studies {studies!r} is a URL, but this build has no DICOMweb datastore to open it with "
            "(--datastore-opener package.module:function); pass a folder of images."
        )
    if not os.path.isdir(studies):
        raise ValueError(f"--studies {studies!r} is not a folder.")
    from monailabel.config import settings

    from monailabel_app.lib.datastore import SafeLocalDatastore

    return SafeLocalDatastore(
        studies, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False, read_only=not scan
    )


@dataclass(frozen=True)
class DatastoreSource:
    """Picklable recipe for a datastore, opened in each worker process (datastores hold locks, caches and
    connections that do not cross processes).

    Attributes:
        studies: a folder, or a URL.
        opener: ``"package.module:function"`` returning the datastore of ``studies`` (default: see
            :func:`open_datastore`).
    """

    studies: str
    opener: str | None = None

    def open(self, scan: bool = True) -> Datastore:
        return open_datastore(self.studies, self.opener, scan)


def select_images(datastore: Datastore, images: str) -> list[str]:
    """Image ids to segment, sorted: ``"all"``, ``"unlabeled"`` (no ``final`` label) or a comma list of ids.

    Raises:
        ValueError: a listed id is not in the datastore (the message names it).
    """
    if images == "all":
        return sorted(datastore.list_images())
    if images == "unlabeled":
        return sorted(datastore.get_unlabeled_images())
    wanted = [part.strip() for part in images.split(",") if part.strip()]
    if not wanted:
        raise ValueError("--images names no image id; use 'all', 'unlabeled' or a comma list of ids.")
    known = set(datastore.list_images())
    unknown = [image for image in wanted if image not in known]
    if unknown:
        listed = ", ".join(sorted(known)[:20])
        raise ValueError(f"--images: {unknown} not in the datastore; its ids: {listed}.")
    return list(dict.fromkeys(wanted))

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""The PACS datastore as ``monailabel start_server --studies <DICOMweb URL>`` gets it (``main.py``
``init_datastore``): modalities from ``--conf``, credentials and cache folder from MONAI Label's settings."""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

from monailabel_app.lib.dicomweb.client import PacsCredentials
from monailabel_app.lib.dicomweb.datastore import PacsDatastore

__all__ = ["open_pacs", "pacs_datastore", "pacs_modalities"]

logger = logging.getLogger(__name__)

_MODALITIES_OF = {"auto": ("CT", "MR"), "ct": ("CT",), "mr": ("MR",)}


def pacs_modalities(conf: dict[str, Any]) -> tuple[str, ...]:
    """Modalities listed and accepted: ``--conf pacs_modalities CT,MR``, else those of ``--conf modality``."""
    text = str(conf.get("pacs_modalities") or "").strip()
    if text:
        return tuple(dict.fromkeys(m.strip().upper() for m in text.split(",") if m.strip()))
    return _MODALITIES_OF.get(str(conf.get("modality") or "auto").lower(), _MODALITIES_OF["auto"])


def pacs_datastore(url: str, conf: dict[str, Any], labels: dict[str, int]) -> PacsDatastore:
    """The datastore ``monailabel start_server --studies <url>`` gets: credentials and cache folder from MONAI
    Label's settings (``MONAI_LABEL_DATASTORE_USERNAME`` / ``_PASSWORD`` / ``_API_KEY``,
    ``MONAI_LABEL_DATASTORE_CACHE_PATH``; default ``$MEDATTN_DATA_DIR/pacs_cache/<hash of the URL>``), modalities
    from ``conf`` (:func:`pacs_modalities`). Never downloads anything.

    Raises:
        PacsStartError: the PACS does not answer.
    """
    from monailabel.config import settings

    url = url.strip().rstrip("/")
    cache_root = (settings.MONAI_LABEL_DATASTORE_CACHE_PATH or settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip()
    if not cache_root:
        from sample_data.paths import default_data_dir

        cache_root = str(default_data_dir() / "pacs_cache")
    cache_dir = os.path.join(os.path.expanduser(cache_root), hashlib.sha256(url.encode()).hexdigest()[:16])
    logger.info(f"PACS datastore {url}: modalities {pacs_modalities(conf)}, cache {cache_dir}")
    return PacsDatastore(
        url,
        cache_dir,
        pacs_modalities(conf),
        labels,
        credentials=PacsCredentials.from_settings(settings),
        timeout=float(settings.MONAI_LABEL_DICOMWEB_PROXY_TIMEOUT or 30.0) * 2,
        settings=settings,
    )


def open_pacs(url: str) -> PacsDatastore:
    """The PACS as a read-only source of images (``python -m monailabel_app.batch_infer --studies <DICOMweb URL>``):
    every CT and MR series, fetched into the same cache as the server's; the batch writes its labels to ``--out``."""
    return pacs_datastore(url, {}, {})

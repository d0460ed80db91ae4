# Copyright MedAttnSlicer contributors. Apache-2.0.
"""MONAI Label's ``Datastore`` on a PACS (DICOMweb), with a local cache.

- **Images** are the PACS's series of the modalities the served models take (``CT`` and ``MR`` unless
  ``--conf pacs_modalities`` or ``--conf modality`` say otherwise); an image id is a Series Instance UID. A series
  is fetched once with WADO-RS *in its stored transfer syntax* (``transfer-syntax=*``: a PACS that cannot transcode
  JPEG 2000 still answers) into the cache and converted to NIfTI (:mod:`.series`).
- **Labelled** series are those a DICOM SEG in the PACS references (any SEG, from any workstation), plus those with
  a ``final`` label submitted here that the PACS did not accept. Active learning chooses among the others.
- A **final** label is checked on its image's grid (:class:`~monailabel_app.lib.datastore.SafeLocalDatastore`),
  kept in the cache, and stored in the PACS as a DICOM SEG (STOW-RS, :mod:`.seg`) referencing its series. If the
  PACS refuses it, the label stays in the cache (labelled, ``info["pacs"] = "not stored"``) and the answer says so.
  An ``original`` label (a model's output) stays local, as in MONAI Label.
- **Training** (:meth:`datalist`) fetches every labelled series and its newest SEG.
- A PACS that fails after start-up answers 503 (:class:`~.errors.PacsUnavailableError`); one unreachable at
  start-up stops the server with a message naming the URL.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Any

import numpy as np
import pydicom
import requests
import SimpleITK as sitk
from filelock import FileLock
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from monailabel_app.lib.datastore import SafeLocalDatastore
from monailabel_app.lib.dicomweb.client import PacsCredentials, http_status, make_client, pacs_errors
from monailabel_app.lib.dicomweb.errors import PacsRejectedError, PacsUnavailableError, SegWriteError
from monailabel_app.lib.dicomweb.seg import comparison_specs, read_seg, segment_specs, write_seg
from monailabel_app.lib.dicomweb.series import check_series_attributes, series_to_nifti
from monailabel_app.lib.errors import BadInputError, NotFoundError

__all__ = ["PacsDatastore", "PacsStartError"]

logger = logging.getLogger(__name__)

_FINAL = "final"
_ORDER_FILE = "slice_order.json"
# QIDO fields asked for with every series
_SERIES_FIELDS = [
    "StudyInstanceUID",
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "PatientID",
    "StudyDate",
    "SeriesDate",
    "SeriesTime",
    "NumberOfSeriesRelatedInstances",
]


def _no_bulk_data(*_: Any) -> None:
    """Bulk data (pixels) of QIDO/WADO metadata are not needed: their references stay unresolved."""
    return None


class PacsStartError(RuntimeError):
    """The PACS did not answer at start-up (the message names the URL and why)."""


def _value(ds: dict, keyword: str) -> str:
    """A QIDO JSON attribute's first value as text ('' when absent)."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    item = ds.get(f"{tag:08X}") or {}
    values = item.get("Value") or []
    return str(values[0]) if values else ""


class PacsDatastore(SafeLocalDatastore):
    """The PACS at ``url`` as a MONAI Label datastore; fetched series and labels live in ``cache_dir``.

    Args:
        url: DICOMweb root (``http://pacs:8042/dicom-web``).
        cache_dir: local cache folder (a MONAI Label local datastore of NIfTI files and ``labels/``).
        modalities: modalities listed and accepted.
        labels: the app's ``{label name: value}`` (segment names and the values SEGs read back to).
        credentials: how to authenticate.
        timeout: seconds per PACS request.
        list_seconds: how long a listing of series and SEGs is reused (own writes update it at once).
        settings: MONAI Label settings (QIDO/WADO/STOW prefixes).

    Raises:
        PacsStartError: the PACS does not answer (named, with the reason).
    """

    def __init__(
        self,
        url: str,
        cache_dir: str,
        modalities: tuple[str, ...],
        labels: dict[str, int],
        credentials: PacsCredentials | None = None,
        timeout: float = 60.0,
        list_seconds: float = 2.0,
        settings: Any = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.modalities = tuple(modalities)
        self.labels = dict(labels)
        self.credentials = credentials or PacsCredentials()
        self.client = make_client(self.url, self.credentials, timeout=timeout, settings=settings)
        self.list_seconds = list_seconds
        self._lock = threading.RLock()
        self._listing: tuple[float, dict[str, dict[str, str]]] | None = None
        self._segs: tuple[float, dict[str, list[dict[str, str]]]] | None = None
        self._seg_refs: dict[str, str | None] = {}  # SEG series UID -> referenced series UID (never changes)
        self._check_reachable()
        super().__init__(cache_dir, extensions=("*.nii.gz",), auto_reload=False)

    # ----- the PACS -----
    def _check_reachable(self) -> None:
        try:
            with pacs_errors(self.url, "checking it at start-up", self.credentials):
                self.client.search_for_studies(limit=1)
        except Exception as err:  # noqa: BLE001 - every failure here means the server cannot serve this PACS
            raise PacsStartError(
                f"cannot use the PACS datastore {self.url}: {err}. Check the URL (the DICOMweb root, e.g. "
                "http://pacs:8042/dicom-web), the network and the credentials; the server does not start without it."
            ) from err

    def _pacs(self, doing: str):
        return pacs_errors(self.url, doing, self.credentials)

    def name(self) -> str:
        return f"PACS {self.url}"

    def description(self) -> str:
        return f"DICOMweb PACS {self.url} ({', '.join(self.modalities)} series; labels stored as DICOM SEG)"

    def _series(self, refresh: bool = False) -> dict[str, dict[str, str]]:
        """``{series UID: info}`` of the accepted modalities in the PACS (reused for ``list_seconds``)."""
        with self._lock:
            if not refresh and self._listing and time.time() - self._listing[0] < self.list_seconds:
                return self._listing[1]
        found: dict[str, dict[str, str]] = {}
        with self._pacs("listing its series"):
            for modality in self.modalities:
                for ds in self.client.search_for_series(search_filters={"Modality": modality}, fields=_SERIES_FIELDS):
                    uid = _value(ds, "SeriesInstanceUID")
                    if uid:
                        found[uid] = {k: _value(ds, k) for k in _SERIES_FIELDS} | {"SeriesInstanceUID": uid}
        with self._lock:
            self._listing = (time.time(), found)
        return found

    def _lookup_series(self, series_uid: str) -> dict[str, str] | None:
        """QIDO of one series by UID, whatever its modality; None when the PACS does not hold it."""
        with self._pacs(f"looking up series {series_uid}"):
            answer = self.client.search_for_series(
                search_filters={"SeriesInstanceUID": series_uid}, fields=_SERIES_FIELDS
            )
        if not answer:
            return None
        return {k: _value(answer[0], k) for k in _SERIES_FIELDS} | {"SeriesInstanceUID": series_uid}

    def _seg_index(self, refresh: bool = False) -> dict[str, list[dict[str, str]]]:
        """``{image series UID: [SEG series info, newest first]}`` over every SEG series in the PACS."""
        with self._lock:
            if not refresh and self._segs and time.time() - self._segs[0] < self.list_seconds:
                return self._segs[1]
        index: dict[str, list[dict[str, str]]] = {}
        with self._pacs("listing its DICOM SEG series"):
            segs = self.client.search_for_series(search_filters={"Modality": "SEG"}, fields=_SERIES_FIELDS)
            for ds in segs:
                seg_uid, study_uid = _value(ds, "SeriesInstanceUID"), _value(ds, "StudyInstanceUID")
                if seg_uid not in self._seg_refs:
                    meta = self.client.retrieve_series_metadata(study_uid, seg_uid)
                    self._seg_refs[seg_uid] = (
                        self._referenced_series(Dataset.from_json(meta[0], _no_bulk_data)) if meta else None
                    )
                referenced = self._seg_refs[seg_uid]
                if referenced:
                    info = {k: _value(ds, k) for k in _SERIES_FIELDS} | {"SeriesInstanceUID": seg_uid}
                    index.setdefault(referenced, []).append(info)
        for infos in index.values():
            infos.sort(key=lambda i: (i["SeriesDate"], i["SeriesTime"], int(i["SeriesNumber"] or 0)), reverse=True)
        with self._lock:
            self._segs = (time.time(), index)
        return index

    @staticmethod
    def _referenced_series(seg: Dataset) -> str | None:
        sequence = seg.get("ReferencedSeriesSequence")
        if sequence:
            return str(sequence[0].SeriesInstanceUID)
        return None

    # ----- listing -----
    def list_images(self) -> list[str]:
        return sorted(self._series())

    def _pending_final(self) -> set[str]:
        """Series with a final label kept here that the PACS does not hold (its STOW failed)."""
        return {
            k
            for k, v in self._datastore.objects.items()
            if v.labels.get(_FINAL) and v.labels[_FINAL].info.get("pacs") == "not stored"
        }

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        if label_tag not in (None, "", _FINAL):
            return super().get_labeled_images(label_tag, labels)
        series = set(self._series())
        return sorted((set(self._seg_index()) | self._pending_final()) & series)

    def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        return sorted(set(self.list_images()) - set(self.get_labeled_images(label_tag, labels)))

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        info = super().get_image_info(image_id)
        pacs = self._series().get(image_id)
        if pacs:
            info = {**pacs, **info}
        return info

    def get_labels_by_image_id(self, image_id: str) -> dict[str, str]:
        tags = dict(super().get_labels_by_image_id(image_id))
        if image_id in self._seg_index():
            tags[_FINAL] = image_id
        return tags

    def status(self) -> dict[str, Any]:
        """Counts for ``/datastore/`` and ``/info/``; when the PACS is down, its error instead (``/info/`` stays up)."""
        try:
            listed = self.list_images()
            labelled = self.get_labeled_images()
        except PacsUnavailableError as err:
            return {"total": None, "completed": None, "label_tags": {}, "pacs": self.url, "pacs_error": err.message}
        return {
            "total": len(listed),
            "completed": len(labelled),
            "label_tags": {_FINAL: len(labelled)},
            "pacs": self.url,
            "modalities": list(self.modalities),
        }

    def json(self) -> dict[str, Any]:
        """``GET /datastore/?output=all``: every listed series (fetched or not) with its labels."""
        local = super().json()
        objects = {}
        segs = self._seg_index()
        for uid, info in self._series().items():
            entry = local["objects"].get(uid) or {"image": {"ext": ".nii.gz", "info": {}}, "labels": {}}
            entry = {"image": dict(entry["image"]), "labels": dict(entry["labels"])}
            entry["image"]["info"] = {**info, **entry["image"].get("info", {}), "cached": uid in local["objects"]}
            if uid in segs and _FINAL not in entry["labels"]:
                entry["labels"][_FINAL] = {
                    "ext": ".nii.gz",
                    "info": {"SeriesInstanceUID": segs[uid][0]["SeriesInstanceUID"]},
                }
            objects[uid] = entry
        return {**local, "name": self.name(), "description": self.description(), "objects": objects}

    # ----- images -----
    def _require_image(self, image_id: str) -> str:
        uri = self.get_image_uri(image_id)
        if not uri:
            raise NotFoundError(self.unknown_image_message(image_id))
        return uri

    def get_image_uri(self, image_id: str) -> str:
        """The cached NIfTI of series ``image_id``, fetched and converted on first use; '' for a series the PACS
        does not hold.

        Raises:
            BadInputError: a series the served models cannot take (modality, colour, undecodable pixels).
            PacsUnavailableError: the PACS failed.
        """
        cached = super().get_image_uri(image_id)
        if cached and os.path.exists(cached):
            return cached
        if not image_id:
            return ""
        info = self._series().get(image_id) or self._lookup_series(image_id)
        if info is None:
            return ""
        check_series_attributes(image_id, info["Modality"], self.modalities)
        lock = FileLock(os.path.join(self._datastore_path, f".fetch-{image_id}.lock"))
        with lock:
            cached = super().get_image_uri(image_id)
            if cached and os.path.exists(cached):
                return cached
            with tempfile.TemporaryDirectory(dir=self._datastore_path, prefix=".fetch-") as tmp:
                folder = os.path.join(tmp, "dicom")
                self._fetch_series(info["StudyInstanceUID"], image_id, folder)
                volume = series_to_nifti(folder, image_id, os.path.join(tmp, f"{image_id}.nii.gz"), self.modalities)
                # slice order of the instances, for DICOM SEG frames (kept beside them, not in the image info)
                order = {
                    "files": [os.path.basename(f) for f in volume.files],
                    "sop_instance_uids": list(volume.sop_instance_uids),
                }
                with open(os.path.join(folder, _ORDER_FILE), "w") as handle:
                    json.dump(order, handle)
                keep = self._dicom_dir(image_id)
                shutil.rmtree(keep, ignore_errors=True)
                os.makedirs(os.path.dirname(keep), exist_ok=True)
                os.replace(folder, keep)
                # the cache is our own: the checks of SafeLocalDatastore.add_image are for uploads
                super(SafeLocalDatastore, self).add_image(image_id, volume.path, dict(info))
        logger.info(f"fetched series {image_id} ({len(volume.files)} instances) from {self.url}")
        return super().get_image_uri(image_id)

    def _dicom_dir(self, image_id: str) -> str:
        return os.path.join(self._datastore_path, ".dicom", image_id)

    def _fetch_series(self, study_uid: str, series_uid: str, folder: str) -> None:
        """WADO-RS of a series in its stored transfer syntax into ``folder`` (one file per instance)."""
        os.makedirs(folder, exist_ok=True)
        with self._pacs(f"fetching series {series_uid}"):
            instances = self.client.retrieve_series(study_uid, series_uid, media_types=(("application/dicom", "*"),))
        for k, ds in enumerate(instances):
            ds.save_as(os.path.join(folder, f"{k:05d}.dcm"), write_like_original=False)

    def _sources(self, image_id: str) -> tuple[list[pydicom.Dataset], list[str]]:
        """Headers of the cached series' instances in slice order, and their SOP Instance UIDs."""
        self._require_image(image_id)
        folder = self._dicom_dir(image_id)
        try:
            with open(os.path.join(folder, _ORDER_FILE)) as handle:
                order = json.load(handle)
            files = [os.path.join(folder, f) for f in order["files"]]
            return [pydicom.dcmread(f, stop_before_pixels=True) for f in files], list(order["sop_instance_uids"])
        except (OSError, ValueError, KeyError) as err:
            raise NotFoundError(
                f"the cached DICOM files of series {image_id} are incomplete ({err}); delete {folder} and "
                f"{self.get_image_uri(image_id)} to fetch the series again."
            ) from err

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        raise BadInputError(
            f"this server's datastore is the PACS {self.url}: send images to the PACS (e.g. STOW-RS or your "
            "modality's DICOM export), not to PUT /datastore/image."
        )

    def remove_image(self, image_id: str) -> None:
        raise BadInputError(f"images live in the PACS {self.url}; remove them there.")

    # ----- labels -----
    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        """The label of ``label_id``: for ``final``, the one kept here unless the PACS holds a newer SEG, which is
        fetched and converted."""
        local = super().get_label_uri(label_id, label_tag)
        if label_tag != _FINAL:
            return local
        segs = self._seg_index().get(label_id)
        if not segs:
            return local
        newest = segs[0]["SeriesInstanceUID"]
        if local and os.path.exists(local):
            known = super().get_label_info(label_id, _FINAL)
            if known.get("SeriesInstanceUID") == newest or known.get("pacs") == "not stored":
                return local
        return self._fetch_seg_label(label_id, segs[0])

    def _fetch_seg_label(self, image_id: str, seg_info: dict[str, str]) -> str:
        seg_uid, study_uid = seg_info["SeriesInstanceUID"], seg_info["StudyInstanceUID"]
        sources, sop_uids = self._sources(image_id)
        with self._pacs(f"fetching DICOM SEG {seg_uid}"):
            instances = self.client.retrieve_series(study_uid, seg_uid, media_types=(("application/dicom", "*"),))
        labels_zyx, used = read_seg(instances[0], sop_uids, self.labels)
        image = sitk.ReadImage(self.get_image_uri(image_id))
        label = sitk.GetImageFromArray(labels_zyx)
        label.CopyInformation(image)
        with tempfile.TemporaryDirectory(dir=self._datastore_path, prefix=".seg-") as tmp:
            path = os.path.join(tmp, f"{image_id}.nii.gz")
            sitk.WriteImage(label, path, useCompression=True, compressionLevel=1)
            info = {"SeriesInstanceUID": seg_uid, "pacs": "stored", "segments": used}
            super(SafeLocalDatastore, self).save_label(image_id, path, _FINAL, info)
        logger.info(f"fetched DICOM SEG {seg_uid} of series {image_id}")
        return super().get_label_uri(image_id, _FINAL)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Check the label on its series' grid and keep it here; a ``final`` label also goes to the PACS as a
        DICOM SEG. A refusal by the PACS keeps the label here and answers 502 saying so."""
        label_info = dict(label_info or {})
        label_id = super().save_label(image_id, label_filename, label_tag, label_info)
        if label_tag != _FINAL:
            return label_id
        try:
            seg_uid = self._store_seg(image_id, label_info)
        except Exception as err:
            self._mark_final(image_id, {"pacs": "not stored", "pacs_error": str(err)})
            kept = (
                f"The label is kept on this server ({super().get_label_uri(image_id, _FINAL)}, tag final) and counts "
                "as labelled; submit it again to retry."
            )
            if isinstance(err, PacsUnavailableError):
                raise PacsUnavailableError(f"{err} {kept}") from err
            if isinstance(err, BadInputError):
                raise BadInputError(f"the label cannot be written as a DICOM SEG: {err} {kept}") from err
            if isinstance(err, PacsRejectedError):
                raise PacsRejectedError(
                    f"the PACS at {self.url} did not store the DICOM SEG of series {image_id}: {err}. {kept}"
                ) from err
            logger.exception(f"writing the DICOM SEG of series {image_id} failed")
            raise SegWriteError(f"writing the DICOM SEG of series {image_id} failed: {err}. {kept}") from err
        self._mark_final(image_id, {"pacs": "stored", "SeriesInstanceUID": seg_uid})
        with self._lock:
            if self._segs is not None:
                info = {k: "" for k in _SERIES_FIELDS} | {"SeriesInstanceUID": seg_uid}
                self._segs[1].setdefault(image_id, []).insert(0, info)
                self._seg_refs[seg_uid] = image_id
        return label_id

    def _mark_final(self, image_id: str, info: dict[str, Any]) -> None:
        current = dict(super().get_label_info(image_id, _FINAL))
        for key in ("pacs_error", "SeriesInstanceUID"):
            current.pop(key, None)
        super().update_label_info(image_id, _FINAL, {**current, **info})

    def _store_seg(self, image_id: str, label_info: dict[str, Any]) -> str:
        """STOW-RS the final label of ``image_id`` as a DICOM SEG; its Series Instance UID."""
        sources, _ = self._sources(image_id)
        values_zyx = sitk.GetArrayFromImage(sitk.ReadImage(super().get_label_uri(image_id, _FINAL)))
        values_zyx = np.rint(values_zyx).astype(np.int64)
        if label_info.get("comparison") in (True, "true", "1", 1):
            specs = comparison_specs()
        else:
            names = label_info.get("label_names") or self.labels
            specs = segment_specs({str(k): int(v) for k, v in dict(names).items()}, np.unique(values_zyx).tolist())
        series_uid = generate_uid()
        previous = self._seg_index().get(image_id) or []
        number = 9001 + len(previous)
        seg = write_seg(
            values_zyx,
            sources,
            specs,
            series_uid,
            series_number=number,
            description=f"MedAttnSlicer final label ({', '.join(s.name for s in specs)})",
        )
        with self._pacs(f"storing the DICOM SEG of series {image_id}"):
            try:
                answer = self.client.store_instances([seg])
            except requests.HTTPError as err:
                status = http_status(err)
                if status is not None and status < 500 and status not in (401, 403):
                    body = " ".join((err.response.text or "").split())[:300]
                    raise PacsRejectedError(f"STOW-RS answered HTTP {status}" + (f" ({body})" if body else "")) from err
                raise
            failed = answer.get("FailedSOPSequence") if answer is not None else None
            if failed:
                reason = failed[0].get("FailureReason")
                raise PacsRejectedError(f"STOW-RS listed the SEG as failed (Failure Reason {reason})")
            # a PACS may answer success and still drop the object (Orthanc's storage filters do): check it is there
            held = self.client.search_for_instances(
                study_instance_uid=str(seg.StudyInstanceUID), series_instance_uid=series_uid
            )
        if not held:
            raise PacsRejectedError(
                "STOW-RS answered success but the PACS does not hold the SEG afterwards (a storage rule or filter of "
                "the PACS refused it)"
            )
        logger.info(f"stored DICOM SEG {series_uid} of series {image_id} in {self.url}")
        return series_uid

    def remove_label(self, label_id: str, label_tag: str) -> None:
        if label_tag == _FINAL and label_id in self._seg_index():
            raise BadInputError(
                f"the final label of series {label_id} is a DICOM SEG in the PACS {self.url}; delete it there "
                "(this server never deletes from the PACS)."
            )
        super().remove_label(label_id, label_tag)

    # ----- training -----
    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        """Every labelled series with its final label (newest SEG), fetched into the cache."""
        items = []
        for image_id in self.get_labeled_images():
            try:
                image = self.get_image_uri(image_id)
                label = self.get_label_uri(image_id, _FINAL)
            except BadInputError as err:
                logger.warning(f"not training on series {image_id}: {err}")
                continue
            if image and label:
                items.append({"image": image, "label": label})
        return items

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Build a MONAI Label local datastore (images + binary/multi-organ labels) from the sample data.

Layout (what ``monailabel.datastore.local.LocalDatastore`` scans)::

    <out>/<image_id>.nii.gz                  image, NIfTI, original pixel type and geometry
    <out>/labels/final/<image_id>.nii.gz     uint8 label on exactly the image's grid: 0 background,
                                             i for the i-th requested organ (1-based, in the order given)
    <out>/datastore_notes.json               provenance, label origin, voxel counts, caveats

Studies:
    example_ct        CT 122x101x112 @ 3 mm, label from example_seg_fast_force_split (class map ``total``)
    example_ct_sm     CT 122x101x30 @ 3 mm, label from example_seg (``total``). Its voxels are slices
                      82..111 of example_ct (see the package docstring): never train on one, test on the other.
    example_mr_sm     MR 117x91x20 @ 3 mm, label from example_seg_mr (``total_mr``)
    example_ct_dicom  the 20-slice DICOM series read with SimpleITK; example_seg_dicom is stored with a flipped
                      y axis and is resampled onto the series grid in physical space (nearest neighbour)
    CTChest4          slicerio's chest CT, unlabeled (its Slicer segmentation has no liver); segment names in notes

``datastore_notes.json`` ``training`` says which labelled images training must not use (the MedAttnSlicer app's
``/train`` reads it): ``exclude`` ``{image id: why}`` (example_ct_dicom, held out), ``validate_on`` (the held-out
images the validation metric is computed on) and ``derived_from`` (example_ct_sm, a crop of example_ct: left out
whenever example_ct is in the datastore too). They stay labelled, for evaluation.

All labels are TotalSegmentator model outputs (regression references of its test suite), not manual ground truth.
Files are written through a hidden staging folder and ``os.replace``; an existing file under ``labels/final``
(e.g. a label a user saved from Slicer) is kept unless ``force=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nrrd
import numpy as np
import SimpleITK as sitk
from filelock import FileLock

from .atomic import atomic_write_image, atomic_write_json
from .class_maps import load_class_maps, resolve_organs
from .errors import SampleDataError
from .fetch import SampleData, fetch
from .grid import find_slab, grid_of, require_same_grid
from .sources import SLICERIO, SOURCES, TOTALSEGMENTATOR

__all__ = ["STUDY_IDS", "BuiltDatastore", "datastore_name", "read_dicom_series", "build_datastore"]

logger = logging.getLogger(__name__)

STUDY_IDS: tuple[str, ...] = ("example_ct", "example_ct_sm", "example_mr_sm", "example_ct_dicom", "CTChest4")
NOTES_FILENAME = "datastore_notes.json"
# labelled images that training must never use, kept labelled for evaluation (notes "training"): the held-out image
# always, a derived image whenever the image it was derived from is in the datastore too
HELD_OUT_IMAGES: dict[str, str] = {
    "example_ct_dicom": (
        "held out: another patient (the DICOM series), the image the READMEs report held-out quality on"
    ),
}
DERIVED_IMAGES: dict[str, tuple[str, str]] = {
    "example_ct_sm": (
        "example_ct",
        "a 30-slice crop of example_ct (slices 82..111): training on it trains on example_ct again, and validating "
        "on it validates on training data",
    ),
}
LABELS_ARE = (
    "TotalSegmentator model outputs kept as regression references in TotalSegmentator's test suite "
    "(tests/reference_files); they are NOT manual ground truth."
)


@dataclass(frozen=True)
class BuiltDatastore:
    """Result of :func:`build_datastore`.

    Attributes:
        path: the datastore folder (give it to MONAI Label as ``studies``).
        notes_path: ``<path>/datastore_notes.json``.
        image_ids: every image written or kept, in build order.
        labeled_ids: the images with a label under ``labels/final``.
        label_values: ``{organ: label value}``, values 1..len(organs).
    """

    path: Path
    notes_path: Path
    image_ids: tuple[str, ...]
    labeled_ids: tuple[str, ...]
    label_values: dict[str, int]

    def image_path(self, image_id: str) -> Path:
        return self.path / f"{image_id}.nii.gz"

    def label_path(self, image_id: str) -> Path:
        return self.path / "labels" / "final" / f"{image_id}.nii.gz"


@dataclass(frozen=True)
class _Study:
    """One image, its TotalSegmentator output already on the image grid (or None), and facts for the notes."""

    image_id: str
    modality: str
    image: sitk.Image
    segmentation: sitk.Image | None
    class_map: str | None
    sources: tuple[str, ...]
    remarks: tuple[str, ...] = ()
    extra: dict | None = None


def datastore_name(organs: Sequence[str]) -> str:
    """Folder name for a datastore of these (normalised) organs, e.g. ``liver`` or ``liver_spleen``."""
    return "_".join(organs)


def read_dicom_series(folder: Path) -> tuple[sitk.Image, dict]:
    """Read the single DICOM series in ``folder`` (slices sorted by position) with SimpleITK/GDCM.

    Returns:
        The volume and a few header facts (modality, manufacturer, model, number of slices).
    """
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if len(series_ids) != 1:
        raise SampleDataError(f"{folder}: expected one DICOM series, found {len(series_ids)}")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    tags = {"modality": "0008|0060", "manufacturer": "0008|0070", "model": "0008|1090"}
    facts = {name: reader.GetMetaData(0, tag).strip() for name, tag in tags.items() if reader.HasMetaDataKey(0, tag)}
    facts["slices"] = len(files)
    return image, facts


def _class_histogram(segmentation: sitk.Image) -> np.ndarray:
    return np.bincount(sitk.GetArrayViewFromImage(segmentation).ravel().astype(np.int64), minlength=256)


def _load_studies(sample: SampleData, wanted: Sequence[str]) -> list[_Study]:
    loaders: dict[str, Callable[[], _Study]] = {}

    def nifti_pair(image_id: str, modality: str, image_path: Path, seg_path: Path, class_map: str) -> _Study:
        image = sitk.ReadImage(str(image_path))
        segmentation = sitk.ReadImage(str(seg_path))
        require_same_grid(image, segmentation, f"{seg_path.name} vs {image_path.name}")
        return _Study(image_id, modality, image, segmentation, class_map, (image_path.name, seg_path.name))

    def dicom() -> _Study:
        image, facts = read_dicom_series(sample.example_ct_dicom)
        stored = sitk.ReadImage(str(sample.example_seg_dicom))
        # The reference label's y axis runs the other way (direction -1, origin at the far edge); resampling
        # through physical space puts every voxel where it belongs without assuming which axis is flipped.
        on_grid = sitk.Resample(stored, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, stored.GetPixelID())
        before, after = _class_histogram(stored), _class_histogram(on_grid)
        if not np.array_equal(before[1:], after[1:]):
            changed = [int(c) for c in np.nonzero(before[1:] != after[1:])[0] + 1]
            raise SampleDataError(
                f"{sample.example_seg_dicom.name} does not map voxel-for-voxel onto the DICOM series grid "
                f"(classes {changed[:10]} changed counts); the files are not the expected pair"
            )
        remarks = (
            f"label resampled from {sample.example_seg_dicom.name} (grid {grid_of(stored)}) onto the series grid "
            "in physical space with nearest neighbour; every class kept its voxel count",
        )
        return _Study(
            "example_ct_dicom",
            facts.get("modality", "CT"),
            image,
            on_grid,
            "total",
            (f"{sample.example_ct_dicom.name}/ ({facts['slices']} DICOM files)", sample.example_seg_dicom.name),
            remarks,
            {"dicom": facts},
        )

    def ct_chest4() -> _Study:
        image = sitk.ReadImage(str(sample.ct_chest4))
        return _Study(
            "CTChest4",
            "CT",
            image,
            None,
            None,
            (sample.ct_chest4.name,),
            ("unlabeled: slicerio's Segmentation.seg.nrrd has no liver (or other abdominal organ) segment",),
        )

    loaders["example_ct"] = lambda: nifti_pair(
        "example_ct", "CT", sample.example_ct, sample.example_seg_fast_force_split, "total"
    )
    loaders["example_ct_sm"] = lambda: nifti_pair(
        "example_ct_sm", "CT", sample.example_ct_sm, sample.example_seg, "total"
    )
    loaders["example_mr_sm"] = lambda: nifti_pair(
        "example_mr_sm", "MR", sample.example_mr_sm, sample.example_seg_mr, "total_mr"
    )
    loaders["example_ct_dicom"] = dicom
    loaders["CTChest4"] = ct_chest4
    return [loaders[image_id]() for image_id in wanted]


def _training_roles(labeled_ids: Sequence[str]) -> dict:
    """The notes' ``training`` entry: labelled images excluded from training, and those validated on."""
    return {
        "exclude": {i: why for i, why in HELD_OUT_IMAGES.items() if i in labeled_ids},
        "validate_on": [i for i in HELD_OUT_IMAGES if i in labeled_ids],
        "derived_from": {
            i: {"source": source, "why": why} for i, (source, why) in DERIVED_IMAGES.items() if i in labeled_ids
        },
        "note": "labelled for evaluation, never trained on: the MedAttnSlicer app's /train leaves 'exclude' out of "
        "training and computes its validation metric on 'validate_on'; a 'derived_from' image is left out of "
        "training and validation whenever its source image is labelled in the same datastore. Edit this entry to "
        "change that.",
    }


def _organ_label(study: _Study, organ_values: Sequence[int]) -> sitk.Image:
    """uint8 label on the image grid: voxel = i where the segmentation holds ``organ_values[i - 1]``."""
    segmentation = sitk.GetArrayViewFromImage(study.segmentation)
    label = np.zeros(segmentation.shape, dtype=np.uint8)
    for index, value in enumerate(organ_values, start=1):
        label[segmentation == value] = index
    image = sitk.GetImageFromArray(label)
    image.CopyInformation(study.image)
    return image


def _organ_statistics(study: _Study, label: sitk.Image, organs: Sequence[str]) -> dict:
    labels = sitk.GetArrayViewFromImage(label)
    intensities = sitk.GetArrayViewFromImage(study.image)
    voxel_ml = float(np.prod(study.image.GetSpacing())) / 1000.0
    counts, volumes, means = {}, {}, {}
    for index, organ in enumerate(organs, start=1):
        mask = labels == index
        count = int(mask.sum())
        counts[organ] = count
        volumes[organ] = round(count * voxel_ml, 2)
        means[organ] = round(float(intensities[mask].mean()), 1) if count else None
    return {"voxel_counts": counts, "volumes_ml": volumes, "mean_intensity": means}


def _slab_relation(sample: SampleData, organs: Sequence[str], total_values: dict[str, int]) -> dict:
    """Is example_ct_sm a voxel-identical crop of example_ct?  Compare the arrays, and their headers."""
    large = sitk.ReadImage(str(sample.example_ct))
    small = sitk.ReadImage(str(sample.example_ct_sm))
    found = find_slab(sitk.GetArrayFromImage(large).astype(np.int64), sitk.GetArrayFromImage(small).astype(np.int64))
    relation: dict = {"images": ["example_ct", "example_ct_sm"]}
    if found is None:
        relation.update(is_crop=False, finding="example_ct_sm is not a voxel-identical slab of example_ct")
        return relation
    numpy_axis, start = found
    itk_axis = 2 - numpy_axis
    count = small.GetSize()[itk_axis]
    index = [0, 0, 0]
    index[itk_axis] = start
    slab_origin = large.TransformIndexToPhysicalPoint(index)
    header_consistent = bool(np.allclose(slab_origin, small.GetOrigin(), atol=1e-3))
    relation.update(
        is_crop=True,
        itk_axis=itk_axis,
        first_index=start,
        last_index=start + count - 1,
        finding=(
            f"every voxel of example_ct_sm equals example_ct at index {'ijk'[itk_axis]}={start}..{start + count - 1} "
            "(same intensities, different pixel type); a model trained on one must not be evaluated on the other"
        ),
        header_consistent=header_consistent,
        header_note=(
            "example_ct_sm's origin matches the slab's position in example_ct"
            if header_consistent
            else f"example_ct_sm keeps example_ct's origin {list(np.round(small.GetOrigin(), 3))} although its voxels "
            f"start at {list(np.round(slab_origin, 3))}: the two do not overlay in physical space"
        ),
    )
    # How far apart are the two TotalSegmentator outputs where the images coincide?
    big_seg = sitk.GetArrayFromImage(sitk.ReadImage(str(sample.example_seg_fast_force_split)))
    small_seg = sitk.GetArrayFromImage(sitk.ReadImage(str(sample.example_seg)))
    big_slab = np.take(big_seg, range(start, start + count), axis=numpy_axis)
    dice = {}
    for organ in organs:
        if organ in total_values:
            a, b = big_slab == total_values[organ], small_seg == total_values[organ]
            total = int(a.sum() + b.sum())
            dice[organ] = round(2.0 * int((a & b).sum()) / total, 4) if total else None
    relation["reference_label_dice_on_overlap"] = dice
    return relation


def _slicer_segments(path: Path) -> list[dict]:
    header = nrrd.read_header(str(path))
    segments = []
    index = 0
    while f"Segment{index}_Name" in header:
        segments.append(
            {
                "name": header[f"Segment{index}_Name"],
                "label_value": int(header.get(f"Segment{index}_LabelValue", index + 1)),
                "layer": int(header.get(f"Segment{index}_Layer", 0)),
            }
        )
        index += 1
    if segments and all(s["layer"] == 0 for s in segments):
        counts = _class_histogram(sitk.ReadImage(str(path)))
        for segment in segments:
            segment["voxel_count"] = int(counts[segment["label_value"]]) if segment["label_value"] < counts.size else 0
    return segments


def _write_if_needed(image: sitk.Image, path: Path, staging: Path, force: bool) -> str:
    if path.exists() and not force:
        return "kept_existing"
    atomic_write_image(image, path, staging)
    return "written"


def build_datastore(
    organs: Sequence[str] = ("liver",),
    out_dir: Path | str | None = None,
    *,
    data_dir: Path | str | None = None,
    image_ids: Sequence[str] | None = None,
    force: bool = False,
) -> BuiltDatastore:
    """Write a MONAI Label local datastore for ``organs`` and return where it is.

    Args:
        organs: TotalSegmentator structure names (``liver``, ``spleen``, ``kidney_left``...); label value i+1
            for ``organs[i]``. Looked up by name in ``total`` for CT and ``total_mr`` for MR.
        out_dir: datastore folder; default ``<data>/datastore/<organs joined by _>``.
        data_dir: sample-data cache (fetched if needed); default :func:`default_data_dir`.
        image_ids: subset of :data:`STUDY_IDS` to include; default all.
        force: overwrite existing images and labels (by default an existing file is kept, so a label a user
            saved under ``labels/final`` survives a rebuild).

    Raises:
        UnknownOrganError: an organ is in neither class map (the message lists close matches).

    A study whose class map lacks one of the organs (e.g. ``trachea`` for MR) is left out and listed under
    ``skipped_images`` in the notes.
    """
    sample = fetch(data_dir)
    class_maps = load_class_maps(sample.data_dir)
    names, lookup = resolve_organs(organs, class_maps)
    wanted = list(STUDY_IDS if image_ids is None else image_ids)
    unknown = [i for i in wanted if i not in STUDY_IDS]
    if unknown or not wanted:
        raise SampleDataError(f"unknown or no image ids {unknown}; choose from {list(STUDY_IDS)}")
    out = Path(out_dir) if out_dir is not None else sample.data_dir / "datastore" / datastore_name(names)
    out = out.expanduser().resolve()
    labels_dir = out / "labels" / "final"
    staging = out / ".staging"
    labels_dir.mkdir(parents=True, exist_ok=True)

    with FileLock(str(out / ".sample_data.lock")):
        notes_images: dict[str, dict] = {}
        skipped: dict[str, str] = {}
        written_ids: list[str] = []
        labeled_ids: list[str] = []
        for study in _load_studies(sample, wanted):
            entry: dict = {
                "image": f"{study.image_id}.nii.gz",
                "modality": study.modality,
                "source_files": list(study.sources),
                "source_package": SLICERIO.package if study.image_id == "CTChest4" else TOTALSEGMENTATOR.package,
                **grid_of(study.image),
                "pixel_type": study.image.GetPixelIDTypeAsString(),
            }
            if study.extra:
                entry.update(study.extra)
            label = None
            if study.segmentation is not None:
                values = lookup[study.class_map]
                missing = [n for n in names if n not in values]
                if missing:
                    skipped[study.image_id] = f"class map {study.class_map!r} has no {missing}"
                    logger.info("skipping %s: %s", study.image_id, skipped[study.image_id])
                    continue
                label = _organ_label(study, [values[n] for n in names])
                require_same_grid(study.image, label, study.image_id)
                entry.update(
                    label=f"labels/final/{study.image_id}.nii.gz",
                    label_source="TotalSegmentator output",
                    class_map=study.class_map,
                    source_class_values={n: values[n] for n in names},
                    **_organ_statistics(study, label, names),
                )
            else:
                entry["label"] = None
            entry["image_status"] = _write_if_needed(study.image, out / entry["image"], staging, force)
            if label is not None:
                entry["label_status"] = _write_if_needed(label, labels_dir / f"{study.image_id}.nii.gz", staging, force)
                if entry["label_status"] == "kept_existing":
                    entry["label_note"] = (
                        "a label already saved here was kept (rebuild with force=True / --force to replace it)"
                    )
                labeled_ids.append(study.image_id)
            else:
                entry["label_status"] = "none"
            if study.remarks:
                entry["remarks"] = list(study.remarks)
            notes_images[study.image_id] = entry
            written_ids.append(study.image_id)

        notes = {
            "labels_are": LABELS_ARE,
            "label_values": {"background": 0, **{n: i for i, n in enumerate(names, start=1)}},
            "organs": names,
            "images": notes_images,
            "skipped_images": skipped,
            "relations": [_slab_relation(sample, names, lookup["total"])],
            "training": _training_roles(labeled_ids),
            "unlabeled_reference_segmentations": {
                "CTChest4": {
                    "file": f"{SLICERIO.cache_dir}/{sample.ct_chest4_segmentation.name}",
                    "segments": _slicer_segments(sample.ct_chest4_segmentation),
                }
            },
            "provenance": [source.provenance() for source in SOURCES],
        }
        notes_path = out / NOTES_FILENAME
        atomic_write_json(notes_path, notes)
        try:
            staging.rmdir()
        except OSError:  # absent, or holds a file of a concurrent writer
            pass
    return BuiltDatastore(
        path=out,
        notes_path=notes_path,
        image_ids=tuple(written_ids),
        labeled_ids=tuple(labeled_ids),
        label_values={n: i for i, n in enumerate(names, start=1)},
    )

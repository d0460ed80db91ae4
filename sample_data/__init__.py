# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Sample data for MedAttnSlicer: small public CT/MR volumes and a ready MONAI Label datastore.

``python -m sample_data`` (or :func:`fetch` + :func:`build_datastore`) downloads two pinned PyPI files with
``pip download --no-deps`` and checks their sha256:

* ``totalsegmentator==2.18.0`` sdist (Apache-2.0): the CT/MR volumes of its ``tests/reference_files`` and the
  model's own segmentations of them (multi-class, class maps ``total`` and ``total_mr``);
* ``slicerio==1.4.0`` wheel (MIT): ``CTChest4.nrrd`` and a Slicer ``Segmentation.seg.nrrd`` of it.

The needed members are extracted into a git-ignored cache (``<repo>/.data``, or ``$MEDATTN_DATA_DIR``, or
``--data-dir``); later runs verify the cache and work offline.

Caveats, measured on these files:

* The labels are TotalSegmentator outputs kept as regression references, not manual ground truth.
* ``example_ct_sm`` is a crop of ``example_ct``: its 30 slices are voxel-for-voxel identical to ``example_ct``
  slices k = 82..111 (same intensities, stored as int16 instead of int32). Its header keeps ``example_ct``'s
  origin, so the two do not overlay in physical space although they are the same anatomy. A model trained on
  one of them must not be evaluated on the other. ``build_datastore`` re-checks this on every build and records
  it under ``relations`` in ``datastore_notes.json``.
* ``example_seg_dicom`` is stored with its y axis flipped relative to the DICOM series; it is resampled onto the
  series grid in physical space (nearest neighbour).
"""

from .class_maps import load_class_maps, parse_class_maps, resolve_organs
from .datastore import STUDY_IDS, BuiltDatastore, build_datastore, datastore_name, read_dicom_series
from .errors import ArchiveContentError, ChecksumError, DownloadError, SampleDataError, UnknownOrganError
from .fetch import SampleData, fetch
from .paths import DATA_DIR_ENV, default_data_dir
from .sources import SLICERIO, SOURCES, TOTALSEGMENTATOR, SourceArchive

__all__ = [
    "fetch",
    "SampleData",
    "build_datastore",
    "BuiltDatastore",
    "STUDY_IDS",
    "datastore_name",
    "read_dicom_series",
    "default_data_dir",
    "DATA_DIR_ENV",
    "load_class_maps",
    "parse_class_maps",
    "resolve_organs",
    "SourceArchive",
    "TOTALSEGMENTATOR",
    "SLICERIO",
    "SOURCES",
    "SampleDataError",
    "DownloadError",
    "ChecksumError",
    "ArchiveContentError",
    "UnknownOrganError",
]

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""A hospital PACS as the app's datastore, through DICOMweb (QIDO-RS, WADO-RS, STOW-RS).

- :mod:`.client`: the DICOMweb client with MONAI Label's credential settings; PACS failures as HTTP 503.
- :mod:`.series`: a fetched DICOM series -> a NIfTI volume the models read (or a 422 naming why not).
- :mod:`.seg`: label maps -> DICOM SEG (highdicom) and back, on the source series' grid.
- :mod:`.datastore`: :class:`PacsDatastore`, MONAI Label's ``Datastore`` on the PACS with a local cache.
- :mod:`.factory`: the datastore for ``--studies <URL>`` (settings, cache folder, modalities).
"""

from monailabel_app.lib.dicomweb.datastore import PacsDatastore, PacsStartError
from monailabel_app.lib.dicomweb.errors import PacsRejectedError, PacsUnavailableError
from monailabel_app.lib.dicomweb.factory import pacs_datastore, pacs_modalities

__all__ = [
    "PacsDatastore",
    "PacsRejectedError",
    "PacsStartError",
    "PacsUnavailableError",
    "pacs_datastore",
    "pacs_modalities",
]

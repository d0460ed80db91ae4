# Copyright MedAttnSlicer contributors. Apache-2.0.
"""A DICOM series fetched from the PACS -> one NIfTI volume the models read, or a 422 saying why it cannot be.

The series' instances arrive in their stored transfer syntax (JPEG 2000, JPEG-LS, RLE, ...): SimpleITK's GDCM
decodes them, sorts the slices along their normal and applies the rescale to Hounsfield units. The SOP Instance UIDs
in slice order are kept: DICOM SEG frames reference the source instances slice by slice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import pydicom
import SimpleITK as sitk

from monailabel_app.lib.errors import BadInputError

__all__ = ["SeriesVolume", "check_series_attributes", "series_to_nifti", "NON_IMAGE_MODALITIES"]

# modalities that hold no image a model could segment or classify
NON_IMAGE_MODALITIES = {"SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "REG", "DOC", "ECG", "AU"}


@dataclass(frozen=True)
class SeriesVolume:
    """A converted series.

    Attributes:
        path: the NIfTI file.
        files: the DICOM files in slice order (index ``k`` is the volume's slice ``k``).
        sop_instance_uids: their SOP Instance UIDs, same order.
        size: volume size ``(x, y, z)``.
    """

    path: str
    files: tuple[str, ...]
    sop_instance_uids: tuple[str, ...]
    size: tuple[int, ...]


def check_series_attributes(
    series_uid: str, modality: str, accepted: Sequence[str], samples_per_pixel: int | None = None
) -> None:
    """Reject a series the served models cannot take.

    Raises:
        BadInputError: a non-image modality, a modality the served models do not take, or colour pixels.
    """
    modality = (modality or "").upper()
    if modality in NON_IMAGE_MODALITIES:
        raise BadInputError(
            f"series {series_uid} is a {modality} object, not an image: the models take image series "
            f"({', '.join(accepted)})."
        )
    if modality not in accepted:
        raise BadInputError(
            f"series {series_uid} has modality {modality or 'unknown'}; the served models take {', '.join(accepted)} "
            "series (--conf pacs_modalities changes which the server lists and accepts)."
        )
    if samples_per_pixel is not None and int(samples_per_pixel) != 1:
        raise BadInputError(
            f"series {series_uid} holds colour images ({samples_per_pixel} samples per pixel, e.g. an RGB secondary "
            "capture); the models take grey-scale CT/MR volumes."
        )


def series_to_nifti(folder: str, series_uid: str, out_path: str, accepted: Sequence[str]) -> SeriesVolume:
    """Convert the DICOM files of ``series_uid`` in ``folder`` into ``out_path`` (``.nii.gz``).

    Args:
        folder: the fetched instances (one file each, any transfer syntax).
        series_uid: the series to read (other files in the folder are ignored).
        out_path: NIfTI file to write.
        accepted: modalities the served models take.

    Raises:
        BadInputError: no instance, colour pixels, a non-image object, or pixels that cannot be decoded (named).
    """
    headers: dict[str, pydicom.Dataset] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        try:
            headers[path] = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is the PACS's answer, reported as such
            raise BadInputError(f"series {series_uid}: instance {name} is not a readable DICOM file: {err}") from err
    if not headers:
        raise BadInputError(f"series {series_uid} has no instance in the PACS.")
    first = next(iter(headers.values()))
    check_series_attributes(series_uid, str(first.get("Modality", "")), accepted, first.get("SamplesPerPixel", 1))
    if not first.get("Rows") or not first.get("Columns"):
        raise BadInputError(f"series {series_uid} holds no image (SOP class {first.get('SOPClassUID')}).")
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series_uid)) or sorted(headers)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as err:
        reason = next((line.strip() for line in str(err).splitlines() if line.strip()), str(err))
        raise BadInputError(f"series {series_uid} could not be decoded: {reason}") from err
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise BadInputError(
            f"series {series_uid} holds colour images ({image.GetNumberOfComponentsPerPixel()} components per "
            "pixel); the models take grey-scale CT/MR volumes."
        )
    if image.GetDimension() == 3 and image.GetSize()[2] != len(files):
        raise BadInputError(
            f"series {series_uid}: {len(files)} files gave {image.GetSize()[2]} slices (multi-frame instances are "
            "not supported in a series of several files)."
        )
    sitk.WriteImage(image, out_path, useCompression=True, compressionLevel=1)
    by_name = {os.path.basename(path): ds for path, ds in headers.items()}
    uids = tuple(str(by_name[os.path.basename(f)].SOPInstanceUID) for f in files)
    return SeriesVolume(out_path, tuple(files), uids, tuple(int(s) for s in image.GetSize()))

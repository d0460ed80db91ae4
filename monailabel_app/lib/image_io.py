# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Image headers and writing results on an input image's exact grid (SimpleITK)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from monailabel_app.lib.errors import BadInputError

__all__ = [
    "ImageHeader",
    "read_header",
    "check_finite_nifti",
    "write_on_grid",
    "read_array_on_grid",
    "voxel_volume_ml",
]


@dataclass(frozen=True)
class ImageHeader:
    """Geometry of an image file as ITK sees it (LPS physical space).

    Attributes:
        path: the file.
        size: voxels per axis in index order ``(x, y[, z])``.
        spacing: mm per voxel along each index axis.
        origin: physical position (mm) of voxel 0.
        direction: row-major direction cosine matrix (``dims * dims`` values).
        components: values per voxel (3 for RGB).
        pixel_type: ITK pixel type name (e.g. ``"16-bit signed integer"``).
    """

    path: str
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    components: int
    pixel_type: str = ""

    @property
    def is_float(self) -> bool:
        """Whether the stored values are floating point (the only ones that can hold NaN)."""
        return "float" in self.pixel_type.lower()

    @property
    def dims(self) -> int:
        """Number of spatial dimensions (a 3D file with one slice counts as 3D)."""
        return len(self.size)

    @property
    def array_shape(self) -> tuple[int, ...]:
        """The shape of the image as MONAI's ITKReader returns it (index order, no channel)."""
        return tuple(self.size)


def read_header(path: str, what: str = "image") -> ImageHeader:
    """Read an image file's geometry without its pixels.

    Raises:
        BadInputError: the file is missing, empty or not an image ITK can read (named in the message).
    """
    if not path or not os.path.exists(path):
        raise BadInputError(f"the {what} file {path!r} does not exist.")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise BadInputError(f"the {what} file {os.path.basename(path)!r} is empty.")
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        reason = next((line for line in first if "ERROR" in line or "Could not" in line or "Unable" in line), "")
        raise BadInputError(
            f"the {what} file {os.path.basename(path)!r} is not a readable image (NIfTI, NRRD, PNG, ...)"
            + (f": {reason.strip()}" if reason else ".")
        ) from err
    size = tuple(int(s) for s in reader.GetSize())
    if len(size) not in (2, 3):
        raise BadInputError(
            f"the {what} has {len(size)} dimensions (size {size}); only 2D and 3D images are supported."
        )
    return ImageHeader(
        path=path,
        size=size,
        spacing=tuple(float(s) for s in reader.GetSpacing()),
        origin=tuple(float(o) for o in reader.GetOrigin()),
        direction=tuple(float(d) for d in reader.GetDirection()),
        components=int(reader.GetNumberOfComponents()),
        pixel_type=sitk.GetPixelIDValueAsString(reader.GetPixelID()),
    )


def check_finite_nifti(path: str, what: str = "image") -> None:
    """Reject a floating-point NIfTI file holding NaN or infinite values.

    ITK's NIfTI reader silently turns NaNs into 0, so the check after loading (``ValidateImaged``) cannot see them
    in NIfTI files; nibabel reads the stored values. Integer NIfTI files cannot hold NaNs and are not scanned.

    Raises:
        BadInputError: naming how many values are not finite.
    """
    if not path.endswith((".nii", ".nii.gz")):
        return
    import nibabel as nib

    try:
        image = nib.load(path)
    except Exception:  # unreadable by nibabel: ITK's own reading reports the problem
        return
    if not np.issubdtype(image.get_data_dtype(), np.floating):
        return
    values = np.asanyarray(image.dataobj)
    n_bad = int(np.count_nonzero(~np.isfinite(values)))
    if n_bad:
        raise BadInputError(
            f"the {what} contains {n_bad} NaN or infinite values; replace them (e.g. by the background intensity)."
        )


def voxel_volume_ml(header: ImageHeader) -> float:
    """Volume of one voxel in millilitres (mm^3 / 1000); a 2D pixel counts as area x 1 mm."""
    return float(np.prod(header.spacing)) / 1000.0


def write_on_grid(
    array: np.ndarray, header: ImageHeader, path: str | None = None, dtype: type = np.uint8, compress: bool = True
) -> str:
    """Write ``array`` with the exact origin, spacing and direction of ``header``.

    Args:
        array: values in index order ``(x, y[, z])`` (MONAI/ITKReader order), same size as the header.
        header: the input image's geometry.
        path: output file (``.nii.gz`` temp file when None).
        dtype: stored pixel type.
        compress: gzip the output.

    Returns:
        the written path.
    """
    array = np.asarray(array)
    if array.ndim == len(header.size) + 1 and array.shape[0] == 1:
        array = array[0]
    if tuple(array.shape) != tuple(header.size):
        raise ValueError(f"result of size {tuple(array.shape)} does not match the image size {header.size}.")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.astype(dtype, copy=False).T))
    image.SetSpacing(header.spacing)
    image.SetOrigin(header.origin)
    image.SetDirection(header.direction)
    if path is None:
        fd, path = tempfile.mkstemp(suffix=".nii.gz", prefix="medattn_")
        os.close(fd)
    sitk.WriteImage(image, path, useCompression=compress, compressionLevel=1)
    return path


def read_array_on_grid(path: str, header: ImageHeader, what: str = "label") -> np.ndarray:
    """Read a label file that must share ``header``'s grid; returns its values in index order ``(x, y[, z])``.

    Raises:
        BadInputError: unreadable file, or a size/geometry different from the image's (both named).
    """
    other = read_header(path, what)
    if other.components != 1:
        raise BadInputError(f"the {what} has {other.components} components per voxel; a label map has one.")
    if tuple(other.size) != tuple(header.size):
        raise BadInputError(
            f"the {what} has size {other.size} but the image has size {header.size}; "
            "a label must be on the image's grid."
        )
    if not np.allclose(other.spacing, header.spacing, rtol=1e-3, atol=1e-4):
        raise BadInputError(f"the {what} spacing {other.spacing} differs from the image spacing {header.spacing}.")
    if not np.allclose(other.origin, header.origin, atol=max(1e-3, 1e-3 * max(header.spacing))):
        raise BadInputError(f"the {what} origin {other.origin} differs from the image origin {header.origin}.")
    if not np.allclose(other.direction, header.direction, atol=1e-3):
        raise BadInputError(
            f"the {what} direction {other.direction} differs from the image direction {header.direction}."
        )
    try:
        values = sitk.GetArrayFromImage(sitk.ReadImage(path)).T
    except RuntimeError as err:
        raise BadInputError(f"the {what} file {os.path.basename(path)!r} could not be read: {err}") from err
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        raise BadInputError(f"the {what} contains NaN or infinite values.")
    return values

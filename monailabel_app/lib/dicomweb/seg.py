# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Label maps <-> DICOM SEG (highdicom), on the grid of the source series.

A label map of values ``{name: value}`` becomes one binary SEG with a segment per value: its label is the name, its
coded property type the SNOMED CT code of that name when pydicom's code dictionary has one (``Liver`` -> SCT
10200004; otherwise the generic ``Tissue``), its recommended display colour the label map's colour (CIELab, as
DICOM stores it). Frames reference the source instances, so a viewer places the SEG on the source images; reading it
back (:func:`read_seg`) gives the label values voxel for voxel on the source grid.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from monailabel_app.lib.comparison import COMPARISON_COLOURS
from monailabel_app.lib.errors import BadInputError

__all__ = ["SegmentSpec", "segment_specs", "comparison_specs", "write_seg", "read_seg", "rgb_to_dicom_lab"]

MANUFACTURER = "MedAttnSlicer"
SOFTWARE_VERSION = "0.1.0"
# colours of common labels (3D Slicer's generic anatomy colours); other values get a palette colour
_NAMED_COLOURS = {
    "liver": (221, 130, 101),
    "spleen": (157, 108, 162),
    "kidney": (185, 102, 83),
    "kidney_left": (185, 102, 83),
    "kidney_right": (185, 102, 83),
    "pancreas": (249, 180, 111),
    "stomach": (216, 132, 105),
    "gallbladder": (139, 150, 98),
    "lung": (197, 165, 145),
}
_PALETTE = ((128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (216, 101, 79), (230, 220, 70))
# CID 7150 "Segmentation Property Categories" (pydicom's dictionary has two codes under this name)
_ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
_GENERIC_NAME = re.compile(r"^label[ _]?(\d+)$")


@dataclass(frozen=True)
class SegmentSpec:
    """One segment: the label map ``value`` it holds, its ``name`` and display colour ``rgb``."""

    value: int
    name: str
    rgb: tuple[int, int, int]


def _colour(name: str, index: int) -> tuple[int, int, int]:
    return _NAMED_COLOURS.get(name.lower(), _PALETTE[index % len(_PALETTE)])


def segment_specs(labels: dict[str, int], values_present: Sequence[int] = ()) -> list[SegmentSpec]:
    """Segments of a label map: every named label (in value order), then any other value present as
    ``label <value>``."""
    specs = [
        SegmentSpec(int(v), n, _colour(n, i)) for i, (n, v) in enumerate(sorted(labels.items(), key=lambda x: x[1]))
    ]
    named = {s.value for s in specs}
    for value in sorted(int(v) for v in values_present if int(v) != 0 and int(v) not in named):
        specs.append(SegmentSpec(value, f"label {value}", _colour("", len(specs))))
    return specs


def comparison_specs() -> list[SegmentSpec]:
    """Segments of an over/under comparison map (agreement white, over green, under red)."""
    return [SegmentSpec(int(c["value"]), name, tuple(c["rgb"])) for name, c in COMPARISON_COLOURS.items()]


def rgb_to_dicom_lab(rgb: Sequence[int]) -> list[int]:
    """sRGB (0-255) -> DICOM's scaled CIELab triplet (``RecommendedDisplayCIELabValue``, 0-65535 each)."""
    from skimage.color import rgb2lab

    lab = rgb2lab(np.asarray(rgb, dtype=np.float64).reshape(1, 1, 3) / 255.0)[0, 0]
    scaled = [lab[0] * 65535.0 / 100.0, (lab[1] + 128.0) * 65535.0 / 255.0, (lab[2] + 128.0) * 65535.0 / 255.0]
    return [int(round(min(max(v, 0.0), 65535.0))) for v in scaled]


def _property_type(name: str) -> tuple[Code, Code]:
    """(category, type) codes for a label name: an anatomical structure when SNOMED CT knows the name."""
    key = "".join(part.capitalize() for part in re.split(r"[\s_\-]+", name) if part)
    try:
        code = getattr(codes.SCT, key)
    except AttributeError:
        return codes.SCT.Tissue, codes.SCT.Tissue
    return _ANATOMICAL_STRUCTURE, code


def write_seg(
    labels_zyx: np.ndarray,
    sources: Sequence[pydicom.Dataset],
    specs: Sequence[SegmentSpec],
    series_uid: str,
    series_number: int = 9001,
    description: str = "MedAttnSlicer label",
    algorithm: str = "MedAttnSlicer",
) -> hd.seg.Segmentation:
    """A DICOM SEG of a label map on the source series' grid.

    Args:
        labels_zyx: label values, shape ``(slices, rows, columns)``; slice ``k`` lies on ``sources[k]``.
        sources: the source instances in slice order (headers suffice; pixels are not decoded).
        specs: the segments (values outside them are an error).
        series_uid: the new SEG series' UID.
        series_number: its Series Number.
        description: its Series Description.
        algorithm: the software named as the segmenting algorithm.

    Raises:
        BadInputError: a shape that does not match the series, or values no segment names.
    """
    labels_zyx = np.asarray(labels_zyx)
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    if labels_zyx.shape != (len(sources), rows, columns):
        raise BadInputError(
            f"the label has shape (slices, rows, columns) {labels_zyx.shape}; its series is "
            f"{(len(sources), rows, columns)}."
        )
    specs = sorted(specs, key=lambda s: s.value)
    unknown = sorted(set(np.unique(labels_zyx).tolist()) - {0} - {s.value for s in specs})
    if unknown:
        raise BadInputError(f"the label holds values {unknown} that no segment names.")
    # segment numbers 1..N in value order
    numbered = np.zeros(labels_zyx.shape, np.uint8)
    for number, spec in enumerate(specs, start=1):
        numbered[labels_zyx == spec.value] = number
    algorithm_id = hd.AlgorithmIdentificationSequence(
        name=algorithm, version=SOFTWARE_VERSION, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = []
    for number, spec in enumerate(specs, start=1):
        category, prop = _property_type(spec.name)
        item = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=spec.name,
            segmented_property_category=category,
            segmented_property_type=prop,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
            algorithm_identification=algorithm_id,
        )
        item.RecommendedDisplayCIELabValue = rgb_to_dicom_lab(spec.rgb)
        descriptions.append(item)
    seg = hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=numbered,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="MedAttnSlicer MONAI Label app",
        software_versions=SOFTWARE_VERSION,
        device_serial_number="0",
        series_description=description,
        omit_empty_frames=False,
    )
    return seg


def _value_of(description: pydicom.Dataset, labels: dict[str, int]) -> int | None:
    name = str(description.get("SegmentLabel", ""))
    if name in labels:
        return int(labels[name])
    lowered = {k.lower(): v for k, v in labels.items()}
    if name.lower() in lowered:
        return int(lowered[name.lower()])
    match = _GENERIC_NAME.match(name.strip().lower())
    return int(match.group(1)) if match else None


def read_seg(
    seg: pydicom.Dataset, source_sop_instance_uids: Sequence[str], labels: dict[str, int]
) -> tuple[np.ndarray, dict[str, int]]:
    """A DICOM SEG as a label map on its source series.

    Args:
        seg: the SEG instance.
        source_sop_instance_uids: the source series' SOP Instance UIDs in slice order.
        labels: ``{name: value}``: a segment named ``name`` gets ``value``; ``label <v>`` gets ``v``; any other
            segment its segment number.

    Returns:
        ``(labels_zyx, {segment name: value used})``; ``labels_zyx`` has shape ``(slices, rows, columns)``.

    Raises:
        BadInputError: overlapping segments, or a SEG that references none of these instances.
    """
    segmentation = seg if isinstance(seg, hd.seg.Segmentation) else hd.seg.Segmentation.from_dataset(seg, copy=False)
    referenced = {uid for _, _, uid in segmentation.get_source_image_uids()}
    missing = [u for u in source_sop_instance_uids if u not in referenced]
    if len(missing) == len(source_sop_instance_uids):
        raise BadInputError("the DICOM SEG references none of its series' instances.")
    numbers = list(segmentation.segment_numbers)
    present = [u for u in source_sop_instance_uids if u in referenced]
    stack = segmentation.get_pixels_by_source_instance(
        source_sop_instance_uids=present, segment_numbers=numbers, combine_segments=False
    )  # (frames, rows, columns, segments)
    rows, columns = stack.shape[1:3]
    out = np.zeros((len(source_sop_instance_uids), rows, columns), np.uint8)
    index = {u: k for k, u in enumerate(source_sop_instance_uids)}
    used: dict[str, int] = {}
    for s, number in enumerate(numbers):
        description = segmentation.get_segment_description(number)
        value = _value_of(description, labels)
        value = int(number) if value is None else value
        used[str(description.SegmentLabel)] = value
        for f, uid in enumerate(present):
            mask = stack[f, :, :, s] > 0
            if np.any(out[index[uid]][mask]):
                raise BadInputError(
                    f"the DICOM SEG's segments overlap on instance {uid}; a label map cannot hold that."
                )
            out[index[uid]][mask] = value
    return out, used

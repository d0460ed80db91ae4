# Copyright MedAttnSlicer contributors. Apache-2.0.
"""MedAttnSlicerLib: the MedAttnSlicer panel's library.

Two kinds of modules, all using only the Python standard library, numpy and what Slicer itself ships (annotators
need no pip install inside Slicer):

Slicer-free (no ``slicer``, ``qt``, ``vtk``, ``ctk``; imported by this package and tested with plain pytest):
    client       MONAI Label REST client (urllib.request), log-in, cancellable requests
    transport    HTTP exchange: cancel by socket shutdown, bulk bodies in few GIL-free calls
    multipart    multipart/form-data encoding and parsing
    jobs         background job runner polled from the panel's QTimer
    workflows    the panel's server round trips as job functions
    heatmap      explanation methods, saliency maps as heat maps (values, colour table)
    overlay      over/under-segmentation overlay maths (Dice, ml)
    labels       label values <-> named segments
    model_card   typed model entries of ``/info/``
    formatting   text and table rows for the panel
    url_history  remembered server URLs
    errors       readable exception types
    cancel       cancel token shared by the panel and a job

Slicer-side (import ``slicer``/``qt``/``vtk``; imported by MedAttnSlicer.py only, never by this ``__init__``):
    scene_results         results as MRML nodes (Logic mixin)
    scene_export          .seg.nrrd and DICOM SEG (Logic mixin)
    server_panel, segmentation_panel, training_panel, classification_panel   the panel's sections (Widget mixins)
    qt_tables             filling tables and combo boxes
    self_test             cases of the module's self-test (needs Slicer, no server)
"""

from .cancel import CancelToken
from .client import InferResult, MonaiLabelClient
from .errors import (
    MedAttnClientError,
    OperationCancelled,
    ProtocolError,
    ServerError,
    ServerTimeout,
    ServerUnavailable,
    TrainingFailed,
)
from .heatmap import (
    EXPLANATION_METHODS,
    HeatMap,
    axial_array_axis,
    axial_index_axis,
    explanation_key,
    explanation_title,
    heat_map_colors,
    heat_map_from_saliency,
    heat_map_indices,
)
from .jobs import BUSY_POLL_INTERVAL_MS, IDLE_POLL_INTERVAL_MS, Job, JobContext, JobEvent, JobRunner, JobState
from .labels import LabelSegment, compose_label_map, label_values, segment_color, split_label_map
from .model_card import CLASSIFICATION, SEGMENTATION, ModelCard, default_model, model_cards
from .multipart import MultipartPart, encode_multipart_formdata, parse_multipart
from .overlay import (
    AGREEMENT,
    OVER_SEGMENTATION,
    SEGMENT_STYLES,
    UNDER_SEGMENTATION,
    OverlaySegment,
    OverUnderOverlay,
    comparison_map,
    dice_coefficient,
    overlay_from_comparison_map,
    overlay_from_masks,
    voxel_volume_ml,
)
from .url_history import DEFAULT_SERVER_URL, ServerUrlHistory, normalize_server_url

#: The Slicer-side modules (listed above): they import ``slicer``/``qt``; this package never imports them.
SLICER_SIDE_MODULES = (
    "scene_results",
    "scene_export",
    "server_panel",
    "segmentation_panel",
    "training_panel",
    "classification_panel",
    "qt_tables",
    "self_test",
)

__all__ = [
    "SLICER_SIDE_MODULES",
    "CancelToken",
    "InferResult",
    "MonaiLabelClient",
    "MedAttnClientError",
    "OperationCancelled",
    "ProtocolError",
    "ServerError",
    "ServerTimeout",
    "ServerUnavailable",
    "TrainingFailed",
    "EXPLANATION_METHODS",
    "HeatMap",
    "axial_array_axis",
    "axial_index_axis",
    "explanation_key",
    "explanation_title",
    "heat_map_colors",
    "heat_map_from_saliency",
    "heat_map_indices",
    "BUSY_POLL_INTERVAL_MS",
    "IDLE_POLL_INTERVAL_MS",
    "Job",
    "JobContext",
    "JobEvent",
    "JobRunner",
    "JobState",
    "LabelSegment",
    "compose_label_map",
    "label_values",
    "segment_color",
    "split_label_map",
    "CLASSIFICATION",
    "SEGMENTATION",
    "ModelCard",
    "default_model",
    "model_cards",
    "MultipartPart",
    "encode_multipart_formdata",
    "parse_multipart",
    "AGREEMENT",
    "OVER_SEGMENTATION",
    "SEGMENT_STYLES",
    "UNDER_SEGMENTATION",
    "OverlaySegment",
    "OverUnderOverlay",
    "comparison_map",
    "dice_coefficient",
    "overlay_from_comparison_map",
    "overlay_from_masks",
    "voxel_volume_ml",
    "DEFAULT_SERVER_URL",
    "ServerUrlHistory",
    "normalize_server_url",
]

__version__ = "0.1.0"

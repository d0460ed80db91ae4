# Copyright MedAttnSlicer contributors. Apache-2.0.
"""INT8 post-training quantisation of the project's networks and TorchScript artifacts that load without them.

>>> int8 = quantize_int8(trained_fp32, calibration_batches)
>>> save_int8_artifact(int8, example_batch, "sadnn_seg_int8.pt")
>>> net = load_int8_artifact("sadnn_seg_int8.pt")  # torch + the kernel op library only
"""

from networks.quantization.agreement import prediction_agreement
from networks.quantization.artifact import (
    ARTIFACT_FORMAT,
    ArtifactError,
    export_torchscript,
    fused_fp32_model,
    kernel_library_path,
    load_artifact,
    load_fp32_artifact,
    load_int8_artifact,
    read_artifact_metadata,
    save_fp32_artifact,
    save_int8_artifact,
)
from networks.quantization.float_parts import describe_float_parts, float_compute_reasons, register_float_compute
from networks.quantization.modules import QuantizedLeaf, QuantizedLocalSelfAttention
from networks.quantization.quantize import (
    SUPPORTED_BACKENDS,
    cpu_has_vnni,
    float_module_types,
    quantize_int8,
    quantized_engine,
    register_float_module,
)

__all__ = [
    "ARTIFACT_FORMAT",
    "ArtifactError",
    "QuantizedLeaf",
    "QuantizedLocalSelfAttention",
    "SUPPORTED_BACKENDS",
    "cpu_has_vnni",
    "describe_float_parts",
    "export_torchscript",
    "float_compute_reasons",
    "float_module_types",
    "fused_fp32_model",
    "kernel_library_path",
    "load_artifact",
    "load_fp32_artifact",
    "load_int8_artifact",
    "prediction_agreement",
    "quantize_int8",
    "quantized_engine",
    "read_artifact_metadata",
    "register_float_compute",
    "register_float_module",
    "save_fp32_artifact",
    "save_int8_artifact",
]

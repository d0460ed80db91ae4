# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Post-training static INT8 quantisation of a trained FP32 network, calibrated on real images.

What is quantised (eager-mode static, PyTorch QuantizedCPU):

- every ungrouped ``nn.Conv1d/2d/3d`` and every ``nn.Linear`` leaf becomes
  :class:`~networks.quantization.modules.QuantizedLeaf`
  (quantise input -> INT8 conv/linear -> dequantise);
- every :class:`~networks.blocks.local_self_attention.LocalSelfAttention` becomes
  :class:`~networks.quantization.modules.QuantizedLocalSelfAttention` (input quantised once, three INT8 projections,
  fused INT8 attention core on their quint8 outputs, float relative-embedding term);
- everything else stays float (``int8_summary`` lists it, :mod:`networks.quantization.float_parts`): the
  arithmetic of linear/re-/class-attention cores (activation x activation products, softmax, FAVOR+ feature maps),
  grouped/depthwise convolutions (slower in INT8 than FP32 on x86/fbgemm, unless ``quantize_grouped_convs``),
  LayerNorm, BatchNorm, activations, pooling (with indices), unpooling, interpolation, softmax,
  residual adds, transposed convolutions (eager INT8 ``ConvTranspose`` is wrong on x86/fbgemm/onednn), and every
  module whose type is registered with :func:`register_float_module` (attention internals of other networks).

Activations use per-tensor affine quint8 with MinMax observers (the x86 default histogram observer was ~10x less
accurate per layer, and gave no gain on trained SaDNN-seg); weights use per-output-channel symmetric qint8.

Portable artifacts (``reduce_range=True``, the default on every CPU): the *inputs* of FBGEMM's INT8 convolutions and
linears are quantised to 7 bits (0..127), their outputs and the projections' q/k/v (read by our own INT8 core, which
is exact on every CPU) to the full 8 bits. On CPUs without VNNI FBGEMM sums each pair of u8 x s8 products in a
saturating int16; with 7-bit inputs a pair is at most 2 * 127 * 128 = 32512, so an artifact computes the same
integers on an AVX2 CPU as on an AVX-512 VNNI one, wherever it was made (see :mod:`networks.isa`). The summary
records ``fbgemm_input_bits`` and ``portable``.

Value equalisation (on by default): per-tensor quantisation of an attention layer's values gave channels with a
small range only a few of the 256 levels, and that was the dominant INT8 error of trained SaDNN-seg (argmax agreement
with FP32 0.80 without, 0.97 with, on held-out CT slices). Each value channel is scaled to the shared range through
the value projection's weights, and the scale is undone exactly in the INT8 core's per-channel output epilogue
(together with a following BatchNorm and ReLU, ``fuse_epilogue``) or, without fusion, by the following BatchNorm
(folded) or on the layer's output (see :func:`~networks.quantization.observers.value_equalization`). Attention layers
left in float run on the fused FP32 core.

The steps, each a module with its own tests (``tests/test_quantization_steps.py``):

1. layer choice (:mod:`networks.quantization.layer_choice`): INT8 targets and float layers with the reason;
2. calibration (:mod:`networks.quantization.calibration`, observers in :mod:`networks.quantization.observers`):
   activation ranges from real batches;
3. conversion (:mod:`networks.quantization.conversion`, epilogue folding in :mod:`networks.quantization.epilogue`):
   INT8 twins of the calibrated layers, float fallback for layers calibration never reached;
4. packing (:mod:`networks.quantization.packing`): the INT8 layers swapped in and ``int8_summary`` for the artifact.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from networks.blocks.local_self_attention import LocalSelfAttention
from networks.isa import cpu_has_vnni
from networks.quantization.calibration import calibrate
from networks.quantization.conversion import convert_targets
from networks.quantization.layer_choice import (
    GROUPED_CONV_REASON,
    float_module_types,
    register_float_module,
    select_targets,
)
from networks.quantization.observers import FBGEMM_SAFE_INPUT_BITS
from networks.quantization.packing import pack_int8_network

__all__ = [
    "FBGEMM_SAFE_INPUT_BITS",
    "GROUPED_CONV_REASON",
    "SUPPORTED_BACKENDS",
    "cpu_has_vnni",
    "ensure_fused_backend",
    "float_copy",
    "float_module_types",
    "quantize_int8",
    "quantized_engine",
    "register_float_module",
]

SUPPORTED_BACKENDS = ("x86", "fbgemm", "onednn", "qnnpack")

# networks.model_card counts the MACs of the layers quantize_int8 targets with the same choice
_select_targets = select_targets


@contextlib.contextmanager
def quantized_engine(backend: str) -> Iterator[None]:
    """Temporarily set ``torch.backends.quantized.engine`` (weights are packed for the engine active at packing)."""
    if backend not in SUPPORTED_BACKENDS:
        raise ValueError(f"backend must be one of {SUPPORTED_BACKENDS}, got {backend!r}")
    if backend not in torch.backends.quantized.supported_engines:
        raise ValueError(
            f"quantized engine {backend!r} is not available in this torch build "
            f"(supported: {torch.backends.quantized.supported_engines})"
        )
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = backend
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def ensure_fused_backend() -> str:
    """Load the kernel library and make sure ``LocalSelfAttention.backend = "fused"`` selects the fused FP32 core.

    Returns the backend name ("fused").
    """
    from networks.blocks.local_self_attention import ATTENTION_BACKENDS, register_attention_backend
    from networks.kernels import load_kernels, local_attention_fused

    load_kernels()
    if "fused" not in ATTENTION_BACKENDS:
        register_attention_backend("fused", local_attention_fused)
    return "fused"


def float_copy(model: nn.Module, keep_float: frozenset[str] = frozenset()) -> nn.Module:
    """The working copy ``quantize_int8`` converts: a deep copy in eval mode on the CPU whose local self-attention
    layers run on the fused FP32 core.

    The fused core gives the pure-torch core's outputs (to float rounding) ~20x faster: calibration uses it, and so
    do attention layers that stay float in the INT8 network. Loading the kernels also registers
    ``torch.ops.medattn.local_attention_int8``, which the INT8 attention layers call.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``keep_float`` names a module ``model`` does not have.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    work = copy.deepcopy(model).cpu().eval()
    unknown = sorted(keep_float - {name for name, _ in work.named_modules()})
    if unknown:
        raise ValueError(f"keep_float names no module of {type(model).__name__}: {unknown}")
    float_attention = [m for m in work.modules() if isinstance(m, LocalSelfAttention)]
    if float_attention:
        ensure_fused_backend()
        for layer in float_attention:
            layer.backend = "fused"
    return work


def quantize_int8(
    model: nn.Module,
    calibration: Iterable[torch.Tensor],
    *,
    backend: str = "x86",
    reduce_range: bool = True,
    keep_float: Iterable[str] = (),
    equalize_values: bool = True,
    quantize_grouped_convs: bool = False,
    fuse_epilogue: bool = True,
    input_equalization: float = 0.0,
) -> nn.Module:
    """INT8 copy of a trained FP32 network, calibrated on ``calibration``.

    Args:
        model: trained FP32 network (left unchanged; a deep copy is converted).
        calibration: iterable of input batches ``(B, C, *spatial)`` (real images, e.g. CT slices); also accepts
            ``(image, label)`` pairs and ``{"image": ...}`` dictionaries. At least one batch.
        backend: quantized engine the weights are packed for: ``"x86"`` (default) or ``"fbgemm"``
            (``"onednn"``/``"qnnpack"`` where the build has them).
        reduce_range: quantise the inputs of FBGEMM's INT8 convs/linears to 7 bits (default), which makes the
            artifact compute the same on CPUs with and without VNNI (module docstring). ``False`` gives them 8 bits:
            one bit finer, but exact only on CPUs with VNNI (on AVX2 the int16 pair sums saturate); such an
            artifact is marked ``portable: False`` and warns when loaded on a CPU without VNNI. Outputs (and the
            q/k/v our own core reads) always use 8 bits.
        keep_float: qualified names of modules (as in ``named_modules()``) to leave in float with all they
            contain, e.g. the most quantisation-sensitive layers.
        equalize_values: per-channel equalisation of each attention layer's values before their per-tensor
            quantisation (see :func:`~networks.quantization.observers.value_equalization`); the undoing scale
            goes into the core's output epilogue
            (``fuse_epilogue``), else is folded into a BatchNorm that directly follows the layer in a Sequential,
            else applied to the layer's output.
        quantize_grouped_convs: also quantise grouped (depthwise) convolutions; off by default because they run
            slower in INT8 than in FP32 on x86/fbgemm (see ``GROUPED_CONV_REASON``; PatchConvNet's and
            EfficientNet's depthwise convs), so they stay float and are listed in ``kept_float``.
        fuse_epilogue: fold an eval BatchNorm and/or ReLU that directly follow an attention layer in a Sequential
            (SaDNN's attention -> BN -> ReLU blocks) into the INT8 core's per-channel epilogue, replacing them by
            ``nn.Identity`` (listed in ``int8_summary["fused_epilogue"]``); with the channels-last core output this
            removed ~40 % of SaDNN-seg's INT8 time outside the attention core. Same maths up to float rounding.
        input_equalization: strength in ``[0, 1]`` of the per-channel equalisation of each attention layer's input
            before its per-tensor 7-bit quantisation (0: off, the default; see
            :func:`~networks.quantization.observers.input_equalization`): input channel ``c`` is multiplied by
            ``(max r / r_c) ** strength`` in the INT8 layer and the projections' weight columns are divided by it.
            The SaDNN families use 0.5 (their recipe in :mod:`networks.registry`).

    Returns:
        the INT8 network in eval mode, on the CPU. Its attribute ``int8_summary`` lists what was quantised
        (``attention``, ``leaves``) and what was kept float (``kept_float``: quantisable layers left float, with the
        reason; ``float_layers``: counts of the other leaf types, e.g. LayerNorm, GELU; ``float_compute``: attention
        cores whose own arithmetic stays float, with the reason, see :mod:`networks.quantization.float_parts`), plus
        ``backend`` and ``reduce_range``.
    """
    keep_float = frozenset(keep_float)
    work = float_copy(model, keep_float)
    targets = select_targets(work, keep_float, quantize_grouped_convs)
    if not targets.attention and not targets.leaves:
        raise ValueError(f"{type(model).__name__} has no Conv1d/2d/3d, Linear or LocalSelfAttention layer to quantise")
    if not 0.0 <= input_equalization <= 1.0:
        raise ValueError(f"input_equalization must be in [0, 1], got {input_equalization}")
    calibrated = calibrate(
        work,
        targets,
        calibration,
        reduce_range=reduce_range,
        equalize_values=equalize_values,
        equalize_inputs=input_equalization > 0.0,
    )
    with quantized_engine(backend):
        replacements, summary = convert_targets(
            work,
            targets,
            calibrated,
            equalize_values=equalize_values,
            fuse_epilogue=fuse_epilogue,
            input_equalization_strength=input_equalization,
            reduce_range=reduce_range,
        )
    return pack_int8_network(
        work, replacements, summary, backend=backend, reduce_range=reduce_range, calibration_batches=calibrated.batches
    )

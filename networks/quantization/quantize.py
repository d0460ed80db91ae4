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
(folded) or on the layer's output (see :func:`_value_equalization`). Attention layers left in float run on the fused
FP32 core.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.ao.nn.quantized as nnq
from torch import nn
from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

from networks.blocks.local_self_attention import LocalSelfAttention
from networks.isa import cpu_has_vnni
from networks.quantization.float_parts import describe_float_parts
from networks.quantization.modules import QuantizedLeaf, QuantizedLocalSelfAttention

__all__ = [
    "SUPPORTED_BACKENDS",
    "quantize_int8",
    "register_float_module",
    "float_module_types",
    "quantized_engine",
    "cpu_has_vnni",
    "ensure_fused_backend",
    "FBGEMM_SAFE_INPUT_BITS",
]

SUPPORTED_BACKENDS = ("x86", "fbgemm", "onednn", "qnnpack")

_QUANTIZED_CONV = {nn.Conv1d: nnq.Conv1d, nn.Conv2d: nnq.Conv2d, nn.Conv3d: nnq.Conv3d}

_FLOAT_MODULE_TYPES: set[type] = set()


def register_float_module(module_type: type) -> type:
    """Keep every module of ``module_type`` (and everything inside it) in float during :func:`quantize_int8`.

    Usable as a class decorator. Attention modules whose internals must not be quantised register here.
    """
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"register_float_module needs an nn.Module subclass, got {module_type!r}")
    _FLOAT_MODULE_TYPES.add(module_type)
    return module_type


def float_module_types() -> set[type]:
    """The registered float-only module types."""
    return set(_FLOAT_MODULE_TYPES)


# Bits of the activations fed to FBGEMM's INT8 ops that never saturate its int16 pair sums (CPUs without VNNI).
FBGEMM_SAFE_INPUT_BITS = 7


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


class _ActivationRange:
    """MinMax range of the float tensors seen at one point of the network during calibration."""

    def __init__(self, reduce_range: bool) -> None:
        # 7 bits as quant_max=127 (MinMaxObserver's own reduce_range flag is deprecated)
        self.observer = MinMaxObserver(
            dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=127 if reduce_range else 255
        )
        self.calls = 0

    def observe(self, tensor: torch.Tensor) -> None:
        self.observer(tensor.detach().float())
        self.calls += 1

    def qparams(self) -> tuple[float, int]:
        scale, zero_point = self.observer.calculate_qparams()
        return float(scale), int(zero_point)


def _quantized_weight(weight: torch.Tensor) -> torch.Tensor:
    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    weight = weight.detach().float()
    observer(weight)
    scales, zero_points = observer.calculate_qparams()
    return torch.quantize_per_channel(weight, scales.double(), zero_points.long(), 0, torch.qint8)


def _conv_padding(conv: nn.Module) -> Any:
    """Numeric padding of a float conv; None when the quantized conv cannot express it."""
    padding = conv.padding
    if isinstance(padding, str):
        if padding == "valid":
            return 0
        # "same": symmetric only when every dilation * (kernel - 1) is even
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            return None
        return tuple(t // 2 for t in total)
    return padding


def _quantized_conv(conv: nn.Module, output_range: _ActivationRange) -> nn.Module:
    qtype = _QUANTIZED_CONV[type(conv)]
    padding = _conv_padding(conv)
    qconv = qtype(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    bias = None if conv.bias is None else conv.bias.detach().float()
    qconv.set_weight_bias(_quantized_weight(conv.weight), bias)
    qconv.scale, qconv.zero_point = output_range.qparams()
    return qconv


def _quantized_linear(linear: nn.Linear, output_range: _ActivationRange) -> nn.Module:
    qlinear = nnq.Linear(linear.in_features, linear.out_features, bias_=linear.bias is not None)
    bias = None if linear.bias is None else linear.bias.detach().float()
    qlinear.set_weight_bias(_quantized_weight(linear.weight), bias)
    qlinear.scale, qlinear.zero_point = output_range.qparams()
    return qlinear


def _quantized_attention(
    layer: LocalSelfAttention,
    projections: list[nn.Module],
    input_scale: float,
    input_zero_point: int,
    output_scale: torch.Tensor | None = None,
    output_shift: torch.Tensor | None = None,
    relu: bool = False,
) -> QuantizedLocalSelfAttention:
    """INT8 twin of ``layer``; its relative embedding is checked against ``layer.relative_embedding()``."""
    tables = torch.cat([getattr(layer, f"rel_{axis}").detach() for axis in range(layer.spatial_dims)], dim=0)
    quantized = QuantizedLocalSelfAttention(
        layer.spatial_dims,
        *projections,
        relative_tables=tables,
        axis_groups=list(layer.axis_groups),
        offset_index=layer._offset_index,
        kernel_size=layer.kernel_size,
        heads=layer.heads,
        input_scale=input_scale,
        input_zero_point=input_zero_point,
        output_scale=output_scale,
        output_shift=output_shift,
        relu=relu,
    )
    with torch.no_grad():
        if not torch.equal(quantized.relative_embedding(), layer.relative_embedding().float()):
            raise RuntimeError(
                "QuantizedLocalSelfAttention's compact relative embedding no longer matches "
                "LocalSelfAttention.relative_embedding(); update networks/quantization/modules.py"
            )
    return quantized


_MAX_VALUE_GAIN = 256.0


def _value_equalization(observer: PerChannelMinMaxObserver) -> tuple[torch.Tensor, _ActivationRange]:
    """Per-channel gains ``u_c >= 1`` for the values and the quantisation range of the equalised values.

    Attention mixes the values channel by channel (``y_c = sum_n w_n v_c(n)``), so scaling value channel ``c`` by
    ``u_c`` (a row scaling of the value projection's weights, free for per-channel weight quantisation) scales
    output channel ``c`` by ``u_c`` and nothing else. With ``u_c = max_c r_c / r_c`` (``r_c`` = largest magnitude
    of channel ``c`` in calibration) every channel spans the shared per-tensor 8-bit range instead of the few levels
    a small channel gets next to a large one. This was the dominant INT8 error of trained SaDNN-seg layers.
    """
    low, high = observer.min_val, observer.max_val
    magnitude = torch.maximum(low.abs(), high.abs())
    peak = magnitude.max()
    if not torch.isfinite(peak) or peak <= 0:
        gain = torch.ones_like(magnitude)
    else:
        gain = (peak / magnitude.clamp_min(peak / _MAX_VALUE_GAIN)).clamp(1.0, _MAX_VALUE_GAIN)
    equalized = _ActivationRange(reduce_range=False)  # values feed our INT8 core only: all 8 bits
    equalized.observe(torch.stack([(low * gain).min(), (high * gain).max()]))
    return gain, equalized


def _first_applied_leaf(module: nn.Module) -> nn.Module:
    while isinstance(module, nn.Sequential) and len(module) > 0:
        module = module[0]
    return module


def _fold_into_following_batchnorm(model: nn.Module, layer: nn.Module, gain: torch.Tensor) -> bool:
    """If ``layer``'s output goes straight into an eval-mode BatchNorm (next in a Sequential), make that BatchNorm
    take the output scaled by ``gain`` per channel (exactly: ``mean * u``, ``(var + eps) * u^2 - eps``)."""
    for parent in model.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.children())
        for index, child in enumerate(children[:-1]):
            if child is not layer:
                continue
            norm = _first_applied_leaf(children[index + 1])
            if (
                isinstance(norm, nn.modules.batchnorm._BatchNorm)
                and not norm.training
                and norm.track_running_stats
                and norm.running_mean is not None
                and norm.num_features == gain.numel()
            ):
                with torch.no_grad():
                    norm.running_mean.mul_(gain)
                    norm.running_var.copy_((norm.running_var + norm.eps) * gain * gain - norm.eps)
                return True
            return False
    return False


def _following_leaves(model: nn.Module, layer: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, module) of the leaves that run right after ``layer`` in its Sequential (nested Sequentials
    such as MONAI's ADN are descended into), in order; empty when ``layer`` is not inside a Sequential."""
    for parent in model.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for index, name in enumerate(names):
            if parent._modules[name] is not layer:
                continue
            leaves: list[tuple[nn.Module, str, nn.Module]] = []

            def flatten(container: nn.Module, child_names: list[str]) -> None:
                for child_name in child_names:
                    child = container._modules[child_name]
                    if isinstance(child, nn.Sequential):
                        flatten(child, list(child._modules))
                    else:
                        leaves.append((container, child_name, child))

            flatten(parent, names[index + 1 :])
            return leaves
    return []


def _fusable_epilogue(
    model: nn.Module, layer: nn.Module, channels: int
) -> tuple[torch.Tensor | None, torch.Tensor | None, bool, list[tuple[nn.Module, str, nn.Module]]]:
    """The eval BatchNorm and/or ReLU directly following ``layer`` (in that order) as a per-channel epilogue:
    ``(scale, shift, relu, fused modules)``; scale/shift None without a BatchNorm."""
    scale = shift = None
    relu = False
    fused: list[tuple[nn.Module, str, nn.Module]] = []
    following = _following_leaves(model, layer)
    position = 0
    if position < len(following):
        norm = following[position][2]
        if (
            isinstance(norm, nn.modules.batchnorm._BatchNorm)
            and not norm.training
            and norm.track_running_stats
            and norm.running_mean is not None
            and norm.num_features == channels
        ):
            with torch.no_grad():
                scale = torch.rsqrt(norm.running_var.float() + norm.eps)
                if norm.weight is not None:
                    scale = scale * norm.weight.float()
                shift = -norm.running_mean.float() * scale
                if norm.bias is not None:
                    shift = shift + norm.bias.float()
            fused.append(following[position])
            position += 1
    if position < len(following) and type(following[position][2]) is nn.ReLU:
        relu = True
        fused.append(following[position])
    return scale, shift, relu, fused


def _leaf_kind(module: nn.Module) -> str | None:
    """"conv"/"linear" for leaves quantize_int8 handles; None otherwise. Exact types: subclasses may change forward."""
    if type(module) in _QUANTIZED_CONV:
        if module.padding_mode not in ("zeros", "reflect") or _conv_padding(module) is None:
            return None
        return "conv"
    if type(module) is nn.Linear:
        return "linear"
    return None


def _is_float_only(module: nn.Module) -> bool:
    return any(isinstance(module, t) for t in _FLOAT_MODULE_TYPES)


# INT8 depthwise convs measured on the x86/fbgemm engines (2 threads, 8 x 240 x 16 x 16): 1.5-3x slower than FP32
# with symmetric padding, 50-100x slower without (fbgemm's fallback path; EfficientNet pads explicitly, then convolves
# unpadded). Only onednn ran them at FP32 speed.
GROUPED_CONV_REASON = "grouped/depthwise conv kept float (INT8 depthwise is slower than FP32 on x86/fbgemm)"


def _select_targets(
    model: nn.Module, keep_float: frozenset[str] = frozenset(), quantize_grouped_convs: bool = False
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]], list[str]]:
    """(attention layers, conv/linear leaves, names kept float with reasons) in module order; each module once."""
    attention, leaves, kept_float = [], [], []
    seen: set[int] = set()

    def visit(prefix: str, module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if prefix in keep_float:
            kept_float.append(f"{prefix}: {type(module).__name__} kept float on request")
            return
        if _is_float_only(module):
            kept_float.append(f"{prefix or '<root>'}: {type(module).__name__} registered float-only")
            return
        if isinstance(module, LocalSelfAttention):
            attention.append((prefix, module))
            return
        kind = _leaf_kind(module)
        if kind == "conv" and module.groups > 1 and not quantize_grouped_convs:
            kept_float.append(f"{prefix}: {type(module).__name__}(groups={module.groups}), {GROUPED_CONV_REASON}")
            return
        if kind is not None:
            leaves.append((prefix, module))
            return
        if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            kept_float.append(f"{prefix}: {type(module).__name__} (INT8 transposed conv is wrong on x86)")
            return
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            kept_float.append(f"{prefix}: {type(module).__name__} (subclass or padding the INT8 op cannot express)")
            return
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return attention, leaves, kept_float


def _replace_modules(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Swap every reference to a replaced module (shared modules included) for its replacement."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in replacements:
                setattr(parent, name, replacements[id(child)])


def _batches(calibration: Iterable[Any]) -> Iterator[torch.Tensor]:
    if isinstance(calibration, torch.Tensor):
        raise TypeError(
            "calibration must be an iterable of input batches (e.g. a list of (B, C, *spatial) tensors or a "
            "DataLoader), not a single tensor; wrap it in a list"
        )
    for item in calibration:
        if isinstance(item, dict):  # MONAI-style batch dictionaries
            if "image" not in item:
                raise ValueError(f"calibration dictionaries need an 'image' key, got keys {sorted(item)}")
            item = item["image"]
        elif isinstance(item, (tuple, list)):  # (image, label) pairs
            item = item[0]
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"calibration batches must be tensors, got {type(item).__name__}")
        if not item.is_floating_point():
            raise TypeError(f"calibration batches must be floating point, got {item.dtype}")
        if not torch.isfinite(item).all():
            raise ValueError("calibration batch contains NaN or infinite values")
        yield item


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
            quantisation (see :func:`_value_equalization`); the undoing scale goes into the core's output epilogue
            (``fuse_epilogue``), else is folded into a BatchNorm that directly follows the layer in a Sequential,
            else applied to the layer's output.
        quantize_grouped_convs: also quantise grouped (depthwise) convolutions; off by default because they run
            slower in INT8 than in FP32 on x86/fbgemm (see ``GROUPED_CONV_REASON``; PatchConvNet's and
            EfficientNet's depthwise convs), so they stay float and are listed in ``kept_float``.
        fuse_epilogue: fold an eval BatchNorm and/or ReLU that directly follow an attention layer in a Sequential
            (SaDNN's attention -> BN -> ReLU blocks) into the INT8 core's per-channel epilogue, replacing them by
            ``nn.Identity`` (listed in ``int8_summary["fused_epilogue"]``); with the channels-last core output this
            removed ~40 % of SaDNN-seg's INT8 time outside the attention core. Same maths up to float rounding.

    Returns:
        the INT8 network in eval mode, on the CPU. Its attribute ``int8_summary`` lists what was quantised
        (``attention``, ``leaves``) and what was kept float (``kept_float``: quantisable layers left float, with the
        reason; ``float_layers``: counts of the other leaf types, e.g. LayerNorm, GELU; ``float_compute``: attention
        cores whose own arithmetic stays float, with the reason, see :mod:`networks.quantization.float_parts`), plus
        ``backend`` and ``reduce_range``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    work = copy.deepcopy(model).cpu().eval()
    keep_float = frozenset(keep_float)
    known = {name for name, _ in work.named_modules()}
    unknown = sorted(keep_float - known)
    if unknown:
        raise ValueError(f"keep_float names no module of {type(model).__name__}: {unknown}")
    attention, leaves, kept_float = _select_targets(work, keep_float, quantize_grouped_convs)
    if not attention and not leaves:
        raise ValueError(f"{type(model).__name__} has no Conv1d/2d/3d, Linear or LocalSelfAttention layer to quantise")
    float_attention = [m for m in work.modules() if isinstance(m, LocalSelfAttention)]
    if float_attention:
        # loads the kernels: torch.ops.medattn.local_attention_int8 is what QuantizedLocalSelfAttention calls
        ensure_fused_backend()
        # The fused FP32 core gives the pure-torch core's outputs (to float rounding) ~20x faster: calibration uses
        # it, and so do attention layers that stay float in the INT8 network.
        for layer in float_attention:
            layer.backend = "fused"

    ranges: dict[str, _ActivationRange] = {}
    handles = []

    def record(key: str):
        # "#in": an input of FBGEMM's INT8 ops (7 bits unless reduce_range=False); "#out": an output, 8 bits
        ranges[key] = _ActivationRange(reduce_range and key.endswith("#in"))
        return ranges[key]

    value_channels: dict[str, PerChannelMinMaxObserver] = {}
    for name, layer in attention:
        in_range = record(f"{name}#in")
        handles.append(layer.register_forward_pre_hook(lambda mod, args, r=in_range: r.observe(args[0])))
        for proj in ("query", "key", "value"):
            out_range = record(f"{name}.{proj}#out")
            handles.append(getattr(layer, proj).register_forward_hook(lambda mod, a, out, r=out_range: r.observe(out)))
        if equalize_values:
            observer = value_channels[name] = PerChannelMinMaxObserver(ch_axis=1, dtype=torch.quint8)
            handles.append(layer.value.register_forward_hook(lambda mod, a, out, o=observer: o(out.detach().float())))
    for name, leaf in leaves:
        in_range, out_range = record(f"{name}#in"), record(f"{name}#out")

        def leaf_hook(mod, args, out, ri=in_range, ro=out_range):
            ri.observe(args[0])
            ro.observe(out)

        handles.append(leaf.register_forward_hook(leaf_hook))

    n_batches = 0
    try:
        with torch.no_grad():
            for batch in _batches(calibration):
                work(batch.cpu().float())
                n_batches += 1
    finally:
        for handle in handles:
            handle.remove()
    if n_batches == 0:
        raise ValueError("calibration yielded no batches; pass at least one real input batch")

    replacements: dict[int, nn.Module] = {}
    summary: dict[str, Any] = {
        "attention": [],
        "leaves": [],
        "kept_float": list(kept_float),
        "value_equalization": {},
        "fused_epilogue": {},
    }
    with quantized_engine(backend):
        for name, layer in attention:
            if ranges[f"{name}#in"].calls == 0:
                summary["kept_float"].append(f"{name}: LocalSelfAttention not reached by calibration")
                continue
            value_range = ranges[f"{name}.value#out"]
            output_scale = output_shift = None
            relu = False
            gain = None
            if equalize_values:
                gain, value_range = _value_equalization(value_channels[name])
                with torch.no_grad():
                    layer.value.weight.mul_(gain.view(-1, *([1] * (layer.value.weight.ndim - 1))))
            if fuse_epilogue:
                output_scale, output_shift, relu, fused = _fusable_epilogue(work, layer, layer.out_channels)
                if gain is not None:
                    output_scale = 1.0 / gain if output_scale is None else output_scale / gain
                    summary["value_equalization"][name] = "output rescaled (fused epilogue)"
                for parent, child_name, child in fused:
                    setattr(parent, child_name, nn.Identity())
                if fused:
                    summary["fused_epilogue"][name] = [type(child).__name__ for _, _, child in fused]
            elif gain is not None:
                if _fold_into_following_batchnorm(work, layer, gain):
                    summary["value_equalization"][name] = "folded into BatchNorm"
                else:
                    output_scale = 1.0 / gain
                    summary["value_equalization"][name] = "output rescaled"
            projections = [
                _quantized_conv(layer.query, ranges[f"{name}.query#out"]),
                _quantized_conv(layer.key, ranges[f"{name}.key#out"]),
                _quantized_conv(layer.value, value_range),
            ]
            scale, zero_point = ranges[f"{name}#in"].qparams()
            replacements[id(layer)] = _quantized_attention(
                layer, projections, scale, zero_point, output_scale, output_shift, relu
            )
            summary["attention"].append(name)
        for name, leaf in leaves:
            if ranges[f"{name}#in"].calls == 0:
                summary["kept_float"].append(f"{name}: {type(leaf).__name__} not reached by calibration")
                continue
            out_range = ranges[f"{name}#out"]
            if _leaf_kind(leaf) == "conv":
                qleaf = _quantized_conv(leaf, out_range)
            else:
                qleaf = _quantized_linear(leaf, out_range)
            scale, zero_point = ranges[f"{name}#in"].qparams()
            replacements[id(leaf)] = QuantizedLeaf(qleaf, scale, zero_point)
            summary["leaves"].append(name)
    if not replacements:
        raise ValueError("no layer of the model ran during calibration; nothing was quantised")
    if id(work) in replacements:  # the model itself is one quantisable layer
        work = replacements[id(work)]
    else:
        _replace_modules(work, replacements)
    work.eval()
    summary.update(
        backend=backend,
        reduce_range=bool(reduce_range),
        fbgemm_input_bits=FBGEMM_SAFE_INPUT_BITS if reduce_range else 8,
        portable=bool(reduce_range),
        calibration_batches=n_batches,
    )
    summary.update(describe_float_parts(work, (QuantizedLeaf, QuantizedLocalSelfAttention)))
    work.int8_summary = summary
    return work

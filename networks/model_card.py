# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Model cards: parameters, multiply-accumulates, FP32/INT8 file sizes and the 45 nm energy estimate per forward.

MACs come from :class:`torch.utils.flop_counter.FlopCounterMode` for the convolutions and matrix products it sees
(it reports FLOPs = 2 x MACs). That covers the token attentions written with ``torch.matmul``/``einsum``: the
Performer's random-feature projections and linear-attention products (HCT), the Nystrom kernels and pseudo-inverse,
re-attention's q k^T, head mixing and maps x V (Scopeformer) and class attention (PatchConvNet); the tests check them
against closed forms. Attention cores that no counter sees correctly (local self-attention is built from
elementwise products and slices, plus one matmul for the relative term) get a *MAC rule*: a function of the module
and its output registered with :func:`register_mac_rule`. For a module with a rule, whatever the counter saw in the
module's own code (outside its child modules, e.g. the projections) is replaced by the rule's count.

Energy follows the SaDNN paper's 45 nm / 0.9 V table (one MAC = one multiply + one add):
INT8 multiply 0.2 pJ, add 0.03 pJ; FP32 multiply 3.7 pJ, add 0.9 pJ. As in the paper, the INT8 figure prices every
MAC at INT8 cost (the INT8 artifact runs the projections as INT8 convs and the attention core's q.k and weighted
value sums in integer arithmetic; softmax, BatchNorm and pooling are not MACs). The token attentions of HCT,
Scopeformer and PatchConvNet keep their activation x activation products in float, so cards also give
``macs_int8`` (what really runs in integer arithmetic) and ``energy_int8_mixed_j`` (the rest priced at FP32).

Run ``python -m networks.model_card [--out DIR]`` to print the cards of the registered families' networks and write
``model_cards.json`` and ``model_cards_radar.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from networks.atomic_file import atomic_path
from networks.registry import LiveMapping, card_variants
from networks.type_lookup import lookup_by_type

__all__ = [
    "ENERGY_PJ",
    "MacRule",
    "register_mac_rule",
    "mac_rules",
    "count_parameters",
    "count_macs",
    "count_int8_macs",
    "energy_joules",
    "state_dict_size_bytes",
    "model_card",
    "save_model_cards",
    "radar_chart",
    "CARD_MODELS",
    "registered_model_cards",
]

# pJ per operation, 45 nm at 0.9 V (Horowitz, ISSCC 2014), as used by the SaDNN paper.
ENERGY_PJ: dict[str, dict[str, float]] = {
    "int8": {"mul": 0.2, "add": 0.03},
    "fp32": {"mul": 3.7, "add": 0.9},
}

MacRule = Callable[[nn.Module, tuple, Any], int]
"""``rule(module, inputs, output) -> MACs`` of one forward call of ``module``'s own code (children excluded)."""

_MAC_RULES: dict[type, MacRule] = {}


def register_mac_rule(module_type: type, rule: MacRule | None = None):
    """Register the MAC count of ``module_type``'s own computation (what its children do is counted separately).

    Usable directly, ``register_mac_rule(MyAttention, rule)``, or as a decorator, ``@register_mac_rule(MyAttention)``.
    The most specific registered class in the module's MRO wins.
    """
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"register_mac_rule needs an nn.Module subclass, got {module_type!r}")

    def _register(fn: MacRule) -> MacRule:
        if not callable(fn):
            raise TypeError(f"MAC rule for {module_type.__name__} must be callable, got {type(fn).__name__}")
        _MAC_RULES[module_type] = fn
        return fn

    return _register if rule is None else _register(rule)


def mac_rules() -> dict[type, MacRule]:
    """A copy of the registered rules (module type -> rule)."""
    _register_builtin_rules()
    return dict(_MAC_RULES)


def local_self_attention_macs(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    """Local self-attention core: ``2 * K * C`` MACs per output pixel (SaDNN paper's count, ``K = k**dims``).

    One ``K * C`` for the query-key(+relative) products and one for the softmax-weighted sum of the values;
    softmax itself is not a MAC. The 1x1 projections are the module's children and are counted by the counter.
    """
    neighbours = module.kernel_size**module.spatial_dims
    batch, channels, *spatial = output.shape
    return 2 * neighbours * channels * batch * math.prod(spatial)


_BUILTINS_REGISTERED = False


def _register_builtin_rules() -> None:
    global _BUILTINS_REGISTERED
    if _BUILTINS_REGISTERED:
        return
    from networks.blocks.local_self_attention import LocalSelfAttention

    _MAC_RULES.setdefault(LocalSelfAttention, local_self_attention_macs)
    try:  # the INT8 replacement of the layer has the same arithmetic
        from networks.quantization.modules import QuantizedLocalSelfAttention

        _MAC_RULES.setdefault(QuantizedLocalSelfAttention, local_self_attention_macs)
    except ImportError:
        pass
    _BUILTINS_REGISTERED = True


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def _run_counted(model: nn.Module, example: torch.Tensor) -> tuple[FlopCounterMode, dict[str, tuple[nn.Module, int]]]:
    """Run ``model(example)`` under a FlopCounterMode, collecting the MACs of every rule-bearing module call."""
    rule_macs: dict[str, list] = {}
    handles = []
    for name, module in model.named_modules():
        rule = lookup_by_type(_MAC_RULES, module)
        if rule is None:
            continue

        def hook(mod, inputs, output, _name=name, _rule=rule):
            entry = rule_macs.setdefault(_name, [mod, 0])
            entry[1] += int(_rule(mod, inputs, output))

        handles.append(module.register_forward_hook(hook))
    counter = FlopCounterMode(display=False, depth=None)
    try:
        with torch.no_grad(), counter:
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return counter, {k: (v[0], v[1]) for k, v in rule_macs.items()}


def count_macs(model: nn.Module, input_shape: Sequence[int], *, device: str | torch.device = "meta") -> dict[str, int]:
    """Multiply-accumulates of one forward pass of an input of ``input_shape`` (batch included).

    The model is run on a deep copy placed on ``device`` (the default ``"meta"`` computes shapes only, so counting a
    paper-size network takes milliseconds; pass ``"cpu"`` for models whose code needs real values).

    Returns:
        ``{"macs": total, "macs_counted": from FlopCounterMode outside rule modules' own code,
        "macs_rules": from registered MAC rules}``.
    """
    _register_builtin_rules()
    import copy

    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) < 2 or any(s < 1 for s in input_shape):
        raise ValueError(f"input_shape must be (batch, channels, *spatial) with positive sizes, got {input_shape}")
    work = copy.deepcopy(model).eval().to(device)
    # FlopCounterMode's module tracker hooks the gradients of module inputs that require grad; a view of a parameter
    # made under no_grad (PatchConvNet's expanded class token) requires grad without a grad_fn and makes it fail
    work.requires_grad_(False)
    example = torch.zeros(input_shape, device=device)
    counter, rule_macs = _run_counted(work, example)
    per_module = counter.get_flop_counts()
    root = type(work).__name__
    total_flops = counter.get_total_flops()
    # Replace what the counter saw inside each rule module's own code (not its children) by the rule's count.
    own_flops_replaced = 0
    for name, (module, _) in rule_macs.items():
        key = f"{root}.{name}" if name else root
        inside = sum(per_module.get(key, {}).values())
        children = sum(sum(per_module.get(f"{key}.{child}", {}).values()) for child, _ in module.named_children())
        own_flops_replaced += max(0, inside - children)
    counted_macs = (total_flops - own_flops_replaced) // 2
    rules = sum(macs for _, macs in rule_macs.values())
    return {"macs": int(counted_macs + rules), "macs_counted": int(counted_macs), "macs_rules": int(rules)}


def count_int8_macs(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    device: str | torch.device = "meta",
    keep_float: Sequence[str] = (),
) -> int:
    """MACs of one forward pass that :func:`networks.quantization.quantize_int8` turns into integer arithmetic.

    Those are the Conv/Linear leaves it quantises and the local self-attention layers (projections + fused INT8
    core, by their MAC rule); the rest of :func:`count_macs` stays float in the INT8 network: the products of the
    token attentions (Performer, Nystrom, re-attention, class attention), transposed convolutions, and everything in
    modules registered float-only, and the layers named in ``keep_float`` (as given to ``quantize_int8``).
    """
    _register_builtin_rules()
    import copy

    from networks.quantization.quantize import _select_targets

    work = copy.deepcopy(model).eval().to(device)
    work.requires_grad_(False)
    attention, leaves, _ = _select_targets(work, frozenset(keep_float))
    total = 0

    def leaf_hook(module, inputs, output):
        nonlocal total
        per_output = module.in_features if isinstance(module, nn.Linear) else module.weight[0].numel()
        total += output.numel() * per_output

    def attention_hook(module, inputs, output):
        nonlocal total
        total += int(lookup_by_type(_MAC_RULES, module)(module, inputs, output))

    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    handles = [m.register_forward_hook(leaf_hook) for _, m in leaves]
    for _, layer in attention:
        handles.append(layer.register_forward_hook(attention_hook))
        handles.extend(c.register_forward_hook(leaf_hook) for c in layer.modules() if isinstance(c, convs))
    try:
        with torch.no_grad():
            work(torch.zeros(tuple(int(s) for s in input_shape), device=device))
    finally:
        for handle in handles:
            handle.remove()
    return int(total)


def energy_joules(macs: int, precision: str) -> float:
    """Energy of ``macs`` multiply-accumulates (one multiply + one add each) at ``precision`` ("fp32" or "int8")."""
    if precision not in ENERGY_PJ:
        raise ValueError(f"precision must be one of {sorted(ENERGY_PJ)}, got {precision!r}")
    if macs < 0:
        raise ValueError(f"macs must be non-negative, got {macs}")
    table = ENERGY_PJ[precision]
    return float(macs) * (table["mul"] + table["add"]) * 1e-12


def state_dict_size_bytes(model: nn.Module, path: str | os.PathLike | None = None) -> int:
    """Bytes of ``torch.save(model.state_dict())``, written to ``path`` (atomically) or to a temporary file."""
    from networks.checkpoint import atomic_torch_save

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if path is not None:
        return atomic_torch_save(state, path).stat().st_size
    with tempfile.TemporaryDirectory() as tmp:
        return atomic_torch_save(state, Path(tmp) / "state_dict.pt").stat().st_size


def model_card(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    name: str,
    int8_model: nn.Module | None = None,
    int8_artifact_path: str | os.PathLike | None = None,
    int8_size_source: str | None = None,
    fp32_state_dict_path: str | os.PathLike | None = None,
    precision: str | None = None,
    mac_device: str = "meta",
    int8_keep_float: Sequence[str] = (),
) -> dict[str, Any]:
    """Card of a network for one forward pass of ``input_shape`` (``(batch, channels, *spatial)``).

    Args:
        model: the FP32 network.
        input_shape: the input of the forward pass the MACs and energies refer to.
        name: card name.
        int8_model: an INT8 model from :func:`networks.quantization.quantize_int8`; its TorchScript artifact is
            saved to a temporary file to measure the INT8 size (give ``int8_artifact_path`` to measure a saved one).
        int8_artifact_path: a saved INT8 artifact whose file size is the INT8 size.
        int8_size_source: free text recorded as ``int8_size_source`` (how the INT8 artifact was calibrated).
        fp32_state_dict_path: where to write the FP32 state dict whose file size is the FP32 size
            (a temporary file by default).
        precision: the precision the card's model is served at ("fp32"/"int8"); defaults to "int8" when INT8
            information is given, else "fp32".
        mac_device: device used to count MACs ("meta" by default, see :func:`count_macs`).
        int8_keep_float: layers the INT8 network keeps float (``quantize_int8``'s ``keep_float``): their MACs are
            not counted in ``macs_int8``.

    Returns:
        JSON-serialisable dictionary with ``name, params, macs, macs_counted, macs_rules, fp32_size_bytes,
        int8_size_bytes, int8_size_source, size_ratio, energy_fp32_j, energy_int8_j, macs_int8,
        energy_int8_mixed_j, precision, input_shape``. ``energy_int8_j`` prices every MAC at INT8 cost (the SaDNN
        paper's convention); ``macs_int8`` (:func:`count_int8_macs`) are the MACs the INT8 network really runs in
        integer arithmetic and ``energy_int8_mixed_j`` prices the others (float attention products) at FP32 cost.
        INT8 fields are None without INT8 information.
    """
    if int8_model is not None and int8_artifact_path is not None:
        raise ValueError("give either int8_model or int8_artifact_path, not both")
    input_shape = [int(s) for s in input_shape]
    macs = count_macs(model, input_shape, device=mac_device)
    fp32_size = state_dict_size_bytes(model, fp32_state_dict_path)

    int8_size = None
    if int8_artifact_path is not None:
        path = Path(int8_artifact_path)
        if not path.is_file():
            raise FileNotFoundError(f"INT8 artifact not found: {path}")
        int8_size = path.stat().st_size
        int8_size_source = int8_size_source or f"artifact file {path.name}"
    elif int8_model is not None:
        from networks.quantization import save_int8_artifact

        example = torch.zeros(input_shape)
        with tempfile.TemporaryDirectory() as tmp:
            int8_size = save_int8_artifact(int8_model, example, Path(tmp) / "int8.pt").stat().st_size
        int8_size_source = int8_size_source or "artifact saved from the given INT8 model"

    energy_int8 = energy_joules(macs["macs"], "int8") if int8_size is not None else None
    macs_int8 = min(count_int8_macs(model, input_shape, device=mac_device, keep_float=int8_keep_float), macs["macs"])
    energy_mixed = None
    if int8_size is not None:
        energy_mixed = energy_joules(macs_int8, "int8") + energy_joules(macs["macs"] - macs_int8, "fp32")
    if precision is None:
        precision = "int8" if int8_size is not None else "fp32"
    return {
        "name": name,
        "params": count_parameters(model),
        "macs": macs["macs"],
        "macs_counted": macs["macs_counted"],
        "macs_rules": macs["macs_rules"],
        "fp32_size_bytes": fp32_size,
        "int8_size_bytes": int8_size,
        "int8_size_source": int8_size_source if int8_size is not None else None,
        "size_ratio": (int8_size / fp32_size) if int8_size is not None else None,
        "energy_fp32_j": energy_joules(macs["macs"], "fp32"),
        "energy_int8_j": energy_int8,
        "macs_int8": macs_int8,
        "energy_int8_mixed_j": energy_mixed,
        "precision": precision,
        "input_shape": input_shape,
    }


def save_model_cards(cards: Sequence[dict[str, Any]] | dict[str, Any], json_path: str | os.PathLike) -> Path:
    """Write the cards as indented JSON (atomically). A single card or a list of cards."""
    path = Path(json_path)
    text = json.dumps(cards, indent=2, sort_keys=False)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text + "\n")
    return path


RADAR_AXES = (("params", "Parameters"), ("macs", "MACs"), ("size_bytes", "Size"), ("energy_j", "Energy"))


def _radar_rows(cards: Sequence[dict[str, Any]]) -> list[tuple[str, dict[str, float]]]:
    rows = []
    for card in cards:
        for precision in ("fp32", "int8"):
            size, energy = card.get(f"{precision}_size_bytes"), card.get(f"energy_{precision}_j")
            if size is None or energy is None:
                continue
            rows.append(
                (
                    f"{card['name']} {precision.upper()}",
                    {"params": card["params"], "macs": card["macs"], "size_bytes": size, "energy_j": energy},
                )
            )
    return rows


def radar_chart(
    cards: Sequence[dict[str, Any]], png_path: str | os.PathLike, *, scale: str = "log", title: str | None = None
) -> Path:
    """Radar chart (SaDNN paper, Fig. 5): axes params, MACs, size, energy; one polygon per model and precision.

    Each axis is normalised by its largest value over all polygons. ``scale="log"`` places a value at
    ``1 + log10(value / max) / decades`` (decades spanned by the data, at least one) so small and INT8 models stay
    visible; ``scale="linear"`` uses ``value / max``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if scale not in ("log", "linear"):
        raise ValueError(f"scale must be 'log' or 'linear', got {scale!r}")
    rows = _radar_rows(cards)
    if not rows:
        raise ValueError("radar_chart needs at least one card with sizes and energies")
    keys = [k for k, _ in RADAR_AXES]
    maxima = {k: max(values[k] for _, values in rows) for k in keys}
    for k, m in maxima.items():
        if m <= 0:
            raise ValueError(f"radar_chart: every card has {k} <= 0")
    if scale == "log":
        smallest = min(values[k] / maxima[k] for _, values in rows for k in keys if values[k] > 0)
        decades = max(1.0, math.ceil(-math.log10(smallest)))

    def radius(value: float, key: str) -> float:
        ratio = value / maxima[key]
        if scale == "linear":
            return ratio
        return max(0.0, 1.0 + math.log10(ratio) / decades) if ratio > 0 else 0.0

    angles = [2 * math.pi * i / len(keys) for i in range(len(keys))]
    fig = plt.figure(figsize=(7.5, 7.5))
    ax = fig.add_subplot(projection="polar")
    cmap = plt.get_cmap("tab20")
    for i, (label, values) in enumerate(rows):
        r = [radius(values[k], k) for k in keys]
        style = "--" if label.endswith("INT8") else "-"
        ax.plot(angles + angles[:1], r + r[:1], style, color=cmap(i % 20), linewidth=1.5, label=label)
        ax.fill(angles + angles[:1], r + r[:1], color=cmap(i % 20), alpha=0.08)
    ax.set_xticks(angles)
    ax.set_xticklabels([label for _, label in RADAR_AXES])
    ax.set_ylim(0, 1.0)
    if scale == "log":
        ticks = [1.0 - d / decades for d in range(int(decades) + 1)]
        ax.set_yticks(ticks)
        ax.set_yticklabels([f"1e-{d}" if d else "max" for d in range(int(decades) + 1)], fontsize=7)
    ax.set_title(title or "Model cards (normalised per axis, " + ("log" if scale == "log" else "linear") + " scale)")
    ax.legend(loc="upper right", bbox_to_anchor=(1.35, 1.1), fontsize=7)
    path = Path(png_path)
    try:
        with atomic_path(path, suffix=".png") as tmp:  # savefig picks the format from the extension
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _card_models() -> dict[str, tuple[dict[str, Any], tuple[int, ...], tuple[int, ...]]]:
    return {
        name: (dict(variant.factory_kwargs), (1, *variant.input_shape), (1, *variant.calibration_input))
        for name, variant in card_variants().items()
    }


CARD_MODELS: Mapping[str, tuple[dict[str, Any], tuple[int, ...], tuple[int, ...]]] = LiveMapping(_card_models)
"""Card name (factory name) -> (factory kwargs, input shape of the card's forward pass, calibration input shape for
the INT8 size): the paper, small and baseline variants of every :mod:`networks.registry` family. Paper networks are
at their paper input sizes; calibration inputs are as small as each network accepts (the INT8 file size does not
depend on them)."""


def _random_calibration(input_shape: Sequence[int], batches: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(tuple(input_shape), generator=generator) for _ in range(batches)]


def registered_model_cards(
    names: Sequence[str] | None = None, *, out_dir: str | os.PathLike | None = None, calibration_batches: int = 2
) -> list[dict[str, Any]]:
    """Cards of the networks in :data:`CARD_MODELS` (randomly initialised weights: sizes and MACs do not depend
    on the weights' values).

    The INT8 size is measured on a real INT8 artifact quantised with ``calibration_batches`` random calibration
    batches of one input each (``int8_size_source`` says so); the file size does not depend on calibration values.
    Artifacts and state dicts are written under ``out_dir`` (a temporary folder when None).
    """
    from networks.factory import create_model
    from networks.quantization import quantize_int8, save_int8_artifact

    names = list(CARD_MODELS) if names is None else list(names)
    unknown = [n for n in names if n not in CARD_MODELS]
    if unknown:
        raise ValueError(f"no card configuration for {unknown}; known: {sorted(CARD_MODELS)}")
    cards = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(out_dir) if out_dir is not None else Path(tmp)
        for i, name in enumerate(names):
            kwargs, shape, calib_shape = CARD_MODELS[name]
            torch.manual_seed(i)
            model = create_model(name, **kwargs).eval()
            int8 = quantize_int8(model, _random_calibration(calib_shape, calibration_batches, seed=i))
            artifact = save_int8_artifact(int8, torch.zeros(calib_shape), base / "artifacts" / f"{name}_int8.pt")
            card = model_card(
                model,
                shape,
                name=name,
                int8_artifact_path=artifact,
                int8_size_source=f"INT8 TorchScript artifact quantised with {calibration_batches} random "
                f"calibration batches of shape {list(calib_shape)} (random weights)",
                fp32_state_dict_path=base / "artifacts" / f"{name}_fp32_state_dict.pt",
            )
            cards.append(card)
    return cards


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/model_cards", help="folder for model_cards.json and the radar PNG")
    parser.add_argument("--models", nargs="*", default=None, help=f"subset of {sorted(CARD_MODELS)}")
    parser.add_argument("--scale", choices=("log", "linear"), default="log", help="radar chart radial scale")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the work is light, and on a CPU shared with busy processes 2 spin-waiting "
        "OpenMP threads made this run 5x slower: 71 s instead of 14 s)",
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out = Path(args.out)
    # stdout carries only the JSON: chatter of network constructors (e.g. MONAI's BasicUNet) goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        cards = registered_model_cards(args.models, out_dir=out)
    json_path = save_model_cards(cards, out / "model_cards.json")
    png_path = radar_chart(cards, out / "model_cards_radar.png", scale=args.scale)
    print(f"wrote {json_path} and {png_path} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(json.dumps(cards, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Grad-CAM (Selvaraju et al., ICCV 2017) for the project's classifiers, on MONAI's ``monai.visualize.GradCAM``.

For a feature map ``A`` (``(B, K, *s)``) of a chosen layer and the logit ``y_c`` of class ``c``::

    alpha_k = mean_s d y_c / d A_k          L_c = ReLU(sum_k alpha_k A_k)

upsampled (bi/tri)linearly to the input grid. MONAI computes the map; this module adds what its wrapper lacks for
repeated use in a server: hooks that are removed after every call (``ModelWithHooks`` keeps them forever), the
caller's gradients, ``requires_grad`` flags and train/eval modes left untouched, gradients even under
``torch.no_grad`` or with frozen weights, per-family default layers, and errors that name the problem.

The logit (not the sigmoid probability) is differentiated, as Grad-CAM prescribes; the sigmoid is monotonic, so
the class evidence is the same.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
from monai.visualize import GradCAM
from monai.visualize.class_activation_maps import ModelWithHooks
from monai.visualize.visualizer import default_upsampler
from torch import nn
from torch.nn.modules.conv import _ConvNd

from networks.blocks.local_self_attention import LocalSelfAttentionBlock
from networks.explain.utils import (
    check_image,
    evaluation_mode,
    is_quantized,
    is_scripted,
    normalize_maps,
    resolve_targets,
)
from networks.nets.hct import HCT
from networks.nets.patchconvnet import PatchConvNet
from networks.nets.sadnn_cls import SaDNNCls
from networks.nets.scopeformer import Scopeformer

__all__ = ["grad_cam", "default_cam_layer", "cam_layer_candidates", "layer_names"]

LayerSpec = str | nn.Module | Sequence[str | nn.Module]


class _RemovableHooks(ModelWithHooks):
    """MONAI's ``ModelWithHooks`` that keeps its hook handles so :meth:`remove` can detach them."""

    def __init__(self, nn_module: nn.Module, target_layer_names: Sequence[str]) -> None:
        super().__init__(nn_module, tuple(target_layer_names), register_forward=False, register_backward=False)
        modules = dict(nn_module.named_modules())
        self.handles = []
        self.inplace_modules: list[nn.Module] = []
        # a full backward hook fails when the hooked output is modified in place, by the layer itself or by the
        # next one (e.g. Conv -> ReLU(inplace=True)): in-place operations are switched off until remove()
        for module in nn_module.modules():
            if getattr(module, "inplace", False) is True:
                module.inplace = False
                self.inplace_modules.append(module)
        for name in self.target_layers:
            module = modules[name]
            self.handles.append(module.register_forward_hook(self.forward_hook(name)))
            self.handles.append(module.register_full_backward_hook(self.backward_hook(name)))
        self.register_forward = self.register_backward = True

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for module in self.inplace_modules:
            module.inplace = True
        self.inplace_modules.clear()
        self.activations.clear()
        self.gradients.clear()


@contextlib.contextmanager
def _gradients_for_explanation(model: nn.Module) -> Iterator[None]:
    """Enable autograd and ``requires_grad`` of every float parameter; restore the flags and ``.grad`` after.

    Served models are often frozen (``requires_grad_(False)``) and called under ``torch.no_grad``; Grad-CAM still
    needs the gradient reaching the target layer, and must not leave gradients behind in the caller's model.
    """
    parameters = [p for p in model.parameters() if p.is_floating_point()]
    saved = [(p, p.requires_grad, p.grad) for p in parameters]
    try:
        for p in parameters:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad


def cam_layer_candidates(model: nn.Module) -> list[tuple[str, ...]]:
    """Grad-CAM layer choices of a model, deepest first; each choice is a tuple of layer names whose maps add up.

    - :class:`HCT`: ``relu`` (BN-ReLU of the last stage before pooling), then ``stages.3`` ... ``stages.0``
      (``stages.3/4`` are the attention-convolution stages).
    - :class:`SaDNNCls`: its local self-attention blocks, last first.
    - :class:`PatchConvNet`: the last trunk block (all blocks share the token grid), else the stem.
    - :class:`Scopeformer`: all ``projections.i`` together, each backbone's last feature map after its 1x1
      projection (the global feature map is their concatenation; the projections get gradients even when the
      backbones are frozen).
    - any other module: its convolutions, last registered first.
    """
    if isinstance(model, HCT):
        # pre-activation network: the last stage's activated features are its head's BN-ReLU ("relu"), the map
        # the classifier pools; earlier stages are candidates for inputs too small to keep a grid there
        return [("relu",)] + [(f"stages.{i}",) for i in reversed(range(len(model.stages) - 1))]
    if isinstance(model, SaDNNCls):
        blocks = [i for i, m in enumerate(model.features) if isinstance(m, LocalSelfAttentionBlock)]
        return [(f"features.{i}",) for i in reversed(blocks)]
    if isinstance(model, PatchConvNet):
        return [(f"blocks.{len(model.blocks) - 1}",)] if len(model.blocks) else [("stem",)]
    if isinstance(model, Scopeformer):
        return [tuple(f"projections.{i}" for i in range(len(model.projections)))]
    convolutions = [(name,) for name, m in model.named_modules() if isinstance(m, _ConvNd)]
    if not convolutions:
        raise ValueError(f"{type(model).__name__} has no convolution layer; pass the Grad-CAM layer explicitly.")
    return convolutions[::-1]


@torch.no_grad()
def _output_grids(model: nn.Module, example: torch.Tensor, names: set[str]) -> dict[str, tuple[int, ...]]:
    """Spatial shape of the outputs of the named layers for ``example`` (one forward in eval mode)."""
    grids: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in model.named_modules():
        if name in names:

            def record(_module, _inputs, output, name=name):
                if isinstance(output, torch.Tensor) and output.ndim == example.ndim:
                    grids[name] = tuple(output.shape[2:])

            handles.append(module.register_forward_hook(record))
    try:
        with evaluation_mode(model):
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return grids


def default_cam_layer(
    model: nn.Module, example: torch.Tensor | None = None, min_grid: int = 8
) -> str | tuple[str, ...]:
    """The default Grad-CAM layer of ``model`` (see :func:`cam_layer_candidates`).

    Without ``example``: the deepest candidate (HCT's activated last stage, SaDNN-cls's last attention block,
    PatchConvNet's last block, Scopeformer's backbone projections). With an example batch ``(B, C, *S)``: the
    deepest candidate whose feature map still has at least ``min_grid`` cells along every axis (Grad-CAM's usual
    7 x 7 to 8 x 8), or the one with the finest grid if none does. Deeper maps are more class-specific but
    coarser: on the 64-pixel blob task of ``tests/test_explain.py``, 4 x 4 layers (SaDNN-cls-small's last block
    before its FC head, HCT's stages) located the evidence poorly where the 8 x 8 layer below them did well.
    HCT's default strides reduce 512 pixels to a 4 x 4 last stage, the full mammograms of the paper to ~25 x 20.

    Returns:
        one layer name, or a tuple of names whose maps are summed (Scopeformer: one per backbone).
    """
    if is_scripted(model):
        raise TypeError("a TorchScript module has no hookable layers for Grad-CAM; use RISE (method='rise').")
    candidates = cam_layer_candidates(model)
    chosen = candidates[0]
    if example is not None and len(candidates) > 1:
        grids = _output_grids(model, example[:1], {name for names in candidates for name in names})
        sized = [(names, min(min(grids[n]) for n in names)) for names in candidates if all(n in grids for n in names)]
        if not sized:
            raise ValueError(f"none of the candidate layers of {type(model).__name__} produced a spatial feature map.")
        fine_enough = [names for names, side in sized if side >= min_grid]
        chosen = fine_enough[0] if fine_enough else max(sized, key=lambda item: item[1])[0]
    return chosen[0] if len(chosen) == 1 else chosen


def layer_names(model: nn.Module, layer: LayerSpec) -> tuple[str, ...]:
    """Names of the given layer(s) of ``model`` (modules, names, or a sequence of them), checked to exist."""
    layers = [layer] if isinstance(layer, (str, nn.Module)) else list(layer)
    if not layers:
        raise ValueError("layer must name at least one module.")
    by_module = {id(m): name for name, m in model.named_modules()}
    known = dict(model.named_modules())
    names = []
    for item in layers:
        if isinstance(item, nn.Module):
            if id(item) not in by_module:
                raise ValueError(f"the given {type(item).__name__} layer is not a submodule of {type(model).__name__}.")
            names.append(by_module[id(item)])
        elif isinstance(item, str):
            if item not in known:
                raise ValueError(f"{type(model).__name__} has no submodule named {item!r}.")
            names.append(item)
        else:
            raise TypeError(f"a layer is a module name or an nn.Module, got {type(item).__name__}.")
    return tuple(names)


def grad_cam(
    model: nn.Module,
    image: torch.Tensor,
    *,
    target: int | Sequence[int] | None = None,
    layer: LayerSpec | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Grad-CAM maps of class ``target`` on the input grid.

    With several layers (Scopeformer's backbones) the upsampled per-layer maps are summed.

    Args:
        model: a differentiable classifier ``(B, C, *S) -> (B, classes)`` logits (not TorchScript, not quantised).
        image: ``(B, C, *S)``.
        target: class explained, one index or one per image (``None``: the top-scoring class of each image).
        layer: a module, its name, or several (``None``: :func:`default_cam_layer` for this input).
        normalize: min-max each map to ``[0, 1]``.

    Returns:
        ``(B, *S)`` float32 maps.
    """
    if not isinstance(model, nn.Module) or is_scripted(model):
        raise TypeError(
            f"Grad-CAM needs the eager nn.Module (hooks and autograd), got {type(model).__name__}; "
            "explain TorchScript or other black-box classifiers with RISE (method='rise')."
        )
    if is_quantized(model):
        raise TypeError("Grad-CAM cannot run on a quantised model (no autograd); use RISE (method='rise').")
    image = check_image(image, getattr(model, "spatial_dims", None))
    names = layer_names(model, default_cam_layer(model, image) if layer is None else layer)
    spatial_size = tuple(image.shape[2:])
    with torch.no_grad(), evaluation_mode(model):
        logits = model(image)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise ValueError(f"{type(model).__name__} must return logits (B, classes) for Grad-CAM.")
    targets = resolve_targets(target, logits, image.shape[0])  # argmax of the logits = of the probabilities

    hooked = _RemovableHooks(model, names)
    cam = GradCAM(nn_module=hooked, target_layers=names, upsampler=default_upsampler, postprocessing=lambda m: m)
    maps = torch.zeros((image.shape[0], *spatial_size), dtype=torch.float32, device=image.device)
    try:
        with _gradients_for_explanation(model), warnings.catch_warnings():
            # frozen Scopeformer backbones: the projections' inputs need no gradient, which torch warns about
            warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
            # MONAI scores one class for the whole batch: run each target class on its images
            for target_class in sorted(set(targets)):
                index = torch.tensor([i for i, t in enumerate(targets) if t == target_class], device=image.device)
                batch = image.index_select(0, index).detach().requires_grad_(True)
                for layer_index, name in enumerate(names):
                    maps[index] += _layer_map(cam, hooked, batch, target_class, layer_index, name, model)
    finally:
        hooked.remove()
    return normalize_maps(maps) if normalize else maps


def _layer_map(
    cam: GradCAM,
    hooked: _RemovableHooks,
    batch: torch.Tensor,
    target_class: int,
    layer_index: int,
    name: str,
    model: nn.Module,
) -> torch.Tensor:
    hooked.activations.clear()
    hooked.gradients.clear()
    try:
        cam_map = cam(batch, class_idx=target_class, layer_idx=layer_index)
    except (KeyError, IndexError, RuntimeError, ValueError) as error:
        activation = hooked.activations.get(name)
        if activation is None:
            if isinstance(error, KeyError):  # MONAI found no activation: the forward pass never ran the layer
                raise ValueError(
                    f"layer {name!r} is not called in the forward pass of {type(model).__name__}."
                ) from error
            raise  # the forward pass failed before the layer: the model's own error
        if not isinstance(activation, torch.Tensor) or activation.ndim != batch.ndim:
            shape = tuple(activation.shape) if isinstance(activation, torch.Tensor) else type(activation).__name__
            raise ValueError(
                f"layer {name!r} outputs {shape}, not a feature map (B, K, *spatial) with {batch.ndim - 2} spatial "
                "dims; choose a convolutional layer or stage."
            ) from error
        if isinstance(error, IndexError) and name not in hooked.gradients:  # MONAI found no gradient to return
            raise ValueError(
                f"layer {name!r} received no gradient from the class score of {type(model).__name__}."
            ) from error
        raise
    activation = hooked.activations[name]
    if not isinstance(activation, torch.Tensor) or activation.ndim != batch.ndim:
        raise ValueError(f"layer {name!r} does not output a (B, K, *spatial) feature map.")
    return cam_map[:, 0].detach().float()

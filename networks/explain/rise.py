# Copyright MedAttnSlicer contributors. Apache-2.0.
"""RISE: Randomized Input Sampling for Explanation (Petsiuk, Das, Saenko, BMVC 2018).

A black-box saliency method: the image is multiplied by ``N`` random smooth masks and the saliency of class ``c``
at a pixel ``x`` is the classifier's probability of ``c``, averaged over the masks weighted by how much each mask
kept ``x``::

    S_c(x) = 1 / (N p) * sum_i P(c | I * M_i + b * (1 - M_i)) * M_i(x)

Masks: a coarse grid of Bernoulli(``p``) cells of ``cell_size`` pixels, (bi/tri)linearly upsampled to one cell more
than the image and cropped at a random shift of less than one cell, so they are smooth and not aligned to the grid.

Only class probabilities are needed, so it explains any classifier: an ``nn.Module``, a TorchScript INT8 artifact,
or any function of a batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from monai.visualize.visualizer import default_upsampler

from networks.explain.utils import check_image, normalize_maps, resolve_targets

__all__ = ["rise_saliency", "rise_masks", "default_cell_size"]

PredictFn = Callable[[torch.Tensor], torch.Tensor]


def default_cell_size(spatial_size: Sequence[int], cells: int = 8) -> tuple[int, ...]:
    """Cell side per axis giving about ``cells`` mask cells along each axis (Petsiuk et al. use 7-8)."""
    return tuple(max(1, math.ceil(int(s) / cells)) for s in spatial_size)


def _as_cell_size(cell_size: int | Sequence[int] | None, spatial_size: Sequence[int]) -> tuple[int, ...]:
    if cell_size is None:
        return default_cell_size(spatial_size)
    cells = (cell_size,) * len(spatial_size) if isinstance(cell_size, int) else tuple(cell_size)
    if len(cells) != len(spatial_size) or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in cells):
        raise ValueError(
            f"cell_size must be a positive integer or one per spatial axis ({len(spatial_size)}), got {cell_size!r}."
        )
    return cells


def rise_masks(
    num_masks: int,
    spatial_size: Sequence[int],
    cell_size: int | Sequence[int] | None = None,
    p_keep: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random smooth RISE masks with values in ``[0, 1]``.

    Args:
        num_masks: number of masks ``N``.
        spatial_size: ``S``, 1 to 3 axes (e.g. ``(H, W)`` or ``(D, H, W)``).
        cell_size: side of a mask cell in pixels, an int or one per axis (``None``: about 8 cells per axis).
        p_keep: probability that a cell is kept (the mask is 1 there).
        generator: CPU random generator; a seeded one makes the masks reproducible.

    Returns:
        ``(N, 1, *S)`` float32 tensor on the CPU.
    """
    spatial_size = tuple(int(s) for s in spatial_size)
    if not 1 <= len(spatial_size) <= 3 or min(spatial_size) < 1:
        raise ValueError(f"spatial_size must have 1 to 3 positive axes, got {spatial_size!r}.")
    if isinstance(num_masks, bool) or not isinstance(num_masks, int) or num_masks < 1:
        raise ValueError(f"num_masks must be a positive integer, got {num_masks!r}.")
    if not 0.0 < float(p_keep) <= 1.0:
        raise ValueError(f"p_keep must be in (0, 1], got {p_keep!r}.")
    cells = _as_cell_size(cell_size, spatial_size)
    grid = tuple(math.ceil(s / c) for s, c in zip(spatial_size, cells))
    # one cell more than the image, so that a shift of up to one cell still covers it
    upsampled_size = tuple((g + 1) * c for g, c in zip(grid, cells))
    coarse = (torch.rand((num_masks, 1, *grid), generator=generator) < p_keep).float()
    smooth = default_upsampler(upsampled_size)(coarse)
    shifts = torch.stack([torch.randint(0, c, (num_masks,), generator=generator) for c in cells], dim=1).tolist()
    masks = torch.empty((num_masks, 1, *spatial_size))
    for i, shift in enumerate(shifts):
        window = tuple(slice(o, o + s) for o, s in zip(shift, spatial_size))
        masks[i] = smooth[(i, slice(None), *window)]
    return masks


def _probabilities(predict_fn: PredictFn, batch: torch.Tensor) -> torch.Tensor:
    probabilities = predict_fn(batch)
    valid = isinstance(probabilities, torch.Tensor) and probabilities.ndim == 2
    if not valid or probabilities.shape[0] != batch.shape[0]:
        got = tuple(probabilities.shape) if isinstance(probabilities, torch.Tensor) else type(probabilities).__name__
        raise ValueError(
            f"predict_fn must map a batch (N, C, *spatial) to class probabilities (N, classes); for N={batch.shape[0]} "
            f"it returned {got}."
        )
    if not torch.isfinite(probabilities).all():
        raise ValueError("predict_fn returned NaN or infinite class probabilities.")
    return probabilities.detach().float()


@torch.no_grad()
def rise_saliency(
    predict_fn: PredictFn,
    image: torch.Tensor,
    *,
    target: int | Sequence[int],
    num_masks: int = 1000,
    cell_size: int | Sequence[int] | None = None,
    p_keep: float = 0.5,
    batch_size: int = 50,
    baseline: float = 0.0,
    generator: torch.Generator | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """RISE saliency of class ``target`` for each image of a batch.

    Args:
        predict_fn: maps a batch ``(N, C, *S)`` to class probabilities ``(N, classes)`` (e.g. ``sigmoid(model(x))``
            for a multi-label classifier). Called ``ceil(num_masks / batch_size)`` times per image, under
            ``torch.no_grad``.
        image: ``(B, C, *S)``, 2 or 3 spatial axes.
        target: class explained, one index for all images or one per image.
        num_masks: masks per image (Petsiuk et al.: 4000-8000 for ImageNet; fewer give noisier maps).
        cell_size: mask cell side in pixels, int or per axis (``None``: about 8 cells per axis).
        p_keep: probability that a mask cell keeps the image.
        batch_size: masked images per ``predict_fn`` call.
        baseline: value of the masked-out pixels (``0``: the mean of a zero-centred image, black for [0, 1] scaling).
        generator: CPU generator of the masks; seed it for a reproducible map.
        normalize: min-max each map to ``[0, 1]`` (else the raw expected probability, about ``[0, 1 / p_keep]``).

    Returns:
        ``(B, *S)`` float32 maps on the image's device.
    """
    image = check_image(image)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if isinstance(num_masks, bool) or not isinstance(num_masks, int) or num_masks < 1:
        raise ValueError(f"num_masks must be a positive integer, got {num_masks!r}.")
    spatial_size = tuple(image.shape[2:])
    targets = resolve_targets(target, None, image.shape[0])
    maps = []
    for single, target_class in zip(image, targets):
        saliency = torch.zeros(spatial_size, dtype=torch.float32, device=image.device)
        for start in range(0, num_masks, batch_size):
            # masks are drawn batch by batch so that memory stays at batch_size masks for any num_masks
            masks = rise_masks(min(batch_size, num_masks - start), spatial_size, cell_size, p_keep, generator)
            masks = masks.to(device=image.device, dtype=image.dtype)
            probabilities = _probabilities(predict_fn, single[None] * masks + baseline * (1.0 - masks))
            if target_class >= probabilities.shape[1]:
                raise ValueError(f"target class {target_class} is out of range for {probabilities.shape[1]} classes.")
            weights = probabilities[:, target_class].to(image.device)
            saliency += torch.tensordot(weights, masks[:, 0].float(), dims=1)
        maps.append(saliency / (num_masks * p_keep))
    stacked = torch.stack(maps)
    return normalize_maps(stacked) if normalize else stacked

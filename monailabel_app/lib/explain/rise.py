# Copyright MedAttnSlicer contributors. Apache-2.0.
"""RISE saliency (Petsiuk, Das, Saenko, BMVC 2018): randomised input sampling for explaining a black-box classifier.

The image is multiplied by ``N`` random smooth binary masks; the saliency of class ``c`` at a pixel is the average
of the classifier's score for ``c`` over the masks, weighted by how much each mask kept that pixel::

    S_c(x) = 1 / (N * p) * sum_i f_c(I * M_i) * M_i(x)

Masks: a coarse ``grid_size`` grid of Bernoulli(p) cells, upsampled (bilinear/trilinear) to
``(grid_size + 1) * cell`` and randomly shifted by up to one cell before cropping to the image size, which makes them
smooth and translation-jittered.

Model-agnostic: ``classifier`` is any callable ``(B, C, *spatial) -> (B, classes)`` (an ``nn.Module``, a TorchScript
INT8 artifact, a wrapped HCT/PatchConvNet), 2D or 3D.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["RISE", "generate_rise_masks"]

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def generate_rise_masks(
    num_masks: int,
    spatial_size: Sequence[int],
    grid_size: int = 8,
    p_keep: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random smooth masks in [0, 1].

    Args:
        num_masks: how many masks ``N``.
        spatial_size: image size ``(H, W)`` or ``(D, H, W)``.
        grid_size: cells per axis of the coarse Bernoulli grid.
        p_keep: probability that a cell is kept.
        generator: random generator (for reproducible saliency).

    Returns:
        ``(N, 1, *spatial_size)`` float tensor.
    """
    spatial_size = tuple(int(s) for s in spatial_size)
    dims = len(spatial_size)
    if dims not in _MODES:
        raise ValueError(f"spatial_size must have 1 to 3 dimensions, got {spatial_size!r}.")
    if num_masks < 1 or grid_size < 1 or not 0.0 < p_keep <= 1.0:
        raise ValueError(f"need num_masks >= 1, grid_size >= 1, 0 < p_keep <= 1; got {num_masks}, {grid_size}, {p_keep}.")
    cells = [math.ceil(s / grid_size) for s in spatial_size]
    up_size = [(grid_size + 1) * c for c in cells]
    grid = (torch.rand((num_masks, 1, *([grid_size] * dims)), generator=generator) < p_keep).float()
    up = F.interpolate(grid, size=up_size, mode=_MODES[dims], align_corners=False)
    masks = torch.empty((num_masks, 1, *spatial_size))
    shifts = torch.stack([torch.randint(0, c, (num_masks,), generator=generator) for c in cells], dim=1)
    for i in range(num_masks):
        window = tuple(slice(int(o), int(o) + s) for o, s in zip(shifts[i], spatial_size))
        masks[i, 0] = up[(i, 0, *window)]
    return masks


class RISE:
    """Saliency maps of a classifier by randomised input masking.

    Args:
        classifier: ``(B, C, *spatial) -> (B, classes)`` scores or logits.
        num_masks: masks per explanation (more: smoother, slower).
        grid_size: coarse mask grid cells per axis.
        p_keep: probability a cell is kept.
        batch_size: masked images per classifier call.
        activation: applied to the classifier output: ``"sigmoid"`` (multi-label logits), ``"softmax"``
            (single-label logits) or ``None`` (already probabilities).
        seed: seed of the mask generator (the same seed gives the same masks).
    """

    def __init__(
        self,
        classifier: Callable[[torch.Tensor], torch.Tensor],
        num_masks: int = 256,
        grid_size: int = 8,
        p_keep: float = 0.5,
        batch_size: int = 32,
        activation: str | None = "sigmoid",
        seed: int = 0,
    ) -> None:
        if activation not in ("sigmoid", "softmax", None):
            raise ValueError(f"activation must be 'sigmoid', 'softmax' or None, got {activation!r}.")
        self.classifier = classifier
        self.num_masks = int(num_masks)
        self.grid_size = int(grid_size)
        self.p_keep = float(p_keep)
        self.batch_size = int(batch_size)
        self.activation = activation
        self.seed = int(seed)

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(B, classes)`` of a batch ``(B, C, *spatial)``."""
        out = self.classifier(images)
        if isinstance(out, (tuple, list)):
            out = out[0]
        out = out.float()
        if self.activation == "sigmoid":
            return torch.sigmoid(out)
        if self.activation == "softmax":
            return torch.softmax(out, dim=1)
        return out

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, baseline: float = 0.0) -> torch.Tensor:
        """Saliency of every class for one image.

        Args:
            image: ``(C, *spatial)`` (no batch dimension).
            baseline: value of masked-out pixels (0 = the bottom of a 0..1-scaled image).

        Returns:
            ``(classes, *spatial)`` float tensor; each class map averages its probability over the masks, so values
            lie in about [0, 1 / p_keep].
        """
        if image.ndim not in (2, 3, 4):
            raise ValueError(f"image must be (C, *spatial) with 1-3 spatial dims, got shape {tuple(image.shape)}.")
        image = image.float()
        spatial = image.shape[1:]
        generator = torch.Generator().manual_seed(self.seed)
        masks = generate_rise_masks(self.num_masks, spatial, self.grid_size, self.p_keep, generator)
        saliency: torch.Tensor | None = None
        for start in range(0, self.num_masks, self.batch_size):
            m = masks[start : start + self.batch_size]
            batch = image[None] * m + baseline * (1.0 - m)
            probs = self.scores(batch)  # (b, classes)
            weighted = torch.einsum("bk,bs->ks", probs, m.reshape(m.shape[0], -1))
            saliency = weighted if saliency is None else saliency + weighted
        assert saliency is not None
        saliency = saliency / (self.num_masks * self.p_keep)
        return saliency.reshape(saliency.shape[0], *spatial)

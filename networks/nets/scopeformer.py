# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Efficient Scopeformer (Barhoumi & Rasool, MIDL 2022): CNN-ensemble features + re-attention ViT for the
multi-label classification of intracranial haemorrhage in CT slices (RSNA 2019: "any" + 5 subtypes).

Several CNN backbones (MONAI networks used as feature extractors) each feed a trainable 1x1 convolution to
``dim / n`` channels; the maps are average-pooled to ``grid x grid`` and concatenated into a global feature map of
``dim`` channels, which a ViT encoder with DeepViT re-attention classifies.

No pretrained weights are downloaded: backbones start from random initialisation unless ``backbone_weights``
names a local state-dict file for them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks import nets as monai_nets
from monai.networks.layers import Conv, Pool
from monai.networks.layers.utils import get_norm_layer
from monai.transforms import ScaleIntensityRange
from monai.utils import convert_to_tensor
from torch import nn

from networks.arguments import check_spatial_dims
from networks.blocks.reattention import ReAttentionTransformerBlock

__all__ = [
    "Scopeformer",
    "BackboneFeatures",
    "SCOPEFORMER_BACKBONES",
    "SCOPEFORMER_MODES",
    "CT_HU_WINDOWS",
    "hu_windows",
    "weighted_multilabel_log_loss",
]

SCOPEFORMER_MODES = ("efficient", "deep_tr", "baseline")

# name -> backbone family; every family is a MONAI network with its classification head removed
SCOPEFORMER_BACKBONES: dict[str, str] = {
    "densenet121": "densenet",
    "densenet169": "densenet",
    "densenet201": "densenet",
    **{f"efficientnet-b{i}": "efficientnet" for i in range(8)},
    **{f"resnet{depth}": "resnet" for depth in (10, 18, 34, 50, 101, 152)},
}

# state-dict prefixes of the classification heads a full MONAI network carries and the extractor drops
_HEAD_PREFIXES = {
    "densenet": ("class_layers.",),
    "efficientnet": ("_conv_head.", "_bn1.", "_fc."),
    "resnet": ("fc.",),
}

# (window centre, window width) in HU: brain, subdural, soft tissue as listed by the paper
CT_HU_WINDOWS: tuple[tuple[float, float], ...] = ((40.0, 80.0), (80.0, 200.0), (80.0, 200.0))


def _replace_batch_norms(module: nn.Module, norm: str | tuple, spatial_dims: int) -> None:
    """Replace every BatchNorm inside ``module`` by ``norm`` on the same channels, in place.

    MONAI's ``ResNet(norm=...)`` only applies ``norm`` to the stem (its residual layers are built with the default
    BatchNorm), so the backbone's norms are swapped after construction. Affine weights start at 1 and biases at 0, as
    MONAI initialises BatchNorm.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            replacement = get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=child.num_features)
            if getattr(replacement, "weight", None) is not None:
                nn.init.ones_(replacement.weight)
                nn.init.zeros_(replacement.bias)
            setattr(module, name, replacement)
        else:
            _replace_batch_norms(child, norm, spatial_dims)


class BackboneFeatures(nn.Module):
    """A MONAI classification network used as a feature extractor: its last feature map, head removed.

    - ``densenet121/169/201``: ``DenseNet.features`` followed by ReLU (1024/1664/1920 channels, stride 32).
    - ``efficientnet-b0 .. b7``: last map of ``EfficientNetBNFeatures`` (320 channels for b0, stride 32).
    - ``resnet10 .. resnet152``: ``layer4`` of ``monai.networks.nets.resnetXX(..., conv1_t_stride=2)``
      (512 or 2048 channels, stride 32).

    Weights are random unless :meth:`load_weights` is given a state-dict file of the same MONAI network, e.g.
    ``torch.save(DenseNet121(2, 3, k).state_dict(), f)``, ``torch.save(resnet50(spatial_dims=2,
    n_input_channels=3).state_dict(), f)`` or an ``EfficientNetBN``/``EfficientNetBNFeatures`` state dict (the
    classifier heads' entries are ignored).

    Args:
        name: one of :data:`SCOPEFORMER_BACKBONES`.
        spatial_dims: 2 or 3.
        in_channels: input channels.
        width: channel multiplier of ResNet backbones (MONAI's ``widen_factor``; e.g. 0.125 gives 8..64 channels
            for CPU-sized models); other families only accept 1.0.
        norm: normalisation of ResNet backbones, a MONAI norm name or ``(name, kwargs)`` (default ``"batch"``, as in
            the paper). ``("instance", {"affine": True})`` or ``("group", {"num_groups": 4})`` keep the parameter
            count and use no running statistics: with tiny batches from one or two training volumes, BatchNorm's
            running statistics do not carry over to other scans. Other families only accept ``"batch"``.

    Shapes:
        ``(B, in_channels, *S) -> (B, out_channels, *S / 32)``.
    """

    def __init__(
        self, name: str, spatial_dims: int = 2, in_channels: int = 3, width: float = 1.0, norm: str | tuple = "batch"
    ) -> None:
        super().__init__()
        if name not in SCOPEFORMER_BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; supported: {', '.join(SCOPEFORMER_BACKBONES)}.")
        self.name = name
        self.family = SCOPEFORMER_BACKBONES[name]
        if not width > 0:
            raise ValueError(f"backbone width must be positive, got {width!r}.")
        if width != 1.0 and self.family != "resnet":
            raise ValueError(f"backbone width {width} applies to ResNet backbones only, not {name!r}.")
        if isinstance(norm, list):  # factory kwargs read back from a checkpoint's JSON metadata
            norm = (norm[0], dict(norm[1])) if len(norm) == 2 else tuple(norm)
        if norm != "batch" and self.family != "resnet":
            raise ValueError(f"backbone norm {norm!r} applies to ResNet backbones only, not {name!r}.")
        self.net: nn.Module
        if self.family == "densenet":
            densenet = getattr(monai_nets, name.replace("densenet", "DenseNet"))
            net = densenet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1)
            self.out_channels = net.class_layers.out.in_features
            net.class_layers = nn.Identity()
        elif self.family == "efficientnet":
            net = monai_nets.EfficientNetBNFeatures(
                name, pretrained=False, spatial_dims=spatial_dims, in_channels=in_channels
            )
            self.out_channels = net._conv_head.in_channels
            # the features forward never uses the head; drop its parameters
            net._conv_head, net._bn1, net._fc = nn.Identity(), nn.Identity(), nn.Identity()
        else:
            # the standard MONAI factory (1x1-conv shortcuts) with an ImageNet-style stride-2 first convolution
            net = getattr(monai_nets, name)(
                spatial_dims=spatial_dims,
                n_input_channels=in_channels,
                conv1_t_stride=2,
                feed_forward=False,
                widen_factor=width,
            )
            if norm != "batch":
                _replace_batch_norms(net, norm, spatial_dims)
            self.out_channels = net.in_planes
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.family == "densenet":
            return F.relu(self.net.features(x))
        if self.family == "efficientnet":
            return self.net(x)[-1]
        net = self.net  # MONAI ResNet without its global pooling
        x = net.act(net.bn1(net.conv1(x)))
        if not net.no_max_pool:
            x = net.maxpool(x)
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))

    def load_weights(self, path: str | os.PathLike) -> None:
        """Load a state dict saved with ``torch.save(monai_network.state_dict(), path)``.

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: the file is not a state dict of this backbone (unreadable, wrong keys or shapes).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"backbone weights for {self.name!r} not found: {path}")
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch.load raises many exception types for foreign files
            raise ValueError(f"cannot read backbone weights for {self.name!r} from {path}: {error}") from error
        if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors) for {self.name!r}.")
        head_prefixes = _HEAD_PREFIXES[self.family]
        state = {k: v for k, v in loaded.items() if not k.startswith(head_prefixes)}
        expected = self.net.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mismatched = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
        if missing or unexpected or mismatched:
            problems = []
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
                if keys:
                    problems.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
            raise ValueError(
                f"{path} is not a state dict of MONAI backbone {self.name!r} "
                f"(spatial_dims/in_channels must match): {'; '.join(problems)}."
            )
        self.net.load_state_dict(state, strict=True)


class Scopeformer(nn.Module):
    """Efficient Scopeformer: an ensemble of CNN feature extractors followed by a re-attention ViT.

    Global feature map: each backbone ``i`` -> 1x1 conv to ``dim / n`` channels -> adaptive average pool to
    ``grid^spatial_dims`` -> concatenate -> ``(B, dim, grid, grid)``. Token configurations (``G = grid^spatial_dims``):

    - ``"baseline"``: ``G`` patch tokens of width ``dim`` + CLS, learnable positions; head on the CLS token.
    - ``"deep_tr"``: transposed, ``dim`` channel tokens of width ``G`` + CLS, learnable positions; head on CLS.
    - ``"efficient"``: transposed without CLS (learnable positions kept); the ``dim x G`` outputs are reshaped back to
      ``(B, dim, grid, grid)``, average-pooled, and a dense layer gives the logits.

    Each of the ``depth`` encoder blocks is pre-norm with DeepViT re-attention (or plain attention with
    ``reattention=False``) and an MLP of width ``mlp_dim``; a final LayerNorm precedes the head. The output is
    multi-label logits (apply the sigmoid in the loss, e.g. :func:`weighted_multilabel_log_loss`).

    Backbones are randomly initialised (nothing is downloaded); ``backbone_weights`` maps backbone names to
    local state-dict files (see :meth:`BackboneFeatures.load_weights`). ``freeze_backbones`` stops their
    gradients and keeps their BatchNorm statistics fixed (they stay in eval mode), leaving the paper's
    "trainable" part: projections, transformer and head.

    Args:
        spatial_dims: 2 (CT slices) or 3.
        in_channels: input channels (3 HU windows, see :func:`hu_windows`).
        out_channels: number of labels (6: any + 5 haemorrhage subtypes).
        backbones: names from :data:`SCOPEFORMER_BACKBONES`.
        dim: channels of the global feature map; divisible by ``len(backbones)``.
        depth: transformer blocks.
        heads: attention heads; must divide the token width (``dim`` for baseline, ``G`` otherwise).
        mlp_dim: MLP hidden width.
        grid: pooled feature-map side, ``grid^spatial_dims`` patches.
        mode: ``"efficient"``, ``"deep_tr"`` or ``"baseline"``.
        dropout: dropout in the transformer and on the embeddings.
        backbone_weights: optional ``{backbone name: state-dict file}``.
        freeze_backbones: make the backbones non-trainable.
        reattention: re-attention (``True``) or plain multi-head attention (``False``).
        reattention_norm: ``"batch"``, ``"layer"`` or ``None``.
        backbone_width: channel multiplier of ResNet backbones (see :class:`BackboneFeatures`), for CPU-sized models.
        backbone_norm: normalisation of ResNet backbones (see :class:`BackboneFeatures`); ``"batch"`` as in the paper.

    Shapes:
        ``(B, in_channels, *S) -> (B, out_channels)``; each side of ``S`` at least ``32 * grid`` to avoid
        repeating backbone pixels in the pooled grid (any size >= 32 works).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 6,
        backbones: Sequence[str] = ("densenet121", "efficientnet-b0", "resnet18"),
        dim: int = 384,
        depth: int = 8,
        heads: int = 16,
        mlp_dim: int = 4096,
        grid: int = 8,
        mode: str = "efficient",
        dropout: float = 0.0,
        backbone_weights: Mapping[str, str | os.PathLike] | None = None,
        freeze_backbones: bool = False,
        reattention: bool = True,
        reattention_norm: str | None = "batch",
        backbone_width: float = 1.0,
        backbone_norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        if mode not in SCOPEFORMER_MODES:
            raise ValueError(f"mode must be one of {SCOPEFORMER_MODES}, got {mode!r}.")
        backbones = tuple(backbones)
        if not backbones:
            raise ValueError("at least one backbone is needed.")
        unknown = [name for name in backbones if name not in SCOPEFORMER_BACKBONES]
        if unknown:
            raise ValueError(f"unknown backbones {unknown}; supported: {', '.join(SCOPEFORMER_BACKBONES)}.")
        if dim % len(backbones) != 0:
            raise ValueError(f"dim ({dim}) must be divisible by the number of backbones ({len(backbones)}).")
        if grid < 1 or depth < 1:
            raise ValueError(f"grid and depth must be positive, got grid={grid}, depth={depth}.")
        backbone_weights = dict(backbone_weights or {})
        stray = sorted(set(backbone_weights) - set(backbones))
        if stray:
            raise ValueError(f"backbone_weights names backbones not in {backbones}: {stray}.")

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.mode = mode
        self.grid = grid
        self.dim = dim
        self.freeze_backbones = freeze_backbones
        patches = grid**spatial_dims
        self.num_patches = patches
        transposed = mode != "baseline"
        width = patches if transposed else dim
        tokens = dim if transposed else patches
        if width % heads != 0:
            raise ValueError(f"heads ({heads}) must divide the token width {width} of mode {mode!r}.")
        self.width = width
        self.use_cls = mode != "efficient"

        self.backbones = nn.ModuleList(
            BackboneFeatures(name, spatial_dims, in_channels, backbone_width, backbone_norm) for name in backbones
        )
        for backbone in self.backbones:
            if backbone.name in backbone_weights:
                backbone.load_weights(backbone_weights[backbone.name])
        conv_type = Conv[Conv.CONV, spatial_dims]
        self.projections = nn.ModuleList(
            conv_type(backbone.out_channels, dim // len(backbones), kernel_size=1) for backbone in self.backbones
        )
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](grid)

        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if self.use_cls else None
        self.position = nn.Parameter(torch.zeros(1, tokens + int(self.use_cls), width))
        self.drop_embedding = nn.Dropout(dropout)
        self.blocks = nn.Sequential(
            *(
                ReAttentionTransformerBlock(
                    width, heads, mlp_dim, dropout, reattention=reattention, norm=reattention_norm
                )
                for _ in range(depth)
            )
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(dim if mode == "efficient" else width, out_channels)

        nn.init.trunc_normal_(self.position, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        if freeze_backbones:
            for parameter in self.backbones.parameters():
                parameter.requires_grad_(False)
            self.backbones.eval()

    def train(self, mode: bool = True) -> Scopeformer:
        super().train(mode)
        if self.freeze_backbones:
            self.backbones.eval()  # frozen extractors keep their BatchNorm statistics
        return self

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Global feature map ``(B, dim, grid, ..., grid)`` of the backbone ensemble."""
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape (B, {self.in_channels}, {', '.join(['*'] * self.spatial_dims)}), "
                f"got {tuple(x.shape)}."
            )
        maps = []
        for backbone, projection in zip(self.backbones, self.projections):
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbones):
                features = backbone(x)
            maps.append(self.pool(projection(features)))
        return torch.cat(maps, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: images of shape ``(B, in_channels, *S)``.

        Returns:
            multi-label logits of shape ``(B, out_channels)``.
        """
        features = self.feature_map(x).flatten(2)  # (B, dim, G)
        tokens = features if self.mode != "baseline" else features.transpose(1, 2)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = self.norm(self.blocks(self.drop_embedding(tokens + self.position)))
        if self.mode == "efficient":
            # (B, dim, G) is the grid-shaped map with d channels: average-pool it over the grid
            return self.head(tokens.mean(dim=-1))
        return self.head(tokens[:, 0])


def weighted_multilabel_log_loss(
    logits: torch.Tensor, targets: torch.Tensor, class_weights: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """RSNA intracranial-haemorrhage weighted multi-label log loss.

    ``sum_{i,c} w_c BCE(logit_ic, y_ic) / sum_{i,c} w_c``, computed with ``binary_cross_entropy_with_logits``
    (e.g. weights ``(2, 1, 1, 1, 1, 1)`` for "any" followed by the five subtypes).

    Args:
        logits: shape ``(B, C)``.
        targets: shape ``(B, C)`` with values in ``[0, 1]``.
        class_weights: ``C`` non-negative weights.

    Returns:
        scalar loss.
    """
    weights = torch.as_tensor(class_weights, dtype=logits.dtype, device=logits.device)
    if logits.ndim != 2 or logits.shape != targets.shape:
        raise ValueError(
            f"logits and targets must both have shape (B, C), got {tuple(logits.shape)} and {tuple(targets.shape)}."
        )
    if weights.shape != (logits.shape[1],):
        raise ValueError(f"class_weights must have {logits.shape[1]} entries, got shape {tuple(weights.shape)}.")
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError("class_weights must be non-negative with a positive sum.")
    per_entry = F.binary_cross_entropy_with_logits(
        logits, targets.to(logits.dtype), weight=weights.expand_as(logits), reduction="sum"
    )
    return per_entry / (weights.sum() * logits.shape[0])


def hu_windows(ct_hu: torch.Tensor, windows: Sequence[tuple[float, float]] = CT_HU_WINDOWS) -> torch.Tensor:
    """Stack HU windows of CT slices as channels in ``[0, 1]`` (MONAI ``ScaleIntensityRange`` with clipping).

    The default windows are brain (40/80), subdural (80/200) and soft tissue (80/200), centre/width in HU,
    as listed by the Efficient Scopeformer paper.

    Args:
        ct_hu: slices in Hounsfield units, shape ``(H, W)``, ``(1, H, W)`` or ``(B, 1, H, W)``.
        windows: ``(centre, width)`` pairs, one output channel each.

    Returns:
        ``(len(windows), H, W)`` for an unbatched input, ``(B, len(windows), H, W)`` for a batched one.
    """
    if not windows:
        raise ValueError("at least one (centre, width) window is needed.")
    ct_hu = torch.as_tensor(ct_hu)
    if ct_hu.ndim == 2:
        ct_hu = ct_hu[None]
    if ct_hu.ndim not in (3, 4) or ct_hu.shape[-3] != 1:
        raise ValueError(f"expected 2D slices of shape (H, W), (1, H, W) or (B, 1, H, W), got {tuple(ct_hu.shape)}.")
    channels = []
    for centre, width in windows:
        if width <= 0 or not math.isfinite(centre):
            raise ValueError(f"a window needs a finite centre and a positive width, got ({centre}, {width}).")
        scale = ScaleIntensityRange(
            a_min=centre - width / 2, a_max=centre + width / 2, b_min=0.0, b_max=1.0, clip=True, dtype=torch.float32
        )
        channels.append(convert_to_tensor(scale(ct_hu), track_meta=False))
    return torch.cat(channels, dim=-3)

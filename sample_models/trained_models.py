# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Small networks trained briefly on real CT, shared by tests and benchmarks.

The data are TotalSegmentator's ``example_ct.nii.gz`` (abdomen CT, 3 mm) and its ``total`` label map
(``example_seg_fast_force_split.nii.gz``; liver = class 5), fetched by :mod:`sample_data`. Axial slices are HU-windowed
to [-200, 300] -> [0, 1], normalised to zero mean / unit variance and resized to a fixed square size; 3D samples are
crops of the resized abdomen volume.
Even slices (and four of the eight 3D crops) train and calibrate; odd slices (the other crops) are held out.

Trained weights are cached as :mod:`networks.checkpoint` files in ``$MEDATTN_MODEL_CACHE`` or
``~/.cache/medattn/trained_models`` (like the kernel cache: outside the checkout, so a fresh clone on the same machine
reuses them), keyed by a hash of the training configuration, the data preparation, the torch version and the source
of everything that shapes the weights (:func:`code_digest`): only the first run after a change pays for training, and
``python -m sample_models`` pays it up front, several models at a time.

    >>> from sample_models import trained_model, ct_slices
    >>> model, config = trained_model("sadnn_seg_small_2d")
    >>> data = ct_slices(64)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pickle
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CT_WINDOW_HU",
    "ORGAN_CLASSES",
    "TrainConfig",
    "CONFIGS",
    "CTData",
    "ct_slices",
    "ct_volume_crops",
    "data_for",
    "train",
    "trained_model",
    "cache_dir",
    "code_digest",
    "train_missing",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
CT_WINDOW_HU = (-200.0, 300.0)
# after windowing to [0, 1]: subtract the mean and divide by the std of example_ct's upper-abdomen slices
CT_NORMALISATION = (0.22, 0.21)
LIVER_CLASS = 5
# ``total`` class map: classes used as multi-label "organ present in this slice" targets for the classifier
ORGAN_CLASSES = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "stomach": 6, "pancreas": 7}
# axial slices used: the upper abdomen, liver in z = 69..111 of example_ct
SLICE_RANGE = (52, 112)
DATA_VERSION = 4  # bump when data preparation or the training loop changes: invalidates cached weights


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a cached model's weights."""

    model_name: str
    model_kwargs: dict = field(default_factory=dict)
    task: str = "segmentation"  # or "classification"
    spatial_dims: int = 2
    size: int = 64  # 2D: slice side; 3D: in-plane crop side (crops are size // 2 deep)
    steps: int = 60
    batch_size: int = 8
    learning_rate: float = 1e-2
    loss: str = "dicece"  # "dicece" (Dice + cross-entropy on the liver), "dice" (soft Dice) or "bce" (multi-label)
    query_init_scale: float = 1.0  # multiplies the initial query projections of every LocalSelfAttention
    seed: int = 0

    def key(self) -> str:
        data = {"version": DATA_VERSION, "window": CT_WINDOW_HU, "norm": CT_NORMALISATION, "slices": SLICE_RANGE}
        code = {"torch": torch.__version__, "sources": code_digest()}
        payload = json.dumps({**dataclasses.asdict(self), "data": data, "code": code}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# what a cached model's weights depend on besides its config: the networks (and the kernels they may call), their
# factory, and this module (data preparation and the training loop). Quantisation, the app and the tests are not in it.
_WEIGHT_SOURCES = ("networks/nets", "networks/blocks", "networks/kernels", "networks/factory.py", "sample_models")


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 (16 hex digits) of the source files under :data:`_WEIGHT_SOURCES` (``.py``, ``.cpp``, ``.h``): a
    cached model trained by other code is never reused."""
    digest = hashlib.sha256()
    for top in _WEIGHT_SOURCES:
        root = REPO_ROOT / top
        files = [root] if root.is_file() else sorted(root.rglob("*"))
        for path in files:
            if path.suffix in (".py", ".cpp", ".h") and path.is_file():
                digest.update(path.relative_to(REPO_ROOT).as_posix().encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# Pure self-attention nets (SaDNN) start with sharply peaked attention: with no 1/sqrt(d) scaling (SASA has none),
# q . k has a std of 5-25 at init. Query projections initialised 10x smaller start near-uniform, train within ~100
# steps and end far better conditioned: SaDNN-seg trained with soft Dice alone and default init reached logits of ~250
# and was so sensitive that INT8 rounding of any single encoder layer moved its liver masks by 20-30 % (Dice 0.64
# INT8 vs FP32). 64 x 64 slices keep a step near 0.2-0.4 s on two cores.
# the 3D networks' data: 32 x 32 x 16 crops, two a step, liver Dice + cross-entropy
_CROPS_3D: dict[str, Any] = {"spatial_dims": 3, "size": 32, "batch_size": 2, "loss": "dicece"}
CONFIGS: dict[str, TrainConfig] = {
    "sadnn_seg_small_2d": TrainConfig(
        "sadnn_seg_small", {"dropout": 0.0}, steps=120, learning_rate=1e-3, loss="dicece", query_init_scale=0.1
    ),
    "unet_baseline_2d": TrainConfig("unet_baseline", {}, steps=30, learning_rate=3e-3, loss="dicece"),
    "sadnn_cls_small_2d": TrainConfig(
        "sadnn_cls_small",
        {"out_channels": len(ORGAN_CLASSES), "img_size": 64},
        task="classification",
        steps=80,
        learning_rate=3e-3,
        loss="bce",
        query_init_scale=0.1,
    ),
    # The attention classifiers of issue 5 on the same organ-presence task. Each input size gives its attention a
    # real token grid rather than a 1x1 or repeated one: HCT-small at 64 px with strides (2, 1, 1, 1, 1) runs its AC
    # blocks on 8 x 8 tokens (the default strides divide by 128: at 64 px that would leave 1-4 tokens);
    # PatchConvNet-small (stride 16) at 128 px pools 8 x 8 patch tokens; Scopeformer-small's backbones (stride 32) at
    # 128 px give exactly its 4 x 4 grid (at 64 px the adaptive pooling would repeat 2 x 2 features; the paper's 8 x 8
    # grid needs 256 px, ~2.4 s per step on one thread). One-thread training times are in the comments.
    # Measured one-thread training times below are from a shared, loaded 2-core machine.
    "hct_small_cls_2d": TrainConfig(  # 4 s; held-out label accuracy 0.96 (majority guess 0.62)
        "hct_small",
        {"in_channels": 1, "out_channels": len(ORGAN_CLASSES), "strides": (2, 1, 1, 1, 1)},
        task="classification",
        steps=150,
        learning_rate=3e-3,
        loss="bce",
    ),
    # 41 s, accuracy 0.85 (majority 0.59): 8.5 M parameters of random-init backbones learn slowly, but batches of 4
    # (90 steps) fit the minute better than 70 steps of 8 (54 s, accuracy 0.86); lr 3e-4 reached only 0.64.
    "scopeformer_small_cls_2d": TrainConfig(
        "scopeformer_small",
        {"in_channels": 1, "out_channels": len(ORGAN_CLASSES)},
        task="classification",
        size=128,
        steps=90,
        batch_size=4,
        learning_rate=1e-3,
        loss="bce",
    ),
    "patchconvnet_small_cls_2d": TrainConfig(  # 11 s, accuracy 0.90 (majority 0.59; 150 steps: 0.85, lr 3e-3: 0.59)
        "patchconvnet_small",
        {"in_channels": 1, "out_channels": len(ORGAN_CLASSES)},
        task="classification",
        size=128,
        steps=300,
        learning_rate=1e-3,
        loss="bce",
    ),
    # lr 3e-3 for 80 steps (the recipe before training was pinned to the AVX2 class) ended with logits of ~90 on
    # that class: INT8 agreement Dice 0.21-0.34 whatever the activation bits. lr 1e-3 for 120 steps (47 s): logits
    # ~31, FP32 Dice vs label 0.56, INT8 agreement 0.885.
    "sadnn_seg_small_3d": TrainConfig(
        "sadnn_seg_small",
        {"spatial_dims": 3, "dropout": 0.0},
        **_CROPS_3D,
        steps=120,
        learning_rate=1e-3,
        query_init_scale=0.1,
    ),
    "unet_baseline_3d": TrainConfig("unet_baseline", {"spatial_dims": 3}, **_CROPS_3D, steps=60, learning_rate=3e-3),
}


@dataclass
class CTData:
    """Images ``(N, 1, *spatial)`` in [0, 1], liver masks ``(N, 1, *spatial)`` (long 0/1), organ presence
    ``(N, len(ORGAN_CLASSES))`` (float 0/1); ``train``/``held_out`` index the samples."""

    images: torch.Tensor
    liver: torch.Tensor
    organs: torch.Tensor
    train: list[int]
    held_out: list[int]

    def split(self, which: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index = {"train": self.train, "held_out": self.held_out}[which]
        return self.images[index], self.liver[index], self.organs[index]


MODEL_CACHE_ENV = "MEDATTN_MODEL_CACHE"


def cache_dir() -> Path:
    """``$MEDATTN_MODEL_CACHE``, else ``$XDG_CACHE_HOME/medattn/trained_models`` (``~/.cache/...``); created."""
    configured = os.environ.get(MODEL_CACHE_ENV)
    if configured:
        path = Path(configured).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        path = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "medattn" / "trained_models"
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.lru_cache(maxsize=1)
def _volume() -> tuple[np.ndarray, np.ndarray]:
    """(HU-windowed CT in [0, 1], total label map), both (z, y, x) float32 / int16."""
    import SimpleITK as sitk

    from sample_data import fetch

    data = fetch()
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(data.example_ct))).astype(np.float32)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(data.example_seg_fast_force_split))).astype(np.int16)
    if image.shape != labels.shape:
        raise RuntimeError(f"example_ct {image.shape} and its label map {labels.shape} differ in shape")
    low, high = CT_WINDOW_HU
    image = (np.clip(image, low, high) - low) / (high - low)
    image = (image - CT_NORMALISATION[0]) / CT_NORMALISATION[1]
    return image, labels


def _organ_presence(labels: torch.Tensor) -> torch.Tensor:
    """(N, *spatial) label maps -> (N, n_organs) presence (>= 20 voxels)."""
    flat = labels.reshape(labels.shape[0], -1)
    return torch.stack([((flat == c).sum(1) >= 20).float() for c in ORGAN_CLASSES.values()], dim=1)


@functools.lru_cache(maxsize=4)
def ct_slices(size: int = 64) -> CTData:
    """Axial slices of example_ct resized to ``size`` x ``size`` (bilinear image, nearest labels)."""
    image, labels = _volume()
    z0, z1 = SLICE_RANGE
    img = torch.from_numpy(image[z0:z1]).unsqueeze(1)
    lab = torch.from_numpy(labels[z0:z1].astype(np.int64)).unsqueeze(1).float()
    img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
    lab = F.interpolate(lab, size=(size, size), mode="nearest").long()
    n = img.shape[0]
    return CTData(
        images=img.contiguous(),
        liver=(lab == LIVER_CLASS).long(),
        organs=_organ_presence(lab[:, 0]),
        train=list(range(0, n, 2)),
        held_out=list(range(1, n, 2)),
    )


@functools.lru_cache(maxsize=4)
def ct_volume_crops(size: int = 32) -> CTData:
    """3D samples: the abdomen (z 48..111) resized to ``(size, 2 size, 2 size)`` and cut into its eight octants,
    crops of ``(size / 2, size, size)`` voxels (``size`` divisible by 32 keeps every side divisible by 16).

    Crops 0, 3, 5, 6 train, crops 1, 2, 4, 7 are held out (each half of the volume in both).
    """
    if size % 32:
        raise ValueError(f"3D crop size must be divisible by 32 (crops are size/2 deep), got {size}")
    image, labels = _volume()
    img = torch.from_numpy(image[48:112]).unsqueeze(0).unsqueeze(0)
    lab = torch.from_numpy(labels[48:112].astype(np.int64)).unsqueeze(0).unsqueeze(0).float()
    shape = (size, 2 * size, 2 * size)
    img = F.interpolate(img, size=shape, mode="trilinear", align_corners=False)[0]
    lab = F.interpolate(lab, size=shape, mode="nearest")[0].long()
    crops_img, crops_lab = [], []
    half = size // 2
    for z in (0, half):  # depth halves: z = 0 is the upper abdomen
        for y in (0, size):
            for x in (0, size):
                crops_img.append(img[:, z : z + half, y : y + size, x : x + size])
                crops_lab.append(lab[:, z : z + half, y : y + size, x : x + size])
    images = torch.stack(crops_img).contiguous()
    lab = torch.stack(crops_lab)
    # alternate crops between training and held out so both see liver and non-liver regions
    return CTData(
        images=images,
        liver=(lab == LIVER_CLASS).long(),
        organs=_organ_presence(lab[:, 0]),
        train=[0, 3, 5, 6],
        held_out=[1, 2, 4, 7],
    )


def data_for(config: TrainConfig) -> CTData:
    return ct_slices(config.size) if config.spatial_dims == 2 else ct_volume_crops(config.size)


def train(config: TrainConfig) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``config.model_name`` from scratch for ``config.steps`` Adam steps on the training samples.

    Segmentation: MONAI Dice or Dice + cross-entropy loss on the liver (2 output channels). Classification:
    BCE-with-logits on the organ presence. Random left-right flips augment.
    Returns ``(model in eval mode, metadata with loss curve and seconds)``.
    """
    # One thread: the summation order (and so, for these briefly trained nets, the weights) depends on the thread
    # count; pinning it makes a config's weights the same in every run on a machine, whatever the caller set.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(config)
    finally:
        torch.set_num_threads(threads)


def _train(config: TrainConfig) -> tuple[nn.Module, dict[str, Any]]:
    from monai.losses import DiceCELoss, DiceLoss

    from networks.factory import create_model

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    data = data_for(config)
    images, liver, organs = data.split("train")
    model = create_model(config.model_name, **config.model_kwargs)
    if config.query_init_scale != 1.0:
        from networks.blocks import scale_query_init

        scale_query_init(model, config.query_init_scale)
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=1e-5)
    losses_by_name = {
        "dice": lambda: DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True),
        "dicece": lambda: DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True),
        "bce": lambda: nn.BCEWithLogitsLoss(),
    }
    if config.loss not in losses_by_name:
        raise ValueError(f"unknown loss {config.loss!r}; known: {sorted(losses_by_name)}")
    if (config.loss == "bce") != (config.task == "classification"):
        raise ValueError(f"loss {config.loss!r} does not fit task {config.task!r}")
    loss_fn = losses_by_name[config.loss]()
    losses = []
    start = time.perf_counter()
    n = images.shape[0]
    for _ in range(config.steps):
        index = torch.randint(0, n, (config.batch_size,), generator=generator)
        x, y_seg, y_cls = images[index], liver[index], organs[index]
        if bool(torch.rand((), generator=generator) < 0.5):  # left-right flips only: anatomy keeps its layout
            x, y_seg = x.flip(-1), y_seg.flip(-1)
        out = model(x)
        loss = loss_fn(out, y_seg) if config.task == "segmentation" else loss_fn(out, y_cls)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    model.eval()
    meta = {"losses": losses, "train_seconds": time.perf_counter() - start, "config": dataclasses.asdict(config)}
    return model, meta


def training_environment() -> dict[str, str]:
    """Environment of the child process that trains a cached model.

    What else makes these briefly trained nets' weights differ from machine to machine is the instruction set of
    PyTorch's float kernels: AVX-512 and AVX2 code round differently, and 60-150 steps amplify that into visibly
    different networks (a 3D U-net predicted 269 liver voxels on an AVX2 CPU where it had predicted over 500 on an
    AVX-512 one). The child runs one thread with ATen, oneDNN and MKL all held to the AVX2 class (the class every
    x86 hospital CPU has; MKL_CBWR makes MKL's results reproducible at it), so a config trains to the same weights on
    either class of machine, and the tests' measured bounds hold on both.
    """
    from networks.isa import cpu_best_isa, isa_environment

    isa = "avx2" if cpu_best_isa() != "portable" else "portable"
    env = isa_environment(isa)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MKL_CBWR="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


_TRAIN_CHILD = """
import pickle, sys
from networks.checkpoint import save_checkpoint
from sample_models.trained_models import train
config, path = pickle.loads(sys.stdin.buffer.read())
model, meta = train(config)
save_checkpoint(model, path, factory_name=config.model_name, factory_kwargs=config.model_kwargs, metadata=meta)
"""


def trained_model(name_or_config: str | TrainConfig) -> tuple[nn.Module, TrainConfig]:
    """The model of ``CONFIGS[name]`` (or of a config), from the cache or trained now (in a child process with the
    pinned :func:`training_environment`) and cached."""
    from networks.checkpoint import CheckpointError, load_checkpoint

    config = CONFIGS[name_or_config] if isinstance(name_or_config, str) else name_or_config
    path = cache_dir() / f"{config.model_name}-{config.spatial_dims}d-{config.key()}.pt"
    if path.exists():
        try:
            model, _ = load_checkpoint(path)
            return model, config
        except CheckpointError:
            path.unlink()  # damaged or stale cache entry: train again
    completed = subprocess.run(
        [sys.executable, "-c", _TRAIN_CHILD],
        input=pickle.dumps((config, str(path))),
        env=training_environment(),
        cwd=REPO_ROOT,
        capture_output=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"training {config.model_name} failed (exit code {completed.returncode}):\n"
            + completed.stderr.decode(errors="replace")[-4000:]
        )
    model, _ = load_checkpoint(path)
    return model, config


def train_missing(names: list[str] | None = None, jobs: int = 1, log: Any = print) -> dict[str, float | None]:
    """Train the models of ``CONFIGS`` (all, or ``names``) that are not cached yet, ``jobs`` at a time (each trains on
    one thread in its own process, so ``jobs`` up to the number of cores run side by side).

    Returns:
        ``{name: seconds it took, or None when it was cached already}``.
    """
    from concurrent.futures import ThreadPoolExecutor

    names = list(CONFIGS) if names is None else names
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {sorted(CONFIGS)}")
    _volume()  # fetch and prepare the sample CT once, before the training processes need it

    def one(name: str) -> float | None:
        config = CONFIGS[name]
        if (cache_dir() / f"{config.model_name}-{config.spatial_dims}d-{config.key()}.pt").exists():
            return None
        start = time.perf_counter()
        trained_model(name)
        seconds = time.perf_counter() - start
        log(f"trained {name} in {seconds:.1f} s")
        return seconds

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return dict(zip(names, pool.map(one, names), strict=True))

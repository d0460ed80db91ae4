# Copyright MedAttnSlicer contributors. Apache-2.0.
"""What the app's train tasks share: starting from the served checkpoint, progress statistics, calibration slices
from the datastore's labelled images, and the re-quantise-then-publish step that ends every successful run."""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import Compose

from monailabel_app.lib.json_files import atomic_write_json, read_json
from monailabel_app.lib.model_store import ModelFiles, ModelSpec, file_version, publish_files
from monailabel_app.lib.preprocess import Preprocessing

__all__ = [
    "atomic_write_json",
    "read_json",
    "TrainProgress",
    "initial_network",
    "calibration_slices",
    "publish_trained",
]

logger = logging.getLogger(__name__)


def _number(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


class TrainProgress:
    """Writes a run's progress to the task's stats file (shown by ``/info`` ``train_stats`` and ``/train``).

    Fields: ``status`` (RUNNING, QUANTIZING, PUBLISHED, FAILED), ``run_id``, ``epoch``, ``total_epochs``,
    ``iteration`` (in the epoch), ``epoch_length``, ``loss``, ``best_metric`` (validation metric, Dice for
    segmentation and F1 = Dice of the presence decisions for classification), ``best_metric_epoch``,
    ``metric_name``, ``train_metric``, ``elapsed_s``, what the run uses (``train_images``, ``val_images``,
    ``excluded_images`` ``{id: why}``, ``metric_note``: what the validation metric is computed on), after the
    training loop ``train_seconds`` (the loop alone) and ``iterations``, and, once published, ``published``. A
    data-parallel run adds ``distributed`` (``world_size``, ``backend``, ``ranks``: each rank's ``rank``, ``host``,
    ``pid``, ``threads``, ``train_images``) and ``replica_digests`` (every rank's parameter digest, all equal).
    """

    def __init__(self, stats_path: str, task: str, run_id: str, total_epochs: int, metric_name: str) -> None:
        self.stats_path = stats_path
        self.start = time.time()
        self.stats: dict[str, Any] = {
            "task": task,
            "status": "RUNNING",
            "run_id": run_id,
            "start_ts": int(self.start),
            "epoch": 0,
            "total_epochs": int(total_epochs),
            "iteration": 0,
            "epoch_length": None,
            "loss": None,
            "best_metric": None,
            "best_metric_epoch": None,
            "metric_name": metric_name,
            "train_metric": None,
        }
        self._last_write = 0.0
        self.write()

    def write(self, **fields: Any) -> None:
        self.stats.update({k: _number(v) for k, v in fields.items()})
        self.stats["elapsed_s"] = round(time.time() - self.start, 1)
        atomic_write_json(self.stats_path, self.stats)
        self._last_write = time.time()

    def attach(self, trainer: Engine, evaluator: Engine | None) -> None:
        def on_iteration(engine: Engine) -> None:
            output = engine.state.output
            loss = None
            if isinstance(output, list) and output and isinstance(output[0], dict):
                loss = output[0].get("loss")
            elif isinstance(output, dict):
                loss = output.get("loss")
            length = engine.state.epoch_length
            iteration = (engine.state.iteration - 1) % length + 1 if length else engine.state.iteration
            self.stats.update(
                {"epoch": engine.state.epoch, "iteration": iteration, "epoch_length": length, "loss": _number(loss)}
            )
            if time.time() - self._last_write > 1.0:
                self.write()

        def on_epoch(engine: Engine) -> None:
            metrics = {k: _number(v) for k, v in engine.state.metrics.items()}
            self.write(epoch=engine.state.epoch, train_metric=metrics)

        def on_validation(engine: Engine) -> None:
            self.write(
                best_metric=engine.state.best_metric,
                best_metric_epoch=engine.state.best_metric_epoch,
                val_metric={k: _number(v) for k, v in engine.state.metrics.items()},
            )

        trainer.add_event_handler(Events.ITERATION_COMPLETED, on_iteration)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, on_epoch)
        if evaluator is not None:
            evaluator.add_event_handler(Events.EPOCH_COMPLETED, on_validation)


def initial_network(
    spec: ModelSpec, files: ModelFiles, num_outputs: int, class_names: Sequence[str], pretrained: bool
) -> tuple[torch.nn.Module, str, dict[str, Any], dict[str, Any]]:
    """The network a run starts from: ``(model, factory_name, factory_kwargs, app metadata of the start)``.

    With ``pretrained``, the served FP32 checkpoint (trained, else bundled); if its classes differ from
    ``class_names``, the layers whose shapes still fit are copied into a network with ``num_outputs`` outputs (the
    output layer starts fresh). Without a checkpoint: a new network from the family's factory defaults.
    """
    from networks.checkpoint import load_checkpoint
    from networks.factory import create_model

    path = files.current("fp32") if pretrained else None
    if path:
        model, metadata = load_checkpoint(path)
        app_meta = dict(metadata.get("app", {}))
        factory_name = metadata["factory_name"]
        factory_kwargs = dict(metadata["factory_kwargs"])
        old_classes = app_meta.get("classes") or app_meta.get("labels") or {}
        old_names = (
            [n for n, _ in sorted(old_classes.items(), key=lambda kv: kv[1])]
            if isinstance(old_classes, dict)
            else list(old_classes)
        )
        if old_names == list(class_names):
            logger.info(f"starting from {path} ({factory_name})")
            return model.train(), factory_name, factory_kwargs, app_meta
        factory_kwargs["out_channels"] = num_outputs
        fresh = create_model(factory_name, **factory_kwargs)
        state = fresh.state_dict()
        kept = {k: v for k, v in model.state_dict().items() if k in state and state[k].shape == v.shape}
        state.update(kept)
        fresh.load_state_dict(state)
        logger.info(
            f"classes changed {old_names} -> {list(class_names)}: kept {len(kept)}/{len(state)} tensors of {path}"
        )
        return fresh.train(), factory_name, factory_kwargs, app_meta
    factory_kwargs = dict(spec.factory_kwargs)
    factory_kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in factory_kwargs.items()}
    factory_kwargs["out_channels"] = num_outputs
    logger.info(f"starting {spec.factory_name} from random weights")
    return create_model(spec.factory_name, **factory_kwargs).train(), spec.factory_name, factory_kwargs, {}


def calibration_slices(
    datalist: Sequence[dict[str, str]],
    prep: Preprocessing,
    label_values: Sequence[int],
    n_slices: int = 32,
    batch_size: int = 8,
    seed: int = 0,
) -> tuple[list[torch.Tensor], list[str]]:
    """Real preprocessed slices from labelled volumes for INT8 calibration: ``(batches (B, 1, H, W), image paths)``.

    About half of each volume's share contains foreground (so the activations of the target organ are in range),
    the rest is drawn from the other slices. 2D images contribute themselves.
    """
    if not datalist:
        raise ValueError("no labelled image to calibrate the INT8 network on.")
    rng = np.random.default_rng(seed)
    per_image = max(1, int(np.ceil(n_slices / len(datalist))))
    slices: list[torch.Tensor] = []
    used: list[str] = []
    for item in datalist:
        from monailabel_app.lib.image_io import read_header

        dims = read_header(item["image"]).dims
        transforms = Compose(prep.transforms(dims, label_key="label", label_values=label_values))
        d = transforms({"image": item["image"], "label": item["label"]})
        image = torch.as_tensor(d["image"]).as_subclass(torch.Tensor).float()
        label = torch.as_tensor(d["label"]).as_subclass(torch.Tensor)
        used.append(item["image"])
        if image.ndim == 3:
            slices.append(image)
            continue
        has_fg = (label[0] > 0).reshape(-1, label.shape[-1]).any(dim=0).numpy()
        fg, bg = np.flatnonzero(has_fg), np.flatnonzero(~has_fg)
        n_fg = min(len(fg), (per_image + 1) // 2)
        n_bg = min(len(bg), per_image - n_fg)
        chosen = list(rng.choice(fg, n_fg, replace=False)) + list(rng.choice(bg, n_bg, replace=False))
        slices += [image[..., int(z)] for z in sorted(chosen)]
    slices = slices[: max(n_slices, 1)]
    batches = [torch.stack(slices[i : i + batch_size]) for i in range(0, len(slices), batch_size)]
    return batches, used


def publish_trained(
    spec: ModelSpec,
    files: ModelFiles,
    model: torch.nn.Module,
    factory_name: str,
    factory_kwargs: dict[str, Any],
    app_meta: dict[str, Any],
    calibration: list[torch.Tensor],
    run_id: str,
) -> dict[str, Any]:
    """Save the trained FP32 checkpoint and, for INT8 families, re-quantise on ``calibration`` and save the INT8
    artifact; both are staged in the trained folder and then published with ``os.replace``.

    Returns:
        ``{"fp32": version, "int8": version, "int8_agreement": figures}``; on any error nothing is published.
    """
    from networks.checkpoint import save_checkpoint

    model = copy.deepcopy(model).cpu().eval()
    os.makedirs(files.trained_dir, exist_ok=True)
    staged: dict[str, str] = {}
    result: dict[str, Any] = {}
    try:
        fp32_tmp = os.path.join(files.trained_dir, f".{files.filename('fp32')}.{run_id}.staged")
        save_checkpoint(
            model, fp32_tmp, factory_name=factory_name, factory_kwargs=factory_kwargs, metadata={"app": app_meta}
        )
        staged[files.publish_path("fp32")] = fp32_tmp
        if spec.int8:
            from networks.kernels import load_kernels
            from networks.quantization import prediction_agreement, quantize_int8, save_int8_artifact

            load_kernels()  # the INT8 attention core is a custom op of the kernel library
            start = time.time()
            qmodel = quantize_int8(model, calibration, **spec.int8.quantize_options)
            agreement = prediction_agreement(model, qmodel, calibration)
            agreement = {
                k: _number(v) for k, v in agreement.items() if isinstance(v, (int, float, str, np.number, torch.Tensor))
            }
            result["int8_agreement"] = agreement
            int8_meta = dict(app_meta)
            int8_meta["int8_agreement_on_calibration"] = agreement
            int8_meta["int8_recipe"] = spec.int8.describe()
            int8_tmp = os.path.join(files.trained_dir, f".{files.filename('int8')}.{run_id}.staged")
            save_int8_artifact(qmodel, calibration[0], int8_tmp, metadata={"app": int8_meta})
            staged[files.publish_path("int8")] = int8_tmp
            logger.info(f"re-quantised {spec.family} in {time.time() - start:.1f} s; agreement {agreement}")
        publish_files(staged)
    except BaseException:
        for tmp in staged.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    result["fp32"] = file_version(files.publish_path("fp32"))
    if spec.int8:
        result["int8"] = file_version(files.publish_path("int8"))
    return result

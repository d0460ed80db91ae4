# Copyright MedAttnSlicer contributors. Apache-2.0.
"""MedAttnSlicer MONAI Label app: SaDNN-seg, the MONAI UNet baseline and the classifiers SaDNN-cls, HCT,
Efficient Scopeformer and PatchConvNet (with explanation maps), in FP32 and INT8.

    monailabel start_server --app monailabel_app --studies DIR --conf models all --host 127.0.0.1 --port 8000

``--conf`` options: see ``monailabel_app/README.md`` (or ``monailabel_app.lib.app_config.CONF_HELP``). What the app
adds to MONAI Label's REST API is specified in ``docs/server_api.md``.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from typing import Any

# MONAI Label loads this file as the module "main"; the app's package and the networks live in the repository root.
_APP_DIR = os.path.dirname(os.path.realpath(__file__))
_REPO_ROOT = os.path.dirname(_APP_DIR)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import torch  # noqa: E402
from monailabel.config import settings  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag  # noqa: E402
from monailabel.interfaces.tasks.infer_v2 import InferTask  # noqa: E402
from monailabel.interfaces.tasks.scoring import ScoringMethod  # noqa: E402
from monailabel.interfaces.tasks.strategy import Strategy  # noqa: E402
from monailabel.interfaces.tasks.train import TrainTask  # noqa: E402
from monailabel.tasks.activelearning.first import First  # noqa: E402
from monailabel.tasks.activelearning.random import Random  # noqa: E402

from monailabel_app.lib.activelearning import Int8Disagreement, TTAUncertainty  # noqa: E402
from monailabel_app.lib.app_config import FAMILY_OF, AppConfig  # noqa: E402
from monailabel_app.lib.batch.server_task import CpuBatchInferTask  # noqa: E402
from monailabel_app.lib.comparison import COMPARISON_COLOURS  # noqa: E402
from monailabel_app.lib.configs import CONFIGS  # noqa: E402
from monailabel_app.lib.datastore import SafeLocalDatastore, unknown_image_message  # noqa: E402
from monailabel_app.lib.errors import BadInputError, NotFoundError  # noqa: E402
from monailabel_app.lib.infers.base import AppInferTask  # noqa: E402
from monailabel_app.lib.infers.classification import ClassificationInfer  # noqa: E402
from monailabel_app.lib.infers.segmentation import SegmentationInfer  # noqa: E402
from monailabel_app.lib.model_cards import ModelCards  # noqa: E402
from monailabel_app.lib.model_store import NetworkCache  # noqa: E402
from monailabel_app.lib.quality import bundled_quality  # noqa: E402
from monailabel_app.lib.request_guard import install_request_guard, note_upload  # noqa: E402
from monailabel_app.lib.scoring import Int8AgreementScoring, OverUnderScoring  # noqa: E402
from monailabel_app.lib.serving import ServingConfig, WorkerPool, install_offload  # noqa: E402
from monailabel_app.lib.trainers.distributed import train_request_problem  # noqa: E402
from networks.registry import default_model_order  # noqa: E402

logger = logging.getLogger(__name__)

# preference order of the default model: the families' default_rank in networks/registry.py, INT8 first within a
# family (the product's point: INT8 on ordinary CPUs)
_DEFAULT_ORDER = default_model_order()


class MedAttnSlicerApp(MONAILabelApp):
    """The MONAI Label app serving the project's networks.

    Args:
        app_dir: this folder.
        studies: the datastore folder (any folder of NIfTI/NRRD images, with or without ``labels/final``).
        conf: ``--conf`` options (models, labels, model_dir, modality, ...).
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, Any]) -> None:
        self.app_config = AppConfig.from_conf(app_dir, conf)
        if self.app_config.threads:
            torch.set_num_threads(self.app_config.threads)
        os.makedirs(self.app_config.model_dir, exist_ok=True)
        self.cache = NetworkCache()
        self.cards = ModelCards(os.path.join(self.app_config.model_dir, ".model_cards.json"))
        families = [f for f in CONFIGS if any(FAMILY_OF[m] == f for m in self.app_config.models)]
        self.configs = {}
        for family in families:
            config = CONFIGS[family]()
            config.init(family, self.app_config.model_dir, conf, None, app_config=self.app_config, cache=self.cache)
            self.configs[family] = config
        self._warmup_thread: threading.Thread | None = None
        # inference pool sizes, checked at start-up; the pools start with the server (on_init_complete)
        self.serving_config = ServingConfig.from_conf(conf, self.app_config.threads)
        self._pools: dict[str, WorkerPool] | None = None
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MedAttnSlicer",
            description="Self-attentive networks (SaDNN) with INT8 inference on ordinary CPUs",
            version="0.1.0",
            labels=[name for name, _ in sorted(self.app_config.labels.items(), key=lambda item: item[1])],
        )
        self._auto_update_scoring = self.app_config.auto_update_scoring

    # ----- MONAI Label initialisation -----
    def init_datastore(self) -> Datastore:
        if self.studies.startswith("http://") or self.studies.startswith("https://"):
            # our DICOMweb datastore (lib/dicomweb): never downloads dcmqi, stops start-up if the PACS is unreachable
            from monailabel_app.lib.dicomweb import pacs_datastore

            self.studies = self.studies.strip().rstrip("/")
            return pacs_datastore(self.studies, self.conf, dict(self.app_config.labels))
        return SafeLocalDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for config in self.configs.values():
            infers.update(config.infer())
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        trainers: dict[str, TrainTask] = {}
        for family, config in self.configs.items():
            task = config.trainer()
            if task is not None:
                trainers[family] = task
        return trainers

    def init_batch_infer(self) -> CpuBatchInferTask:
        # MONAI Label's BatchInferTask divides by the number of CUDA devices (ZeroDivisionError on CPU servers)
        return CpuBatchInferTask()

    def _segmentation_tasks(self) -> dict[str, SegmentationInfer]:
        return {n: t for n, t in self._infers.items() if isinstance(t, SegmentationInfer)}

    def _twin_pair(self) -> tuple[SegmentationInfer, SegmentationInfer] | None:
        """(INT8, FP32) tasks of the first segmentation family served in both precisions."""
        tasks = self._segmentation_tasks()
        for family in dict.fromkeys(FAMILY_OF[name] for name in _DEFAULT_ORDER):
            int8, fp32 = tasks.get(f"{family}_int8"), tasks.get(f"{family}_fp32")
            if int8 is not None and fp32 is not None:
                return int8, fp32
        return None

    def default_model(self) -> str | None:
        """The model clients should pick first: the first valid of INT8 SaDNN-seg, FP32 SaDNN-seg, the UNet...;
        never one whose bundled weights are below their quality floor."""
        for name in _DEFAULT_ORDER:
            task = self._infers.get(name)
            if task is not None and task.is_valid() and not self._experimental(name):
                return name
        return None

    def _preferred_segmentation(self, seg: dict[str, SegmentationInfer]) -> str | None:
        """The segmentation model strategies and scoring use: the first in the default order, not experimental."""
        return next((n for n in _DEFAULT_ORDER if n in seg and not self._experimental(n, seg[n])), None)

    def _quality(self, name: str, task: AppInferTask | None = None) -> dict[str, Any] | None:
        task = task or self._infers[name]
        return bundled_quality(task.spec.family, self.app_config.bundled_dir)

    def _experimental(self, name: str, task: AppInferTask | None = None) -> bool:
        quality = self._quality(name, task)
        return bool(quality and quality["experimental"])

    def init_strategies(self) -> dict[str, Strategy]:
        strategies: dict[str, Strategy] = {"random": Random(), "first": First()}
        seg = self._segmentation_tasks()
        default = self._preferred_segmentation(seg)
        if default:
            strategies["tta_uncertainty"] = TTAUncertainty(seg[default])
        pair = self._twin_pair()
        if pair:
            strategies["int8_disagreement"] = Int8Disagreement(*pair)
        return strategies

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        methods: dict[str, ScoringMethod] = {}
        seg = self._segmentation_tasks()
        default = self._preferred_segmentation(seg)
        if default:
            methods["over_under"] = OverUnderScoring(seg, default)
        pair = self._twin_pair()
        if pair:
            methods["int8_agreement"] = Int8AgreementScoring(*pair)
        return methods

    # ----- /info -----
    def info(self) -> dict[str, Any]:
        meta = super().info()
        default = self.default_model()
        for name, model in meta["models"].items():
            task = self._infers[name]
            if not isinstance(task, AppInferTask):
                continue
            model["precision"] = task.precision
            model["twin"] = task.twin if task.twin and self._infers[task.twin].is_valid() else None
            model["default"] = name == default
            model["family"] = task.spec.family
            model["task"] = task.spec.task
            # measured held-out quality of the bundled weights and the floor (lib/quality.py); a trained model
            # replaces the weights, but not these figures
            model["quality"] = self._quality(name)
            model["experimental"] = bool(model["quality"] and model["quality"]["experimental"])
            if isinstance(task, ClassificationInfer):
                model["explanations"] = list(task.explanations)
                model["default_explanation"] = task.default_explanation
            try:
                model["model_card"] = self.cards.get(name, task.files, task.precision, task.spec.int8)
            except Exception as err:  # a card must never take /info down
                logger.error(f"model card of {name} failed: {err}")
                model["model_card"] = None
        meta["default_model"] = default
        meta["comparison_colours"] = COMPARISON_COLOURS
        meta["model_dir"] = self.app_config.model_dir
        if self._pools:
            meta["serving"] = {name: pool.status() for name, pool in self._pools.items()}
        running = self._training_running()
        for stats in meta["train_stats"].values():
            if stats.get("status") in ("RUNNING", "QUANTIZING") and not running:
                stats["status"] = "STOPPED"
        return meta

    @staticmethod
    def _training_running() -> bool:
        from monailabel.utils.async_tasks.utils import processes

        return len(processes("train")) > 0

    # ----- requests -----
    def infer(self, request, datastore=None):
        model = request.get("model")
        task = self._infers.get(model)
        if task is None:
            raise NotFoundError(f"unknown model {model!r}; available: {sorted(self._infers)}")
        if not task.is_valid():
            raise NotFoundError(f"model {model!r} has no weights file; train it or add its bundled weights.")
        datastore = datastore if datastore else self.datastore()
        image = request.get("image")
        image_id = None
        if isinstance(image, str):
            if not image:
                raise BadInputError(
                    "missing query parameter 'image': pass a datastore image id (GET /datastore/?output=all lists "
                    "them) or upload the image file in the multipart field 'file'."
                )
            if not os.path.exists(image):
                if not datastore.get_image_uri(image):
                    raise NotFoundError(unknown_image_message(image, datastore.list_images()))
                image_id = image
            else:
                note_upload(image, "file")
        if isinstance(request.get("label"), str) and os.path.exists(request["label"]):
            note_upload(request["label"], "label")
        request = dict(request)
        cleanup: list[str] = []
        try:
            reference = request.get("reference")
            if reference:
                if not isinstance(task, SegmentationInfer):
                    raise BadInputError(f"reference comparisons need a segmentation model; {model} is a {task.type}.")
                self._resolve_reference(request, task, image_id, datastore, cleanup)
                request["save_label"] = False  # a comparison map is not a label
            return super().infer(request, datastore)
        finally:
            for path in cleanup:
                if os.path.exists(path):
                    os.unlink(path)

    def _resolve_reference(
        self, request: dict, task: SegmentationInfer, image_id: str | None, datastore: Datastore, cleanup: list[str]
    ) -> None:
        reference = str(request["reference"])
        if reference == "upload":
            label = request.get("label")
            if not label or not os.path.exists(label):
                raise BadInputError("reference 'upload' needs the label file in the multipart field 'label'.")
            request["reference_path"] = label
        elif reference in self._infers:
            other = self._infers[reference]
            if not isinstance(other, SegmentationInfer):
                raise BadInputError(f"reference model {reference!r} is not a segmentation model.")
            if not other.is_valid():
                raise NotFoundError(f"reference model {reference!r} has no weights file.")
            image = request["image"] if image_id is None else datastore.get_image_uri(image_id)
            sub = {k: v for k, v in request.items() if k not in ("reference", "reference_path", "model", "label")}
            sub.update({"image": image, "model": reference})
            label_file, result = other(sub)
            cleanup.append(label_file)
            request["reference_path"] = label_file
            request["reference_version"] = result.get("model_version")
        else:
            tags = {t.value for t in DefaultLabelTag}
            if image_id is None:
                raise BadInputError(
                    f"reference {reference!r} is a datastore label tag or a model name; an uploaded image has no "
                    f"stored labels (use 'upload' or a model name: {sorted(self._segmentation_tasks())})."
                )
            uri = datastore.get_label_uri(image_id, reference)
            if not uri or not os.path.exists(uri):
                if reference in tags or reference in (datastore.get_labels_by_image_id(image_id) or {}):
                    raise NotFoundError(f"image {image_id!r} has no {reference!r} label.")
                raise BadInputError(
                    f"unknown reference {reference!r}: use 'final', 'original', 'upload' or a segmentation model "
                    f"({sorted(self._segmentation_tasks())})."
                )
            request["reference_path"] = uri
        request["reference_name"] = reference

    def next_sample(self, request):
        strategy = request.get("strategy") or "random"
        if strategy not in self._strategies:
            raise NotFoundError(f"unknown active-learning strategy {strategy!r}; available: {sorted(self._strategies)}")
        return super().next_sample(request)

    def scoring(self, request, datastore=None):
        method = request.get("method")
        if method not in self._scoring_methods:
            raise NotFoundError(f"unknown scoring method {method!r}; available: {sorted(self._scoring_methods)}")
        return super().scoring(request, datastore)

    def train(self, request):
        model = request.get("model")
        if model not in self._trainers:
            raise NotFoundError(f"unknown train task {model!r}; available: {sorted(self._trainers)}")
        return super().train(request)

    # ----- start-up -----
    def on_init_complete(self):
        super().on_init_complete()
        self._warn_if_public()
        # before the request guard, which then wraps it: its 404s are answered on the event loop
        self._pools = install_offload(self.serving_config)
        install_request_guard(
            {
                "train": lambda: set(self._trainers),
                "train_request": train_request_problem,
                "scoring": lambda: set(self._scoring_methods),
                "images": lambda: set(self.datastore().list_images()),
                "missing_image": lambda image: unknown_image_message(image, self.datastore().list_images()),
            }
        )
        self._warmup_thread = threading.Thread(target=self._warm_up, name="warmup", daemon=True)
        self._warmup_thread.start()

    @staticmethod
    def _warn_if_public() -> None:
        """MONAI Label's ``start_server`` binds 0.0.0.0 unless told otherwise: say so loudly."""
        argv = sys.argv
        host = "0.0.0.0"
        for flag in ("--host", "-i"):
            if flag in argv and argv.index(flag) + 1 < len(argv):
                host = argv[argv.index(flag) + 1]
        if host not in ("127.0.0.1", "localhost", "::1"):
            logger.warning(
                f"the server listens on {host}, reachable from other machines; "
                "start it with --host 127.0.0.1 (as `make serve` does) unless that is intended"
            )

    def _warm_up(self) -> None:
        """Background start-up work that keeps first requests fast: model cards, the ITK image IO, the default
        network (or every network with ``--conf preload true``)."""
        try:
            self.info()  # computes and caches the model cards
            self._warm_up_image_io()
            default = self.default_model()
            for name, task in self._infers.items():
                if isinstance(task, AppInferTask) and task.is_valid() and (self.app_config.preload or name == default):
                    task.load()
            logger.info("warm-up done")
        except Exception as err:  # warm-up is an optimisation; requests report real errors themselves
            logger.warning(f"warm-up failed: {err}")

    @staticmethod
    def _warm_up_image_io() -> None:
        import numpy as np
        import SimpleITK as sitk
        from monai.transforms import LoadImage

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "warmup.nii.gz")
            sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 2, 2), np.int16)), path)
            LoadImage(reader="ITKReader", image_only=True)(path)

# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Many annotators, one server: heavy requests run in bounded worker pools off MONAI Label's event loop.

:func:`install_offload` wraps the running MONAI Label server's ASGI stack with
:class:`~monailabel_app.lib.serving.offload.OffloadMiddleware`; ``--conf`` options (see :data:`SERVING_CONF_HELP`)
size the pools.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from monailabel_app.lib.serving.offload import OffloadMiddleware, offload_rules
from monailabel_app.lib.serving.pool import PoolFullError, WorkerPool, default_workers, machine_cores

__all__ = [
    "SERVING_CONF_HELP",
    "OffloadMiddleware",
    "PoolFullError",
    "ServingConfig",
    "WorkerPool",
    "default_workers",
    "install_offload",
    "machine_cores",
    "offload_rules",
]

logger = logging.getLogger(__name__)

SERVING_CONF_HELP = {
    "infer_workers": "inferences run at once, each in its own worker thread (default: one per core up to 2 cores, "
    "then one per 2 cores)",
    "infer_threads": "torch threads per inference worker (default: the cores, or --conf threads, divided by the "
    "workers)",
    "infer_queue": "inference requests that may wait for a worker; one more is answered 503 with Retry-After "
    "(default 32)",
    "infer_offload": "'false' to run inference on the server's event loop as MONAI Label does (one request at a time, "
    "nothing else answered meanwhile; for comparisons: benchmarks/load.py)",
}

_DEFAULT_QUEUE = 32
# label / image uploads: one worker reading and checking files, its own queue so saves never wait for inferences
_IO_WORKERS = 1
_IO_QUEUE = 64


def _positive_int(conf: dict[str, Any], key: str, default: int, minimum: int) -> int:
    value = conf.get(key)
    if value is None or str(value).strip() == "":
        return default
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ValueError(f"--conf {key} must be an integer, got {value!r}.") from None
    if number < minimum:
        raise ValueError(f"--conf {key} must be >= {minimum}, got {number}.")
    return number


@dataclass(frozen=True)
class ServingConfig:
    """Sizes of the inference pool.

    Attributes:
        workers: concurrent inferences.
        torch_threads: torch threads of each.
        max_waiting: inference requests allowed to wait.
        cores: the cores the sizes were derived from.
        enabled: False with ``--conf infer_offload false`` (no pools: MONAI Label's own request handling).
    """

    workers: int
    torch_threads: int
    max_waiting: int
    cores: int
    enabled: bool = True

    @classmethod
    def from_conf(cls, conf: dict[str, Any], threads: int | None = None, cores: int | None = None) -> ServingConfig:
        """Sizes from ``--conf infer_workers / infer_threads / infer_queue``; ``threads`` is ``--conf threads``
        (the cores to use, default all of this process's)."""
        cores = cores or machine_cores()
        budget = threads or cores
        workers = _positive_int(conf, "infer_workers", default_workers(budget), 1)
        torch_threads = _positive_int(conf, "infer_threads", max(1, budget // workers), 1)
        max_waiting = _positive_int(conf, "infer_queue", _DEFAULT_QUEUE, 0)
        if workers * torch_threads > cores:
            logger.warning(
                f"{workers} inference workers x {torch_threads} torch threads = {workers * torch_threads} threads on "
                f"{cores} cores: concurrent inferences will compete for cores"
            )
        enabled = str(conf.get("infer_offload", "true")).strip().lower() not in ("0", "false", "no", "off")
        return cls(workers, torch_threads, max_waiting, cores, enabled)


def install_offload(config: ServingConfig) -> dict[str, WorkerPool] | None:
    """Wrap the running MONAI Label server's ASGI stack with the offload middleware (once); its pools, or None when
    not running inside MONAI Label's server (e.g. the batch-inference subprocess) or disabled by the conf."""
    if not config.enabled:
        logger.warning("--conf infer_offload false: inference runs on the event loop, one request at a time")
        return None
    from monailabel_app.lib.asgi import running_server_app

    running = running_server_app()
    if running is None:
        return None
    fastapi_app, prefix = running
    layer = fastapi_app.middleware_stack
    for _ in range(8):  # already installed (the app re-initialised): keep the running pools
        if isinstance(layer, OffloadMiddleware):
            return layer.pools
        layer = getattr(layer, "inner", None)
        if layer is None:
            break
    pools = {
        "infer": WorkerPool("infer", config.workers, config.torch_threads, config.max_waiting),
        "io": WorkerPool("io", _IO_WORKERS, 1, _IO_QUEUE),
    }
    fastapi_app.middleware_stack = OffloadMiddleware(fastapi_app.middleware_stack, pools, prefix)
    logger.info(
        f"inference runs off the event loop: {config.workers} workers x {config.torch_threads} torch threads "
        f"({config.cores} cores), at most {config.max_waiting} waiting (then 503 + Retry-After)"
    )
    return pools

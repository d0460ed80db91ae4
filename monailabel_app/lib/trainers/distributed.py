# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Data-parallel training on CPU: ``torch.distributed`` (gloo) ranks started by ``torchrun``.

Two sides:

- the *launcher* (the server's training subprocess for ``POST /train/<family>`` with ``workers`` > 1, or
  ``python -m monailabel_app.train --workers N``): :class:`LaunchSettings` checks the rendezvous settings before
  anything starts (a wrong one fails at once, naming it), :func:`run_torchrun` starts the real ``torchrun`` and turns
  its failure into one clear message (which rank died and how, or why the ranks could not meet);
- each *rank* (``torchrun ... -m monailabel_app.train``): :func:`rank_from_env` reads what ``torchrun`` set,
  :func:`init_rank` joins the gloo process group and divides the machine's cores between the ranks on it,
  :func:`rank_share` is the rank's share of the training images (MONAI ``partition_dataset``) and
  :func:`parameter_digest` lets rank 0 check that every replica holds the same weights before it publishes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "LAUNCH_KEYS",
    "launch_fields",
    "train_request_problem",
    "DistributedTrainingError",
    "RankInfo",
    "LaunchSettings",
    "rank_from_env",
    "available_cores",
    "threads_per_rank",
    "init_rank",
    "is_first_machine",
    "lead_rank",
    "rank_share",
    "parameter_digest",
    "torchrun_command",
    "run_torchrun",
]

logger = logging.getLogger(__name__)


class DistributedTrainingError(RuntimeError):
    """A distributed run that failed: a rank died, or the ranks could not meet (the message says which and why)."""


@dataclass(frozen=True)
class RankInfo:
    """Where this process stands in a ``torchrun`` job (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``LOCAL_WORLD_SIZE``)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def rank_from_env(environ: dict[str, str] | None = None) -> RankInfo | None:
    """The rank ``torchrun`` started this process as; ``None`` outside ``torchrun`` or in a job of one process."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    world_size = int(env["WORLD_SIZE"])
    if world_size <= 1:
        return None
    return RankInfo(
        rank=int(env["RANK"]),
        world_size=world_size,
        local_rank=int(env.get("LOCAL_RANK", 0)),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", world_size)),
    )


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_rank(local_world_size: int, cores: int | None = None) -> int:
    """Torch threads for each of ``local_world_size`` ranks on one machine: the cores shared out, at least one, so
    ranks do not fight for cores (N ranks x all cores threads each is oversubscription)."""
    cores = available_cores() if cores is None else cores
    return max(1, cores // max(1, local_world_size))


def init_rank(info: RankInfo, timeout_s: float = 1800.0) -> int:
    """Join the gloo process group (address and port from ``torchrun``'s environment) and set this rank's torch
    threads. Returns the threads per rank.

    ``OMP_NUM_THREADS``, when the launcher set it, wins over the computed share (``torchrun`` alone sets it to 1).
    """
    import datetime

    import ignite.distributed as idist

    threads = threads_per_rank(info.local_world_size)
    if os.environ.get("MEDATTN_THREADS_PER_RANK"):
        threads = max(1, int(os.environ["MEDATTN_THREADS_PER_RANK"]))
    torch.set_num_threads(threads)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="gloo",
            init_method="env://",
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    idist.sync()  # ignite (and MONAI's metric handlers through it) gather metrics over the ranks
    logger.info(
        f"rank {info.rank}/{info.world_size} (local {info.local_rank}/{info.local_world_size}) joined gloo; "
        f"{threads} torch thread(s) on {available_cores()} core(s)"
    )
    return threads


def is_first_machine(settings: LaunchSettings) -> bool:
    """Whether this machine hosts the rendezvous (``rdzv_endpoint`` is one of its addresses)."""
    host, _ = _parse_endpoint(str(settings.rdzv_endpoint))
    return _is_local_address(host)


def lead_rank(info: RankInfo) -> int:
    """The rank that reports progress and publishes (a collective): the lowest rank on the first machine (the one
    whose launcher was given ``rdzv_endpoint`` as its own address: where the server that asked for the run is), else
    rank 0. ``torchrun`` numbers machines by host name, so rank 0 may be on another machine."""
    first = os.environ.get("MEDATTN_FIRST_MACHINE") == "1"
    flags: list[Any] = [None] * info.world_size
    torch.distributed.all_gather_object(flags, first)
    return min((r for r, f in enumerate(flags) if f), default=0)


def rank_share(items: Sequence[Any], rank: int, world_size: int, even: bool) -> list[Any]:
    """This rank's share of ``items`` (MONAI ``partition_dataset``, interleaved, in the given order).

    ``even``: pad by repeating items so every rank gets as many (training: every rank must take the same number of
    steps, each one an all-reduce). With fewer items than ranks every rank gets them all (different random crops
    still differ: the ranks' augmentation seeds differ).
    """
    from monai.data import partition_dataset

    items = list(items)
    if world_size <= 1 or len(items) < world_size:
        return items
    return list(partition_dataset(items, num_partitions=world_size, even_divisible=even)[rank])


def parameter_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters (names, shapes and float32 bytes, in ``named_parameters`` order): equal
    digests mean bit-identical learned weights. Buffers are left out: DDP copies rank 0's (BatchNorm running
    statistics) to every rank at the start of each step, and the last step updates each rank's with its own batch."""
    digest = hashlib.sha256()
    for name, tensor in module.named_parameters():
        t = tensor.detach().cpu().float().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------- launcher
def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _is_local_address(host: str) -> bool:
    """Whether this machine can listen on ``host`` (one of its own addresses)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    for family, _, _, _, address in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((address[0], 0))
                return True
        except OSError:
            continue
    return False


@dataclass
class LaunchSettings:
    """How many ranks and where they meet (``torchrun`` options), checked by :meth:`validated`.

    Attributes:
        workers: ranks on this machine (``--nproc_per_node``).
        nnodes: machines (``--nnodes``); every machine runs the same command.
        rdzv_endpoint: ``HOST:PORT`` where the ranks meet (``--rdzv_endpoint``): an address of the first machine,
            which hosts the rendezvous; default on one machine ``127.0.0.1`` and a free port.
        rdzv_id: job id, the same on every machine (``--rdzv_id``).
        join_timeout: seconds to wait for every machine to join before failing (``--rdzv_conf join_timeout``).
        threads: torch threads per rank (default: this machine's cores // ``workers``).
    """

    workers: int = 1
    nnodes: int = 1
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    join_timeout: float = 300.0
    threads: int | None = None

    @property
    def world_size(self) -> int:
        return self.workers * self.nnodes

    def validated(self) -> LaunchSettings:
        """A copy with defaults filled in.

        Raises:
            ValueError: a setting that cannot work, named (``workers``, ``nnodes``, ``rdzv_endpoint``,
                ``join_timeout``, ``threads``), before any process starts.
        """
        workers = _positive_int(self.workers, "workers", "ranks (processes) on this machine")
        nnodes = _positive_int(self.nnodes, "nnodes", "machines taking part")
        threads = None
        if self.threads not in (None, ""):
            threads = _positive_int(self.threads, "threads", "torch threads per rank")
        try:
            join_timeout = float(self.join_timeout)
        except (TypeError, ValueError):
            join_timeout = -1.0
        if not join_timeout > 0:
            raise ValueError(f"join_timeout must be a positive number of seconds, got {self.join_timeout!r}.")
        endpoint = self.rdzv_endpoint
        if not endpoint:
            if nnodes > 1:
                raise ValueError(
                    f"nnodes {nnodes} needs rdzv_endpoint HOST:PORT: an address of the first machine that every "
                    "machine can reach, and a free port there (e.g. 10.0.0.1:29400)."
                )
            endpoint = f"127.0.0.1:{_free_port('127.0.0.1')}"
        host, port = _parse_endpoint(endpoint)
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as err:
            raise ValueError(f"rdzv_endpoint {endpoint!r}: host {host!r} cannot be resolved ({err.strerror}).") from err
        if nnodes == 1:
            if not _is_local_address(host):
                raise ValueError(
                    f"rdzv_endpoint {endpoint!r}: with nnodes 1 the ranks meet on this machine, but {host!r} is not "
                    "one of its addresses; use 127.0.0.1 (or give nnodes, the number of machines)."
                )
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind((socket.gethostbyname(host), port))
            except OSError as err:
                raise ValueError(
                    f"rdzv_endpoint {endpoint!r}: port {port} is already in use on this machine ({err.strerror}); "
                    "choose a free port or leave rdzv_endpoint out."
                ) from err
        rdzv_id = str(self.rdzv_id) if self.rdzv_id else ("medattn_train" if nnodes > 1 else uuid.uuid4().hex[:12])
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", rdzv_id):
            raise ValueError(f"rdzv_id {rdzv_id!r}: use letters, digits, '_', '-' or '.'.")
        return LaunchSettings(workers, nnodes, f"{host}:{port}", rdzv_id, join_timeout, threads)

    def describe(self) -> str:
        return (
            f"--nnodes {self.nnodes} --nproc_per_node {self.workers} --rdzv_endpoint {self.rdzv_endpoint} "
            f"--rdzv_id {self.rdzv_id} (join timeout {self.join_timeout:g} s)"
        )


# the train request fields that say how many ranks run and where they meet (:class:`LaunchSettings`)
LAUNCH_KEYS = ("workers", "nnodes", "rdzv_endpoint", "rdzv_id", "join_timeout", "threads")


def launch_fields(request: dict[str, Any]) -> dict[str, Any]:
    """The request's :data:`LAUNCH_KEYS` that are set."""
    return {k: request[k] for k in LAUNCH_KEYS if request.get(k) not in (None, "")}


def train_request_problem(request: dict[str, Any]) -> str | None:
    """What is wrong with a train request's data-parallel settings, or ``None``: the server answers 422 with it
    instead of starting a run that would fail."""
    given = launch_fields(request)
    if not given:
        return None
    try:
        LaunchSettings(**given).validated()
    except (TypeError, ValueError) as err:
        return str(err)
    return None


def _positive_int(value: Any, name: str, what: str) -> int:
    try:
        number = int(value)
        if number != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number of {what}, got {value!r}.") from None
    if number < 1:
        raise ValueError(f"{name} must be at least 1 ({what}), got {number}.")
    return number


def _parse_endpoint(endpoint: str) -> tuple[str, int]:
    text = str(endpoint).strip()
    match = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d+)", text)
    if not match:
        raise ValueError(f"rdzv_endpoint {endpoint!r} must be HOST:PORT, e.g. 10.0.0.1:29400.")
    port = int(match.group(2))
    if not 1 <= port <= 65535:
        raise ValueError(f"rdzv_endpoint {endpoint!r}: port {port} is outside 1..65535.")
    return match.group(1), port


def torchrun_command(settings: LaunchSettings, module: str, args: Sequence[str]) -> list[str]:
    """The ``torchrun`` command line starting ``python -m module args`` as every rank of ``settings`` (validated).

    ``torchrun`` is the launcher installed next to this Python; ``--max_restarts 0``: a rank that dies ends the run
    (a restart would repeat the run from scratch, with no checkpoint to resume from)."""
    launcher = Path(sys.executable).parent / "torchrun"
    head = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [
        *head,
        "--nnodes", str(settings.nnodes),
        "--nproc_per_node", str(settings.workers),
        "--rdzv_backend", "c10d",
        "--rdzv_endpoint", str(settings.rdzv_endpoint),
        "--rdzv_id", str(settings.rdzv_id),
        "--rdzv_conf", f"join_timeout={settings.join_timeout:g}",
        "--max_restarts", "0",
        "--monitor_interval", "0.5",
        "-m", module,
        *args,
    ]  # fmt: skip


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


# one failure in torchrun's summary ("Failures:" / "Root Cause (first observed failure):" blocks)
_FAILURE = re.compile(
    r"host\s*:\s*(?P<host>\S+)\s*\n\s*rank\s*:\s*(?P<rank>\d+)\s*\(local_rank:\s*(?P<local>\d+)\)\s*\n"
    r"\s*exitcode\s*:\s*(?P<code>-?\d+)"
)
_RDZV = re.compile(r"(Rendezvous\w*(?:Error|Exception|Timeout)\w*|DistStoreError)[:\s]+(.*)")
_EXCEPTION = re.compile(r"^(?:\[rank\d+\]:)?\s*(?:error: )?((?:\w+\.)*\w+(?:Error|Exception)): (.+)$")


def explain_failure(returncode: int, output: Sequence[str], settings: LaunchSettings) -> str:
    """One message for a failed ``torchrun``: which rank died and how (exit code or signal, and the last exception
    printed), or why the ranks could not meet (naming the rendezvous settings).

    A rank killed from outside (a signal other than the SIGTERM torchrun stops the others with) is named before
    the ranks that then failed for want of it; otherwise torchrun's first observed failure.
    """
    text = "\n".join(output)
    summary = max(text.rfind("Failures:"), text.rfind("Root Cause (first observed failure)"))
    failures = [m.groupdict() for m in _FAILURE.finditer(text, max(0, text.rfind("Failures:")))] if summary >= 0 else []
    if failures:
        killed = [f for f in failures if int(f["code"]) < 0 and int(f["code"]) != -signal.SIGTERM]
        root_at = text.rfind("Root Cause (first observed failure)")
        root = next((m.groupdict() for m in _FAILURE.finditer(text, root_at)), None) if root_at >= 0 else None
        failure = min(killed, key=lambda f: int(f["rank"])) if killed else (root or failures[0])
        rank, code = int(failure["rank"]), int(failure["code"])
        if code < 0:
            how = f"was killed by {_signal_name(code)}"
        else:
            raised = [f"{m.group(1)}: {m.group(2)}" for line in output if (m := _EXCEPTION.match(line.strip()))]
            how = f"exited with code {code}" + (f" ({raised[-1][:400]})" if raised else "")
        return (
            f"distributed training failed: rank {rank} of {settings.world_size} on {failure['host']} {how}; torchrun "
            "stopped every rank, nothing was published and the served checkpoint is unchanged."
        )
    rendezvous = _RDZV.search(text)
    if rendezvous:
        error, detail = rendezvous.group(1), rendezvous.group(2).strip()
        detail = "" if not detail or detail.endswith(error) else f": {detail[:300]}"
        return (
            f"distributed training failed: the ranks could not meet at rdzv_endpoint {settings.rdzv_endpoint} "
            f"(nnodes {settings.nnodes}, rdzv_id {settings.rdzv_id}, join_timeout {settings.join_timeout:g} s): "
            f"{error}{detail}. Check that every machine runs the same "
            "command with the same nnodes, rdzv_endpoint (an address of the first machine they can all reach) and "
            "rdzv_id; nothing was published."
        )
    how = f"was killed by {_signal_name(returncode)}" if returncode < 0 else f"exited with code {returncode}"
    tail = "\n".join(output[-12:])
    return f"distributed training failed: torchrun {how}; nothing was published. Last output:\n{tail}"


def run_torchrun(
    settings: LaunchSettings,
    module: str,
    args: Sequence[str],
    env: dict[str, str] | None = None,
    echo: Callable[[str], None] | None = print,
) -> None:
    """Run ``torchrun`` (:func:`torchrun_command`) to completion, echoing its output line by line.

    Every rank gets ``MEDATTN_THREADS_PER_RANK`` (``settings.threads`` or cores // ``workers``) and
    ``OMP_NUM_THREADS`` to match, and ``MEDATTN_FIRST_MACHINE`` (1 when this machine hosts the rendezvous: its
    ranks publish, see :func:`lead_rank`).

    Raises:
        DistributedTrainingError: ``torchrun`` failed (:func:`explain_failure`).
    """
    settings = settings.validated()
    threads = settings.threads or threads_per_rank(settings.workers)
    environment = dict(os.environ if env is None else env)
    environment.update(
        {
            "MEDATTN_THREADS_PER_RANK": str(threads),
            "OMP_NUM_THREADS": str(threads),
            "MEDATTN_FIRST_MACHINE": "1" if is_first_machine(settings) else "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    repo_root = str(Path(__file__).resolve().parents[3])
    environment["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, environment.get("PYTHONPATH", "")) if p)
    command = torchrun_command(settings, module, args)
    logger.info(f"starting {settings.world_size} rank(s), {threads} thread(s) each: {' '.join(command)}")
    start = time.time()
    output: deque[str] = deque(maxlen=400)
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment, bufsize=1
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            output.append(line)
            if echo is not None:
                echo(line)
        returncode = process.wait()
    except BaseException:
        process.terminate()  # torchrun stops its ranks on SIGTERM
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        raise
    if returncode != 0:
        raise DistributedTrainingError(explain_failure(returncode, list(output), settings))
    logger.info(f"{settings.world_size} rank(s) finished in {time.time() - start:.1f} s")

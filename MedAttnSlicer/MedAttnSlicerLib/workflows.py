# Copyright MedAttnSlicer contributors. Apache-2.0.
"""The panel's server round trips as job functions for :class:`~MedAttnSlicerLib.jobs.JobRunner`.

Each function takes a :class:`~MedAttnSlicerLib.jobs.JobContext` first, talks to the server
through a :class:`~MedAttnSlicerLib.client.MonaiLabelClient`, reports progress and honours cancel.
None of them touches Slicer: they return file paths and plain data that the widget loads on the
main thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from .client import InferResult, MonaiLabelClient
from .errors import MedAttnClientError, OperationCancelled, ProtocolError, ServerError, TrainingFailed
from .formatting import training_fraction, training_text
from .heatmap import explanation_key
from .jobs import JobContext
from .model_card import ModelCard

__all__ = [
    "REFERENCE_SEGMENT",
    "REFERENCE_FINAL",
    "REFERENCE_TWIN",
    "NextSample",
    "TrainingOutcome",
    "server_reference",
    "connect",
    "fetch_next_sample",
    "segment",
    "compare_on_server",
    "classify",
    "submit_label",
    "run_training",
    "run_scoring",
]

#: Compare choices offered by the panel.
REFERENCE_SEGMENT = "segment"  # a segment already in the scene (computed locally)
REFERENCE_FINAL = "final"  # the image's stored final label (server)
REFERENCE_TWIN = "twin"  # the FP32 twin of an INT8 model (server)

_FINAL_TASK_STATES = ("DONE", "ERROR", "STOPPED")


@dataclass
class NextSample:
    """An image chosen by active learning and downloaded.

    Attributes:
        image_id: datastore id.
        image_path: local file.
        strategy: the strategy that chose it.
        info: the strategy's full answer (image info, strategy bookkeeping...).
    """

    image_id: str
    image_path: str
    strategy: str
    info: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainingOutcome:
    """How a training run ended (only successful runs; failures raise).

    Attributes:
        task: training task name.
        status: the server's final status ("DONE").
        stats: the task's ``train_stats`` (epoch, total_epochs, best_metric...).
        record: the server's task record.
    """

    task: str
    status: str
    stats: Dict[str, Any] = field(default_factory=dict)
    record: Dict[str, Any] = field(default_factory=dict)


def server_reference(choice: str, model: ModelCard) -> str:
    """The ``reference`` request param for a compare choice.

    Raises:
        ValueError: for the local segment choice (nothing to ask the server), or a twin that
            does not exist.
    """
    if choice == REFERENCE_FINAL:
        return "final"
    if choice == REFERENCE_TWIN:
        if not model.twin:
            raise ValueError(f"Model '{model.name}' has no twin in the other precision to compare with")
        return model.twin
    if choice == REFERENCE_SEGMENT:
        raise ValueError("A segment in the scene is compared locally, not on the server")
    raise ValueError(f"Unknown reference choice '{choice}'; expected segment, final or twin")


def connect(ctx: JobContext, client: MonaiLabelClient, username: str = "", password: str = "") -> Dict[str, Any]:
    """Log in when the server asks for it (``GET /auth/``, ``POST /auth/token``), then ``GET /info/``.

    The client keeps the token (in memory); the password is used once and not kept.
    """
    ctx.progress(None, f"Connecting to {client.server_url}")
    if client.auth_enabled(cancel=ctx.cancel_token):
        if not username or not password:
            raise MedAttnClientError(
                f"{client.server_url} asks for a log-in: enter your user name and password, then press Connect."
            )
        ctx.progress(None, f"Logging in as '{username}'")
        client.login(username, password, cancel=ctx.cancel_token)
        try:
            return client.info(cancel=ctx.cancel_token)
        except ServerError as error:
            if error.status != 401:
                raise
            # MONAI Label 0.8.5 with PyJWT 2 does this for every token (jwt.decode without "algorithms").
            raise MedAttnClientError(
                f"{client.server_url} logged '{username}' in but refuses the token it issued ({error.detail}): "
                "the server cannot check its own tokens; its log says why."
            ) from error
    if username:
        ctx.progress(None, f"{client.server_url} has no log-in; connecting without one")
    return client.info(cancel=ctx.cancel_token)


def fetch_next_sample(
    ctx: JobContext,
    client: MonaiLabelClient,
    strategy: str,
    dest_dir: Optional[str] = None,
    params: Optional[Dict[str, Any]] = None,
) -> NextSample:
    """Ask the strategy for an image and download it.

    Raises:
        MedAttnClientError: when the strategy has no image left to offer.
    """
    ctx.progress(None, f"Asking strategy '{strategy}' for the next image")
    answer = client.next_sample(strategy, params, cancel=ctx.cancel_token)
    if not answer or not answer.get("id"):
        raise MedAttnClientError(f"Strategy '{strategy}' returned no image: every image may already be labelled")
    image_id = str(answer["id"])
    ctx.progress(0.0, f"Downloading image '{image_id}'")
    path = client.download_image(image_id, dest_dir, cancel=ctx.cancel_token, progress=lambda f, m: ctx.progress(f, m))
    return NextSample(image_id=image_id, image_path=path, strategy=strategy, info=answer)


def segment(
    ctx: JobContext,
    client: MonaiLabelClient,
    model: str,
    image_id: Optional[str] = None,
    image_file: Optional[str] = None,
    params: Optional[Dict[str, Any]] = None,
    dest_dir: Optional[str] = None,
) -> InferResult:
    """Run a segmentation model; the result must carry a label file."""
    result = _infer(ctx, client, model, image_id, image_file, params, dest_dir)
    if not result.label_path:
        raise ProtocolError(f"Model '{model}' returned no label file (answer: {result.params})")
    return result


def _infer(
    ctx: JobContext,
    client: MonaiLabelClient,
    model: str,
    image_id: Optional[str],
    image_file: Optional[str],
    params: Optional[Dict[str, Any]],
    dest_dir: Optional[str],
) -> InferResult:
    """``POST /infer/{model}`` as part of the job: cancelled by its token, progress reported to it."""
    return client.infer(
        model,
        image_id=image_id,
        image_file=image_file,
        params=params,
        dest_dir=dest_dir,
        cancel=ctx.cancel_token,
        progress=lambda f, m: ctx.progress(f, m),
    )


def compare_on_server(
    ctx: JobContext,
    client: MonaiLabelClient,
    model: str,
    image_id: str,
    reference: str,
    reference_label: Optional[int] = None,
    dest_dir: Optional[str] = None,
) -> InferResult:
    """Run ``model`` with ``reference``: the label file is the comparison map, ``comparison`` the figures."""
    if not image_id:
        raise ValueError("Comparing on the server needs a datastore image: load it with Next sample or submit it first")
    params: Dict[str, Any] = {"reference": reference}
    if reference_label is not None:
        params["reference_label"] = int(reference_label)
    result = segment(ctx, client, model, image_id=image_id, params=params, dest_dir=dest_dir)
    if result.comparison is None:
        raise ProtocolError(f"Model '{model}' ignored reference '{reference}': its answer has no 'comparison' figures")
    return result


def classify(
    ctx: JobContext,
    client: MonaiLabelClient,
    model: str,
    image_id: Optional[str] = None,
    image_file: Optional[str] = None,
    slice_index: Optional[int] = None,
    dest_dir: Optional[str] = None,
    explain: Optional[str] = None,
    params: Optional[Dict[str, Any]] = None,
) -> InferResult:
    """Run a classification model: ``probabilities`` per class and a saliency map file.

    Args:
        slice_index: axial slice to classify (the server's default, the middle slice, when None).
        explain: explanation method (``explain`` request param: "rise", "grad_cam", "attention_rollout",
            "class_attention"); the server's default when None. Pick it from the model card's
            ``explanations``.
        params: further request params (e.g. ``rise_masks``, ``saliency_class``).

    Raises:
        ProtocolError: when the answer has no probabilities, no saliency map, or a map made with another
            method than the one asked for.
    """
    request: Dict[str, Any] = dict(params or {})
    if slice_index is not None:
        request["slice"] = int(slice_index)
    wanted = explanation_key(explain) if explain else ""
    if wanted:
        request["explain"] = wanted
    result = _infer(ctx, client, model, image_id, image_file, request, dest_dir)
    if result.probabilities is None:
        raise ProtocolError(f"Model '{model}' returned no class probabilities (answer: {result.params})")
    if not result.label_path:
        raise ProtocolError(f"Model '{model}' returned no saliency map file")
    used = explanation_key(result.params.get("saliency"))
    if wanted and used and used != wanted:
        raise ProtocolError(
            f"Model '{model}' was asked for a '{wanted}' explanation but answered with '{used}': "
            "the server does not support that method"
        )
    return result


def submit_label(
    ctx: JobContext,
    client: MonaiLabelClient,
    label_path: str,
    image_id: Optional[str] = None,
    image_path: Optional[str] = None,
    tag: str = "final",
    params: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Save a label as ``tag``; uploads the image first when it is not in the datastore yet.

    Returns:
        the server's answer plus ``image`` (the datastore id used).
    """
    if not image_id:
        if not image_path:
            raise ValueError("Submitting a label needs the image id or the image file to upload")
        ctx.progress(None, "Uploading the image to the datastore")
        image_id = client.upload_image(image_path, cancel=ctx.cancel_token)
    ctx.progress(None, f"Saving the label of '{image_id}' as '{tag}'")
    answer = client.save_label(image_id, label_path, tag=tag, params=params, cancel=ctx.cancel_token)
    answer = dict(answer or {})
    answer.setdefault("image", image_id)
    return answer


def run_training(
    ctx: JobContext,
    client: MonaiLabelClient,
    task: str,
    params: Optional[Dict[str, Any]] = None,
    poll_interval_s: float = 2.0,
) -> TrainingOutcome:
    """Start ``task`` on the server and follow it until it ends.

    Progress comes from ``info()["train_stats"][task]`` (epoch, total_epochs, best_metric); stats
    left over from an earlier run (same ``start_ts`` as before we started) are ignored. Cancel
    stops the server's training (``DELETE /train/``), only when it is the task this job started,
    before the job reports ``cancelled``; a detached job (module closing) leaves it running.

    Raises:
        TrainingFailed: when the server reports ERROR.
        OperationCancelled: when cancelled here (training stopped) or stopped by someone else.
    """
    old_start = _train_stats(client, task, ctx).get("start_ts")
    record: Dict[str, Any] = {}
    stats: Dict[str, Any] = {}

    def show_progress(status: str) -> None:
        nonlocal stats
        fresh = _train_stats(client, task, ctx)
        if fresh.get("start_ts") != old_start:
            stats = fresh
        ctx.progress(training_fraction(stats), training_text(task, status, stats))

    try:
        ctx.progress(0.0, f"Starting training '{task}'")
        record.update(client.train_start(task, params, cancel=ctx.cancel_token) or {})
        status = _follow_task(
            ctx,
            record,
            lambda: client.train_status(all_tasks=True, cancel=ctx.cancel_token),
            poll_interval_s,
            f"training task '{task}'",
            show_progress,
        )
    except OperationCancelled:
        if ctx.detached:  # the module is closing: the server's training is not ours to end
            raise OperationCancelled(f"Training '{task}' left running on the server") from None
        raise OperationCancelled(_stop_training(client, task, record)) from None
    if status == "DONE":
        stats = _train_stats(client, task, ctx) or stats
        ctx.progress(1.0, training_text(task, status, stats))
        return TrainingOutcome(task=task, status=status, stats=stats, record=record)
    if status == "STOPPED":
        raise OperationCancelled(f"Training '{task}' was stopped on the server")
    raise TrainingFailed(task, status, record.get("details"))


def _stop_training(client: MonaiLabelClient, task: str, record: Dict[str, Any]) -> str:
    """Stop the server's training if it is ours; returns the message for the cancelled event.

    The job's token is already cancelled, so these requests run without it.

    Raises:
        MedAttnClientError: when the server could not be asked to stop.
    """
    try:
        running = client.train_status(check_if_running=True)
        if not running:
            return f"Training '{task}' cancelled (nothing was running on the server)"
        # Only the task this job started, identified by the id the server gave it: another annotator
        # may be training the same model on a shared server.
        ours = bool(record.get("id")) and running.get("id") == record.get("id")
        if not ours:
            return f"Training '{task}' cancelled; another training task on the server was left running"
        client.train_stop()
    except MedAttnClientError as error:
        raise MedAttnClientError(
            f"Training '{task}' was cancelled here but stopping it on the server failed: {error}"
        ) from error
    return f"Training '{task}' stopped on the server"


def run_scoring(
    ctx: JobContext,
    client: MonaiLabelClient,
    method: str,
    params: Optional[Dict[str, Any]] = None,
    poll_interval_s: float = 1.0,
) -> Dict[str, Any]:
    """Run a scoring method as a background task on the server, follow it to its end, and return the
    datastore listing (``GET /datastore/?output=all``) holding the new per-image scores.

    Read the figures with :func:`~MedAttnSlicerLib.formatting.scores_by_image` (raw) or
    :func:`~MedAttnSlicerLib.formatting.score_rows` (table). Cancel stops the server's task (``DELETE /scoring/``).

    Args:
        method: a name from ``info()["scoring"]`` (``over_under``, ``int8_agreement``).
        params: request params of the method (e.g. ``{"max_slices": 8}`` for ``int8_agreement``).
        poll_interval_s: seconds between ``GET /scoring/`` polls.

    Raises:
        ServerError: the server refused to start it (404 naming an unknown method, 429 when one runs).
        MedAttnClientError: the task ended with ERROR or STOPPED (its last log lines in the message).
        ProtocolError: the server lost track of the task.
        OperationCancelled: cancelled here (the server's task was stopped).
    """
    record: Dict[str, Any] = {}
    try:
        ctx.progress(None, f"Scoring with '{method}'")
        record.update(client.scoring_start(method, params, cancel=ctx.cancel_token) or {})
        status = _follow_task(
            ctx,
            record,
            lambda: client.scoring_status(all_tasks=True, cancel=ctx.cancel_token),
            poll_interval_s,
            f"scoring task '{method}'",
            lambda status: ctx.progress(None, f"Scoring '{method}': {status}"),
        )
    except OperationCancelled:
        if ctx.detached:  # the module is closing: leave the server's task alone
            raise OperationCancelled(f"Scoring '{method}' left running on the server") from None
        try:
            client.scoring_stop()
        except MedAttnClientError as error:
            raise MedAttnClientError(
                f"Scoring '{method}' was cancelled here but stopping it on the server failed: {error}"
            ) from error
        raise OperationCancelled(f"Scoring '{method}' stopped on the server") from None
    if status != "DONE":
        raise MedAttnClientError(
            f"Scoring '{method}' ended with status {status}: " + "; ".join(map(str, (record.get("details") or [])[-3:]))
        )
    return client.datastore("all", cancel=ctx.cancel_token)


def _follow_task(
    ctx: JobContext,
    record: Dict[str, Any],
    statuses: Callable[[], Any],
    poll_interval_s: float,
    what: str,
    on_poll: Callable[[str], None],
) -> str:
    """Poll a server task until its status is final; that status.

    Args:
        record: the task record the start request answered; updated in place with each newer record, so that a
            caller interrupted by cancellation still knows the task's id.
        statuses: ``GET /train/`` or ``GET /scoring/`` with all tasks.
        poll_interval_s: seconds between polls.
        what: the task in messages (``"training task 'x'"``).
        on_poll: called with the status after each poll that found the task (progress reports).

    Raises:
        ProtocolError: the server lost track of the task (three polls in a row without it).
    """
    task_id = record.get("id")
    status, missing = str(record.get("status") or "SUBMITTED"), 0
    while status not in _FINAL_TASK_STATES:
        ctx.sleep(poll_interval_s)
        current = _find_task(statuses(), task_id)
        if current is None:
            missing += 1
            if missing >= 3:
                raise ProtocolError(f"The server lost track of {what} ({task_id})")
            continue
        missing = 0
        record.clear()
        record.update(current)
        status = str(current.get("status") or "RUNNING")
        on_poll(status)
    return status


def _train_stats(client: MonaiLabelClient, task: str, ctx: JobContext) -> Dict[str, Any]:
    stats = (client.info(cancel=ctx.cancel_token).get("train_stats") or {}).get(task) or {}
    return dict(stats) if isinstance(stats, dict) else {}


def _find_task(status: Any, task_id: Optional[str]) -> Optional[Dict[str, Any]]:
    """The record with ``task_id`` in a status answer (a list with all=true, a dict otherwise)."""
    records: List[Any] = status if isinstance(status, list) else ([status] if status else [])
    records = [r for r in records if isinstance(r, dict)]
    if task_id is None:
        return records[-1] if records else None
    for candidate in reversed(records):
        if candidate.get("id") == task_id:
            return candidate
    return None

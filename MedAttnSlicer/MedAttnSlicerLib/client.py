# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Client for the MONAI Label 0.8.5 REST API, standard library only.

Endpoints used (paths, query parameters and body formats as served by ``monailabel.endpoints``):

==========================================  ==========================================================
``GET    /auth/``                           is authentication enabled (``enabled``)
``POST   /auth/token``                      log in: form ``username``, ``password``; ``access_token``
``GET    /info/``                           app info: models, trainers, strategies, scoring, train_stats
``GET    /datastore/?output=all|stats``     datastore listing
``GET    /datastore/image/info?image=``     one image's info (scores live here)
``GET    /datastore/image?image=``          download an image (file response)
``GET    /datastore/label?label=&tag=``     download a label (file response)
``PUT    /datastore/image?image=``          upload an image; multipart ``params`` + ``file``
``PUT    /datastore/label?image=&tag=``     save a label; multipart ``params`` + ``label``
``POST   /activelearning/{strategy}``       next sample; JSON body = strategy params
``POST   /infer/{model}?image=&output=all`` inference; multipart ``params`` [+ ``file``] [+ ``label``];
                                            answer: multipart ``params`` (JSON) + ``image`` (file),
                                            or plain JSON when the model returns no file
``POST   /train/{task}``                    start training; JSON body = training params
``DELETE /train/``                          stop the running training
``GET    /train/?all=&check_if_running=``   training task status (404 when there is none)
``POST   /scoring/{method}``                start scoring; JSON body = params
``GET    /scoring/``, ``DELETE /scoring/``  scoring status, stop
==========================================  ==========================================================

Every blocking call accepts a :class:`~MedAttnSlicerLib.cancel.CancelToken`: cancelling shuts the
request's socket down, so a call waiting for a long inference returns at once with
:class:`~MedAttnSlicerLib.errors.OperationCancelled`. The HTTP plumbing is :mod:`MedAttnSlicerLib.transport`.

Authentication: a server started with ``MONAI_LABEL_AUTH_ENABLE=true`` answers 401 without a bearer token.
:meth:`MonaiLabelClient.login` trades a user name and password for one (MONAI Label asks its OpenID realm,
e.g. Keycloak); the token lives in this object only and goes with every request. The password is not kept.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import tempfile
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

from .cancel import CancelToken
from .errors import MedAttnClientError, ProtocolError, ServerError
from .heatmap import explanation_key
from .multipart import encode_multipart_formdata, file_suffix, parse_multipart, parts_by_name
from .transport import Exchange, parse_json, query_url
from .url_history import normalize_server_url

__all__ = ["MonaiLabelClient", "InferResult", "ProgressCallback"]

#: ``progress(fraction, message)``; fraction in [0, 1] or None when unknown.
ProgressCallback = Callable[[Optional[float], str], None]


@dataclass
class InferResult:
    """What ``POST /infer/{model}`` returned.

    Attributes:
        model: the model that ran.
        image_id: the datastore image id the request named (None for an uploaded file).
        params: the JSON result (``comparison``, ``probabilities``, ``slice``, timings...).
        label_path: local path of the returned label file (prediction, comparison map or
            saliency map), or None when the server sent JSON only.
    """

    model: str
    image_id: Optional[str]
    params: Dict[str, Any] = field(default_factory=dict)
    label_path: Optional[str] = None

    @property
    def comparison(self) -> Optional[Dict[str, Any]]:
        value = self.params.get("comparison")
        return value if isinstance(value, dict) else None

    @property
    def probabilities(self) -> Optional[Dict[str, float]]:
        value = self.params.get("probabilities")
        return value if isinstance(value, dict) else None

    @property
    def explanation(self) -> Optional[str]:
        """The classifier's explanation method (``saliency``: "RISE" -> "rise"), or None."""
        value = self.params.get("saliency")
        return explanation_key(value) if value else None


class MonaiLabelClient:
    """Blocking client of one MONAI Label server. Safe to use from a worker thread.

    Args:
        server_url: e.g. ``http://127.0.0.1:8000`` (a missing scheme means http).
        timeout_s: socket timeout of short calls (info, datastore, uploads, train control).
        infer_timeout_s: socket timeout of inference, active learning and downloads, which may
            legitimately take minutes on a CPU server.
        client_id: sent as ``client_id`` where MONAI Label records who asked (active learning, labels).
        auth_token: bearer token for servers started with authentication enabled.
        download_dir: where returned files are written (a private temporary folder when omitted).
        use_system_proxy: honour ``http_proxy``-style variables; off by default because the
            server is normally on localhost or the local network.
    """

    def __init__(
        self,
        server_url: str,
        timeout_s: float = 30.0,
        infer_timeout_s: float = 1800.0,
        client_id: Optional[str] = None,
        auth_token: Optional[str] = None,
        download_dir: Optional[str] = None,
        use_system_proxy: bool = False,
    ) -> None:
        if timeout_s <= 0 or infer_timeout_s <= 0:
            raise ValueError(f"Timeouts must be positive, got {timeout_s} and {infer_timeout_s}")
        self._server_url = normalize_server_url(server_url)
        self.timeout_s = float(timeout_s)
        self.infer_timeout_s = float(infer_timeout_s)
        self.client_id = client_id
        self.auth_token = auth_token
        self._download_dir = download_dir
        self._lock = threading.Lock()
        self.use_system_proxy = use_system_proxy

    @property
    def server_url(self) -> str:
        return self._server_url

    @property
    def download_dir(self) -> str:
        with self._lock:  # jobs of several threads may ask at once
            if self._download_dir is None:
                self._download_dir = tempfile.mkdtemp(prefix="medattnslicer-")
            os.makedirs(self._download_dir, exist_ok=True)
            return self._download_dir

    # ----------------------------------------------------------------- authentication
    def auth_enabled(self, cancel: Optional[CancelToken] = None) -> bool:
        """``GET /auth/``: whether the server asks for a log-in (servers without the endpoint: no)."""
        try:
            answer = self._json("GET", "/auth/", cancel=cancel)
        except ServerError as error:
            if error.status == 404:
                return False
            raise
        return bool(isinstance(answer, dict) and answer.get("enabled"))

    def login(self, username: str, password: str, cancel: Optional[CancelToken] = None) -> str:
        """``POST /auth/token`` (OAuth2 password form); keeps the access token for later requests and returns it.

        Raises:
            ValueError: empty user name or password.
            MedAttnClientError: the server refused the log-in (wrong user name or password).
            ProtocolError: the server has authentication disabled (it returns no token).
        """
        if not username or not password:
            raise ValueError("Enter a user name and a password to log in.")
        form = urllib.parse.urlencode({"username": username, "password": password}).encode("ascii")
        self.auth_token = None  # a failed log-in must not leave the previous user's token in use
        try:
            answer = self._json(
                "POST", "/auth/token", body=form, content_type="application/x-www-form-urlencoded", cancel=cancel
            )
        except ServerError as error:
            # MONAI Label 0.8.5 passes the realm's refusal on as a 500 without detail.
            raise MedAttnClientError(
                f"Log-in as '{username}' was refused by {self._server_url} ({error.status}): "
                "check the user name and password."
            ) from error
        token = answer.get("access_token") if isinstance(answer, dict) else None
        if not token:
            raise ProtocolError(f"{self._server_url} has authentication disabled: it returned no access token")
        self.auth_token = str(token)
        return self.auth_token

    def logout(self) -> None:
        """Forget the token (the server keeps no session to end)."""
        self.auth_token = None

    # ----------------------------------------------------------------- app and datastore
    def info(self, cancel: Optional[CancelToken] = None) -> Dict[str, Any]:
        """``GET /info/``: models, trainers, strategies, scoring methods, train_stats, datastore status."""
        result = self._json("GET", "/info/", cancel=cancel)
        if not isinstance(result, dict) or "models" not in result:
            raise ProtocolError(f"{self._server_url}/info/ did not return MONAI Label app info")
        return result

    def datastore(self, output: str = "all", cancel: Optional[CancelToken] = None) -> Dict[str, Any]:
        """``GET /datastore/?output=``; ``all`` lists every image with its labels and info."""
        if output not in ("all", "stats", "train"):
            raise ValueError(f"Datastore output must be 'all', 'stats' or 'train', got '{output}'")
        return self._json("GET", "/datastore/", query={"output": output}, cancel=cancel)

    def image_info(self, image_id: str, cancel: Optional[CancelToken] = None) -> Dict[str, Any]:
        """``GET /datastore/image/info?image=``."""
        return self._json("GET", "/datastore/image/info", query={"image": _require_id(image_id)}, cancel=cancel)

    def next_sample(
        self, strategy: str, params: Optional[Dict[str, Any]] = None, cancel: Optional[CancelToken] = None
    ) -> Dict[str, Any]:
        """``POST /activelearning/{strategy}``; returns ``{"id", ...}`` or ``{}`` when nothing is left."""
        body = dict(params or {})
        if self.client_id and "client_id" not in body:
            body["client_id"] = self.client_id
        return self._json(
            "POST",
            f"/activelearning/{_segment(strategy)}",
            json_body=body,
            timeout_s=self.infer_timeout_s,
            cancel=cancel,
        )

    def download_image(
        self,
        image_id: str,
        dest_dir: Optional[str] = None,
        cancel: Optional[CancelToken] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> str:
        """``GET /datastore/image?image=``; returns the local file path."""
        return self._download(
            "/datastore/image", {"image": _require_id(image_id)}, image_id, dest_dir, cancel, progress
        )

    def download_label(
        self,
        image_id: str,
        tag: str = "final",
        dest_dir: Optional[str] = None,
        cancel: Optional[CancelToken] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> str:
        """``GET /datastore/label?label=&tag=``; the label id of an image is the image id."""
        return self._download(
            "/datastore/label",
            {"label": _require_id(image_id), "tag": _require_id(tag)},
            f"{image_id}_{tag}",
            dest_dir,
            cancel,
            progress,
        )

    def upload_image(
        self,
        image_path: str,
        image_id: Optional[str] = None,
        params: Optional[Dict[str, Any]] = None,
        cancel: Optional[CancelToken] = None,
    ) -> str:
        """``PUT /datastore/image?image=`` (multipart ``params`` + ``file``); returns the stored image id."""
        query = {"image": image_id} if image_id else None
        content_type, body = encode_multipart_formdata({"params": json.dumps(params or {})}, {"file": image_path})
        result = self._json("PUT", "/datastore/image", query=query, body=body, content_type=content_type, cancel=cancel)
        if not isinstance(result, dict) or not result.get("image"):
            raise ProtocolError(f"Upload of {image_path} returned no image id: {result!r}")
        return str(result["image"])

    def save_label(
        self,
        image_id: str,
        label_path: str,
        tag: str = "final",
        params: Optional[Dict[str, Any]] = None,
        cancel: Optional[CancelToken] = None,
    ) -> Dict[str, Any]:
        """``PUT /datastore/label?image=&tag=`` (multipart ``params`` + ``label``)."""
        save_params = dict(params or {})
        if self.client_id and "client_id" not in save_params:
            save_params["client_id"] = self.client_id
        content_type, body = encode_multipart_formdata({"params": json.dumps(save_params)}, {"label": label_path})
        return self._json(
            "PUT",
            "/datastore/label",
            query={"image": _require_id(image_id), "tag": _require_id(tag)},
            body=body,
            content_type=content_type,
            cancel=cancel,
        )

    # ----------------------------------------------------------------- inference
    def infer(
        self,
        model: str,
        image_id: Optional[str] = None,
        params: Optional[Dict[str, Any]] = None,
        image_file: Optional[str] = None,
        label_file: Optional[str] = None,
        dest_dir: Optional[str] = None,
        cancel: Optional[CancelToken] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> InferResult:
        """``POST /infer/{model}?image=&output=all``.

        Args:
            model: model name from ``info()["models"]``.
            image_id: datastore image to run on; or
            image_file: a local image file sent in the multipart ``file`` field instead.
            params: request params (e.g. ``{"reference": "final"}``, ``{"slice": 40}``).
            label_file: a label sent in the multipart ``label`` field (``reference="upload"``).
            dest_dir: where the returned label file goes.
        """
        if not image_id and not image_file:
            raise ValueError("infer needs an image_id (datastore image) or an image_file to upload")
        files: Dict[str, Any] = {}
        if image_file:
            files["file"] = image_file
        if label_file:
            files["label"] = label_file
        content_type, body = encode_multipart_formdata({"params": json.dumps(params or {})}, files)
        query = {"output": "all"}
        if image_id:
            query["image"] = image_id
        if progress:
            progress(None, f"Running {model} on the server")
        headers, data = self._raw(
            "POST",
            f"/infer/{_segment(model)}",
            query=query,
            body=body,
            content_type=content_type,
            timeout_s=self.infer_timeout_s,
            cancel=cancel,
        )
        response_type = headers.get("Content-Type", "")
        result = InferResult(model=model, image_id=image_id)
        if response_type.lower().startswith("multipart/"):
            parts = parts_by_name(parse_multipart(data, response_type))
            if "params" in parts:
                result.params = parse_json(parts["params"].data, f"params of /infer/{model}")
            file_part = parts.get("image") or next((p for p in parts.values() if p.filename), None)
            if file_part is not None:
                stem = _safe_filename(f"{model}_{image_id or 'upload'}")
                suffix = file_suffix(file_part.filename or "") or ".nii.gz"
                result.label_path = _write_unique(dest_dir or self.download_dir, stem, suffix, file_part.data)
        elif "json" in response_type.lower():
            parsed = parse_json(data, f"/infer/{model}")
            result.params = parsed if isinstance(parsed, dict) else {"result": parsed}
        else:
            raise ProtocolError(f"/infer/{model} answered with unexpected Content-Type '{response_type}'")
        return result

    # ----------------------------------------------------------------- training and scoring
    def train_start(
        self, task: str, params: Optional[Dict[str, Any]] = None, cancel: Optional[CancelToken] = None
    ) -> Dict[str, Any]:
        """``POST /train/{task}``; returns the task record (``id``, ``status``...). 429 when one runs."""
        return self._json("POST", f"/train/{_segment(task)}", json_body=dict(params or {}), cancel=cancel)

    def train_stop(self, cancel: Optional[CancelToken] = None) -> Optional[Dict[str, Any]]:
        """``DELETE /train/``; returns the stopped task record, or None when nothing was running."""
        return self._json("DELETE", "/train/", cancel=cancel)

    def train_status(
        self, all_tasks: bool = False, check_if_running: bool = False, cancel: Optional[CancelToken] = None
    ) -> Any:
        """``GET /train/``: the latest task record (a list with ``all_tasks``), or None when there is none."""
        return self._task_status("/train/", all_tasks, check_if_running, cancel)

    def scoring_start(
        self, method: str, params: Optional[Dict[str, Any]] = None, cancel: Optional[CancelToken] = None
    ) -> Dict[str, Any]:
        """``POST /scoring/{method}``; returns the task record."""
        return self._json("POST", f"/scoring/{_segment(method)}", json_body=dict(params or {}), cancel=cancel)

    def scoring_stop(self, cancel: Optional[CancelToken] = None) -> Optional[Dict[str, Any]]:
        """``DELETE /scoring/``."""
        return self._json("DELETE", "/scoring/", cancel=cancel)

    def scoring_status(
        self, all_tasks: bool = False, check_if_running: bool = False, cancel: Optional[CancelToken] = None
    ) -> Any:
        """``GET /scoring/``: like :meth:`train_status`."""
        return self._task_status("/scoring/", all_tasks, check_if_running, cancel)

    def _task_status(self, path: str, all_tasks: bool, check_if_running: bool, cancel: Optional[CancelToken]) -> Any:
        query = {"all": _bool(all_tasks), "check_if_running": _bool(check_if_running)}
        try:
            return self._json("GET", path, query=query, cancel=cancel)
        except ServerError as error:
            if error.status == 404:  # MONAI Label's way of saying "no task (running)"
                return None
            raise

    # ----------------------------------------------------------------- HTTP plumbing
    def url(self, path: str, query: Optional[Dict[str, Any]] = None) -> str:
        """Absolute URL of ``path`` with an encoded query string."""
        return query_url(self._server_url, path, query)

    def _json(
        self,
        method: str,
        path: str,
        query: Optional[Dict[str, Any]] = None,
        json_body: Any = None,
        body: Optional[bytes] = None,
        content_type: Optional[str] = None,
        timeout_s: Optional[float] = None,
        cancel: Optional[CancelToken] = None,
    ) -> Any:
        if json_body is not None:
            body = json.dumps(json_body).encode("utf-8")
            content_type = "application/json"
        _, data = self._raw(method, path, query, body, content_type, timeout_s, cancel)
        return parse_json(data, f"{method} {path}")

    def _raw(
        self,
        method: str,
        path: str,
        query: Optional[Dict[str, Any]] = None,
        body: Optional[bytes] = None,
        content_type: Optional[str] = None,
        timeout_s: Optional[float] = None,
        cancel: Optional[CancelToken] = None,
    ) -> Tuple[http.client.HTTPMessage, bytes]:
        """Send one request and read the whole answer body."""
        with self._exchange(method, path, query, body, content_type, timeout_s, cancel) as exchange:
            return exchange.headers, exchange.read_all()

    def _exchange(
        self,
        method: str,
        path: str,
        query: Optional[Dict[str, Any]],
        body: Optional[bytes],
        content_type: Optional[str],
        timeout_s: Optional[float],
        cancel: Optional[CancelToken],
    ) -> Exchange:
        headers = {"Content-Type": content_type} if content_type else {}
        if self.auth_token:
            headers["Authorization"] = f"Bearer {self.auth_token}"
        return Exchange(
            self.url(path, query), method, body, headers, timeout_s or self.timeout_s, cancel, self.use_system_proxy
        )

    def _download(
        self,
        path: str,
        query: Dict[str, Any],
        fallback_stem: str,
        dest_dir: Optional[str],
        cancel: Optional[CancelToken],
        progress: Optional[ProgressCallback],
    ) -> str:
        dest_dir = dest_dir or self.download_dir
        os.makedirs(dest_dir, exist_ok=True)
        with self._exchange("GET", path, query, None, None, self.infer_timeout_s, cancel) as exchange:
            filename = exchange.headers.get_filename()
            if filename:
                target_name = _safe_filename(os.path.basename(filename))
            else:
                target_name = _safe_filename(fallback_stem) + ".nii.gz"
            target = os.path.join(dest_dir, target_name)
            total = exchange.headers.get("Content-Length")
            total_bytes = int(total) if total and total.isdigit() else None
            handle, partial = tempfile.mkstemp(prefix=".download-", dir=dest_dir)
            try:
                with os.fdopen(handle, "wb") as out:
                    received = 0
                    for chunk in exchange.iter_chunks():
                        out.write(chunk)
                        received += len(chunk)
                        if progress:
                            fraction = received / total_bytes if total_bytes else None
                            progress(fraction, f"Downloading {target_name}: {received / 1e6:.1f} MB")
                os.replace(partial, target)
            except BaseException:
                if os.path.exists(partial):
                    os.remove(partial)
                raise
        return target


def _segment(name: str) -> str:
    if not name or not str(name).strip():
        raise ValueError("A model, strategy, task or method name must not be empty")
    return urllib.parse.quote(str(name), safe="")


def _require_id(value: Optional[str]) -> str:
    if value is None or not str(value).strip():
        raise ValueError("An image id (or label tag) must not be empty")
    return str(value)


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _safe_filename(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip(".")
    return cleaned or "file"


def _write_unique(dest_dir: str, stem: str, suffix: str, data: bytes) -> str:
    os.makedirs(dest_dir, exist_ok=True)
    handle, path = tempfile.mkstemp(prefix=stem + "-", suffix=suffix, dir=dest_dir)
    with os.fdopen(handle, "wb") as out:
        out.write(data)
    return path

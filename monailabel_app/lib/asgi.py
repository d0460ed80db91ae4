# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Where the app's ASGI middlewares (:mod:`.request_guard`, :mod:`.serving`) wrap MONAI Label's running server."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["running_server_app"]


def running_server_app() -> tuple[Any, str] | None:
    """MONAI Label's FastAPI app with its middleware stack built (to be wrapped), and the API prefix
    (``MONAI_LABEL_API_STR``); ``None`` when this process is not MONAI Label's server (e.g. a training or batch
    subprocess)."""
    server = sys.modules.get("monailabel.app")
    if server is None or not hasattr(server, "app"):
        return None
    from monailabel.config import settings

    fastapi_app = server.app
    if fastapi_app.middleware_stack is None:
        fastapi_app.middleware_stack = fastapi_app.build_middleware_stack()
    return fastapi_app, settings.MONAI_LABEL_API_STR

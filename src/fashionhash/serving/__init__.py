"""Search service and web app over a run's model and a catalogue index.

:class:`SearchService` (no web dependencies) loads the model and the index once;
:func:`create_app` / :func:`serve` (need the ``serve`` extra: FastAPI, uvicorn,
python-multipart) put it behind HTTP with a web page.
"""
from __future__ import annotations

from typing import Any

from .service import SearchService, ServiceConfig, ServiceError

__all__ = ["SearchService", "ServiceConfig", "ServiceError", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    # the web layer is imported on first use so the CLI's `search` needs no FastAPI
    if name in ("create_app", "serve"):
        from . import app

        return getattr(app, name)
    raise AttributeError(name)

"""``imvar-jax serve``: OpenAI's image-variations API over the pipeline, requests batched onto every device.

``settings`` (the server's settings and a request's fields), ``batcher`` (the queue and its
worker thread), ``service`` (the model, loaded and warmed up), ``app`` (Starlette routes and
``serve``). The web stack is imported only here, never by the rest of imvar_jax, and only when
its names are used: it comes with the ``serve`` extra.
"""

from __future__ import annotations

from typing import Any

from .settings import RequestError, ServeSettings, Work

__all__ = ["RequestError", "ServeSettings", "Work", "build_app", "serve"]


def __getattr__(name: str) -> Any:
    if name in ("build_app", "serve"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The HTTP side: OpenAI's ``POST /v1/images/variations`` and friends on Starlette, served by uvicorn.

Every error a client sees is OpenAI's error object ``{"error": {"message", "type", "param",
"code"}}`` with the status the ``openai`` SDK maps to its exceptions; a traceback only ever goes
to the server's log.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import json
import logging
import secrets
import signal
import threading
import time
from collections import OrderedDict
from importlib import resources
from typing import Any, Awaitable, Callable

import numpy as np
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..preprocessing import to_pil
from ..settings import SEED_LIMIT
from .batcher import Closed, QueueFull
from .service import Service, read_picture
from .settings import RequestError, ServeSettings, request_work

log = logging.getLogger(__name__)

# OpenAI's error types by status; every other 4xx is an invalid request.
_TYPES = {429: "rate_limit_error", 500: "server_error", 503: "server_error"}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class ImageStore:
    """``response_format=url`` pictures: at most ``limit`` PNGs, each kept ``ttl`` seconds under an unguessable name."""

    def __init__(self, limit: int, ttl: float) -> None:
        self.limit, self.ttl = limit, ttl
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, png: bytes) -> str:
        name = secrets.token_urlsafe(18) + ".png"
        with self._lock:
            self._expire()
            self._items[name] = (time.monotonic() + self.ttl, png)
            while len(self._items) > self.limit:
                self._items.popitem(last=False)
        return name

    def get(self, name: str) -> bytes | None:
        with self._lock:
            self._expire()
            item = self._items.get(name)
            return None if item is None else item[1]

    def _expire(self) -> None:
        now = time.monotonic()
        while self._items and next(iter(self._items.values()))[0] <= now:
            self._items.popitem(last=False)


class _BodyTooLarge(Exception):
    pass


class _BodyStalled(Exception):
    pass


class BodyGuard:
    """Bounds every request body: 413 past ``max_bytes`` (by Content-Length, or counted as it arrives when
    chunked), 408 when the client pauses longer than ``timeout`` seconds in the middle of it."""

    def __init__(self, app: Callable[..., Awaitable[None]], max_bytes: int, timeout: float) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_large = f"the request body is larger than the {self.max_bytes} bytes this server takes"
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await error_response(400, "Content-Length is not a number")(scope, receive, send)
                return
            if declared > self.max_bytes:
                await error_response(413, too_large, code="request_too_large",
                                     headers={"Connection": "close"})(scope, receive, send)
                return
        received = 0
        body_done = False
        started = False

        async def guarded_receive() -> dict:
            nonlocal received, body_done
            if body_done:
                return await receive()  # after the body: waiting for a disconnect may take any time
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:
                raise _BodyStalled() from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge()
                body_done = not message.get("more_body", False)
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracked_send)
        except (_BodyTooLarge, _BodyStalled) as e:
            if started:
                raise
            if isinstance(e, _BodyTooLarge):
                response = error_response(413, too_large, code="request_too_large", headers={"Connection": "close"})
            else:
                response = error_response(408, f"the request body stalled for more than {self.timeout:g} s",
                                          code="request_timeout", headers={"Connection": "close"})
            await response(scope, receive, send)


def _png(image: np.ndarray) -> bytes:
    """A picture as PNG bytes, rounded to 8 bits as ``imvar-jax generate`` writes its files."""
    buffer = io.BytesIO()
    to_pil(image)[0].save(buffer, format="PNG")
    return buffer.getvalue()


def build_app(service: Service, load: bool = True) -> Starlette:
    """The ASGI app over ``service``; with ``load`` the model loads in a thread at start-up (``/health`` is
    503 until every served size is compiled) and the batcher drains at shutdown."""
    settings: ServeSettings = service.settings
    store = ImageStore(settings.store_pictures, settings.url_ttl_s)
    page = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")

    def authorized(request: Request) -> bool:
        key = service.settings.api_key
        if key is None:
            return True
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # Constant time: how much of a guess matched must not show in the answer's timing.
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())

    def refuse_unauthorized() -> JSONResponse:
        return error_response(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'",
                              code="invalid_api_key")

    def not_ready() -> JSONResponse | None:
        if service.state == "ready":
            return None
        message = ("the model is still loading and compiling; retry shortly" if service.state == "starting"
                   else f"the model failed to load: {service.error}")
        return error_response(503, message, code="not_ready", headers={"Retry-After": "5"})

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def health(request: Request) -> Response:
        body: dict[str, Any] = {"status": service.state, **service.settings.public(),
                                "devices": len(service.devices), "pictures_per_call": service.capacity}
        if service.state == "ready":
            body["ready_after_s"] = round(service.ready_after or 0.0, 3)
            body["queued_pictures"] = service.batcher.pending
            body["stats"] = service.batcher.stats.as_dict()
        if service.error:
            body["error"] = service.error
        return JSONResponse(body, status_code=200 if service.state == "ready" else 503)

    async def models(request: Request) -> Response:
        if not authorized(request):
            return refuse_unauthorized()
        model = service.settings.generation.model
        return JSONResponse({"object": "list", "data": [{"id": model, "object": "model",
                                                         "created": int(service.started), "owned_by": "imvar-jax"}]})

    async def image_file(request: Request) -> Response:
        png = store.get(request.path_params["name"])
        if png is None:
            return error_response(404, "no such picture (pictures expire; ask for b64_json to keep them)",
                                  code="not_found")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    async def variations(request: Request) -> Response:
        if not authorized(request):
            return refuse_unauthorized()
        refused = not_ready()
        if refused is not None:
            return refused
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return error_response(400, "expected a multipart/form-data body with an 'image' file", "image")
        try:
            form = await request.form(max_files=1, max_fields=16, max_part_size=4096)
        except HTTPException as e:  # Starlette's own refusal of a malformed or over-long form
            return error_response(400, f"malformed multipart form: {e.detail}")
        try:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise RequestError("image: expected a picture file in the 'image' field", "image")
            unknown = sorted(set(form.keys()) - _FIELDS)
            if unknown:
                raise RequestError(f"{unknown[0]}: not a field of this endpoint (fields: {', '.join(sorted(_FIELDS))})",
                                   unknown[0])
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            work, n, seed, response_format = request_work(fields, service.settings)
            data = await upload.read()
            picture = await asyncio.to_thread(read_picture, data, service.settings.max_pixels)
            pixel_values = await asyncio.to_thread(service.prepare, picture)
        except RequestError as e:
            return error_response(e.status, str(e), e.param, e.code)
        finally:
            await form.close()
        if seed is None:
            seed = secrets.randbelow(SEED_LIMIT)
        try:
            future = service.batcher.submit(pixel_values, n, seed, work)
        except QueueFull as e:
            return error_response(429, str(e), code="queue_full", headers={"Retry-After": "1"})
        except Closed as e:
            return error_response(503, str(e), code="shutting_down")
        try:
            result = await asyncio.wrap_future(future)
        except Exception:
            return error_response(500, "generating the pictures failed (the server's log says why)",
                                  code="generation_failed")
        pngs = await asyncio.to_thread(lambda: [_png(x) for x in result.images])
        if response_format == "b64_json":
            items = [{"b64_json": base64.b64encode(p).decode("ascii")} for p in pngs]
        else:
            items = [{"url": str(request.url_for("image_file", name=store.put(p)))} for p in pngs]
        body = {"created": int(time.time()), "data": items, "seed": seed,
                "nsfw_content_detected": result.nsfw}
        return Response(json.dumps(body), media_type="application/json")

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        detail = getattr(exc, "detail", None) or "error"
        return error_response(status, f"{detail}: {request.method} {request.url.path}")

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("unhandled error for %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal server error (the server's log says why)")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        if load:
            thread = threading.Thread(target=service.load, name="imvar-jax-load", daemon=True)
            thread.start()
            app.state.loader = thread
        yield
        if service.batcher is not None:
            await asyncio.to_thread(service.batcher.close)

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/images/variations", variations, methods=["POST"]),
        Route("/v1/images/files/{name}", image_file, methods=["GET"], name="image_file"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout_s)
    return app


# OpenAI's fields, then this server's documented extensions.
_FIELDS = frozenset({"image", "n", "size", "response_format", "model", "user",
                     "seed", "steps", "guidance_scale", "scheduler"})


def serve(settings: ServeSettings, on_failure: Callable[[str], None] | None = None) -> int:
    """Run the server until SIGTERM or Ctrl-C (requests in flight are finished first); returns an exit code.

    The model loads while the server already answers ``/health`` (503 until ready); if it cannot
    load, the reason goes to ``on_failure`` and the server stops with exit code 1.
    """
    import uvicorn

    service = Service(settings)
    app = build_app(service)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info", access_log=True,
                            timeout_keep_alive=5, lifespan="on")
    server = uvicorn.Server(config)

    def watch() -> None:
        service.wait()
        if service.state == "failed":
            if on_failure is not None:
                on_failure(service.error or "the model failed to load")
            server.should_exit = True

    threading.Thread(target=watch, name="imvar-jax-watch", daemon=True).start()
    # uvicorn re-raises the signal that stopped it once it has shut down; with these handlers in place
    # that re-raise is a no-op, so a graceful stop ends with exit code 0 instead of death by signal.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 1 if service.state == "failed" else 0

"""The server's settings: one frozen object checked once at start-up, and the per-request work it admits.

A request may choose what an OpenAI client sends (``n``, ``size``, ``response_format``) and the
documented extensions (``seed``, ``steps``, ``guidance_scale``, ``scheduler``); everything else
is the server's ``GenerationSettings``. ``request_work`` turns a request's fields into a ``Work``
(what decides the compiled program and the pictures) or a ``RequestError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import shown
from ..schedulers import SCHEDULERS
from ..settings import MAX_STEPS, SEED_LIMIT, GenerationSettings, SettingsError, check_value

MAX_N = 10  # OpenAI's limit on n for image variations
RESPONSE_FORMATS = ("url", "b64_json")
API_KEY_ENV = "IMVAR_JAX_API_KEY"
# The generation options a server takes from its command line; the rest belong to requests or do not apply.
SERVED_FIELDS = ("model", "revision", "steps", "guidance", "scheduler", "eta", "preprocessing", "dtype",
                 "vae_dtype", "attention", "safety_checker")


class RequestError(ValueError):
    """A request field the server refuses; ``param`` names it as OpenAI's error object does."""

    def __init__(self, message: str, param: str | None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.status = status
        self.code = code


def parse_size(text: str) -> tuple[int, int]:
    """OpenAI's ``"WIDTHxHEIGHT"`` -> ``(height, width)``; SettingsError unless two positive integers."""
    parts = text.lower().split("x") if isinstance(text, str) else []
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise SettingsError(f"expected WIDTHxHEIGHT in pixels (e.g. 512x512), got {shown(text)}")
    width, height = int(parts[0]), int(parts[1])
    return height, width


def size_text(size: tuple[int, int]) -> str:
    """``(height, width)`` -> OpenAI's ``"WIDTHxHEIGHT"``."""
    return f"{size[1]}x{size[0]}"


@dataclass(frozen=True)
class Work:
    """What one compiled program call shares: pictures with equal ``Work`` are batched together."""

    size: tuple[int, int]  # (height, width)
    steps: int
    guidance: float
    scheduler: str


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``imvar-jax serve`` is started with; construction checks every field.

    ``generation``: model, dtypes, safety checker and the defaults of the per-request values.
    ``sizes``: the ``(height, width)`` sizes requests may ask for (the first is the default),
    each compiled at start-up. ``batch_per_device`` x devices is how many pictures one program
    call makes; the worker waits at most ``max_wait_ms`` after a request's arrival for others
    to share its call. ``max_queue``: pictures waiting or running before new requests get 429.
    ``max_body_bytes`` and ``max_pixels`` bound an upload; ``body_timeout_s`` is how long a client
    may pause while sending it. ``url_ttl_s`` and ``store_pictures``: how long and how many
    ``response_format=url`` pictures are kept. ``max_steps``: the most steps a request may ask
    for (every step count runs one program; each new scheduler compiles once, on its first request).
    """

    generation: GenerationSettings = field(default_factory=GenerationSettings)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    sizes: tuple[tuple[int, int], ...] = ()
    batch_per_device: int = 4
    max_wait_ms: float = 50.0
    max_queue: int = 256
    max_body_bytes: int = 20 << 20
    max_pixels: int = 4096 * 4096
    body_timeout_s: float = 30.0
    url_ttl_s: float = 3600.0
    store_pictures: int = 1000
    max_steps: int = 150

    def __post_init__(self) -> None:
        if not isinstance(self.generation, GenerationSettings):
            raise SettingsError(f"generation: expected GenerationSettings, got {shown(self.generation)}")
        if not isinstance(self.host, str) or not self.host:
            raise SettingsError(f"host: expected an address, got {shown(self.host)}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise SettingsError(f"port: expected 0..65535, got {shown(self.port)}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise SettingsError("api_key: expected a non-empty key")
        sizes = tuple(check_value("size", tuple(s), "sizes") for s in self.sizes)
        if len(set(sizes)) != len(sizes):
            raise SettingsError(f"sizes: a size is listed twice in {', '.join(map(size_text, sizes))}")
        object.__setattr__(self, "sizes", sizes)
        for name in ("batch_per_device", "max_queue", "max_body_bytes", "max_pixels", "store_pictures"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsError(f"{name}: expected a positive integer, got {shown(value)}")
        object.__setattr__(self, "max_steps", check_value("steps", self.max_steps, "max_steps"))
        for name in ("max_wait_ms", "body_timeout_s", "url_ttl_s"):
            value = check_value("guidance", getattr(self, name), name)  # a finite number
            if value < 0 or value == 0 and name != "max_wait_ms":
                raise SettingsError(f"{name}: expected a positive number, got {shown(getattr(self, name))}")
            object.__setattr__(self, name, float(value))
        if self.generation.steps > self.max_steps:
            raise SettingsError(f"steps: {self.generation.steps} is more than --max-steps {self.max_steps}")

    def replace(self, **changes: Any) -> "ServeSettings":
        return dataclasses.replace(self, **changes)

    @property
    def default_work(self) -> Work:
        g = self.generation
        return Work(self.sizes[0], g.steps, g.guidance, g.scheduler)

    def public(self) -> dict[str, Any]:
        """What ``/health`` tells clients about the server (never the key)."""
        g = self.generation
        return {"model": g.model, "sizes": [size_text(s) for s in self.sizes], "steps": g.steps,
                "max_steps": self.max_steps, "guidance_scale": g.guidance, "scheduler": g.scheduler,
                "schedulers": list(SCHEDULERS), "max_n": MAX_N, "safety_checker": g.safety_checker,
                "max_body_bytes": self.max_body_bytes, "max_pixels": self.max_pixels}


def api_key_from_env(given: str | None) -> str | None:
    """``--api-key``, else ``$IMVAR_JAX_API_KEY`` (so the key need not show in the process list)."""
    return given if given is not None else os.environ.get(API_KEY_ENV) or None


def _int_field(form: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    text = form.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(str(text).strip())
    except ValueError:
        raise RequestError(f"{name}: expected an integer, got {shown(text)}", name) from None
    if not low <= value <= high:
        raise RequestError(f"{name}: expected an integer in {low}..{high}, got {value}", name)
    return value


def request_work(form: Mapping[str, Any], settings: ServeSettings) -> tuple[Work, int, int | None, str]:
    """A request's ``(work, n, seed, response_format)`` from its form fields; RequestError naming the first bad one.

    ``seed`` None means the server picks one (and says which in the response).
    """
    g = settings.generation
    n = _int_field(form, "n", 1, 1, MAX_N)
    size_field = form.get("size")
    if size_field in (None, ""):
        size = settings.sizes[0]
    else:
        try:
            size = parse_size(str(size_field))
        except SettingsError as e:
            raise RequestError(f"size: {e}", "size") from None
        if size not in settings.sizes:
            raise RequestError(f"size: {shown(size_field)} is not served here (choose one of "
                               f"{', '.join(size_text(s) for s in settings.sizes)})", "size")
    response_format = form.get("response_format") or "url"
    if response_format not in RESPONSE_FORMATS:
        raise RequestError(f"response_format: expected one of {', '.join(RESPONSE_FORMATS)}, got "
                           f"{shown(response_format)}", "response_format")
    steps = _int_field(form, "steps", g.steps, 1, min(settings.max_steps, MAX_STEPS))
    seed_text = form.get("seed")
    seed = None if seed_text in (None, "") else _int_field(form, "seed", 0, 0, SEED_LIMIT - 1)
    guidance = g.guidance
    if form.get("guidance_scale") not in (None, ""):
        try:
            guidance = check_value("guidance", float(str(form["guidance_scale"]).strip()), "guidance_scale")
        except (ValueError, SettingsError):
            raise RequestError(f"guidance_scale: expected a finite number, got {shown(form['guidance_scale'])}",
                               "guidance_scale") from None
    scheduler = form.get("scheduler") or g.scheduler
    if scheduler not in SCHEDULERS:
        raise RequestError(f"scheduler: expected one of {', '.join(SCHEDULERS)}, got {shown(scheduler)}",
                           "scheduler")
    model = form.get("model")
    if model not in (None, "") and model != g.model:
        raise RequestError(f"model: {shown(model)} is not served here (this server serves {g.model!r})", "model",
                           code="model_not_found")
    return Work(size, steps, guidance, scheduler), n, seed, response_format

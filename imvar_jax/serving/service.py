"""The model behind the server: loaded once, warmed up for every served size, fed by the batcher."""

from __future__ import annotations

import dataclasses
import io
import logging
import threading
import time
import warnings
from typing import Any, Sequence

import jax
import numpy as np
from PIL import Image

from ..batch.inputs import InputError, decode_image
from .. import memory
from ..errors import NonFiniteError
from ..memory import InsufficientMemoryError
from ..pipeline import ImageVariationPipeline
from ..settings import SettingsError
from .batcher import Batcher
from .settings import RequestError, ServeSettings, Work, size_text

log = logging.getLogger(__name__)

# OpenAI asks for PNG; JPEG and WebP are taken too. Anything else (GIF, TIFF, BMP, ...) is refused by
# its header, before a decoder runs on it.
FORMATS = ("PNG", "JPEG", "WEBP")


def read_picture(data: bytes, max_pixels: int) -> Image.Image:
    """An uploaded file's decoded picture, or RequestError (400, or 413 for too many pixels) saying why not."""
    if not data:
        raise RequestError("image: the file is empty", "image")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as header:  # reads the header only
                fmt, (width, height) = header.format, header.size
        except Image.DecompressionBombError:
            raise RequestError(f"image: too many pixels (more than {max_pixels})", "image", 413,
                               "image_too_large") from None
        except Exception:
            raise RequestError("image: not a picture (expected a PNG, JPEG or WebP file)", "image") from None
    if fmt not in FORMATS:
        raise RequestError(f"image: {fmt} files are not taken (expected PNG, JPEG or WebP)", "image")
    if width * height > max_pixels:
        raise RequestError(f"image: {width}x{height} is {width * height} pixels, more than the {max_pixels} "
                           f"this server takes", "image", 413, "image_too_large")
    try:
        return decode_image(data)
    except InputError as e:
        raise RequestError(f"image: {e}", "image") from None


class Service:
    """Loads the pipeline on ``devices`` (default every local device) and serves program calls to the batcher.

    ``state`` goes ``"starting"`` -> ``"ready"`` (every served size compiled) or ``"failed"`` (``error``
    says why). Only the batcher's worker thread runs programs once ready.
    """

    def __init__(self, settings: ServeSettings, devices: Sequence[jax.Device] | None = None) -> None:
        self.settings = settings
        self.devices = list(devices or jax.local_devices())
        self.capacity = len(self.devices) * settings.batch_per_device
        self.state = "starting"
        self.error: str | None = None
        self.batcher: Batcher | None = None
        self.started = time.time()
        self.ready_after: float | None = None
        self._pipes: dict[str, ImageVariationPipeline] = {}
        self._params: dict[str, Any] | None = None
        self._ready = threading.Event()

    def load(self) -> None:
        """Load, compile every served size, start the batcher; sets ``state`` (never raises)."""
        try:
            self._load()
        except (SettingsError, ValueError, OSError) as e:
            self.error = str(e)
            self.state = "failed"
        except Exception as e:  # a load that fails in an unforeseen way still ends with a one-line reason
            log.exception("loading the model failed")
            self.error = f"{type(e).__name__}: {e}"
            self.state = "failed"
        finally:
            self._ready.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until loading ended (ready or failed)."""
        return self._ready.wait(timeout)

    def _load(self) -> None:
        g = self.settings.generation

        def first_size(pipe: ImageVariationPipeline) -> dict[str, Any] | None:
            # The first served size's program is made while the weights load; a size the model refuses is
            # reported below, by name.
            try:
                size = pipe.size(*self.settings.sizes[0]) if self.settings.sizes else pipe.size()
            except SettingsError:
                return None
            side = pipe.image_encoder.config.image_size
            return {"images": np.zeros((1, 3, side, side), np.float32),
                    **self._call(Work(size, g.steps, g.guidance, g.scheduler))}

        pipe, params = ImageVariationPipeline.from_pretrained(
            g.model, scheduler=g.scheduler, dtype=g.dtype, vae_dtype=g.vae_dtype, revision=g.revision,
            safety_checker=g.safety_checker, attention=g.attention, devices=self.devices, warm_up=first_size)
        try:
            sizes = tuple(pipe.size(*s) for s in self.settings.sizes) or (pipe.size(),)
        except SettingsError as e:
            raise SettingsError(f"sizes: {e}") from None
        self.settings = self.settings.replace(sizes=sizes)
        self._pipes[g.scheduler] = pipe
        self._params = params
        side = pipe.image_encoder.config.image_size
        blank = np.zeros((1, 3, side, side), np.float32)
        for size in sizes:
            start = time.perf_counter()
            try:
                self.run(Work(size, g.steps, g.guidance, g.scheduler), blank, [0], [0])
            except InsufficientMemoryError as e:
                if e.fits == 0:
                    raise  # not even one picture per device: the message names the size
                # The pipeline speaks of slots; a server is laid out by --batch-per-device.
                raise SettingsError(
                    f"batch_per_device: {self.settings.batch_per_device} pictures per device at {size_text(size)} "
                    f"need {memory.size_text(e.needed)} per device, {memory.size_text(e.available)} free; about "
                    f"{e.fits} per device fit: lower --batch-per-device") from None
            log.info("compiled %s for %d pictures per call on %d %s devices in %.1f s", size_text(size),
                     self.capacity, len(self.devices), pipe.platform, time.perf_counter() - start)
        s = self.settings
        self.batcher = Batcher(self.run, self.capacity, s.max_wait_ms / 1000, s.max_queue)
        self.ready_after = time.time() - self.started
        self.state = "ready"

    def pipeline(self, scheduler: str) -> ImageVariationPipeline:
        """The pipeline for ``scheduler``: the same modules and params, its own scheduler and programs."""
        if scheduler not in self._pipes:
            base = self._pipes[self.settings.generation.scheduler]
            self._pipes[scheduler] = dataclasses.replace(base, scheduler_name=scheduler)
        return self._pipes[scheduler]

    def prepare(self, picture: Image.Image) -> np.ndarray:
        """One uploaded picture as the image encoder's pixel values ``[3, S, S]``."""
        g = self.settings.generation
        return self._pipes[g.scheduler].prepare_inputs([picture], g.preprocessing)[0]

    def run(self, work: Work, pixel_values: np.ndarray, seeds: Sequence[int], indices: Sequence[int],
            ) -> tuple[np.ndarray, np.ndarray | None]:
        """One program call of ``capacity`` slots: picture p varies ``pixel_values[p]`` with the key
        ``fold_in(key(seeds[p]), indices[p])``, as ``imvar-jax generate`` numbers a picture's variations."""
        try:
            out = self.pipeline(work.scheduler).generate(pixel_values, self._params, seed=list(seeds),
                                                         first_index=list(indices), **self._call(work))
        except NonFiniteError as e:
            # The pictures that went NaN or inf come back black, as flagged ones do.
            log.warning("%s", e)
            out = e.output
        flags = None if out.nsfw_content_detected is None else np.asarray(out.nsfw_content_detected, bool)
        return out.images, flags

    def _call(self, work: Work) -> dict[str, Any]:
        """``generate``'s arguments for a program call of ``work``: ``capacity`` slots, one picture per input."""
        g = self.settings.generation
        height, width = work.size
        return dict(num_images_per_prompt=1, slots=self.capacity, num_inference_steps=work.steps,
                    guidance_scale=work.guidance, height=height, width=width, eta=g.eta, preprocessing=g.preprocessing)

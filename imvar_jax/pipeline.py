"""User API: load a checkpoint, generate variations, and run the model pieces in diffusers' layouts."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from . import executables, memory
from .conditioning import check_weights, path_weights
from .errors import NonFiniteError, shown
from .hub import DEFAULT_MODEL
from .loading import open_model
from .models import abstract_params
from .models.clip_vision import CLIPVisionModelWithProjection
from .models.layers import target_platform
from .models.safety_checker import SafetyChecker
from .models.unet import UNet2DConditionModel
from .models.vae import AutoencoderKL, sample_latent
from .parallel import (PicturePlan, Placement, as_key, on_device, picture_keys, picture_plan, replicate,
                       replicated_devices, replicated_shapes, seeded_picture_keys, unreplicate)
from .precision import resolve_dtypes
from .preprocessing import prepare_init_images, prepare_inputs, to_pil
from .sampling import Conditioning, Models, Sampled, SampleOptions, encode_sources, sample
from .schedulers import SD_V1_SCHEDULER_CONFIG, make_scheduler
from .schedulers.common import start_step
from .settings import (MAX_PICTURES_PER_DEVICE, MAX_SIDE, MAX_STEPS, SEED_LIMIT, GenerationSettings, SettingsError,
                       check_value, positive_int)

log = logging.getLogger(__name__)

# Every scheduler's tables are padded to this many loop steps: at most MAX_STEPS steps plus PNDM's
# warm-up calls (9 with Runge-Kutta steps). A new step count then changes values, not shapes, and compiles
# nothing; the loop stops at the real count, so the padding costs no step.
TABLE_STEPS = MAX_STEPS + 24


def _nchw_to_nhwc(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 2, 3, 1))


def _nhwc_to_nchw(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 3, 1, 2))


def _check_attention(attention: Any, platform: str) -> str:
    """Refuse what cannot work on the target devices at load time, not at the first call's tracing."""
    attention = check_value("attention", attention)
    if attention == "cudnn" and platform not in ("gpu", "cuda"):
        raise SettingsError(f"attention: 'cudnn' needs an NVIDIA GPU but the devices are {platform!r}; use 'auto'")
    if attention == "splash" and platform != "tpu":
        log.warning("attention='splash' off a TPU runs the kernel in Pallas interpret mode: correct but very "
                    "slow, meant for testing; 'auto' picks the fast choice for %s", platform)
    return attention


class _Callbacks:
    """Step callbacks of the calls in flight, by id.

    A compiled program is shared by every call with the same shapes, so it cannot hold one
    caller's callback: it passes the traced id of its call to ``dispatch``, which finds that
    call's callback here. Two threads calling one pipeline each see only their own steps.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._active: dict[int, Callable[[int, int, np.ndarray], None]] = {}

    @contextmanager
    def active(self, callback: Callable[[int, int, np.ndarray], None] | None) -> Iterator[int]:
        if callback is None:
            yield 0
            return
        with self._lock:
            call_id = next(self._ids) % 2**31
            self._active[call_id] = callback
        try:
            yield call_id
        finally:
            # Host callbacks may still be queued when the result is ready; let them land first.
            jax.effects_barrier()
            with self._lock:
                del self._active[call_id]

    def dispatch(self, call_id, step, timestep, latents) -> None:
        callback = self._active.get(int(call_id))
        if callback is not None:
            callback(int(step), int(timestep), np.asarray(latents))


_CALLBACKS = _Callbacks()


@dataclass
class ImageVariationOutput:
    """``images``: float32 ``[N*k, H, W, 3]`` in [0, 1] (or PIL images), input-major;
    ``nsfw_content_detected``: one bool per picture, or None without a safety checker.

    ``pictures``: the position ``i*k + j`` of each picture in ``images``. A single process gets
    every picture (``0 .. N*k-1``); in a job over several processes' devices each process gets
    only the pictures its own devices made (None where not recorded: all of them).
    """

    images: Any
    nsfw_content_detected: list[bool] | None
    pictures: list[int] | None = None


@dataclass
class ImageVariationPipeline:
    """Stable Diffusion Image Variations in Flax: the modules plus the checkpoint's configs.

    Params live outside the pipeline (a plain dict with ``"unet"``, ``"vae"``,
    ``"image_encoder"`` and optionally ``"safety_checker"``), so they can be
    replicated, sharded or saved independently. One pipeline may be called from several
    threads at once.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    image_encoder: CLIPVisionModelWithProjection
    safety_checker: SafetyChecker | None = None
    scheduler_config: dict[str, Any] | None = None
    feature_extractor_config: dict[str, Any] | None = None
    dtype: Any = jnp.float32
    scheduler_name: str = "pndm"
    # Called with a line before and after each sampling program is compiled or loaded ("compiling for 512x512 on 8
    # devices ...", "compiled in 41.2 s"): the command line shows where its first minute goes.
    on_compile: Callable[[str], None] | None = field(default=None, repr=False, compare=False)
    _programs: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)
    _compile_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.scheduler = make_scheduler(self.scheduler_name, self.scheduler_config or SD_V1_SCHEDULER_CONFIG)

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.scale_factor

    @property
    def platform(self) -> str:
        """The platform this pipeline's programs are built for (see ``from_configs``)."""
        return target_platform(self.unet.platform)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike = DEFAULT_MODEL, *,
                        scheduler: str = "pndm", dtype: Any = None, vae_dtype: Any = None,
                        revision: str | None = None, safety_checker: bool = True, attention: str = "auto",
                        devices: Sequence[jax.Device] | None = None,
                        on_compile: Callable[[str], None] | None = None,
                        warm_up: "Mapping[str, Any] | Callable[[ImageVariationPipeline], Mapping[str, Any] | None] | None"
                        = None) -> tuple["ImageVariationPipeline", dict[str, Any]]:
        """Load a converted Flax folder, a PyTorch diffusers folder (converted in memory), a hub id or ``"tiny"``.

        A hub id is downloaded and converted once per (revision, dtype) into imvar-jax's cache
        (``imvar_jax.hub``); ``revision`` defaults to the repo's main branch, or to
        ``DEFAULT_REVISION`` for the default model. ``"tiny"`` is a toy random-weight model built
        in-process (``imvar_jax.tiny``; a folder of that name loads as ``"./tiny"``).
        ``scheduler`` is one of ``"pndm"``, ``"ddim"``, ``"lms"``, ``"euler"``, ``"euler-a"``
        (Euler ancestral), ``"dpmpp-2m"`` (DPM-Solver++(2M)), ``"dpmpp-2m-karras"`` (on Karras
        sigmas), configured from the checkpoint's
        scheduler config.

        ``dtype`` (``"float32"``, ``"bfloat16"``, ``"float16"``) is the dtype of params and
        activations; None picks bfloat16 when the target devices are TPUs or GPUs and float32
        on CPUs. ``vae_dtype`` is the VAE's (None: the same); ``"float32"`` keeps decoding out of
        half precision's range limits. ``attention`` is ``"auto"`` (per backend) or one of
        ``"xla"``, ``"cudnn"``, ``"chunked"``, ``"splash"`` (see ``imvar_jax.models.layers``).
        ``devices``: None puts params on the first local device, for ``jit=False`` calls; a device
        list gives them already replicated there (as ``imvar_jax.replicate`` would), each device
        getting its copy straight from host memory, so no device ever holds a second one.
        ``on_compile``: the pipeline's ``on_compile`` (set before ``warm_up`` runs).

        ``warm_up``: the keyword arguments of a ``generate`` call to come (``images`` among them, standing
        for its inputs: see ``warm_up``), or a function that is given the pipeline, made from the configs
        before any weight is read, and returns them (or None). That call's sampling program is then loaded
        from the executable cache, or compiled, on a second thread while the weights load, instead of
        at the first call; its errors are raised here, once the weights have loaded.
        Returns ``(pipeline, params)``.
        """
        scheduler = check_value("scheduler", scheduler)
        safety_checker = check_value("safety_checker", safety_checker)
        if devices is not None:
            placement = Placement.of(devices)

            def put(x):
                return replicate(x, placement.devices)
        else:
            placement = Placement.of(jax.local_devices()[:1])

            def put(x):
                return jax.device_put(x, placement.devices[0])

        attention = _check_attention(attention, placement.platform)
        dtype, vae_dtype = resolve_dtypes(dtype, vae_dtype, placement.platform)
        source = open_model(path, revision=revision, dtype=dtype, vae_dtype=vae_dtype, safety_checker=safety_checker)
        pipe = cls.from_configs(source.configs, dtype=dtype, vae_dtype=vae_dtype, attention=attention,
                                scheduler=scheduler, scheduler_config=source.scheduler_config,
                                feature_extractor_config=source.feature_extractor_config, platform=placement.platform)
        pipe.on_compile = on_compile
        if pipe.safety_checker is None:
            log.warning("The safety checker is disabled: generated pictures are not filtered. Keep it on in "
                        "anything public facing (the Stable Diffusion license asks for it).")
        call = warm_up(pipe) if callable(warm_up) else warm_up
        if call is None:
            return pipe, source.load_params(put)
        if not isinstance(call, Mapping):
            raise ValueError(f"warm_up: expected the keyword arguments of a generate call, got {shown(call)}")
        call = dict(call)
        images = call.pop("images", None)
        shapes = pipe.abstract_params(devices)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="imvar-jax-warm-up") as pool:
            ready = pool.submit(pipe.warm_up, shapes, images, **call)
            start = time.perf_counter()
            params = source.load_params(put)
            loaded = time.perf_counter()
            ready.result()
        if on_compile is not None:
            on_compile(f"weights loaded in {loaded - start:.1f} s; the sampling program was ready "
                       f"{time.perf_counter() - loaded:.1f} s after them")
        return pipe, params

    @classmethod
    def from_configs(cls, configs: dict[str, Any], *, dtype: Any = None, vae_dtype: Any = None,
                     attention: str = "auto", scheduler: str = "pndm", scheduler_config: dict[str, Any] | None = None,
                     feature_extractor_config: dict[str, Any] | None = None,
                     platform: str | None = None) -> "ImageVariationPipeline":
        """The modules for component configs ``{"unet", "vae", "image_encoder"[, "safety_checker"]}``.

        ``dtype``, ``vae_dtype`` and ``attention`` mean what they mean in ``from_pretrained``.
        ``platform`` is the target devices' (``jax.Device.platform``, or ``"cuda"``/``"tpu"`` to
        build programs for ``jax.export`` from another host; default: the first local device's):
        dtype defaults and attention kernels are chosen for it, never for the tracing host.
        """
        platform = platform or jax.local_devices()[0].platform
        attention = _check_attention(attention, platform)
        dtype, vae_dtype = (jnp.dtype(d) for d in resolve_dtypes(dtype, vae_dtype, platform))
        checker = configs.get("safety_checker")
        return cls(
            unet=UNet2DConditionModel(configs["unet"], dtype=dtype, attention_impl=attention, platform=platform),
            # The VAE's one attention is a float32 head 512 wide, outside cuDNN's flash kernel.
            vae=AutoencoderKL(configs["vae"], dtype=vae_dtype,
                              attention_impl="auto" if attention == "cudnn" else attention, platform=platform),
            image_encoder=CLIPVisionModelWithProjection(configs["image_encoder"], dtype=dtype,
                                                        attention_impl=attention, platform=platform),
            safety_checker=(None if checker is None
                            else SafetyChecker(checker, dtype=dtype, attention_impl=attention, platform=platform)),
            scheduler_config=scheduler_config,
            feature_extractor_config=feature_extractor_config,
            dtype=dtype,
            scheduler_name=check_value("scheduler", scheduler),
        )

    def abstract_params(self, devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
        """The params ``from_pretrained(devices=devices)`` returns, as ``jax.ShapeDtypeStruct`` leaves (shapes,
        dtypes and placement; nothing is read or allocated): for ``warm_up`` before the weights exist."""
        shapes = {name: abstract_params(self._module(name).config, self._module(name).dtype)
                  for name in self._components()}
        if devices is not None:
            return replicated_shapes(shapes, Placement.of(devices).devices)
        on = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on), shapes)

    def warm_up(self, params: dict[str, Any], images: Any = None, **kwargs: Any) -> None:
        """Get the sampling program that ``generate(images, params, **kwargs)`` would run, without running it:
        loaded from the executable cache, or compiled (and stored there); the call then finds it ready.

        ``params``: real ones, or ``abstract_params``' shapes, so that the program can be made while the
        weights are still loading (``from_pretrained(warm_up=...)`` does so). ``images`` (or ``image_embeds``
        and the other inputs) stand for the call's: only their number and kind, pictures or embeddings,
        shape the program, so zeros of the right shape will do, and with ``slots`` one input is enough.
        Raises what ``generate`` would raise for the same arguments (a ``TypeError`` for an unknown one).
        """
        call = _GENERATE.bind(self, images, params, **kwargs)
        call.apply_defaults()
        self._generate(*list(call.arguments.values())[1:], frames=None, dry=True)

    def _compiled(self, key: Any, build: Callable[[], Callable[..., Any]]) -> Callable[..., Any]:
        with self._lock:
            if key not in self._programs:
                self._programs[key] = build()
            return self._programs[key]

    def prepare_inputs(self, images: Any, preprocessing: str = "v2",
                       only: Callable[[int], Any] | None = None) -> np.ndarray:
        """Pictures -> pixel values ``[N, 3, S, S]`` for this pipeline's image encoder (see ``imvar_jax.prepare_inputs``,
        also for ``only``), using the checkpoint's feature-extractor config; shard them for ``jit=True`` calls."""
        return prepare_inputs(images, check_value("preprocessing", preprocessing),
                              size=self.image_encoder.config.image_size,
                              feature_extractor_config=self.feature_extractor_config, only=only)

    def encode_image(self, params: dict[str, Any], pixel_values: jax.Array) -> jax.Array:
        """CLIP image embeddings ``[N, 1, D]`` from pixel values ``[N, 3, S, S]`` (CLIPImageProcessor's output)."""

        def run(p, x):
            embeds = self.image_encoder.apply({"params": p}, _nchw_to_nhwc(x.astype(self.dtype)))
            return embeds[:, None, :]  # [N, 1, D]

        return self._compiled("encode_image", lambda: jax.jit(run))(params["image_encoder"], jnp.asarray(pixel_values))

    def image_embeddings(self, images: Any, params: dict[str, Any], preprocessing: str = "v2") -> np.ndarray:
        """CLIP image embeddings ``[N, D]`` float32 of ``images`` (anything ``prepare_inputs`` takes), as the
        sampling program computes them (one picture at a time), for ``generate(image_embeds=...)``.

        ``params`` may be plain or ``replicate``d; the embeddings are computed on one of their devices.
        """
        encoder = params["image_encoder"] if isinstance(params, Mapping) and "image_encoder" in params else None
        if encoder is None:
            raise ValueError("params: expected the pipeline's params, with 'image_encoder'")
        if replicated_devices(params) is not None:
            # One local device's copy: in a multi-process job the stacked array's other rows are not addressable.
            encoder = jax.tree.map(lambda a: min(a.addressable_shards, key=lambda s: s.index[0].start or 0).data[0],
                                   encoder)
        models = Models(self.unet, self.vae, self.image_encoder)
        program = self._compiled("image_embeddings", lambda: jax.jit(
            lambda p, x: encode_sources(models, {"image_encoder": p}, x)))
        return np.asarray(program(encoder, jnp.asarray(self.prepare_inputs(images, preprocessing))))

    def predict_noise(self, params: dict[str, Any], latents: jax.Array, timestep: jax.Array | int,
                      image_embeds: jax.Array) -> jax.Array:
        """UNet noise prediction; ``latents`` and the result are ``[N, C, h, w]`` as in diffusers."""

        def run(p, x, t, ctx):
            out = self.unet.apply({"params": p}, _nchw_to_nhwc(x.astype(self.dtype)), t, ctx.astype(self.dtype))
            return _nhwc_to_nchw(out)

        return self._compiled("predict_noise", lambda: jax.jit(run))(
            params["unet"], jnp.asarray(latents), jnp.asarray(timestep), jnp.asarray(image_embeds))

    def decode_latents(self, params: dict[str, Any], latents: jax.Array) -> jax.Array:
        """Scaled latents ``[N, C, h, w]`` -> images ``[N, H, W, 3]`` float32 in [0, 1]."""
        scale = self.vae.config.scaling_factor

        def run(p, z):
            z = _nchw_to_nhwc(z.astype(jnp.float32) / scale).astype(self.vae.dtype)
            x = self.vae.apply({"params": p}, z, method=AutoencoderKL.decode)
            return jnp.clip(x.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

        return self._compiled("decode_latents", lambda: jax.jit(run))(params["vae"], jnp.asarray(latents))

    def encode_latents(self, params: dict[str, Any], images: jax.Array, key: jax.Array) -> jax.Array:
        """Images ``[N, H, W, 3]`` in [0, 1] -> latents sampled with ``key`` and scaled, ``[N, C, h, w]``."""
        scale = self.vae.config.scaling_factor

        def run(p, x, k):
            x = (x.astype(jnp.float32) * 2 - 1).astype(self.vae.dtype)
            mean, logvar = self.vae.apply({"params": p}, x, method=AutoencoderKL.encode)
            z = sample_latent(mean.astype(jnp.float32), logvar.astype(jnp.float32), k)
            return _nhwc_to_nchw(z * scale)

        return self._compiled("encode_latents", lambda: jax.jit(run))(params["vae"], jnp.asarray(images), key)

    # ------------------------------------------------------------------
    # Placement: every sharded call goes through a Placement's program
    # ------------------------------------------------------------------

    @staticmethod
    def _placed(params: dict[str, Any], devices: Sequence[jax.Device] | None,
                ) -> tuple[Placement, dict[str, Any], bool]:
        """Where a call runs and its params there: ``(placement, params, stacked)``.

        Replicated params say where to run unless ``devices`` does; plain params already on the
        one device asked for are used in place; anything else is replicated for this call.
        """
        on = replicated_devices(params)
        placement = Placement.of(devices or on)
        if on is not None and tuple(on) == placement.devices:
            return placement, params, True
        if on is None and len(placement) == 1 and on_device(params, placement.devices[0]):
            return placement, params, False
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
            # warm_up's shapes: those of the params this call would replicate.
            one = params if on is None else jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), params)
            return placement, replicated_shapes(one, placement.devices), True
        return placement, replicate(params if on is None else unreplicate(params), placement.devices), True

    def check_safety(self, params: dict[str, Any], pixel_values: Any,
                     devices: Sequence[jax.Device] | None = None) -> np.ndarray:
        """The safety checker's flags ``bool[N]`` for CLIP-preprocessed pictures ``[N, 3, S, S]``.

        The N pictures are split evenly over ``devices`` (default: where the params are, as
        ``generate`` places them) and checked there.
        """
        if self.safety_checker is None or "safety_checker" not in params:
            raise ValueError("this pipeline was loaded without a safety checker")
        placement, checker_params, stacked = self._placed({"safety_checker": params["safety_checker"]}, devices)
        if placement.is_multiprocess:
            raise ValueError("devices: check_safety checks pictures on this process's devices "
                             "(jax.local_devices()); generate checks a multi-process job's pictures itself")
        pixel_values = np.asarray(pixel_values, np.float32)
        plan = picture_plan(pixel_values.shape[0], 1, multiple=len(placement))
        return self._check_safety(placement, checker_params, stacked, pixel_values[plan.source])[:plan.count]

    def _check_safety(self, placement: Placement, params: dict[str, Any], stacked: bool,
                      pixel_values: np.ndarray) -> np.ndarray:
        """Flags for the rows of a batch split over ``placement`` that this process holds (``local_slots``);
        ``pixel_values`` is the whole batch, where only those rows need real pictures."""
        def check_safety(p, x):
            _, flags = self.safety_checker.apply({"params": p["safety_checker"]}, _nchw_to_nhwc(x.astype(self.dtype)))
            return flags

        program = self._compiled(("check_safety", placement, stacked),
                                 lambda: placement.program(check_safety, stacked, (True,)))
        return placement.local(program({"safety_checker": params["safety_checker"]}, placement.split(pixel_values)))

    def _sample_program(self, opts: SampleOptions, placement: Placement, stacked: bool):
        """One jitted program per static option set and placement."""
        models = Models(self.unet, self.vae, self.image_encoder)

        def generate(params, sources, weights, negative_weights, init_pixels, key_data, latents, start,
                     guidance_scale, eta, sched_state, every, warmup, call_id):
            cond = Conditioning(sources, weights, negative_weights, init_pixels, start)
            return sample(models, opts, params, cond, jax.random.wrap_key_data(key_data), latents,
                          guidance_scale, eta, sched_state, every, warmup, _CALLBACKS.dispatch, call_id)

        batch_args = (True, True, True, opts.from_image, True, opts.latents_given, False, False, False, False, False,
                      False, False)
        return self._compiled(("sample", opts, placement, stacked),
                              lambda: placement.program(generate, stacked, batch_args))

    def _sample_executable(self, opts: SampleOptions, placement: Placement, params: dict[str, Any], stacked: bool,
                           rows: int, steps: int, latent_shape: tuple[int, int, int],
                           source_shape: tuple[int, ...]) -> Any:
        """The compiled sampling program for ``rows`` inputs per call, compiled once per shape.

        It is compiled from abstract arguments, so its memory can be checked before anything of
        the call's size is allocated; the same executable then runs the call.
        """
        params_key = _signature(params)
        # Not the step count: the tables are padded to TABLE_STEPS, so every count shares one program.
        key = ("sample-exe", opts, placement, stacked, rows, params_key, source_shape)
        with self._lock:
            found = self._programs.get(key)
        if found is not None:
            return found
        with self._compile_lock:  # two threads asking for one new shape compile it once
            found = self._programs.get(key)
            if found is not None:
                return found
            return self._compile_sample(key, opts, placement, params, stacked, rows, steps, latent_shape,
                                        source_shape)

    def _compile_sample(self, key: Any, opts: SampleOptions, placement: Placement, params: dict[str, Any],
                        stacked: bool, rows: int, steps: int, latent_shape: tuple[int, int, int],
                        source_shape: tuple[int, ...]) -> Any:
        per_device = rows * opts.num_images_per_prompt // len(placement)
        c, h, w = latent_shape
        split, whole = placement.batch_sharding, placement.replicated_sharding
        f = self.vae_scale_factor
        n_out = rows * opts.num_images_per_prompt
        state = jax.eval_shape(lambda: self.scheduler.set_timesteps(steps, (per_device, h, w, c),
                                                                    padded_to=TABLE_STEPS))
        scalar = {dtype: jax.ShapeDtypeStruct((), dtype, sharding=whole) for dtype in (jnp.float32, jnp.int32)}

        def rows_of(*shape: int, dtype: Any = jnp.float32) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct((rows, *shape), dtype, sharding=split)

        args = (params, rows_of(opts.sources, *source_shape), rows_of(opts.sources), rows_of(opts.sources),
                rows_of(3, h * f, w * f) if opts.from_image else None,
                jax.ShapeDtypeStruct((n_out, 2), jnp.uint32, sharding=split),
                jax.ShapeDtypeStruct((n_out, c, h, w), jnp.float32, sharding=split) if opts.latents_given else None,
                scalar[jnp.int32], scalar[jnp.float32], scalar[jnp.float32],
                jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=whole), state),
                scalar[jnp.int32], scalar[jnp.int32], scalar[jnp.int32])
        notify = self.on_compile or (lambda line: None)
        pictures = n_out // len(placement)
        what = (f"for {h * f}x{w * f} on {len(placement)} {'device' if len(placement) == 1 else 'devices'} "
                f"({pictures} {'picture' if pictures == 1 else 'pictures'} per device per call)")
        start = time.perf_counter()
        # A program with a host callback holds a Python function, and a multi-process one other hosts' devices:
        # neither can be stored.
        cache = None if opts.with_callback or placement.is_multiprocess else executables.active()
        compiled = None
        if cache is not None:
            disk_key = executables.key_text((Models(self.unet, self.vae, self.image_encoder), opts, stacked,
                                             _signature(args)), placement.devices)
            compiled = cache.load(disk_key, jax.tree.structure((args, {})), jax.tree.structure(Sampled(0, 0, 0)),
                                  placement.devices)
            if compiled is not None:
                notify(f"loaded the compiled program {what} from {cache.folder} in "
                       f"{time.perf_counter() - start:.1f} s")
        if compiled is None:
            notify(f"compiling {what}...")
            lowered = self._sample_program(opts, placement, stacked).lower(*args)
            compiled = lowered.compile() if cache is None else cache.compile(lowered)
            notify(f"compiled in {time.perf_counter() - start:.1f} s")
            if cache is not None:
                cache.store(disk_key, compiled)
        with self._lock:
            self._programs[key] = compiled
        return compiled

    def size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """``(height, width)`` of the output pictures: the model's default where None; checked against the VAE."""
        f = self.vae_scale_factor
        sample_size = self.unet.config.sample_size
        if sample_size is None and (height is None or width is None):
            # diffusers' default config leaves sample_size unset: only the caller can say the size.
            raise SettingsError("size: the UNet config sets no sample_size, so give height and width (--size HxW)")
        default = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        height = default[0] * f if height is None else height
        width = default[1] * f if width is None else width
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0 or v % f:
                raise SettingsError(f"{name}: {shown(v)} is not a positive multiple of {f} "
                                    f"(the VAE's downsampling factor)")
            if v > MAX_SIDE:
                raise SettingsError(f"{name}: expected at most {MAX_SIDE} pixels, got {shown(v)}")
        return int(height), int(width)

    def resolve(self, settings: GenerationSettings, revision: str | None) -> GenerationSettings:
        """``settings`` with what the loaded model decides filled in: dtypes, output size and ``revision``."""
        size = settings.size or (None, None)
        try:
            height, width = self.size(*size)
        except SettingsError as e:
            raise SettingsError(f"size: {e}") from None
        return settings.replace(dtype=jnp.dtype(self.dtype).name, vae_dtype=jnp.dtype(self.vae.dtype).name,
                                size=(height, width), revision=revision)

    # ------------------------------------------------------------------
    # Argument checks: API misuse is a ValueError naming the argument
    # ------------------------------------------------------------------

    def _components(self) -> tuple[str, ...]:
        return ("unet", "vae", "image_encoder") + (() if self.safety_checker is None else ("safety_checker",))

    def _module(self, name: str) -> Any:
        return {"unet": self.unet, "vae": self.vae, "image_encoder": self.image_encoder,
                "safety_checker": self.safety_checker}[name]

    def _shapes(self, name: str) -> dict[str, Any]:
        """Component ``name``'s params tree as float32 shapes (nothing allocated)."""
        return abstract_params(self._module(name).config)

    def _expected_params(self, name: str) -> dict[str, Any]:
        """Component ``name``'s params by key path: their shapes."""
        return {jax.tree_util.keystr(path): leaf.shape
                for path, leaf in jax.tree_util.tree_leaves_with_path(self._shapes(name))}

    def _check_params(self, params: Any, copies: int | None) -> None:
        """``params`` checked against the modules' own trees; ``copies`` is the leading axis of ``replicate``d
        params (None for plain ones). A tree that passed is not walked again."""
        names = self._components()
        if not isinstance(params, Mapping):
            raise ValueError(f"params: expected a dict with {', '.join(map(repr, names))}, got {shown(params)}")
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"params: missing {', '.join(map(repr, missing))} "
                             f"(expected {', '.join(map(repr, names))})")
        signature = (copies, _signature({n: params[n] for n in names}))
        if ("params-ok", signature) in self._programs:
            return
        lead = () if copies is None else (copies,)
        for name in names:
            expected = self._expected_params(name)
            try:
                got = {jax.tree_util.keystr(path): leaf for path, leaf in
                       jax.tree_util.tree_leaves_with_path(params[name])}
            except Exception:
                raise ValueError(f"params[{name!r}]: expected a nested dict of arrays") from None
            absent = sorted(expected.keys() - got.keys())
            extra = sorted(got.keys() - expected.keys())
            if absent or extra:
                what = f"missing {absent[0]}" if absent else f"unexpected {extra[0]}"
                more = len(absent) + len(extra) - 1
                raise ValueError(f"params[{name!r}]: {what}{f' and {more} more differences' if more else ''} "
                                 f"(not params of this pipeline's {name})")
            for where, shape in expected.items():
                leaf = got[where]
                leaf_shape = getattr(leaf, "shape", None)
                dtype = getattr(leaf, "dtype", None)
                if leaf_shape is None or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
                    raise ValueError(f"params[{name!r}]{where}: expected a float array, got {shown(leaf)}")
                if tuple(leaf_shape) != (*lead, *shape):
                    raise ValueError(f"params[{name!r}]{where}: expected shape {(*lead, *shape)}, "
                                     f"got {tuple(leaf_shape)}")
        with self._lock:
            self._programs[("params-ok", signature)] = True

    def _check_call(self, k: Any, steps: Any, guidance: Any, eta: Any, callback: Any, callback_steps: Any,
                    output_type: Any, height: Any, width: Any, seed: Any, seed_name: str,
                    ) -> tuple[int, int, float, float, int, tuple[int, int], int | jax.Array]:
        """The call arguments through the settings' own checks, errors named as the arguments are."""
        if output_type not in ("np", "pil"):
            raise ValueError(f"output_type: expected 'np' or 'pil', got {shown(output_type)}")
        if callback is not None and not callable(callback):
            raise ValueError(f"callback: expected a callable (step, timestep, latents), got {shown(callback)}")
        return (check_value("num_images_per_prompt", k), check_value("steps", steps, "num_inference_steps"),
                check_value("guidance", guidance, "guidance_scale"), check_value("eta", eta),
                positive_int("callback_steps", callback_steps), self.size(height, width), _check_seed(seed, seed_name))

    def _check_latents(self, latents: Any, want_shape: tuple[int, ...], what: str) -> np.ndarray:
        try:
            latents = np.asarray(latents, np.float32)
        except (TypeError, ValueError):
            raise ValueError(f"latents: expected a float array of shape {want_shape} {what}") from None
        if tuple(latents.shape) != want_shape:
            raise ValueError(f"latents: expected shape {want_shape} {what}, got {tuple(latents.shape)}")
        if not np.isfinite(latents).all():
            raise ValueError("latents: contain NaN or infinity")
        return latents

    # ------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------

    def _run(self, placement: Placement, params: dict[str, Any], stacked: bool, k: int, cond: "_Rows",
             inputs: np.ndarray, indices: np.ndarray, latents: np.ndarray | None,
             seed: "int | jax.Array | _InputSeeds", steps: int, guidance: float, eta: float, size: tuple[int, int],
             callback: Callable[..., None] | None, callback_steps: int,
             setting: str, dry: bool = False) -> tuple[np.ndarray, np.ndarray | None, list[str | None]] | None:
        """The sampling program on ``placement`` for the rows of ``cond`` (a multiple of the device count, row r
        holding input ``inputs[r]``), ``k`` pictures each, picture p's noise from ``indices[p]``; then the safety
        check there.

        Returns this process's pictures (the positions ``placement.local_slots(len(rows) * k)``: all of them in
        a single process), their safety flags and, per picture, where it went non-finite (None if it did not);
        such pictures come back black. The program's memory is checked first: ``InsufficientMemoryError``
        names ``setting`` when the call asks for more pictures per device than fit. ``dry``: stop (returning
        None) once the program is there.
        """
        height, width = size
        f = self.vae_scale_factor
        latent_shape = (self.unet.config.in_channels, height // f, width // f)
        rows = len(cond.weights)
        n_out = rows * k
        per_device = n_out // len(placement)
        if per_device > MAX_PICTURES_PER_DEVICE:
            raise SettingsError(f"{setting}: {per_device} pictures per device in one call, more than "
                                f"{MAX_PICTURES_PER_DEVICE}")
        from_image = cond.init_pixels is not None
        try:
            start = start_step(steps, cond.strength) if from_image else 0
        except ValueError as e:
            raise SettingsError(str(e)) from None
        opts = SampleOptions(num_images_per_prompt=k, latent_size=latent_shape[1:], do_cfg=guidance > 1.0,
                             latents_given=latents is not None, with_callback=callback is not None,
                             scheduler=self.scheduler, sources=cond.weights.shape[1], embeds_given=cond.embeds_given,
                             mix=cond.mix, from_image=from_image, padded_tables=True)
        models = {n: params[n] for n in ("unet", "vae", "image_encoder")}
        source_shape = cond.sources.shape[2:]
        executable = self._sample_executable(opts, placement, models, stacked, rows, steps, latent_shape,
                                             source_shape)
        if dry:
            return None
        resident = _bytes_per_device(models, len(placement) if stacked else 1)

        def one_picture() -> int | None:
            # Memory at one picture per device: the second point that says how many fit.
            single = dataclasses.replace(opts, num_images_per_prompt=1)
            probe = self._sample_executable(single, placement, models, stacked, len(placement), steps, latent_shape,
                                            source_shape)
            return memory.needed_bytes(probe, resident)

        # Each process can only see its own devices' memory; one that does not fit stops there.
        memory.check_fits(memory.needed_bytes(executable, resident), per_device, size, placement.local_devices,
                          setting, one_picture)

        try:
            sched_state = self.scheduler.set_timesteps(steps, (per_device, *latent_shape[1:], latent_shape[0]), start,
                                                       padded_to=TABLE_STEPS)
        except ValueError as e:
            raise SettingsError(f"strength: {e}" if start else str(e)) from None
        warmup = int(sched_state.length) - steps
        if isinstance(seed, _InputSeeds):
            keys = seeded_picture_keys(seed.seeds[np.repeat(inputs, k)], indices)
        else:
            keys = picture_keys(seed, indices)
        key_data = np.asarray(jax.random.key_data(keys))  # [B*k, 2]
        with _CALLBACKS.active(callback) as call_id:
            start_arg, *scalars = placement.whole((np.int32(start), np.float32(guidance), np.float32(eta), sched_state,
                                                   np.int32(callback_steps), np.int32(warmup), np.int32(call_id)))
            out = executable(models, placement.split(cond.sources), placement.split(cond.weights),
                             placement.split(cond.negative_weights),
                             None if cond.init_pixels is None else placement.split(cond.init_pixels),
                             placement.split(key_data), None if latents is None else placement.split(latents),
                             start_arg, *scalars)
            # This process's pictures only (all of them in a single process): [local slots, H, W, 3],
            # writable, as flagged ones are blacked out.
            images = np.array(placement.local(out.images))
            step = placement.local(out.nonfinite_step)
            decoded = placement.local(out.decoded_finite)
        timesteps = np.asarray(sched_state.timesteps)
        where = [None if first < 0 and ok else f"step {first} (timestep {timesteps[first]})" if first >= 0
                 else "decoding" for first, ok in zip(step.tolist(), decoded.tolist())]
        bad = np.array([w is not None for w in where], bool)
        images[bad] = 0.0
        flags = None
        if self.safety_checker is not None:
            checked = self._safety_inputs(images)  # [local slots, 3, S, S]
            batch = np.zeros((n_out, *checked.shape[1:]), np.float32)
            batch[placement.local_slots(n_out)] = checked
            flags = self._check_safety(placement, params, stacked, batch)
            images[flags] = 0.0
        return images, flags, where

    @staticmethod
    def _output(images: np.ndarray, flags: np.ndarray | None, where: list[str | None], indices: np.ndarray,
                slots: np.ndarray, count: int, output_type: str) -> ImageVariationOutput:
        """The call's output from this process's pictures, at positions ``slots`` (padding past ``count`` dropped);
        ``NonFiniteError`` carrying it when any of them went non-finite."""
        real = slots < count
        images, slots = images[real], slots[real]
        where = [w for w, r in zip(where, real) if r]
        output = ImageVariationOutput(images=to_pil(images) if output_type == "pil" else images,
                                      nsfw_content_detected=None if flags is None else [bool(x) for x in flags[real]],
                                      pictures=slots.tolist())
        bad = {int(indices[p]): w for p, w in zip(slots, where) if w is not None}
        if bad:
            raise NonFiniteError(_nonfinite_message(bad), pictures=bad, output=output)
        return output

    def __call__(self, pixel_values: Any, params: dict[str, Any], prng_seed: int | jax.Array,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, num_images_per_prompt: int = 1,
                 height: int | None = None, width: int | None = None, latents: Any = None, eta: float = 0.0,
                 jit: bool = False, output_type: str = "np",
                 callback: Callable[[int, int, np.ndarray], None] | None = None, callback_steps: int = 1,
                 first_index: int | Sequence[int] = 0) -> ImageVariationOutput:
        """Generate ``num_images_per_prompt`` variations of each input picture (diffusers-Flax's call).

        ``jit=False``: ``pixel_values`` ``[N, 3, S, S]``, plain ``params`` on one device.
        ``jit=True``: ``pixel_values`` from ``shard`` (``[D, N/D, 3, S, S]``), ``params`` from
        ``replicate``; device d runs its N/D inputs. Picture ``i*k + j`` is variation j of input
        i and its noise comes from ``fold_in(prng_seed, i*k + j)`` in both modes; ``prng_seed``
        is an int in 0..2**32-1 or a PRNG key. ``latents``
        (``[N*k, C, h, w]``, sharded likewise with ``jit=True``) replace the drawn starting noise.
        ``callback(step, timestep, latents)`` is called from inside the compiled loop (once per
        device with that device's latents when ``jit=True``). ``first_index`` shifts the global
        picture indices, so one large job split into calls keeps its pictures: an int numbers this
        call's pictures from there on; one int per input (input-major, as flattened by ``shard``)
        gives each input's first picture, its variation j being that index + j.

        Raises ``InsufficientMemoryError`` (a ``SettingsError``) before sampling when the call
        does not fit the devices' free memory, and ``NonFiniteError`` when a picture went NaN or
        inf (its ``output`` holds every picture, the bad ones black; ``pictures`` says where).

        ``generate`` is the simpler door: it prepares pictures, spreads the N*k pictures (not the
        N inputs) over the devices and pads them itself.
        """
        k, steps, guidance, eta, callback_steps, size, prng_seed = self._check_call(
            num_images_per_prompt, num_inference_steps, guidance_scale, eta, callback, callback_steps, output_type,
            height, width, prng_seed, "prng_seed")
        f = self.vae_scale_factor
        lead = 2 if jit else 1
        s = self.image_encoder.config.image_size
        want = "[D, N/D, 3, S, S] from shard()" if jit else "[N, 3, S, S]"
        try:
            pixel_values = np.asarray(pixel_values, np.float32)
        except (TypeError, ValueError):
            raise ValueError(f"pixel_values: expected a float array {want} with S={s}") from None
        if pixel_values.ndim != lead + 3 or pixel_values.shape[lead:] != (3, s, s):
            raise ValueError(f"pixel_values: expected {want} with S={s}, got shape {tuple(pixel_values.shape)}")
        batch = pixel_values.shape[:lead]  # (N,) or (D, N/D)
        n_in = int(np.prod(batch))
        if n_in == 0:
            raise ValueError(f"pixel_values: expected at least one picture, got shape {tuple(pixel_values.shape)}")
        if not np.isfinite(pixel_values).all():
            raise ValueError("pixel_values: contain NaN or infinity")
        latent_shape = (self.unet.config.in_channels, size[0] // f, size[1] // f)
        if latents is not None:
            latents = self._check_latents(latents, (*batch[:-1], batch[-1] * k, *latent_shape),
                                          f"(N*k, C, H/{f}, W/{f})")
            latents = latents.reshape(n_in * k, *latent_shape)  # [N*k, C, h, w]
        if jit:
            devices = replicated_devices(params) if isinstance(params, Mapping) else None
            if devices is None:
                raise ValueError("params: jit=True expects params from imvar_jax.replicate(params)")
            if batch[0] != len(devices):
                raise ValueError(f"pixel_values: sharded over {batch[0]} devices but params are replicated "
                                 f"on {len(devices)}")
            self._check_params(params, len(devices))
            placement, stacked = Placement.of(devices), True
        else:
            if isinstance(params, Mapping) and replicated_devices(params) is not None:
                raise ValueError("params: jit=False expects plain params; pass jit=True for replicated ones")
            self._check_params(params, None)
            leaves = jax.tree.leaves(params)
            device = next(iter(leaves[0].sharding.device_set)) if leaves and isinstance(leaves[0], jax.Array) \
                else jax.local_devices()[0]
            placement, stacked = Placement.of([device]), False
        plan = picture_plan(n_in, k, first_index)
        images, flags, where = self._run(
            placement, params, stacked, k, _Rows.plain(pixel_values.reshape(n_in, 3, s, s)), np.arange(n_in),
            plan.index, latents, prng_seed, steps, guidance, eta, size, callback, callback_steps,
            "num_images_per_prompt" if k > 1 else "pixel_values")
        return self._output(images, flags, where, plan.index, placement.local_slots(len(plan.index)), plan.count,
                            output_type)

    def _safety_inputs(self, images: np.ndarray) -> np.ndarray:
        """The safety checker sees what diffusers gives it: 8-bit pictures through the CLIP processor."""
        return prepare_inputs(to_pil(images), "clip", feature_extractor_config=self.feature_extractor_config,
                              size=self.safety_checker.config.vision_config.image_size)

    def generate(self, images: Any, params: dict[str, Any], seed: int | jax.Array | Sequence[int] = 0,
                 num_images_per_prompt: int = 1, preprocessing: str = "v2", latents: Any = None,
                 devices: Sequence[jax.Device] | None = None, first_index: int | Sequence[int] = 0,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, height: int | None = None,
                 width: int | None = None, eta: float = 0.0, output_type: str = "np",
                 callback: Callable[[int, int, np.ndarray], None] | None = None, callback_steps: int = 1,
                 slots: int | None = None, *, mix_weights: Sequence[float] | None = None, mix_method: str = "slerp",
                 negative_image: Any = None, image_embeds: Any = None, negative_image_embeds: Any = None,
                 strength: float = 1.0, init_image: Any = None) -> ImageVariationOutput:
        """Prepare ``images``, spread their pictures over the devices, generate, return the flat output.

        ``images``: anything ``prepare_inputs`` accepts (PIL images, arrays, pixel values).
        ``params``: already replicated (``replicate``, or ``from_pretrained(devices=...)``: used
        as they are, on their devices unless ``devices`` says otherwise), or plain: on one device
        that already holds them they are used in place, otherwise replicated for this call, so
        replicate once yourself when calling repeatedly. ``devices`` defaults to the replicated
        params' devices, else every local device. ``seed`` is an int in 0..2**32-1 or a PRNG key, or a
        list of ints, one per input: input i's pictures then come from ``fold_in(key(seed[i]), index)``,
        as if it had been a call of its own with that seed (so one call can serve several requests).
        The other arguments mean what they mean in ``__call__``; pictures equal a ``jit=False``
        call with the same seed, and the errors are the same (``InsufficientMemoryError`` before
        sampling, ``NonFiniteError`` with the whole output after).
        The N*k pictures, not the N inputs, are what is split over the devices (each picture
        keeps its index i*k + j, so its noise), so one input with 8 variations fills 8 devices
        instead of padding every device to 8 pictures. ``slots`` pads every call to that many
        pictures (a multiple of the device count), so calls with fewer inputs reuse one program.

        Creative controls (the weights and ``strength`` are traced: changing them compiles nothing):

        - ``mix_weights``: one weight >= 0 per input; the inputs become one input whose embedding is their
          mix (``mix_method``: ``"slerp"`` on the unit sphere with the norm interpolated, or ``"linear"``, a
          weighted sum; see ``imvar_jax.mix_embeddings``), varied ``num_images_per_prompt`` times.
        - ``negative_image``: a picture whose embedding replaces the zero embedding of classifier-free
          guidance's unconditional half, so the pictures move away from it (``negative_image_embeds``: its
          embedding ``[D]`` instead).
        - ``image_embeds``: CLIP image embeddings ``[N, D]`` (``encode_image``'s, or your own arithmetic) in
          place of ``images`` (pass ``images=None``).
        - ``strength`` in (0, 1]: below 1, start from a picture's own VAE latents noised to that level and run
          the last ``int(strength * num_inference_steps)`` steps (diffusers' img2img rule), keeping its layout.
          The picture is each input's own, or ``init_image``: one picture for every input, or a list of one per
          input (required with ``mix_weights``, interpolation or embeddings); it is resized to the output size.
        """
        return self._generate(images, params, seed, num_images_per_prompt, preprocessing, latents, devices,
                              first_index, num_inference_steps, guidance_scale, height, width, eta, output_type,
                              callback, callback_steps, slots, mix_weights, mix_method, negative_image, image_embeds,
                              negative_image_embeds, strength, init_image, frames=None)

    def interpolate(self, images: Any, params: dict[str, Any], frames: int = 8, seed: int | jax.Array = 0,
                    mix_method: str = "slerp", num_images_per_prompt: int = 1, preprocessing: str = "v2",
                    devices: Sequence[jax.Device] | None = None, first_index: int = 0,
                    num_inference_steps: int = 50, guidance_scale: float = 7.5, height: int | None = None,
                    width: int | None = None, eta: float = 0.0, output_type: str = "np",
                    callback: Callable[[int, int, np.ndarray], None] | None = None, callback_steps: int = 1,
                    slots: int | None = None, *, negative_image: Any = None, image_embeds: Any = None,
                    negative_image_embeds: Any = None, strength: float = 1.0,
                    init_image: Any = None) -> ImageVariationOutput:
        """``frames`` pictures along the path through the embeddings of ``images`` (two or more, in order; or
        ``image_embeds``), evenly spaced, the first and last frames at the first and last picture.

        Every frame starts from the same noise (that of picture ``first_index`` and on), so only the
        conditioning moves and the sweep is smooth; output picture ``f*k + j`` is variation j of frame f.
        ``mix_method`` is how neighbours are blended (``"slerp"`` by default, or ``"linear"``); the other
        arguments are ``generate``'s. A frame's position is a traced weight: every frame runs one program.
        """
        if isinstance(first_index, bool) or not isinstance(first_index, (int, np.integer)):
            raise ValueError(f"first_index: expected an int, got {shown(first_index)}")
        return self._generate(images, params, seed, num_images_per_prompt, preprocessing, None, devices,
                              first_index, num_inference_steps, guidance_scale, height, width, eta, output_type,
                              callback, callback_steps, slots, None, mix_method, negative_image, image_embeds,
                              negative_image_embeds, strength, init_image,
                              frames=check_value("frames", frames))

    def _generate(self, images: Any, params: dict[str, Any], seed: Any, num_images_per_prompt: Any,
                  preprocessing: Any, latents: Any, devices: Any, first_index: Any, num_inference_steps: Any,
                  guidance_scale: Any, height: Any, width: Any, eta: Any, output_type: Any, callback: Any,
                  callback_steps: Any, slots: Any, mix_weights: Any, mix_method: Any, negative_image: Any,
                  image_embeds: Any, negative_image_embeds: Any, strength: Any, init_image: Any, *,
                  frames: int | None, dry: bool = False) -> ImageVariationOutput | None:
        """``generate`` and ``interpolate``: ``frames`` None makes one input per picture, or one mix with
        ``mix_weights``; an int makes that many inputs along the path through the pictures. ``dry``
        (``warm_up``): stop once the sampling program is there."""
        per_input = seed if isinstance(seed, (list, tuple)) else None
        k, steps, guidance, eta, callback_steps, size, seed = self._check_call(
            num_images_per_prompt, num_inference_steps, guidance_scale, eta, callback, callback_steps, output_type,
            height, width, 0 if per_input is not None else seed, "seed")
        if per_input is not None:
            seed = _InputSeeds(np.asarray([check_value("seed", s, f"seed[{i}]") for i, s in enumerate(per_input)],
                                          np.int64))
        mix_method = check_value("mix_method", mix_method)
        strength = check_value("strength", strength)
        if slots is not None:
            slots = positive_int("slots", slots)
        if devices is not None:
            devices = Placement.of(devices).devices  # an empty or odd list is refused here, by name
        embeds = None
        if image_embeds is not None:
            if images is not None:
                raise ValueError("images: give images or image_embeds, not both (pass images=None)")
            embeds = self._check_embeds(image_embeds, "image_embeds")
        elif images is None:
            raise ValueError("images: expected pictures (or image_embeds=...), got None")
        if (negative_image_embeds is not None) + (negative_image is not None) > 1:
            raise ValueError("negative_image: give negative_image or negative_image_embeds, not both")
        if embeds is None and negative_image_embeds is not None:
            raise ValueError("negative_image_embeds: with pictures give negative_image (or pass image_embeds)")
        negative = negative_image is not None or negative_image_embeds is not None
        if strength < 1 and init_image is None and (embeds is not None or mix_weights is not None
                                                    or frames is not None):
            raise ValueError("init_image: strength < 1 with mix_weights, interpolation or image_embeds needs the "
                             "picture to start from (init_image=...)")
        on = replicated_devices(params) if isinstance(params, Mapping) else None
        self._check_params(params, None if on is None else len(on))
        placement, params, stacked = self._placed(params, devices)
        if slots is not None and slots > MAX_PICTURES_PER_DEVICE * len(placement):
            raise SettingsError(f"slots: {slots} is more than {MAX_PICTURES_PER_DEVICE} pictures per device on "
                                f"{len(placement)} devices")
        planned: list[tuple[PicturePlan, _Mixes]] = []

        def needed(n: int) -> np.ndarray:
            # Each process prepares only the sources its own devices' pictures use (all of them in a single process).
            mixes = _Mixes.build(n, mix_weights, frames, negative)
            starts = first_index if frames is None else [first_index] * len(mixes.weights)
            planned.append((picture_plan(len(mixes.weights), k, starts, multiple=len(placement), slots=slots), mixes))
            plan = planned[0][0]
            local = plan.inputs[placement.local_slots(len(plan.source))]
            used = np.unique(mixes.sources[local])
            return used[used < n]  # source n, the negative picture, is prepared on its own

        if embeds is not None:
            needed(len(embeds))
            sources = embeds
            if negative_image is not None:
                # The sources of one call are all embeddings: the negative picture becomes one too.
                negative_pixels = self._one_picture(negative_image, preprocessing)
                negative_embeds = (np.zeros((1, self.image_encoder.config.projection_dim), np.float32) if dry
                                   else self.image_embeddings(negative_pixels, params))
                sources = np.concatenate([sources, negative_embeds])
            elif negative:
                sources = np.concatenate([sources, self._check_embeds(negative_image_embeds, "negative_image_embeds",
                                                                      single=True)])
        else:
            sources = self.prepare_inputs(images, preprocessing, only=needed)
            if negative:
                sources = np.concatenate([sources, self._one_picture(negative_image, preprocessing)])
        ((plan, mixes),) = planned
        n = len(mixes.weights)
        if isinstance(seed, _InputSeeds) and len(seed.seeds) != n:
            raise SettingsError(f"seed: {len(seed.seeds)} seeds for {n} inputs (give one per input, or one int)")
        mine = placement.local_slots(len(plan.source))
        if latents is not None:
            f = self.vae_scale_factor
            latents = self._check_latents(
                latents, (n * k, self.unet.config.in_channels, size[0] // f, size[1] // f),
                f"(inputs x num_images_per_prompt, C, H/{f}, W/{f})")[plan.source]
        init_pixels = None
        if strength < 1:
            local_inputs = plan.inputs[mine]
            side = self.image_encoder.config.image_size
            if isinstance(init_image, (list, tuple)):
                if len(init_image) != n:
                    raise ValueError(f"init_image: {len(init_image)} pictures for {n} inputs (give one picture, "
                                     f"or a list of one per input)")
                init_pixels = prepare_init_images(init_image, *size, clip_side=side, only=lambda _: local_inputs,
                                                  name="init_image")[plan.inputs]
            elif init_image is not None:
                one = prepare_init_images([init_image], *size, clip_side=side, name="init_image")
                init_pixels = np.repeat(one, len(plan.source), axis=0)  # [P, 3, H, W]
            else:
                init_pixels = prepare_init_images(images, *size, clip_side=side,
                                                  only=lambda _: local_inputs)[plan.inputs]
        rows = plan.inputs
        cond = _Rows(sources[mixes.sources[rows]], mixes.weights[rows], mixes.negative_weights[rows],
                     embeds_given=embeds is not None, mix=mix_method, init_pixels=init_pixels, strength=strength)
        setting = "slots" if slots is not None else "num_images_per_prompt" if k > 1 else "images"
        ran = self._run(placement, params, stacked, 1, cond, plan.inputs, plan.index, latents, seed, steps, guidance,
                        eta, size, callback, callback_steps, setting, dry)
        if ran is None:
            return None
        images, flags, where = ran
        return self._output(images, flags, where, plan.index, mine, plan.count, output_type)

    def _one_picture(self, picture: Any, preprocessing: str, name: str = "negative_image") -> np.ndarray:
        """One picture (PIL, an HWC array, or pixel values ``[1, 3, S, S]``) as pixel values ``[1, 3, S, S]``."""
        try:
            pixel_values = self.prepare_inputs([picture] if isinstance(picture, Image.Image) else picture,
                                               preprocessing)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}: {str(e).removeprefix('images: ')}") from None
        if len(pixel_values) != 1:
            raise ValueError(f"{name}: expected one picture, got {len(pixel_values)}")
        return pixel_values

    def _check_embeds(self, embeds: Any, name: str, single: bool = False) -> np.ndarray:
        """CLIP image embeddings as float32 ``[N, D]`` (``[D]`` or ``[N, 1, D]`` accepted; one row if ``single``)."""
        d = self.unet.config.cross_attention_dim
        want = f"[{d}]" if single else f"[N, {d}]"
        try:
            x = np.asarray(embeds, np.float32)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected a float array {want}, got {shown(embeds)}") from None
        if x.ndim == 3 and x.shape[1] == 1:
            x = x[:, 0]
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != d or x.shape[0] == 0 or (single and x.shape[0] != 1):
            raise ValueError(f"{name}: expected a float array {want} (the image encoder's projection), "
                             f"got shape {tuple(np.shape(embeds))}")
        if not np.isfinite(x).all():
            raise ValueError(f"{name}: contain NaN or infinity")
        return x


# warm_up takes generate's arguments, whatever may have been put in its place.
_GENERATE = inspect.signature(ImageVariationPipeline.generate)


@dataclass(frozen=True)
class _Rows:
    """The host inputs of one sampling call, one row per input it runs (``sampling.Conditioning``'s arrays)."""

    sources: np.ndarray  # [R, M, 3, S, S] float32 pixel values, or [R, M, D] embeddings
    weights: np.ndarray  # [R, M] float32
    negative_weights: np.ndarray  # [R, M] float32
    embeds_given: bool = False
    mix: str = "linear"
    init_pixels: np.ndarray | None = None  # [R, 3, H, W] in [-1, 1]: img2img's starting pictures
    strength: float = 1.0

    @classmethod
    def plain(cls, pixel_values: np.ndarray) -> "_Rows":
        """Each row varies its own picture ``[R, 3, S, S]``, as diffusers' pipeline does."""
        ones = np.ones((len(pixel_values), 1), np.float32)
        return cls(pixel_values[:, None], ones, np.zeros_like(ones))


@dataclass(frozen=True)
class _Mixes:
    """Which sources each input of a ``generate`` call mixes, and with what weights (host tables)."""

    sources: np.ndarray  # [L, M] int: rows of the source list (the pictures, then the negative one)
    weights: np.ndarray  # [L, M] float32
    negative_weights: np.ndarray  # [L, M] float32

    @classmethod
    def build(cls, n: int, mix_weights: Any, frames: int | None, negative: bool) -> "_Mixes":
        """For ``n`` pictures: one input each, or one mix of them all (``mix_weights``), or ``frames`` inputs
        along their path; with a ``negative`` picture (source ``n``) as every input's unconditional half."""
        if frames is not None:
            weights = path_weights(n, frames)  # [F, n]
            sources = np.broadcast_to(np.arange(n), weights.shape)
        elif mix_weights is not None:
            weights = check_weights(mix_weights, n)[None]  # [1, n]
            sources = np.arange(n)[None]
        else:
            weights = np.ones((n, 1), np.float32)
            sources = np.arange(n)[:, None]
        negative_weights = np.zeros_like(weights)
        if negative:
            sources = np.concatenate([sources, np.full((len(weights), 1), n)], axis=1)
            weights = np.concatenate([weights, np.zeros((len(weights), 1), np.float32)], axis=1)
            negative_weights = np.concatenate([negative_weights, np.ones((len(weights), 1), np.float32)], axis=1)
        return cls(np.asarray(sources), weights, negative_weights)


@dataclass(frozen=True)
class _InputSeeds:
    """One int seed per input of a ``generate`` call."""

    seeds: np.ndarray  # [N] int64


def _check_seed(seed: Any, name: str) -> int | jax.Array:
    """An int seed in the settings' range (the CLI's check), or a PRNG key as ``as_key`` takes it."""
    if isinstance(seed, (jax.Array, np.ndarray)) and (_is_key(seed) or seed.dtype == np.uint32 and seed.shape == (2,)):
        as_key(seed, name)
        return seed
    try:
        return check_value("seed", seed, name)
    except SettingsError:
        raise SettingsError(f"{name}: expected an integer in 0..{SEED_LIMIT - 1} or a PRNG key, "
                            f"got {shown(seed)}") from None


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _signature(tree: Any) -> tuple[Any, ...]:
    """What a compiled program depends on in ``tree``: its structure and each leaf's shape, dtype and placement."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((getattr(x, "shape", None), str(getattr(x, "dtype", type(x))), getattr(x, "sharding", None))
                          for x in leaves)


def _bytes_per_device(tree: Any, copies: int) -> int:
    """Bytes of ``tree``'s device arrays on each of ``copies`` devices (``replicate``d trees hold one copy per
    device); host arrays are not resident, the call transfers them."""
    return sum(x.nbytes for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)) // copies


def _nonfinite_message(bad: dict[int, str]) -> str:
    """One line: which pictures went NaN or inf and where, grouped by where."""
    by_place: dict[str, list[int]] = {}
    for index, where in sorted(bad.items()):
        by_place.setdefault(where, []).append(index)
    parts = []
    for where, indices in by_place.items():
        listed = ", ".join(map(str, indices[:8])) + (f" and {len(indices) - 8} more" if len(indices) > 8 else "")
        parts.append(f"{'picture' if len(indices) == 1 else 'pictures'} {listed} at {where}")
    return (f"sampling produced non-finite values (NaN or inf): {'; '.join(parts)}; a numerical overflow in the "
            f"model, not a fault of the input pictures (a float32 dtype or a smaller guidance_scale may help)")

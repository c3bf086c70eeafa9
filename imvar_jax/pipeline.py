"""User API: load a checkpoint, generate variations, and run the model pieces in diffusers' layouts."""

from __future__ import annotations

import itertools
import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .hub import DEFAULT_MODEL
from .loading import load_model
from .models.clip_vision import CLIPVisionModelWithProjection
from .models.safety_checker import SafetyChecker
from .models.unet import UNet2DConditionModel
from .models.vae import AutoencoderKL, sample_latent
from .parallel import Placement, on_device, picture_keys, picture_plan, replicate, replicated_devices, unreplicate
from .precision import resolve_dtypes
from .preprocessing import prepare_inputs, to_pil
from .sampling import Models, SampleOptions, sample
from .schedulers import SD_V1_SCHEDULER_CONFIG, make_scheduler
from .settings import GenerationSettings, SettingsError, check_value, positive_int

log = logging.getLogger(__name__)


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
    ``nsfw_content_detected``: one bool per picture, or None without a safety checker."""

    images: Any
    nsfw_content_detected: list[bool] | None


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
    _programs: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.scheduler = make_scheduler(self.scheduler_name, self.scheduler_config or SD_V1_SCHEDULER_CONFIG)

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.scale_factor

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike = DEFAULT_MODEL, *,
                        scheduler: str = "pndm", dtype: Any = None, vae_dtype: Any = None,
                        revision: str | None = None, safety_checker: bool = True, attention: str = "auto",
                        devices: Sequence[jax.Device] | None = None,
                        ) -> tuple["ImageVariationPipeline", dict[str, Any]]:
        """Load a converted Flax folder, a PyTorch diffusers folder (converted in memory), a hub id or ``"tiny"``.

        A hub id is downloaded and converted once per (revision, dtype) into imvar-jax's cache
        (``imvar_jax.hub``); ``revision`` defaults to the repo's main branch, or to
        ``DEFAULT_REVISION`` for the default model. ``"tiny"`` is a toy random-weight model built
        in-process (``imvar_jax.tiny``; a folder of that name loads as ``"./tiny"``).
        ``scheduler`` is one of ``"pndm"``, ``"ddim"``, ``"lms"``, configured from the checkpoint's
        scheduler config.

        ``dtype`` (``"float32"``, ``"bfloat16"``, ``"float16"``) is the dtype of params and
        activations; None picks bfloat16 when the target devices are TPUs or GPUs and float32
        on CPUs. ``vae_dtype`` is the VAE's (None: the same); ``"float32"`` keeps decoding out of
        half precision's range limits. ``attention`` is ``"auto"`` (per backend) or one of
        ``"xla"``, ``"cudnn"``, ``"chunked"``, ``"splash"`` (see ``imvar_jax.models.layers``).
        ``devices``: None puts params on the first local device, for ``jit=False`` calls; a device
        list gives them already replicated there (as ``imvar_jax.replicate`` would), each device
        getting its copy straight from host memory, so no device ever holds a second one.
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
        loaded = load_model(path, revision=revision, dtype=dtype, vae_dtype=vae_dtype, safety_checker=safety_checker,
                            put=put)
        pipe = cls.from_configs(loaded.configs, dtype=dtype, vae_dtype=vae_dtype, attention=attention,
                                scheduler=scheduler, scheduler_config=loaded.scheduler_config,
                                feature_extractor_config=loaded.feature_extractor_config, platform=placement.platform)
        if pipe.safety_checker is None:
            log.warning("The safety checker is disabled: generated pictures are not filtered. Keep it on in "
                        "anything public facing (the Stable Diffusion license asks for it).")
        return pipe, loaded.params

    @classmethod
    def from_configs(cls, configs: dict[str, Any], *, dtype: Any = None, vae_dtype: Any = None,
                     attention: str = "auto", scheduler: str = "pndm", scheduler_config: dict[str, Any] | None = None,
                     feature_extractor_config: dict[str, Any] | None = None,
                     platform: str | None = None) -> "ImageVariationPipeline":
        """The modules for component configs ``{"unet", "vae", "image_encoder"[, "safety_checker"]}``.

        ``dtype``, ``vae_dtype`` and ``attention`` mean what they mean in ``from_pretrained``;
        ``platform`` is the target devices' (default: the first local device's).
        """
        platform = platform or jax.local_devices()[0].platform
        attention = _check_attention(attention, platform)
        dtype, vae_dtype = (jnp.dtype(d) for d in resolve_dtypes(dtype, vae_dtype, platform))
        checker = configs.get("safety_checker")
        return cls(
            unet=UNet2DConditionModel(configs["unet"], dtype=dtype, attention_impl=attention),
            # The VAE's one attention is a float32 head 512 wide, outside cuDNN's flash kernel.
            vae=AutoencoderKL(configs["vae"], dtype=vae_dtype,
                              attention_impl="auto" if attention == "cudnn" else attention),
            image_encoder=CLIPVisionModelWithProjection(configs["image_encoder"], dtype=dtype,
                                                        attention_impl=attention),
            safety_checker=(None if checker is None
                            else SafetyChecker(checker, dtype=dtype, attention_impl=attention)),
            scheduler_config=scheduler_config,
            feature_extractor_config=feature_extractor_config,
            dtype=dtype,
            scheduler_name=check_value("scheduler", scheduler),
        )

    def _compiled(self, key: Any, build: Callable[[], Callable[..., Any]]) -> Callable[..., Any]:
        with self._lock:
            if key not in self._programs:
                self._programs[key] = build()
            return self._programs[key]

    def prepare_inputs(self, images: Any, preprocessing: str = "v2") -> np.ndarray:
        """Pictures -> pixel values ``[N, 3, S, S]`` for this pipeline's image encoder (see ``imvar_jax.prepare_inputs``),
        using the checkpoint's feature-extractor config; shard them for ``jit=True`` calls."""
        return prepare_inputs(images, check_value("preprocessing", preprocessing),
                              size=self.image_encoder.config.image_size,
                              feature_extractor_config=self.feature_extractor_config)

    def encode_image(self, params: dict[str, Any], pixel_values: jax.Array) -> jax.Array:
        """CLIP image embeddings ``[N, 1, D]`` from pixel values ``[N, 3, S, S]`` (CLIPImageProcessor's output)."""

        def run(p, x):
            embeds = self.image_encoder.apply({"params": p}, _nchw_to_nhwc(x.astype(self.dtype)))
            return embeds[:, None, :]  # [N, 1, D]

        return self._compiled("encode_image", lambda: jax.jit(run))(params["image_encoder"], jnp.asarray(pixel_values))

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
        return self._check_safety(placement, checker_params, stacked, np.asarray(pixel_values, np.float32))

    def _check_safety(self, placement: Placement, params: dict[str, Any], stacked: bool,
                      pixel_values: np.ndarray) -> np.ndarray:
        def check_safety(p, x):
            _, flags = self.safety_checker.apply({"params": p["safety_checker"]}, _nchw_to_nhwc(x.astype(self.dtype)))
            return flags

        plan = picture_plan(pixel_values.shape[0], 1, multiple=len(placement))
        program = self._compiled(("check_safety", placement, stacked),
                                 lambda: placement.program(check_safety, stacked, (True,)))
        flags = program({"safety_checker": params["safety_checker"]}, placement.split(pixel_values[plan.source]))
        return np.asarray(flags)[:plan.count]

    def _sample_program(self, opts: SampleOptions, placement: Placement, stacked: bool):
        """One compiled program per static option set and placement; each keeps its own shape cache."""
        models = Models(self.unet, self.vae, self.image_encoder)

        def generate(params, pixel_values, key_data, latents, guidance_scale, eta, sched_state, every, warmup,
                     call_id):
            return sample(models, opts, params, pixel_values, jax.random.wrap_key_data(key_data), latents,
                          guidance_scale, eta, sched_state, every, warmup, _CALLBACKS.dispatch, call_id)

        batch_args = (True, True, opts.latents_given, False, False, False, False, False, False)
        return self._compiled(("sample", opts, placement, stacked),
                              lambda: placement.program(generate, stacked, batch_args))

    def size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """``(height, width)`` of the output pictures: the model's default where None; checked against the VAE."""
        f = self.vae_scale_factor
        sample_size = self.unet.config.sample_size
        default = sample_size if isinstance(sample_size, int) else sample_size[0]
        height = default * f if height is None else height
        width = default * f if width is None else width
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0 or v % f:
                raise SettingsError(f"{name}: {v!r} is not a positive multiple of {f} (the VAE's downsampling factor)")
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

    def _run(self, placement: Placement, params: dict[str, Any], stacked: bool, k: int, pixel_values: Any,
             indices: np.ndarray, latents: Any, seed: int | jax.Array, steps: int, guidance: float, eta: float,
             size: tuple[int, int], callback: Callable[..., None] | None, callback_steps: int,
             ) -> tuple[np.ndarray, np.ndarray | None]:
        """The sampling program on ``placement``: ``pixel_values`` ``[B, 3, S, S]`` (B a multiple of the device
        count), ``k`` pictures each, picture p's noise from ``indices[p]``; then the safety check there."""
        height, width = size
        f = self.vae_scale_factor
        latent_shape = (self.unet.config.in_channels, height // f, width // f)
        n_out = pixel_values.shape[0] * k
        per_device = n_out // len(placement)
        opts = SampleOptions(num_images_per_prompt=k, latent_size=latent_shape[1:], do_cfg=guidance > 1.0,
                             latents_given=latents is not None, with_callback=callback is not None,
                             scheduler=self.scheduler)
        sched_state = self.scheduler.set_timesteps(steps, (per_device, *latent_shape[1:], latent_shape[0]))
        warmup = sched_state.timesteps.shape[0] - steps
        key_data = np.asarray(jax.random.key_data(picture_keys(seed, indices)))  # [B*k, 2]
        program = self._sample_program(opts, placement, stacked)
        with _CALLBACKS.active(callback) as call_id:
            images = program(params, placement.split(pixel_values), placement.split(key_data),
                             None if latents is None else placement.split(latents), jnp.float32(guidance),
                             jnp.float32(eta), sched_state, jnp.int32(callback_steps), jnp.int32(warmup),
                             jnp.int32(call_id))
            images = np.array(images)  # [B*k, H, W, 3], writable: flagged ones are blacked out
        flags = None
        if self.safety_checker is not None and "safety_checker" in params:
            flags = self._check_safety(placement, params, stacked, self._safety_inputs(images))
            images[flags] = 0.0
        return images, flags

    def _check_call(self, k: Any, steps: Any, guidance: Any, eta: Any, callback_steps: Any, output_type: Any,
                    height: Any, width: Any) -> tuple[int, int, float, float, int, tuple[int, int]]:
        """The call arguments through the settings' own checks, errors named as the arguments are."""
        if output_type not in ("np", "pil"):
            raise ValueError(f"output_type: expected 'np' or 'pil', got {output_type!r}")
        return (check_value("num_images_per_prompt", k), check_value("steps", steps, "num_inference_steps"),
                check_value("guidance", guidance, "guidance_scale"), check_value("eta", eta),
                positive_int("callback_steps", callback_steps), self.size(height, width))

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
        i and its noise comes from ``fold_in(prng_seed, i*k + j)`` in both modes. ``latents``
        (``[N*k, C, h, w]``, sharded likewise with ``jit=True``) replace the drawn starting noise.
        ``callback(step, timestep, latents)`` is called from inside the compiled loop (once per
        device with that device's latents when ``jit=True``). ``first_index`` shifts the global
        picture indices, so one large job split into calls keeps its pictures: an int numbers this
        call's pictures from there on; one int per input (input-major, as flattened by ``shard``)
        gives each input's first picture, its variation j being that index + j.

        ``generate`` is the simpler door: it prepares pictures, spreads the N*k pictures (not the
        N inputs) over the devices and pads them itself.
        """
        k, steps, guidance, eta, callback_steps, size = self._check_call(
            num_images_per_prompt, num_inference_steps, guidance_scale, eta, callback_steps, output_type, height, width)
        f = self.vae_scale_factor
        lead = 2 if jit else 1
        s = self.image_encoder.config.image_size
        pixel_values = np.asarray(pixel_values, np.float32)
        if pixel_values.ndim != lead + 3 or pixel_values.shape[lead:] != (3, s, s):
            want = "[D, N/D, 3, S, S] from shard()" if jit else "[N, 3, S, S]"
            raise ValueError(f"pixel_values: expected {want} with S={s}, got shape {tuple(pixel_values.shape)}")
        batch = pixel_values.shape[:lead]  # (N,) or (D, N/D)
        n_in = int(np.prod(batch))
        latent_shape = (self.unet.config.in_channels, size[0] // f, size[1] // f)
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            want_shape = (*batch[:-1], batch[-1] * k, *latent_shape)
            if tuple(latents.shape) != want_shape:
                raise ValueError(f"latents: expected shape {want_shape} (N*k, C, H/{f}, W/{f}), "
                                 f"got {tuple(latents.shape)}")
            latents = latents.reshape(n_in * k, *latent_shape)  # [N*k, C, h, w]
        if jit:
            devices = replicated_devices(params)
            if devices is None:
                raise ValueError("params: jit=True expects params from imvar_jax.replicate(params)")
            if batch[0] != len(devices):
                raise ValueError(f"pixel_values: sharded over {batch[0]} devices but params are replicated "
                                 f"on {len(devices)}")
            placement, stacked = Placement.of(devices), True
        else:
            if replicated_devices(params) is not None:
                raise ValueError("params: jit=False expects plain params; pass jit=True for replicated ones")
            leaves = jax.tree.leaves(params)
            device = next(iter(leaves[0].sharding.device_set)) if leaves and isinstance(leaves[0], jax.Array) \
                else jax.local_devices()[0]
            placement, stacked = Placement.of([device]), False
        plan = picture_plan(n_in, k, first_index)
        images, flags = self._run(placement, params, stacked, k, pixel_values.reshape(n_in, 3, s, s), plan.index,
                                  latents, prng_seed, steps, guidance, eta, size, callback, callback_steps)
        return ImageVariationOutput(images=to_pil(images) if output_type == "pil" else images,
                                    nsfw_content_detected=None if flags is None else [bool(x) for x in flags])

    def _safety_inputs(self, images: np.ndarray) -> np.ndarray:
        """The safety checker sees what diffusers gives it: 8-bit pictures through the CLIP processor."""
        return prepare_inputs(to_pil(images), "clip", feature_extractor_config=self.feature_extractor_config,
                              size=self.safety_checker.config.vision_config.image_size)

    def generate(self, images: Any, params: dict[str, Any], seed: int | jax.Array = 0,
                 num_images_per_prompt: int = 1, preprocessing: str = "v2", latents: Any = None,
                 devices: Sequence[jax.Device] | None = None, first_index: int | Sequence[int] = 0,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, height: int | None = None,
                 width: int | None = None, eta: float = 0.0, output_type: str = "np",
                 callback: Callable[[int, int, np.ndarray], None] | None = None, callback_steps: int = 1,
                 slots: int | None = None) -> ImageVariationOutput:
        """Prepare ``images``, spread their pictures over the devices, generate, return the flat output.

        ``images``: anything ``prepare_inputs`` accepts (PIL images, arrays, pixel values).
        ``params``: already replicated (``replicate``, or ``from_pretrained(devices=...)``: used
        as they are, on their devices unless ``devices`` says otherwise), or plain: on one device
        that already holds them they are used in place, otherwise replicated for this call, so
        replicate once yourself when calling repeatedly. ``devices`` defaults to the replicated
        params' devices, else every local device. The other arguments mean what they mean in
        ``__call__``; pictures equal a ``jit=False`` call with the same seed.
        The N*k pictures, not the N inputs, are what is split over the devices (each picture
        keeps its index i*k + j, so its noise), so one input with 8 variations fills 8 devices
        instead of padding every device to 8 pictures. ``slots`` pads every call to that many
        pictures (a multiple of the device count), so calls with fewer inputs reuse one program.
        """
        k, steps, guidance, eta, callback_steps, size = self._check_call(
            num_images_per_prompt, num_inference_steps, guidance_scale, eta, callback_steps, output_type, height, width)
        placement, params, stacked = self._placed(params, devices)
        pixel_values = self.prepare_inputs(images, preprocessing)
        n = pixel_values.shape[0]
        plan = picture_plan(n, k, first_index, multiple=len(placement), slots=slots)
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.shape[0] != n * k:
                raise ValueError(f"latents: expected {n * k} (inputs x num_images_per_prompt), got {latents.shape[0]}")
            latents = latents[plan.source]
        images, flags = self._run(placement, params, stacked, 1, pixel_values[plan.inputs], plan.index, latents,
                                  seed, steps, guidance, eta, size, callback, callback_steps)
        images = images[:plan.count]
        return ImageVariationOutput(images=to_pil(images) if output_type == "pil" else images,
                                    nsfw_content_detected=None if flags is None else [bool(x) for x in flags[:plan.count]])

"""User API: load a checkpoint, generate variations, and run the model pieces in diffusers' layouts."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .convert.checkpoint import is_converted, iter_torch_components, load_converted
from .hub import DEFAULT_MODEL, TINY_MODEL, resolve_model
from .models.clip_vision import CLIPVisionModelWithProjection
from .models.layers import ATTENTION_IMPLS
from .models.safety_checker import SafetyChecker
from .models.unet import UNet2DConditionModel
from .models.vae import AutoencoderKL, sample_latent
from .parallel import image_keys, on_device, pad_batch, replicate, replicated_devices, shard, unreplicate
from .precision import resolve_dtypes
from .preprocessing import prepare_inputs, to_pil
from .sampling import Models, SampleOptions, sample
from .schedulers import SCHEDULERS, make_scheduler

log = logging.getLogger(__name__)


def _nchw_to_nhwc(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 2, 3, 1))


def _nhwc_to_nchw(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 3, 1, 2))


def _read_optional_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _move_to_devices(tree: dict[str, Any], put: Callable[[Any], jax.Array]) -> dict[str, Any]:
    """Put a nested dict of host arrays on devices leaf by leaf, emptying ``tree`` as it goes.

    Each host array is dropped as soon as its device copy exists, so loading never holds a
    whole second copy of a component (on a CPU backend the "device" copy is host memory too).
    """
    out = {}
    for key in list(tree):
        value = tree.pop(key)
        out[key] = _move_to_devices(value, put) if isinstance(value, dict) else jax.block_until_ready(put(value))
        del value
    return out


def _check_attention(attention: Any) -> None:
    """Refuse what cannot work here at load time, not at the first call's tracing."""
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"attention: unknown {attention!r} (choose one of {', '.join(ATTENTION_IMPLS)})")
    backend = jax.default_backend()
    if attention == "cudnn" and backend not in ("gpu", "cuda"):
        raise ValueError(f"attention: 'cudnn' needs an NVIDIA GPU but JAX's backend is {backend!r}; use 'auto'")
    if attention == "splash" and backend != "tpu":
        log.warning("attention='splash' off a TPU runs the kernel in Pallas interpret mode: correct but very "
                    "slow, meant for testing; 'auto' picks the fast choice for %s", backend)


# The checkpoint's own scheduler, for folders that lack scheduler/scheduler_config.json.
SD_V1_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False,
}


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
    replicated, sharded or saved independently.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    image_encoder: CLIPVisionModelWithProjection
    safety_checker: SafetyChecker | None = None
    scheduler_config: dict[str, Any] | None = None
    feature_extractor_config: dict[str, Any] | None = None
    dtype: Any = jnp.float32
    scheduler_name: str = "pndm"
    _jitted: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    _callback: Callable[..., None] | None = field(default=None, init=False, repr=False, compare=False)

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
        activations; None picks bfloat16 on TPU and GPU and float32 on CPU. ``vae_dtype`` is the
        VAE's (None: the same); ``"float32"`` keeps decoding out of half precision's range limits.
        ``attention`` is ``"auto"`` (per backend) or one of ``"xla"``, ``"cudnn"``, ``"chunked"``,
        ``"splash"`` (see ``imvar_jax.models.layers``).
        ``devices``: None puts params on the first local device, for ``jit=False`` calls; a device
        list gives them already replicated there (as ``imvar_jax.replicate`` would), each device
        getting its copy straight from host memory, so no device ever holds a second one.
        Returns ``(pipeline, params)``.
        """
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler: unknown {scheduler!r} (choose one of {', '.join(SCHEDULERS)})")
        _check_attention(attention)
        dtype, vae_dtype = resolve_dtypes(dtype, vae_dtype)
        first = jax.local_devices()[0]
        put = (lambda x: replicate(x, devices)) if devices is not None else (lambda x: jax.device_put(x, first))

        def place(tree: dict[str, Any]) -> dict[str, Any]:
            return _move_to_devices(tree, put)

        if str(path) == TINY_MODEL:
            if revision is not None:
                raise ValueError(f"revision: the built-in {TINY_MODEL!r} model has no revisions, got {revision!r}")
            # Imported here: imvar_jax.tiny builds on this module.
            from .tiny import tiny_pipeline

            pipe, params = tiny_pipeline(scheduler=scheduler, dtype=dtype, vae_dtype=vae_dtype,
                                         safety_checker=safety_checker, attention=attention, place=place)
        else:
            root = resolve_model(path, revision, dtype)
            loader = load_converted if is_converted(root) else iter_torch_components
            configs: dict[str, Any] = {}
            params = {}
            for name, config, p in loader(root, dtype, include_safety_checker=safety_checker,
                                          component_dtypes={"vae": vae_dtype}):
                configs[name] = config
                params[name] = place(p)
            pipe = cls.from_configs(
                configs, dtype=dtype, vae_dtype=vae_dtype, attention=attention, scheduler=scheduler,
                scheduler_config=_read_optional_json(root / "scheduler" / "scheduler_config.json"),
                feature_extractor_config=_read_optional_json(root / "feature_extractor" / "preprocessor_config.json"))
        if pipe.safety_checker is None:
            log.warning("The safety checker is disabled: generated pictures are not filtered. Keep it on in "
                        "anything public facing (the Stable Diffusion license asks for it).")
        return pipe, params

    @classmethod
    def from_configs(cls, configs: dict[str, Any], *, dtype: Any = None, vae_dtype: Any = None,
                     attention: str = "auto", scheduler: str = "pndm", scheduler_config: dict[str, Any] | None = None,
                     feature_extractor_config: dict[str, Any] | None = None) -> "ImageVariationPipeline":
        """The modules for component configs ``{"unet", "vae", "image_encoder"[, "safety_checker"]}``.

        ``dtype``, ``vae_dtype`` and ``attention`` mean what they mean in ``from_pretrained``.
        """
        _check_attention(attention)
        dtype, vae_dtype = (jnp.dtype(d) for d in resolve_dtypes(dtype, vae_dtype))
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
            scheduler_name=scheduler,
        )

    def _jit(self, name: str, fn):
        if name not in self._jitted:
            self._jitted[name] = jax.jit(fn)
        return self._jitted[name]

    def encode_image(self, params: dict[str, Any], pixel_values: jax.Array) -> jax.Array:
        """CLIP image embeddings ``[N, 1, D]`` from pixel values ``[N, 3, S, S]`` (CLIPImageProcessor's output)."""

        def run(p, x):
            embeds = self.image_encoder.apply({"params": p}, _nchw_to_nhwc(x.astype(self.dtype)))
            return embeds[:, None, :]  # [N, 1, D]

        return self._jit("encode_image", run)(params["image_encoder"], jnp.asarray(pixel_values))

    def predict_noise(self, params: dict[str, Any], latents: jax.Array, timestep: jax.Array | int,
                      image_embeds: jax.Array) -> jax.Array:
        """UNet noise prediction; ``latents`` and the result are ``[N, C, h, w]`` as in diffusers."""

        def run(p, x, t, ctx):
            out = self.unet.apply({"params": p}, _nchw_to_nhwc(x.astype(self.dtype)), t, ctx.astype(self.dtype))
            return _nhwc_to_nchw(out)

        return self._jit("predict_noise", run)(params["unet"], jnp.asarray(latents), jnp.asarray(timestep),
                                               jnp.asarray(image_embeds))

    def decode_latents(self, params: dict[str, Any], latents: jax.Array) -> jax.Array:
        """Scaled latents ``[N, C, h, w]`` -> images ``[N, H, W, 3]`` float32 in [0, 1]."""
        scale = self.vae.config.scaling_factor

        def run(p, z):
            z = _nchw_to_nhwc(z.astype(jnp.float32) / scale).astype(self.vae.dtype)
            x = self.vae.apply({"params": p}, z, method=AutoencoderKL.decode)
            return jnp.clip(x.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

        return self._jit("decode_latents", run)(params["vae"], jnp.asarray(latents))

    def encode_latents(self, params: dict[str, Any], images: jax.Array, key: jax.Array) -> jax.Array:
        """Images ``[N, H, W, 3]`` in [0, 1] -> latents sampled with ``key`` and scaled, ``[N, C, h, w]``."""
        scale = self.vae.config.scaling_factor

        def run(p, x, k):
            x = (x.astype(jnp.float32) * 2 - 1).astype(self.vae.dtype)
            mean, logvar = self.vae.apply({"params": p}, x, method=AutoencoderKL.encode)
            z = sample_latent(mean.astype(jnp.float32), logvar.astype(jnp.float32), k)
            return _nhwc_to_nchw(z * scale)

        return self._jit("encode_latents", run)(params["vae"], jnp.asarray(images), key)

    def check_safety(self, params: dict[str, Any], pixel_values: Any,
                     devices: tuple[jax.Device, ...] | None = None) -> np.ndarray:
        """The safety checker's flags ``bool[N]`` for CLIP-preprocessed pictures ``[N, 3, S, S]``.

        With ``devices`` (params from ``replicate`` over them), the N pictures are split
        evenly over those devices and checked there.
        """
        if self.safety_checker is None or "safety_checker" not in params:
            raise ValueError("this pipeline was loaded without a safety checker")

        def run(p, x):
            _, flags = self.safety_checker.apply({"params": p}, _nchw_to_nhwc(x.astype(self.dtype)))
            return flags

        if devices is None:
            return np.asarray(self._jit("check_safety", run)(params["safety_checker"], jnp.asarray(pixel_values)))
        key = ("check_safety", devices)
        if key not in self._jitted:
            self._jitted[key] = jax.pmap(run, devices=devices)
        flags = self._jitted[key](params["safety_checker"], shard(np.asarray(pixel_values), len(devices)))
        return np.asarray(flags).reshape(-1)

    # ------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------

    def _host_callback(self, step, timestep, latents) -> None:
        if self._callback is not None:
            self._callback(int(step), int(timestep), np.asarray(latents))

    def _program(self, opts: SampleOptions, devices: tuple[jax.Device, ...] | None):
        """One compiled program per static option set (and device set for pmap); each keeps its shape cache."""
        key = (opts, devices)
        if key not in self._jitted:
            models = Models(self.unet, self.vae, self.image_encoder)

            def run(params, pixel_values, keys, latents, guidance_scale, eta, sched_state, every, warmup):
                return sample(models, opts, params, pixel_values, keys, latents, guidance_scale, eta, sched_state,
                              every, warmup, self._host_callback)

            if devices is not None:
                self._jitted[key] = jax.pmap(run, in_axes=(0, 0, 0, 0 if opts.latents_given else None,
                                                           None, None, None, None, None), devices=devices)
            else:
                self._jitted[key] = jax.jit(run)
        return self._jitted[key]

    def _size(self, height: int | None, width: int | None) -> tuple[int, int]:
        f = self.vae_scale_factor
        sample_size = self.unet.config.sample_size
        default = sample_size if isinstance(sample_size, int) else sample_size[0]
        height = default * f if height is None else height
        width = default * f if width is None else width
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, (int, np.integer)) or v <= 0 or v % f:
                raise ValueError(f"{name}: {v!r} is not a positive multiple of {f} (the VAE's downsampling factor)")
        return int(height), int(width)

    def __call__(self, pixel_values: Any, params: dict[str, Any], prng_seed: int | jax.Array,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, num_images_per_prompt: int = 1,
                 height: int | None = None, width: int | None = None, latents: Any = None, eta: float = 0.0,
                 jit: bool = False, output_type: str = "np",
                 callback: Callable[[int, int, np.ndarray], None] | None = None, callback_steps: int = 1,
                 first_index: int | Sequence[int] = 0) -> ImageVariationOutput:
        """Generate ``num_images_per_prompt`` variations of each input picture.

        ``jit=False``: ``pixel_values`` ``[N, 3, S, S]``, plain ``params``, one device.
        ``jit=True``: ``pixel_values`` from ``shard`` (``[D, N/D, 3, S, S]``), ``params`` from
        ``replicate``; runs the pmap'd program. Picture ``i*k + j`` is variation j of input i and
        its noise comes from ``fold_in(prng_seed, i*k + j)`` in both modes. ``latents``
        (``[N*k, C, h, w]``, sharded likewise with ``jit=True``) replace the drawn starting noise.
        ``callback(step, timestep, latents)`` is called from inside the compiled loop (once per
        device with that device's latents when ``jit=True``). ``first_index`` shifts the global
        picture indices, so one large job split into calls keeps its pictures: an int numbers this
        call's pictures from there on; one int per input (input-major, as flattened by ``shard``)
        gives each input's first picture, its variation j being that index + j.
        """
        k = num_images_per_prompt
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"num_images_per_prompt: expected a positive int, got {k!r}")
        if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: expected a positive int, got {num_inference_steps!r}")
        if not isinstance(callback_steps, (int, np.integer)) or callback_steps < 1:
            raise ValueError(f"callback_steps: expected a positive int, got {callback_steps!r}")
        if output_type not in ("np", "pil"):
            raise ValueError(f"output_type: expected 'np' or 'pil', got {output_type!r}")
        height, width = self._size(height, width)
        f = self.vae_scale_factor
        lead = 2 if jit else 1
        s = self.image_encoder.config.image_size
        pixel_values = np.asarray(pixel_values, np.float32) if not isinstance(pixel_values, jax.Array) else pixel_values
        if pixel_values.ndim != lead + 3 or pixel_values.shape[lead:] != (3, s, s):
            want = "[D, N/D, 3, S, S] from shard()" if jit else "[N, 3, S, S]"
            raise ValueError(f"pixel_values: expected {want} with S={s}, got shape {tuple(pixel_values.shape)}")
        batch = pixel_values.shape[:lead]  # (N,) or (D, N/D)
        n_out = int(np.prod(batch)) * k
        latent_shape = (self.unet.config.in_channels, height // f, width // f)
        if latents is not None:
            latents = np.asarray(latents, np.float32) if not isinstance(latents, jax.Array) else latents
            want_shape = (*batch[:-1], batch[-1] * k, *latent_shape)
            if tuple(latents.shape) != want_shape:
                raise ValueError(f"latents: expected shape {want_shape} (N*k, C, H/{f}, W/{f}), "
                                 f"got {tuple(latents.shape)}")
        devices = None
        if jit:
            devices = replicated_devices(params)
            if devices is None:
                raise ValueError("params: jit=True expects params from imvar_jax.replicate(params)")
            if batch[0] != len(devices):
                raise ValueError(f"pixel_values: sharded over {batch[0]} devices but params are replicated "
                                 f"on {len(devices)}")
            devices = tuple(devices)

        if isinstance(first_index, (int, np.integer)):
            keys = image_keys(prng_seed, n_out, int(first_index))
        else:
            # Per-input starts let a resumed batch job skip finished inputs and keep everyone's noise.
            starts = np.asarray(first_index)
            if (starts.shape != (n_out // k,) or not np.issubdtype(starts.dtype, np.integer)
                    or (starts.size and starts.min() < 0)):
                raise ValueError(f"first_index: expected an int or {n_out // k} non-negative ints (one per "
                                 f"input), got {first_index!r}")
            keys = jnp.concatenate([image_keys(prng_seed, k, int(start)) for start in starts])
        keys = keys.reshape(*batch[:-1], batch[-1] * k)
        do_cfg = guidance_scale > 1.0
        opts = SampleOptions(num_images_per_prompt=int(k), latent_size=latent_shape[1:], do_cfg=do_cfg,
                             latents_given=latents is not None, with_callback=callback is not None,
                             scheduler=self.scheduler)
        sched_state = self.scheduler.set_timesteps(int(num_inference_steps),
                                                   (batch[-1] * k, *latent_shape[1:], latent_shape[0]))
        warmup = sched_state.timesteps.shape[0] - int(num_inference_steps)
        self._callback = callback
        try:
            images = self._program(opts, devices)(
                params, pixel_values, keys, latents, jnp.float32(guidance_scale), jnp.float32(eta), sched_state,
                jnp.int32(callback_steps), jnp.int32(warmup))
            images = np.array(images).reshape(n_out, height, width, 3)  # writable: flagged ones are blacked out
        finally:
            self._callback = None

        nsfw = None
        if self.safety_checker is not None and "safety_checker" in params:
            flags = self.check_safety(params, self._safety_inputs(images), devices)
            images[flags] = 0.0
            nsfw = [bool(x) for x in flags]
        return ImageVariationOutput(images=to_pil(images) if output_type == "pil" else images,
                                    nsfw_content_detected=nsfw)

    def _safety_inputs(self, images: np.ndarray) -> np.ndarray:
        """The safety checker sees what diffusers gives it: 8-bit pictures through the CLIP processor."""
        return prepare_inputs(to_pil(images), "clip", feature_extractor_config=self.feature_extractor_config,
                              size=self.safety_checker.config.vision_config.image_size)

    def generate(self, images: Any, params: dict[str, Any], seed: int | jax.Array = 0,
                 num_images_per_prompt: int = 1, preprocessing: str = "v2", latents: Any = None,
                 devices: Sequence[jax.Device] | None = None, first_index: int | Sequence[int] = 0,
                 **kwargs: Any) -> ImageVariationOutput:
        """Prepare ``images``, spread their pictures over the devices, generate, return the flat output.

        ``images``: anything ``prepare_inputs`` accepts (PIL images, arrays, pixel values).
        ``params``: already replicated (``replicate``, or ``from_pretrained(devices=...)``: used
        as they are, on their devices unless ``devices`` says otherwise), or plain: on one device
        that already holds them they are used in place, otherwise replicated for this call, so
        replicate once yourself when calling repeatedly. ``devices`` defaults to the replicated
        params' devices, else every local device. Other keyword arguments are those of
        ``__call__``. Pictures equal a ``jit=False`` call with the same seed.
        The N*k pictures, not the N inputs, are what is split over the devices (each picture
        keeps its index i*k + j, so its noise), so one input with 8 variations fills 8 devices
        instead of padding every device to 8 pictures.
        """
        # Without ``devices``, replicated params say where to run; anything else runs on every local device.
        devices = sorted(devices or replicated_devices(params) or jax.local_devices(), key=lambda dev: dev.id)
        d = len(devices)
        pixel_values = prepare_inputs(images, preprocessing, size=self.image_encoder.config.image_size,
                                      feature_extractor_config=self.feature_extractor_config)
        n = pixel_values.shape[0]
        k = num_images_per_prompt
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"num_images_per_prompt: expected a positive int, got {k!r}")
        if isinstance(first_index, (int, np.integer)):
            starts = np.arange(n * k) + int(first_index)
        else:
            first_index = np.asarray(first_index)
            if first_index.shape != (n,):
                raise ValueError(f"first_index: expected an int or {n} ints (one per input), got {first_index!r}")
            starts = (first_index[:, None] + np.arange(k)).reshape(-1)  # [N*k]
        pictures = pad_batch(np.repeat(pixel_values, k, axis=0), d)  # [N*k + pad, 3, S, S]
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.shape[0] != n * k:
                raise ValueError(f"latents: expected {n * k} (inputs x num_images_per_prompt), got {latents.shape[0]}")
            latents = pad_batch(latents, d)
        on = replicated_devices(params)
        if on is None and d == 1 and on_device(params, devices[0]):
            # One device already holding the params: the single-device program, without a second copy.
            out = self(pictures, params, seed, num_images_per_prompt=1, latents=latents, jit=False,
                       first_index=starts, **kwargs)
        else:
            if on != devices:
                params = replicate(params if on is None else unreplicate(params), devices)
            out = self(shard(pictures, d), params, seed, num_images_per_prompt=1,
                       latents=None if latents is None else shard(latents, d), jit=True,
                       first_index=pad_batch(starts, d), **kwargs)
        keep = n * k
        return ImageVariationOutput(images=out.images[:keep],
                                    nsfw_content_detected=None if out.nsfw_content_detected is None
                                    else out.nsfw_content_detected[:keep])

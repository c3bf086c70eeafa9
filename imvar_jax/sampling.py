"""The pure sampling program: encode pictures, denoise in one ``lax.fori_loop``, decode.

Everything here is traceable and device-local: the pipeline runs it on each device of a
``parallel.Placement`` (``shard_map`` over a mesh, under ``jit``). Static choices (images per input, guidance on/off, whether
latents are given) pick the program; ``guidance_scale``, ``eta``, the scheduler state
(timesteps included) and ``callback_steps`` are traced values.

The program also reports where each picture first went non-finite (NaN or inf), so a numerical
failure is named by step and picture instead of surfacing later as a broken PNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from .models.clip_vision import CLIPVisionModelWithProjection
from .models.unet import UNet2DConditionModel
from .models.vae import AutoencoderKL


@dataclass(frozen=True)
class Models:
    """The modules a sampling program runs (hashable, so it can key compiled programs)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    image_encoder: CLIPVisionModelWithProjection


@dataclass(frozen=True)
class SampleOptions:
    """Static settings: each distinct value compiles its own program."""

    num_images_per_prompt: int
    latent_size: tuple[int, int]  # (h, w)
    do_cfg: bool
    latents_given: bool
    with_callback: bool
    scheduler: Any  # a schedulers.* object (frozen, hashable)


@partial(jax.export.register_namedtuple_serialization, serialized_name="imvar_jax.sampling.Sampled")
class Sampled(NamedTuple):
    """What a sampling program returns, one entry per picture (registered so exported programs serialize)."""

    images: jax.Array  # [N*k, H, W, 3] float32 in [0, 1]
    nonfinite_step: jax.Array  # [N*k] int32: the first loop step whose latents were NaN or inf, -1 if none
    decoded_finite: jax.Array  # [N*k] bool: whether the VAE's output was finite before clipping


def latent_noise(key: jax.Array, channels: int, size: tuple[int, int], stream: int | jax.Array) -> jax.Array:
    """Standard normal noise ``[h, w, C]`` for one picture, stream 0 being its starting latents.

    Drawn in diffusers' ``[C, h, w]`` order so the same key gives the same latents in either layout.
    """
    z = jax.random.normal(jax.random.fold_in(key, stream), (channels, *size), jnp.float32)
    return jnp.transpose(z, (1, 2, 0))  # [h, w, C]


def sample(models: Models, opts: SampleOptions, params: dict[str, Any], pixel_values: jax.Array,
           keys: jax.Array, latents: jax.Array | None, guidance_scale: jax.Array, eta: jax.Array,
           sched_state: Any, callback_steps: jax.Array, callback_warmup: jax.Array,
           host_callback: Callable[..., None] | None = None, callback_id: jax.Array | int = 0) -> Sampled:
    """Generate ``N * k`` pictures ``[N*k, H, W, 3]`` float32 in [0, 1], with their finiteness (``Sampled``).

    pixel_values: ``[N, 3, S, S]`` CLIP-normalised inputs; keys: ``[N*k]`` PRNG keys, one per
    output picture, in output order (input-major); latents: ``[N*k, C, h, w]`` or None.
    ``host_callback(callback_id, step, timestep, latents)`` runs every ``callback_steps`` steps after
    the first ``callback_warmup`` loop iterations (PNDM's extra warm-up call), as diffusers calls it;
    ``callback_id`` is a traced value, so one compiled program serves every caller's callback.
    """
    unet, vae, scheduler = models.unet, models.vae, opts.scheduler
    dtype = unet.dtype
    k = opts.num_images_per_prompt
    channels = unet.config.in_channels

    embeds = models.image_encoder.apply({"params": params["image_encoder"]},
                                        jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(dtype))  # [N, D]
    embeds = jnp.repeat(embeds.astype(jnp.float32), k, axis=0)[:, None, :]  # [N*k, 1, D]
    if opts.do_cfg:
        # Unconditional half first, as diffusers concatenates; the zero embedding is the
        # "no image" input the checkpoint was trained with.
        context = jnp.concatenate([jnp.zeros_like(embeds), embeds])  # [2*N*k, 1, D]
    else:
        context = embeds

    if opts.latents_given:
        x = jnp.transpose(latents.astype(jnp.float32), (0, 2, 3, 1))  # [N*k, h, w, C]
    else:
        x = jax.vmap(lambda key: latent_noise(key, channels, opts.latent_size, 0))(keys)
    x = x * sched_state.init_noise_sigma

    def body(i: jax.Array, carry):
        x, state, nonfinite_step = carry
        t = state.timesteps[i]
        inp = scheduler.scale_model_input(state, x, i)
        if opts.do_cfg:
            inp = jnp.concatenate([inp, inp])
        eps = unet.apply({"params": params["unet"]}, inp.astype(dtype), t, context.astype(dtype))
        if opts.do_cfg:
            uncond, cond = jnp.split(eps, 2)
            eps = uncond + guidance_scale * (cond - uncond)
        # Step i's noise (DDIM's for eta, Euler ancestral's) is stream i + 1 of each picture's key; stream 0
        # made its latents.
        noise = (jax.vmap(lambda key: latent_noise(key, channels, x.shape[1:3], i + 1))(keys)
                 if scheduler.draws_noise else None)
        x, state = scheduler.step(state, eps, i, x, eta=eta, variance_noise=noise)
        # Once non-finite, a picture stays so: only the first step says where it went wrong.
        finite = jnp.all(jnp.isfinite(x), axis=(1, 2, 3))
        nonfinite_step = jnp.where((nonfinite_step < 0) & ~finite, i, nonfinite_step)
        if opts.with_callback:
            last = i == state.timesteps.shape[0] - 1
            jax.lax.cond(((i + 1 > callback_warmup) | last) & (i % callback_steps == 0),
                         lambda: jax.debug.callback(host_callback, callback_id, i, t, jnp.transpose(x, (0, 3, 1, 2))),
                         lambda: None)
        return x, state, nonfinite_step

    nonfinite_step = jnp.full((x.shape[0],), -1, jnp.int32)
    x, _, nonfinite_step = jax.lax.fori_loop(0, sched_state.timesteps.shape[0], body,
                                             (x, sched_state, nonfinite_step))

    z = (x / vae.config.scaling_factor).astype(vae.dtype)

    def decode(one: jax.Array) -> tuple[jax.Array, jax.Array]:
        image = vae.apply({"params": params["vae"]}, one[None], method=AutoencoderKL.decode)[0]  # [H, W, 3]
        image = image.astype(jnp.float32)
        # Checked before clipping, which would turn inf into a plausible-looking 0 or 1.
        return jnp.clip(image / 2 + 0.5, 0.0, 1.0), jnp.all(jnp.isfinite(image))

    # One picture at a time: the decoder's full-resolution activations (128 channels at 512x512)
    # would otherwise grow with the batch and set the largest batch a device can hold.
    images, decoded_finite = jax.lax.map(decode, z)  # [N*k, H, W, 3], [N*k]
    return Sampled(images, nonfinite_step, decoded_finite)

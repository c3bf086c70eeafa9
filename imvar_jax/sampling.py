"""The pure sampling program: encode pictures, mix their embeddings, denoise in one ``lax.fori_loop``, decode.

Everything here is traceable and device-local: the pipeline runs it on each device of a
``parallel.Placement`` (``shard_map`` over a mesh, under ``jit``). Static choices (images per input,
guidance on/off, whether latents are given, how many sources each input mixes and how, img2img or not)
pick the program; ``guidance_scale``, ``eta``, the mixing weights, the img2img start step, the
scheduler state (timesteps included, and with padded tables the number of steps) and
``callback_steps`` are traced values.

The program also reports where each picture first went non-finite (NaN or inf), so a numerical
failure is named by step and picture instead of surfacing later as a broken PNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from .models.unet import UNet2DConditionModel
from .conditioning import mix_embeddings
from .models.clip_vision import CLIPVisionModelWithProjection
from .models.vae import AutoencoderKL


@dataclass(frozen=True)
class Models:
    """The modules a sampling program runs (hashable, so it can key compiled programs)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    image_encoder: CLIPVisionModelWithProjection


@dataclass(frozen=True)
class SampleOptions:
    """Static settings: each distinct value compiles its own program.

    Every output picture is conditioned on a weighted mix of ``sources`` embeddings (1 for a plain
    variation); the weights themselves, and the step an img2img run starts at, are traced.
    """

    num_images_per_prompt: int
    latent_size: tuple[int, int]  # (h, w)
    do_cfg: bool
    latents_given: bool
    with_callback: bool
    scheduler: Any  # a schedulers.* object (frozen, hashable)
    sources: int = 1  # M: the embeddings each input row mixes
    embeds_given: bool = False  # the sources are CLIP image embeddings, not pixel values to encode
    mix: str = "linear"  # conditioning.MIX_METHODS
    from_image: bool = False  # start from a picture's VAE latents noised to the start step (strength < 1)
    # The scheduler's tables are padded past its real length, so that one program serves every step count: the
    # loop then stops at the state's traced ``length`` instead of the tables' static one.
    padded_tables: bool = False


class Conditioning(NamedTuple):
    """What each input row is conditioned on (traced arrays; ``N`` rows, ``M`` sources each)."""

    sources: jax.Array  # [N, M, 3, S, S] CLIP-normalised pixel values, or [N, M, D] embeddings
    weights: jax.Array  # [N, M] float32: the conditional embedding's mix (conditioning.mix_embeddings)
    negative_weights: jax.Array  # [N, M] float32: the unconditional one's; all 0 is the zero embedding
    init_pixels: jax.Array | None = None  # [N, 3, H, W] in [-1, 1]: the picture img2img starts from
    start: jax.Array | int = 0  # int32: the first loop step (img2img), 0 for a full run


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


# The stream of each picture's key that draws its VAE posterior sample in img2img runs; the loop's streams are
# 0 (starting noise) and 1 .. L (step noise), far below it.
POSTERIOR_STREAM = 2**31 - 1


def encode_sources(models: Models, params: dict[str, Any], pixel_values: jax.Array) -> jax.Array:
    """CLIP image embeddings ``[P, D]`` float32 of pixel values ``[P, 3, S, S]``, one picture at a time.

    One at a time, so a picture's embedding is the same to the bit whatever else is in the batch (a
    matmul's blocking, and so its rounding, can change with the batch size); the encoder is a small
    share of a sampling run.
    """
    encoder = models.image_encoder

    def one(x: jax.Array) -> jax.Array:
        return encoder.apply({"params": params["image_encoder"]},
                             jnp.transpose(x, (1, 2, 0))[None].astype(encoder.dtype))[0]  # [D]

    return jax.lax.map(one, pixel_values).astype(jnp.float32)


def sample(models: Models, opts: SampleOptions, params: dict[str, Any], cond: Conditioning,
           keys: jax.Array, latents: jax.Array | None, guidance_scale: jax.Array, eta: jax.Array,
           sched_state: Any, callback_steps: jax.Array, callback_warmup: jax.Array,
           host_callback: Callable[..., None] | None = None, callback_id: jax.Array | int = 0) -> Sampled:
    """Generate ``N * k`` pictures ``[N*k, H, W, 3]`` float32 in [0, 1], with their finiteness (``Sampled``).

    cond: each input row's sources, mixing weights and img2img start (``Conditioning``); keys: ``[N*k]``
    PRNG keys, one per output picture, in output order (input-major); latents: ``[N*k, C, h, w]`` or None
    (with ``from_image`` they replace the noise added to the picture's latents).
    ``sched_state`` comes from ``set_timesteps(..., start)`` with the same start as ``cond.start``.
    ``host_callback(callback_id, step, timestep, latents)`` runs every ``callback_steps`` steps after
    the first ``callback_warmup`` loop iterations (PNDM's extra warm-up call), as diffusers calls it;
    ``callback_id`` is a traced value, so one compiled program serves every caller's callback.
    """
    unet, vae, scheduler = models.unet, models.vae, opts.scheduler
    dtype = unet.dtype
    k = opts.num_images_per_prompt
    channels = unet.config.in_channels

    n, m = cond.weights.shape
    if opts.embeds_given:
        sources = cond.sources.astype(jnp.float32)  # [N, M, D]
    else:
        sources = encode_sources(models, params, cond.sources.reshape(n * m, *cond.sources.shape[2:]))
        sources = sources.reshape(n, m, -1)  # [N, M, D]
    embeds = mix_embeddings(sources, cond.weights, opts.mix)  # [N, D]
    embeds = jnp.repeat(embeds, k, axis=0)[:, None, :]  # [N*k, 1, D]
    if opts.do_cfg:
        # Unconditional half first, as diffusers concatenates. With no negative picture it is the zero
        # embedding, the "no image" input the checkpoint was trained with.
        if m > 1:
            negative = jnp.repeat(mix_embeddings(sources, cond.negative_weights, opts.mix), k, axis=0)[:, None, :]
        else:
            negative = jnp.zeros_like(embeds)
        context = jnp.concatenate([negative, embeds])  # [2*N*k, 1, D]
    else:
        context = embeds

    if opts.latents_given:
        noise = jnp.transpose(latents.astype(jnp.float32), (0, 2, 3, 1))  # [N*k, h, w, C]
    else:
        noise = jax.vmap(lambda key: latent_noise(key, channels, opts.latent_size, 0))(keys)
    start = cond.start if opts.from_image else 0
    stop = sched_state.length if opts.padded_tables else sched_state.timesteps.shape[0]
    if opts.from_image:
        x = noised_picture_latents(models, params, cond.init_pixels, keys, k, noise, scheduler, sched_state, start)
    else:
        x = noise * sched_state.init_noise_sigma

    def step_noise(i: jax.Array) -> jax.Array:
        # Step i's noise (DDIM's for eta, Euler ancestral's) is stream i + 1 of each picture's key; stream 0
        # made its latents.
        return jax.vmap(lambda key: latent_noise(key, channels, x.shape[1:3], i + 1))(keys)

    # The named scopes label the loop's parts in profiles (benchmarks/bench_loop.py sorts ops by them).
    def body(i: jax.Array, carry):
        x, state, nonfinite_step = carry
        t = state.timesteps[i]
        with jax.named_scope("guidance"):
            inp = scheduler.scale_model_input(state, x, i)
            if opts.do_cfg:
                inp = jnp.concatenate([inp, inp])
        eps = unet.apply({"params": params["unet"]}, inp.astype(dtype), t, context.astype(dtype))
        with jax.named_scope("guidance"):
            if opts.do_cfg:
                eps_uncond, eps_cond = jnp.split(eps, 2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        with jax.named_scope("step_noise"):
            if not scheduler.draws_noise:
                noise = None
            elif scheduler.noise_only_with_eta:
                # eta is traced, so the choice is made at run time: with eta 0 no step draws anything.
                noise = jax.lax.cond(eta != 0, step_noise, lambda i: jnp.zeros(x.shape, jnp.float32), i)
            else:
                noise = step_noise(i)
        with jax.named_scope("scheduler"):
            x, state = scheduler.step(state, eps, i, x, eta=eta, variance_noise=noise)
        with jax.named_scope("finite_check"):
            # Once non-finite, a picture stays so: only the first step says where it went wrong.
            finite = jnp.all(jnp.isfinite(x), axis=(1, 2, 3))
            nonfinite_step = jnp.where((nonfinite_step < 0) & ~finite, i, nonfinite_step)
        if opts.with_callback:
            last = i == stop - 1
            # Steps are counted from the run's own first step, as diffusers' img2img loop counts them.
            run_step = i - start
            jax.lax.cond(((run_step + 1 > callback_warmup) | last) & (run_step % callback_steps == 0),
                         lambda: jax.debug.callback(host_callback, callback_id, i, t, jnp.transpose(x, (0, 3, 1, 2))),
                         lambda: None)
        return x, state, nonfinite_step

    nonfinite_step = jnp.full((x.shape[0],), -1, jnp.int32)
    x, _, nonfinite_step = jax.lax.fori_loop(start, stop, body,
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


def noised_picture_latents(models: Models, params: dict[str, Any], init_pixels: jax.Array, keys: jax.Array, k: int,
                           noise: jax.Array, scheduler: Any, sched_state: Any, start: jax.Array) -> jax.Array:
    """img2img's starting latents ``[N*k, h, w, C]``: each row's picture ``[N, 3, H, W]`` encoded by the VAE
    (one at a time, as decoding), a posterior sample per output picture (its key's ``POSTERIOR_STREAM``),
    scaled, and noised to loop step ``start`` with ``noise`` as the scheduler's forward process does."""
    vae = models.vae

    def encode(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean, logvar = vae.apply({"params": params["vae"]}, jnp.transpose(x, (1, 2, 0))[None].astype(vae.dtype),
                                 method=AutoencoderKL.encode)
        return mean[0], logvar[0]  # [h, w, C] each

    mean, logvar = jax.lax.map(encode, init_pixels)  # [N, h, w, C]
    mean, logvar = jnp.repeat(mean, k, axis=0), jnp.repeat(logvar, k, axis=0)  # [N*k, h, w, C]
    channels = mean.shape[-1]
    posterior = jax.vmap(lambda key: latent_noise(key, channels, mean.shape[1:3], POSTERIOR_STREAM))(keys)
    latents = (mean + jnp.exp(0.5 * logvar) * posterior) * vae.config.scaling_factor
    return scheduler.add_noise(sched_state, latents, noise, start)

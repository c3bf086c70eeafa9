"""Creative controls: mixing, interpolation, negative pictures, img2img strength and precomputed embeddings.

Parity is against diffusers' PyTorch pieces: its image-variation pipeline with the conditioning we
compute fed into its ``_encode_image``, and for strength a loop composed from its scheduler
(``set_timesteps``, ``add_noise``, ``step``), UNet, VAE and ``VaeImageProcessor``, since no diffusers
image-variation pipeline has a strength.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import CompileLog
from imvar_jax import ImageVariationPipeline, convert_checkpoint
from imvar_jax.conditioning import mix_embeddings, path_weights
from imvar_jax.parallel import image_keys
from imvar_jax.sampling import POSTERIOR_STREAM, latent_noise
from imvar_jax.settings import SettingsError
from tiny_checkpoint import build_torch_pipeline, save_pipeline

STEPS = 4
HEIGHT, WIDTH = 16, 24  # the tiny VAE downsamples by 2
LATENT = (4, HEIGHT // 2, WIDTH // 2)
# Max abs pixel error against diffusers' pieces, about 5x the largest measured (jax 0.10.2, torch 2.13, CPU):
# strength runs 4.5e-6 to 8.2e-6 (DDIM, Euler and Euler ancestral the largest), the slerp mix with a
# negative 2.7e-6, the linear mix 3.7e-6.
TOLERANCE = 4e-5


@pytest.fixture(scope="module")
def torch_pipe():
    return build_torch_pipeline(seed=5)


@pytest.fixture(scope="module")
def folder(torch_pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("creative")
    return convert_checkpoint(save_pipeline(torch_pipe, root / "torch"), root / "flax")


_PIPES: dict = {}


def _ours(folder, scheduler: str = "pndm"):
    if scheduler not in _PIPES:
        _PIPES[scheduler] = ImageVariationPipeline.from_pretrained(folder, scheduler=scheduler, safety_checker=False)
    return _PIPES[scheduler]


def _pictures(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (20 + 4 * i, 28, 3), dtype=np.uint8)) for i in range(n)]


ONE_DEVICE = dict(num_inference_steps=STEPS, guidance_scale=3.0, height=HEIGHT, width=WIDTH)


def _one(**kw):
    return {**ONE_DEVICE, "devices": jax.local_devices()[:1], **kw}


# ----------------------------------------------------------------------
# The mixing math
# ----------------------------------------------------------------------

def test_mixes_are_exact_at_the_ends_and_slerp_keeps_to_the_sphere():
    rng = np.random.default_rng(0)
    e = jnp.asarray(rng.normal(size=(3, 2, 64)).astype(np.float32))  # [B, M, D]
    a, b = np.asarray(e[:, 0]), np.asarray(e[:, 1])
    for method in ("linear", "slerp"):
        mix = jax.jit(lambda x, w, m=method: mix_embeddings(x, w, m))
        at = lambda *w: np.asarray(mix(e, jnp.asarray(np.tile(np.float32(w), (3, 1)))))  # noqa: E731
        np.testing.assert_array_equal(at(1, 0), a)
        np.testing.assert_array_equal(at(0, 1), b)
        np.testing.assert_array_equal(at(5, 0), a)  # weights are shares of their sum
        np.testing.assert_array_equal(at(0, 0), np.zeros_like(a))  # no weight: the "no picture" embedding
    linear = np.asarray(mix_embeddings(e, jnp.asarray([[0.7, 0.3]] * 3), "linear"))
    np.testing.assert_allclose(linear, 0.7 * a + 0.3 * b, rtol=1e-6, atol=1e-6)
    # slerp(a, b, t): angle t * theta from a in the plane of a and b, norm (1 - t)|a| + t|b|.
    t = 0.3
    mid = np.asarray(mix_embeddings(e, jnp.asarray([[1 - t, t]] * 3), "slerp"))
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    ua, ub, um = a / na[:, None], b / nb[:, None], mid / np.linalg.norm(mid, axis=1)[:, None]
    theta = np.arccos(np.sum(ua * ub, axis=1))
    np.testing.assert_allclose(np.linalg.norm(mid, axis=1), (1 - t) * na + t * nb, rtol=1e-5)
    np.testing.assert_allclose(np.arccos(np.clip(np.sum(ua * um, axis=1), -1, 1)), t * theta, rtol=1e-4)
    np.testing.assert_allclose(np.arccos(np.clip(np.sum(ub * um, axis=1), -1, 1)), (1 - t) * theta, rtol=1e-4)
    # Three sources fold in order: (1, 1, 1) is slerp(slerp(a, b, 1/2), c, 1/3).
    e3 = jnp.asarray(rng.normal(size=(1, 3, 64)).astype(np.float32))
    two = mix_embeddings(e3[:, :2], jnp.asarray([[1.0, 1.0]]), "slerp")
    three = mix_embeddings(jnp.stack([two, e3[:, 2]], axis=1), jnp.asarray([[2.0, 1.0]]), "slerp")
    np.testing.assert_allclose(mix_embeddings(e3, jnp.asarray([[1.0, 1.0, 1.0]]), "slerp"), three, rtol=1e-5)


def test_path_weights_spread_frames_evenly():
    np.testing.assert_allclose(path_weights(2, 5), [[1, 0], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [0, 1]])
    np.testing.assert_allclose(path_weights(3, 5), [[1, 0, 0], [0.5, 0.5, 0], [0, 1, 0], [0, 0.5, 0.5], [0, 0, 1]])
    with pytest.raises(ValueError, match="frames"):
        path_weights(2, 1)


# ----------------------------------------------------------------------
# End to end: bit-exact special cases, and one program for every weight
# ----------------------------------------------------------------------

@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_weights_one_and_zero_give_the_single_picture_bit_for_bit(folder, method):
    pipe, params = _ours(folder)
    a, b = _pictures(2)
    single = pipe.generate([a], params, seed=3, num_images_per_prompt=2, **_one()).images
    mixed = pipe.generate([a, b], params, seed=3, num_images_per_prompt=2, mix_weights=[1, 0], mix_method=method,
                          **_one()).images
    np.testing.assert_array_equal(mixed, single)
    other = pipe.generate([b], params, seed=3, num_images_per_prompt=2, **_one()).images
    assert float(np.abs(other - single).max()) > 1e-2  # the pictures do steer the result
    # The interpolation's ends are its pictures, every frame on the same noise (here picture 0's); compared on
    # the same layout (two pictures in the call), as a batch's size can change the UNet's rounding.
    ends = pipe.interpolate([a, b], params, frames=2, seed=3, mix_method=method, **_one()).images
    np.testing.assert_array_equal(ends, pipe.generate([a, b], params, seed=3, first_index=[0, 0], **_one()).images)
    frames = pipe.interpolate([a, b], params, frames=3, seed=3, mix_method=method, **_one()).images
    assert min(float(np.abs(frames[1] - frames[i]).max()) for i in (0, 2)) > 1e-3
    # Embeddings in, as the program computes them: the same pictures.
    embeds = pipe.image_embeddings([a, b], params)
    np.testing.assert_array_equal(pipe.generate(None, params, seed=3, num_images_per_prompt=2,
                                                image_embeds=embeds[:1], **_one()).images, single)


def test_changing_weights_strength_or_negative_compiles_nothing(folder):
    pipe, params = _ours(folder)
    a, b, c = _pictures(3, seed=1)
    run = _one(seed=0, num_images_per_prompt=2)
    calls = [
        lambda w: pipe.generate([a, b], params, mix_weights=w, **run),
        lambda w: pipe.generate([a], params, negative_image=[b, c][int(w[0] > 0.5)], **run),
        lambda w: pipe.generate([a], params, strength=w[0], **run),
        lambda w: pipe.interpolate([a, b] if w[0] > 0.5 else [b, c], params, frames=2, **run),
    ]
    for call in calls:
        call([0.9, 0.1])  # compiles this control's program
        with CompileLog() as log:
            again = call([0.4, 0.6])
        assert log.names == [], log.names
        assert np.isfinite(again.images).all()
    with CompileLog() as log:
        pipe.generate([a], params, **{**run, "height": WIDTH, "width": HEIGHT})  # a shape no other test runs
    assert log.names, "the compile log saw no compile: the counting itself is broken"


# ----------------------------------------------------------------------
# Parity with diffusers' pieces
# ----------------------------------------------------------------------

def _scheduler_class(scheduler: str):
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler, LMSDiscreteScheduler, PNDMScheduler)

    return {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "lms": LMSDiscreteScheduler,
            "euler": EulerDiscreteScheduler, "euler-a": EulerAncestralDiscreteScheduler,
            "dpmpp-2m": DPMSolverMultistepScheduler}[scheduler]


@contextlib.contextmanager
def _our_ancestral_noise(count: int, first_stream: int):
    """diffusers' Euler ancestral step draws its noise from torch; give it ours: loop step i's noise of picture p is
    stream i + 1 of ``fold_in(key(0), p)``, where a run cut at the front starts at ``first_stream``."""
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_ancestral

    keys = image_keys(0, count)
    streams = iter(range(first_stream, first_stream + STEPS + 1))

    def noise(*args, **kwargs):
        stream = next(streams)
        z = jax.vmap(lambda key: latent_noise(key, LATENT[0], LATENT[1:], stream))(keys)  # [P, h, w, C]
        return torch.from_numpy(np.asarray(z).transpose(0, 3, 1, 2).copy())  # [P, C, h, w]

    with mock.patch.object(euler_ancestral, "randn_tensor", noise):
        yield


def _reference_conditioning(torch_pipe, cond: np.ndarray, uncond: np.ndarray, pixel_values, latents, k: int):
    """diffusers' image-variation pipeline with its ``_encode_image`` giving our (uncond, cond) embeddings."""
    def encode(image, device, num_images_per_prompt, do_classifier_free_guidance):
        c = torch.from_numpy(np.repeat(cond, num_images_per_prompt, axis=0))[:, None]  # [N*k, 1, D]
        u = torch.from_numpy(np.repeat(uncond, num_images_per_prompt, axis=0))[:, None]
        return torch.cat([u, c])

    checker = torch_pipe.safety_checker
    torch_pipe.register_modules(safety_checker=None)
    try:
        with mock.patch.object(torch_pipe, "_encode_image", encode), torch.no_grad():
            return torch_pipe(image=torch.from_numpy(pixel_values), height=HEIGHT, width=WIDTH,
                              num_inference_steps=STEPS, num_images_per_prompt=k, guidance_scale=3.0,
                              latents=torch.from_numpy(latents), output_type="np").images
    finally:
        torch_pipe.register_modules(safety_checker=checker)


def _torch_embeds(torch_pipe, pixel_values: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch_pipe.image_encoder(torch.from_numpy(pixel_values)).image_embeds.numpy()


def _slerp_reference(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Textbook slerp in float64 on the directions, norm interpolated linearly."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    theta = np.arccos(np.clip(a @ b / (na * nb), -1, 1))
    direction = (np.sin((1 - t) * theta) * a / na + np.sin(t * theta) * b / nb) / np.sin(theta)
    return (direction * ((1 - t) * na + t * nb)).astype(np.float32)


def test_mix_and_negative_match_diffusers(torch_pipe, folder):
    from diffusers import PNDMScheduler

    torch_pipe.scheduler = PNDMScheduler.from_config(
        {k: v for k, v in torch_pipe.scheduler.config.items() if k != "_use_default_values"})
    pipe, params = _ours(folder)
    rng = np.random.default_rng(2)
    pixel_values = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)  # a, b and the negative picture
    latents = rng.normal(size=(2, *LATENT)).astype(np.float32)
    a, b, neg = _torch_embeds(torch_pipe, pixel_values)
    t = 0.35
    ref = _reference_conditioning(torch_pipe, _slerp_reference(a, b, t)[None], neg[None], pixel_values[:1],
                                  latents, 2)
    out = pipe.generate(pixel_values[:2], params, seed=0, num_images_per_prompt=2, latents=latents,
                        mix_weights=[1 - t, t], mix_method="slerp", negative_image=pixel_values[2:],
                        preprocessing="clip", **_one()).images
    err = float(np.abs(out - ref).max())
    assert err <= TOLERANCE, f"slerp mix with a negative picture: max abs pixel error {err:.2e}"
    # The same mix with zeros as the unconditional half is another picture: the negative does act.
    zero = _reference_conditioning(torch_pipe, _slerp_reference(a, b, t)[None], np.zeros_like(neg)[None],
                                   pixel_values[:1], latents, 2)
    assert float(np.abs(zero - ref).max()) > 1e-2
    linear = _reference_conditioning(torch_pipe, ((1 - t) * a + t * b)[None], np.zeros_like(neg)[None],
                                     pixel_values[:1], latents, 2)
    ours = pipe.generate(pixel_values[:2], params, seed=0, num_images_per_prompt=2, latents=latents,
                         mix_weights=[1 - t, t], mix_method="linear", preprocessing="clip", **_one()).images
    assert float(np.abs(ours - linear).max()) <= TOLERANCE


def _reference_strength(torch_pipe, scheduler: str, strength: float, embeds: np.ndarray, init: Image.Image,
                        noise: np.ndarray, posterior: np.ndarray) -> np.ndarray:
    """img2img composed from diffusers' pieces, as its StableDiffusionImg2ImgPipeline runs them."""
    from diffusers.image_processor import VaeImageProcessor

    sched = _scheduler_class(scheduler).from_config(
        {k: v for k, v in torch_pipe.scheduler.config.items() if k != "_use_default_values"})
    sched.set_timesteps(STEPS)
    init_steps = min(int(STEPS * strength), STEPS)
    t_start = max(STEPS - init_steps, 0)
    timesteps = sched.timesteps[t_start * sched.order:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    vae, unet = torch_pipe.vae, torch_pipe.unet
    with torch.no_grad():
        image = VaeImageProcessor(vae_scale_factor=2).preprocess(init, height=HEIGHT, width=WIDTH)  # [1, 3, H, W]
        dist = vae.encode(image).latent_dist
        k = len(noise)
        x0 = (dist.mean + dist.std * torch.from_numpy(posterior)) * vae.config.scaling_factor  # [k, C, h, w]
        x = sched.add_noise(x0, torch.from_numpy(noise), timesteps[:1].repeat(k))
        context = torch.from_numpy(np.repeat(embeds, k, axis=0))[:, None]  # [k, 1, D]
        context = torch.cat([torch.zeros_like(context), context])
        for t in timesteps:
            inp = sched.scale_model_input(torch.cat([x, x]), t)
            eps_uncond, eps_cond = unet(inp, t, encoder_hidden_states=context).sample.chunk(2)
            x = sched.step(eps_uncond + 3.0 * (eps_cond - eps_uncond), t, x).prev_sample
        pictures = vae.decode(x / vae.config.scaling_factor).sample
    return (pictures / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("scheduler,strength", [("pndm", 0.6), ("pndm", 0.3), ("ddim", 0.5), ("lms", 0.75),
                                                ("euler", 0.5), ("euler-a", 0.5), ("dpmpp-2m", 0.75)])
def test_strength_matches_diffusers_pieces(torch_pipe, folder, scheduler, strength):
    pipe, params = _ours(folder, scheduler)
    rng = np.random.default_rng(3)
    pixel_values = rng.normal(size=(1, 3, 32, 32)).astype(np.float32)
    (init,) = _pictures(1, seed=4)
    k = 2
    noise = rng.normal(size=(k, *LATENT)).astype(np.float32)
    keys = image_keys(0, k)
    posterior = np.asarray(jax.vmap(lambda key: latent_noise(key, LATENT[0], LATENT[1:], POSTERIOR_STREAM))(keys))
    posterior = posterior.transpose(0, 3, 1, 2).copy()  # [k, C, h, w]
    with _our_ancestral_noise(k, STEPS - int(STEPS * strength) + 1):
        ref = _reference_strength(torch_pipe, scheduler, strength, _torch_embeds(torch_pipe, pixel_values), init,
                                  noise, posterior)
    out = pipe.generate(pixel_values, params, seed=0, num_images_per_prompt=k, latents=noise, strength=strength,
                        init_image=init, preprocessing="clip", **_one()).images
    err = float(np.abs(out - ref).max())
    assert err <= TOLERANCE, f"{scheduler} strength {strength}: {err:.2e}"
    # Starting from the picture is another run than starting from noise with the same noise.
    full = pipe.generate(pixel_values, params, seed=0, num_images_per_prompt=k, latents=noise,
                         preprocessing="clip", **_one()).images
    assert float(np.abs(full - out).max()) > 1e-2


def test_controls_give_the_same_pictures_on_one_or_eight_devices(folder):
    """The posterior sample, the added noise and every step's noise come from the pictures' own keys."""
    pipe, params = _ours(folder, "euler-a")
    a, b, c = _pictures(3, seed=6)
    run = dict(ONE_DEVICE, seed=4, num_images_per_prompt=3, strength=0.5, negative_image=c)
    one = pipe.generate([a, b], params, devices=jax.local_devices()[:1], **run).images
    eight = pipe.generate([a, b], params, **run).images
    assert len(jax.local_devices()) == 8
    # A batch of 6 on one device and of 1 per device round differently (about 1e-6 in the UNet).
    assert float(np.abs(one - eight).max()) <= 1e-5
    assert float(np.abs(one[:3] - one[3:]).max()) > 1e-2  # each input starts from its own picture


def test_bad_creative_arguments_are_refused_by_name(folder):
    pipe, params = _ours(folder)
    a, b = _pictures(2)
    run = _one()
    cases = [
        (dict(images=[a, b], mix_weights=[1, -1]), "mix_weights"),
        (dict(images=[a, b], mix_weights=[1]), "mix_weights"),
        (dict(images=[a, b], mix_weights=[0, 0]), "mix_weights"),
        (dict(images=[a], mix_method="cubic"), "mix_method"),
        (dict(images=[a], strength=0.0), "strength"),
        (dict(images=[a], strength=0.1), "strength"),  # 0.1 x 4 steps runs no step
        (dict(images=[a, b], mix_weights=[1, 1], strength=0.5), "init_image"),
        (dict(images=[a], image_embeds=np.zeros((1, 32))), "images"),
        (dict(images=None, image_embeds=np.zeros((1, 7))), "image_embeds"),
        (dict(images=None, image_embeds=np.full((1, 32), np.nan)), "image_embeds"),
        (dict(images=[a], negative_image_embeds=np.zeros(32)), "negative_image_embeds"),
        (dict(images=[a, b], strength=0.5, init_image=[a]), "init_image"),
        (dict(images=np.zeros((1, 3, 32, 32), np.float32), strength=0.5), "images"),
    ]
    for kwargs, name in cases:
        images = kwargs.pop("images")
        with pytest.raises((ValueError, SettingsError)) as caught:
            pipe.generate(images, params, **kwargs, **run)
        assert str(caught.value).startswith(f"{name}:"), (kwargs, str(caught.value))
    with pytest.raises(ValueError, match="^images: interpolation needs at least 2"):
        pipe.interpolate([a], params, frames=4, **run)
    with pytest.raises(SettingsError, match="^frames:"):
        pipe.interpolate([a, b], params, frames=0, **run)

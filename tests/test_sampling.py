"""End to end: our compiled sampler against diffusers' StableDiffusionImageVariationPipeline."""

from __future__ import annotations

import contextlib
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from imvar_jax import ImageVariationPipeline, convert_checkpoint
from helpers import CompileLog
from imvar_jax.parallel import image_keys, replicate, shard
from imvar_jax.sampling import Conditioning, Models, SampleOptions, latent_noise, sample
from imvar_jax.settings import MAX_STEPS, SettingsError
from tiny_checkpoint import build_torch_pipeline, save_pipeline

STEPS = 4
HEIGHT, WIDTH = 16, 24  # non-square; the tiny VAE downsamples by 2
K = 2  # variations per input
# Max abs pixel error against diffusers, about 4x what was measured (jax 0.10.2, torch 2.13, CPU):
# PNDM/LMS at most 4.8e-6 (odd size 2.2e-6, with the safety checker 3.4e-6); DDIM 5.0e-5, since
# its x0 estimate divides by sqrt(alpha_bar) and guidance multiplies the UNet's rounding;
# Euler, Euler ancestral and DPM-Solver++(2M) with and without Karras sigmas at most 3.6e-6.
PIXEL_TOLERANCE = {"pndm": 2e-5, "lms": 2e-5, "ddim": 2e-4, "euler": 2e-5, "euler-a": 2e-5, "dpmpp-2m": 2e-5,
                   "dpmpp-2m-karras": 2e-5}


@pytest.fixture(scope="module")
def torch_pipe():
    return build_torch_pipeline(seed=3)


@pytest.fixture(scope="module")
def folder(torch_pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    return convert_checkpoint(save_pipeline(torch_pipe, root / "torch"), root / "flax")


_PIPES: dict = {}


def _ours(folder, scheduler: str, safety_checker: bool = False):
    key = (scheduler, safety_checker)
    if key not in _PIPES:
        _PIPES[key] = ImageVariationPipeline.from_pretrained(folder, scheduler=scheduler, safety_checker=safety_checker)
    return _PIPES[key]


def _inputs(n: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    pixel_values = rng.normal(size=(n, 3, 32, 32)).astype(np.float32)
    latents = rng.normal(size=(n * K, 4, HEIGHT // 2, WIDTH // 2)).astype(np.float32)
    return pixel_values, latents


@contextlib.contextmanager
def _our_ancestral_noise(count: int, shape: tuple[int, int, int]):
    """diffusers' Euler ancestral step draws its noise from torch; give it ours instead: step i's noise of
    picture p is stream i + 1 of ``fold_in(key(0), p)``, as the pipeline called with seed 0 draws it."""
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_ancestral

    keys = image_keys(0, count)
    step = iter(range(1, MAX_STEPS + 1))

    def noise(*args, **kwargs):
        stream = next(step)
        z = jax.vmap(lambda key: latent_noise(key, shape[0], shape[1:], stream))(keys)  # [P, h, w, C]
        return torch.from_numpy(np.asarray(z).transpose(0, 3, 1, 2).copy())  # [P, C, h, w]

    with mock.patch.object(euler_ancestral, "randn_tensor", noise):
        yield


def _reference(torch_pipe, scheduler: str, pixel_values, latents, guidance: float, safety: bool = False, **kw):
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler, LMSDiscreteScheduler, PNDMScheduler)

    cls = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "lms": LMSDiscreteScheduler, "euler": EulerDiscreteScheduler,
           "euler-a": EulerAncestralDiscreteScheduler, "dpmpp-2m": DPMSolverMultistepScheduler,
           "dpmpp-2m-karras": DPMSolverMultistepScheduler}[scheduler]
    # The config as scheduler_config.json holds it, which is what our pipeline reads: without
    # the in-memory list of implicit defaults that from_config would swap for the new class's.
    saved = {k: v for k, v in torch_pipe.scheduler.config.items() if k != "_use_default_values"}
    torch_pipe.scheduler = cls.from_config({**saved, **({"use_karras_sigmas": True} if "karras" in scheduler else {})})
    checker = torch_pipe.safety_checker
    if not safety:
        torch_pipe.register_modules(safety_checker=None)
    try:
        with torch.no_grad():
            call = {"height": HEIGHT, "width": WIDTH, "num_inference_steps": STEPS, "num_images_per_prompt": K, **kw}
            out = torch_pipe(image=torch.from_numpy(pixel_values), guidance_scale=guidance,
                             latents=torch.from_numpy(latents), output_type="np", **call)
    finally:
        torch_pipe.register_modules(safety_checker=checker)
    return out.images, out.nsfw_content_detected


# Every scheduler guided; the unguided program (no unconditional half) once: what it leaves out
# does not depend on the scheduler, whose step tests/test_schedulers.py compares with diffusers'.
@pytest.mark.parametrize("scheduler,guidance", [("pndm", 3.0), ("ddim", 3.0), ("lms", 3.0), ("euler", 3.0),
                                                ("euler-a", 3.0), ("dpmpp-2m", 3.0), ("dpmpp-2m-karras", 3.0),
                                                ("pndm", 1.0)])
def test_matches_diffusers(torch_pipe, folder, scheduler, guidance):
    pipe, params = _ours(folder, scheduler)
    pixel_values, latents = _inputs()
    with _our_ancestral_noise(len(latents), latents.shape[1:]):
        ref, _ = _reference(torch_pipe, scheduler, pixel_values, latents, guidance)
    out = pipe(pixel_values, params, 0, num_inference_steps=STEPS, guidance_scale=guidance,
               num_images_per_prompt=K, height=HEIGHT, width=WIDTH, latents=latents)
    assert out.images.shape == (2 * K, HEIGHT, WIDTH, 3) and out.images.dtype == np.float32
    assert out.nsfw_content_detected is None
    err = float(np.max(np.abs(out.images - ref)))
    assert err <= PIXEL_TOLERANCE[scheduler], f"{scheduler} guidance {guidance}: max abs pixel error {err:.2e}"
    assert float(np.std(ref)) > 0.01  # the comparison is between real pictures, not two constants


def test_odd_latent_size_matches_diffusers(torch_pipe, folder, monkeypatch):
    """18x22 pixels: 9x11 latents, which the UNet's downsampler does not halve evenly."""
    # diffusers' input check insists on multiples of SD's factor 8; the tiny VAE's factor is 2.
    monkeypatch.setattr(torch_pipe, "check_inputs", lambda *args, **kwargs: None)
    pipe, params = _ours(folder, "pndm")
    rng = np.random.default_rng(9)
    pixel_values = rng.normal(size=(1, 3, 32, 32)).astype(np.float32)
    latents = rng.normal(size=(1, 4, 9, 11)).astype(np.float32)
    ref, _ = _reference(torch_pipe, "pndm", pixel_values, latents, 3.0, height=18, width=22,
                        num_images_per_prompt=1)
    out = pipe(pixel_values, params, 0, num_inference_steps=STEPS, guidance_scale=3.0, height=18, width=22,
               latents=latents)
    assert out.images.shape == (1, 18, 22, 3)
    assert float(np.max(np.abs(out.images - ref))) <= PIXEL_TOLERANCE["pndm"]


def _aim_safety_checker(torch_pipe, images: np.ndarray) -> int:
    """Set the checker's thresholds so that exactly one of ``images`` is flagged; return its index."""
    from imvar_jax.preprocessing import prepare_inputs, to_pil

    checker = torch_pipe.safety_checker
    clip_input = prepare_inputs(to_pil(images), "clip", feature_extractor_config=torch_pipe.feature_extractor.to_dict())
    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(torch.from_numpy(clip_input))[1])
        embeds = torch.nn.functional.normalize(embeds, dim=-1)
        cos = embeds @ torch.nn.functional.normalize(checker.concept_embeds, dim=-1).T  # [N, 17]
        top = cos[:, 0].argsort(descending=True)
        first, second = float(cos[top[0], 0]), float(cos[top[1], 0])
        assert first - second > 0.004, "pictures too alike to flag only one"
        checker.concept_embeds_weights.fill_(2.0)  # cosine <= 1: nothing else can pass
        checker.concept_embeds_weights[0] = (first + second) / 2
        checker.special_care_embeds_weights.fill_(2.0)
    return int(top[0])


def test_safety_checker_matches_diffusers(torch_pipe, folder, tmp_path):
    pixel_values, latents = _inputs(seed=1)
    clean, _ = _reference(torch_pipe, "pndm", pixel_values, latents, 3.0)
    flagged = _aim_safety_checker(torch_pipe, clean)
    aimed = convert_checkpoint(save_pipeline(torch_pipe, tmp_path / "torch"), tmp_path / "flax")
    pipe, params = ImageVariationPipeline.from_pretrained(aimed, scheduler="pndm")
    ref, ref_flags = _reference(torch_pipe, "pndm", pixel_values, latents, 3.0, safety=True)
    out = pipe(pixel_values, params, 0, num_inference_steps=STEPS, guidance_scale=3.0, num_images_per_prompt=K,
               height=HEIGHT, width=WIDTH, latents=latents)
    assert ref_flags == [i == flagged for i in range(2 * K)]
    assert out.nsfw_content_detected == ref_flags
    assert not out.images[flagged].any()
    assert float(np.max(np.abs(out.images - ref))) <= PIXEL_TOLERANCE["pndm"]
    # Several pictures per device: the flag must black out the right one after sharding.
    gen = pipe.generate(pixel_values, params, seed=0, num_images_per_prompt=K, preprocessing="clip",
                        latents=latents, num_inference_steps=STEPS, guidance_scale=3.0, height=HEIGHT, width=WIDTH,
                        devices=jax.local_devices()[:2])
    assert gen.nsfw_content_detected == ref_flags
    np.testing.assert_allclose(gen.images, out.images, atol=1e-5)


def _one_and_eight(pipe, params, pixel_values, **run):
    one = pipe.generate(pixel_values, params, devices=jax.local_devices()[:1], **run).images
    eight = pipe.generate(pixel_values, params, **run).images
    assert len(jax.local_devices()) == 8 and one.shape == (pixel_values.shape[0] * K, HEIGHT, WIDTH, 3)
    return one, eight


def test_same_pictures_on_one_or_eight_devices(folder):
    pipe, params = _ours(folder, "pndm")
    pixel_values, _ = _inputs(n=3)  # 6 pictures: padded to 8 on 8 devices
    run = dict(seed=7, num_images_per_prompt=K, preprocessing="clip", num_inference_steps=STEPS, guidance_scale=3.0,
               height=HEIGHT, width=WIDTH)
    one, eight = _one_and_eight(pipe, params, pixel_values, **run)
    assert float(np.max(np.abs(one - eight))) <= 1e-5
    np.testing.assert_array_equal(eight, pipe.generate(pixel_values, params, **run).images)
    other = pipe.generate(pixel_values, params, **{**run, "seed": 8}).images
    assert float(np.max(np.abs(other - eight))) > 1e-2
    # The unsharded call with the same seed draws the same noise.
    single = pipe(pixel_values, params, 7, num_images_per_prompt=K, num_inference_steps=STEPS, guidance_scale=3.0,
                  height=HEIGHT, width=WIDTH).images
    assert float(np.max(np.abs(single - one))) <= 1e-5


def test_ddim_eta_noise_is_deterministic(folder):
    pipe, params = _ours(folder, "ddim")
    pixel_values, _ = _inputs(n=3)
    run = dict(seed=7, num_images_per_prompt=K, preprocessing="clip", num_inference_steps=STEPS, guidance_scale=3.0,
               eta=0.5, height=HEIGHT, width=WIDTH)
    one, eight = _one_and_eight(pipe, params, pixel_values, **run)
    # A batch of 6 on one device and of 1 per device round differently (1e-6 relative in the
    # UNet, measured); DDIM's x0 estimate divides by sqrt(alpha_bar) and the guidance scale
    # multiplies, which grew that to 4e-5 here with any eta, 0 included.
    assert float(np.max(np.abs(one - eight))) <= 1e-4
    np.testing.assert_array_equal(eight, pipe.generate(pixel_values, params, **run).images)
    assert float(np.max(np.abs(pipe.generate(pixel_values, params, **{**run, "seed": 8}).images - eight))) > 1e-2
    # eta's noise is drawn from the pictures' keys: it changes the pictures, reproducibly. Whether it is drawn at
    # all is decided at run time (none at eta 0), by the same program.
    with CompileLog() as log:
        no_eta = pipe.generate(pixel_values, params, **{**run, "eta": 0.0}).images
    assert not log.names
    assert float(np.max(np.abs(no_eta - eight))) > 1e-3


def test_euler_ancestral_noise_follows_the_picture_keys(folder):
    """Euler ancestral draws fresh noise every step from each picture's own key stream: the pictures do not
    depend on the device count, and the seed changes them."""
    pipe, params = _ours(folder, "euler-a")
    pixel_values, _ = _inputs(n=3)
    run = dict(seed=7, num_images_per_prompt=K, preprocessing="clip", num_inference_steps=STEPS, guidance_scale=3.0,
               height=HEIGHT, width=WIDTH)
    one, eight = _one_and_eight(pipe, params, pixel_values, **run)
    assert float(np.max(np.abs(one - eight))) <= 1e-5
    np.testing.assert_array_equal(eight, pipe.generate(pixel_values, params, **run).images)
    assert float(np.max(np.abs(pipe.generate(pixel_values, params, **{**run, "seed": 8}).images - eight))) > 1e-2


def test_compiles_once_and_not_per_step(folder):
    pipe, params = ImageVariationPipeline.from_pretrained(folder, safety_checker=False)
    a, _ = _inputs(seed=4)
    b, _ = _inputs(seed=5)
    common = dict(num_inference_steps=STEPS, num_images_per_prompt=K, height=HEIGHT, width=WIDTH)
    with CompileLog() as first:
        pipe(a, params, 0, guidance_scale=3.0, **common)
    assert first.names, "the compile log saw no compile: the counting itself is broken"
    # Other inputs, seed and guidance scale are traced values: the second call compiles nothing.
    with CompileLog() as second:
        pipe(b, params, 1, guidance_scale=7.5, eta=0.5, **common)
    assert second.names == []
    # So is the step count: the scheduler's tables are padded to one length, the loop stops at the real one.
    with CompileLog() as steps:
        by_steps = {n: pipe(a, params, 0, guidance_scale=3.0, **{**common, "num_inference_steps": n}).images
                    for n in (10, 20, 50)}
    assert steps.names == []
    assert float(np.abs(by_steps[10] - by_steps[50]).max()) > 1e-3  # the runs did differ in length

    # The loop is one XLA while over the scheduler's real timesteps, not unrolled: the compiled
    # program for 10 and for 50 steps (tables not padded, as exported programs have them) is the same
    # size, with one loop of each length.
    models = Models(pipe.unet, pipe.vae, pipe.image_encoder)
    opts = SampleOptions(num_images_per_prompt=K, latent_size=(HEIGHT // 2, WIDTH // 2), do_cfg=True,
                         latents_given=False, with_callback=False, scheduler=pipe.scheduler)
    keys = jax.random.split(jax.random.key(0), 2 * K)
    ones = jnp.ones((a.shape[0], 1), jnp.float32)
    program = jax.jit(lambda p, x, k, state: sample(models, opts, p, Conditioning(x[:, None], ones, 0 * ones), k, None,
                                                    jnp.float32(3.0), jnp.float32(0.0), state, jnp.int32(1),
                                                    jnp.int32(1)))
    texts = {}
    for steps in (10, 50):
        state = pipe.scheduler.set_timesteps(steps, (2 * K, HEIGHT // 2, WIDTH // 2, 4))
        text = program.lower(params, a, keys, state).compile().as_text()
        trips = re.findall(r'known_trip_count":\{"n":"(\d+)"', text)
        assert trips.count(str(len(state.timesteps))) == 1, (steps, trips)
        texts[steps] = text
    assert texts[10].count(" convolution(") == texts[50].count(" convolution(") > 0
    assert abs(len(texts[10]) - len(texts[50])) < 100


def test_warm_up_makes_the_program_while_the_weights_load(folder):
    """``from_pretrained(warm_up=...)`` gets the call's sampling program on a thread during loading: the call then
    compiles nothing and gives the pictures a pipeline without warm-up gives."""
    a, _ = _inputs(seed=4)
    call = dict(num_inference_steps=STEPS, num_images_per_prompt=K, height=HEIGHT, width=WIDTH, guidance_scale=3.0)
    notes = []
    with CompileLog() as loading:
        pipe, params = ImageVariationPipeline.from_pretrained(folder, safety_checker=False, on_compile=notes.append,
                                                              warm_up=dict(images=np.zeros_like(a), **call))
    assert loading.count("jit(generate)") == 1, loading.names
    assert [n for n in notes if n.startswith("compiling for")] and \
        re.fullmatch(r"weights loaded in \d+\.\d s; the sampling program was ready \d+\.\d s after them", notes[-1])
    with CompileLog() as calling:
        warm = pipe.generate(a, params, seed=3, **call).images
    assert calling.count("jit(generate)") == 0, calling.names
    plain_pipe, plain_params = _ours(folder, "pndm")
    np.testing.assert_array_equal(warm, plain_pipe.generate(a, plain_params, seed=3, **call).images)


@pytest.mark.parametrize("kwargs", [dict(), dict(devices=2), dict(dtype="bfloat16", vae_dtype="float32")])
def test_abstract_params_are_what_from_pretrained_returns(folder, kwargs):
    devices = jax.local_devices()[:kwargs.pop("devices")] if "devices" in kwargs else None
    pipe, params = ImageVariationPipeline.from_pretrained(folder, devices=devices, **kwargs)
    shapes = pipe.abstract_params(devices)
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    for shape, real in zip(jax.tree.leaves(shapes), jax.tree.leaves(params)):
        assert (shape.shape, shape.dtype, shape.sharding) == (real.shape, real.dtype, real.sharding)
    assert {x.dtype for x in jax.tree.leaves(shapes["vae"])} == {np.dtype(kwargs.get("vae_dtype", "float32"))}


def test_warm_up_errors_are_those_of_the_call(folder):
    pixel_values, _ = _inputs(n=1)
    with pytest.raises(TypeError, match="bogus"):
        ImageVariationPipeline.from_pretrained(folder, safety_checker=False,
                                               warm_up=dict(images=pixel_values, bogus=1))
    with pytest.raises(SettingsError, match="^height: 7 is not a positive multiple of 2"):
        ImageVariationPipeline.from_pretrained(folder, safety_checker=False,
                                               warm_up=lambda pipe: dict(images=pixel_values, height=7, width=8))
    with pytest.raises(ValueError, match="^warm_up: expected the keyword arguments of a generate call"):
        ImageVariationPipeline.from_pretrained(folder, safety_checker=False, warm_up=["images"])
    # A function may decide against warming up, from the configs.
    seen = []
    pipe, params = ImageVariationPipeline.from_pretrained(folder, safety_checker=False,
                                                          warm_up=lambda pipe: seen.append(pipe) or None)
    assert seen and seen[0] is pipe and "unet" in params


def test_pmap_call_with_replicated_params(folder):
    pipe, params = _ours(folder, "lms")
    pixel_values, latents = _inputs(n=2)
    common = dict(num_inference_steps=STEPS, guidance_scale=3.0, num_images_per_prompt=K, height=HEIGHT, width=WIDTH)
    devices = jax.local_devices()[:2]
    flat = pipe(pixel_values, params, 3, latents=latents, **common).images
    sharded = pipe(shard(pixel_values, 2), replicate(params, devices), 3, latents=shard(latents, 2), jit=True,
                   **common).images
    assert float(np.max(np.abs(flat - sharded))) <= 1e-5


def test_callback_steps_match_diffusers(torch_pipe, folder):
    pipe, params = _ours(folder, "pndm")
    pixel_values, latents = _inputs()
    ref_calls, our_calls = [], []
    _reference(torch_pipe, "pndm", pixel_values, latents, 3.0, callback_steps=2,
               callback=lambda i, t, x: ref_calls.append((i, int(t), x.numpy().copy())))
    pipe(pixel_values, params, 0, num_inference_steps=STEPS, guidance_scale=3.0, num_images_per_prompt=K,
         height=HEIGHT, width=WIDTH, latents=latents, callback_steps=2,
         callback=lambda i, t, x: our_calls.append((i, t, x)))
    jax.effects_barrier()
    assert [(i, t) for i, t, _ in our_calls] == [(i, t) for i, t, _ in ref_calls]
    assert ref_calls
    for (_, _, ours), (_, _, ref) in zip(our_calls, ref_calls):
        np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_pil_output_and_bad_arguments(folder):
    pipe, params = _ours(folder, "pndm")
    pixel_values, latents = _inputs()
    common = dict(num_inference_steps=STEPS, num_images_per_prompt=K, height=HEIGHT, width=WIDTH)
    out = pipe(pixel_values, params, 0, output_type="pil", **common)
    assert len(out.images) == 2 * K and out.images[0].size == (WIDTH, HEIGHT)
    with pytest.raises(ValueError, match="height"):
        pipe(pixel_values, params, 0, **{**common, "height": 15})
    with pytest.raises(ValueError, match="latents"):
        pipe(pixel_values, params, 0, latents=latents[:1], **common)
    with pytest.raises(ValueError, match="pixel_values"):
        pipe(pixel_values[:, :, :16], params, 0, **common)
    with pytest.raises(ValueError, match="jit=True expects params"):
        pipe(shard(pixel_values, 2), params, 0, jit=True, **common)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(pixel_values, params, 0, **{**common, "num_inference_steps": 0})

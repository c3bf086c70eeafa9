"""The loading API against diffusers' PyTorch pipeline on the same tiny checkpoint."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import assert_close
from imvar_jax import ImageVariationPipeline, SettingsError, convert_checkpoint, tiny
from tiny_checkpoint import build_torch_pipeline, save_pipeline


@pytest.fixture(scope="module")
def torch_pipe():
    return build_torch_pipeline(seed=1)


@pytest.fixture(scope="module")
def folders(torch_pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    src = save_pipeline(torch_pipe, root / "torch")
    return {"torch": src, "converted": convert_checkpoint(src, root / "flax")}


@pytest.fixture(scope="module", params=["torch", "converted"])
def loaded(request, folders):
    return ImageVariationPipeline.from_pretrained(folders[request.param])


def _pixels(n: int = 2, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)


def test_params_layout(loaded):
    pipe, params = loaded
    assert set(params) == {"unet", "vae", "image_encoder", "safety_checker"}
    assert pipe.vae_scale_factor == 2
    assert pipe.scheduler_config["_class_name"] == "PNDMScheduler"
    assert pipe.feature_extractor_config["crop_size"] == {"height": 32, "width": 32}


def test_encode_image(loaded, torch_pipe):
    pipe, params = loaded
    x = _pixels()
    ours = pipe.encode_image(params, x)
    with torch.no_grad():
        ref = torch_pipe.image_encoder(torch.from_numpy(x)).image_embeds.unsqueeze(1).numpy()
    assert ours.shape == (2, 1, 32)
    assert_close(ours, ref, what="image_embeds")


def test_predict_noise_non_square(loaded, torch_pipe):
    pipe, params = loaded
    rng = np.random.default_rng(1)
    # 24x32 latents: 768 tokens at the first level, so CPU takes the chunked attention path.
    latents = rng.normal(size=(2, 4, 24, 32)).astype(np.float32)
    embeds = rng.normal(size=(2, 1, 32)).astype(np.float32)
    ours = pipe.predict_noise(params, latents, 501, embeds)
    with torch.no_grad():
        ref = torch_pipe.unet(torch.from_numpy(latents), 501, encoder_hidden_states=torch.from_numpy(embeds)).sample
    assert_close(ours, ref.numpy(), what="noise prediction")


def test_decode_latents(loaded, torch_pipe):
    pipe, params = loaded
    latents = np.random.default_rng(2).normal(size=(2, 4, 8, 6)).astype(np.float32) * 0.2
    ours = pipe.decode_latents(params, latents)
    with torch.no_grad():
        img = torch_pipe.vae.decode(torch.from_numpy(latents) / torch_pipe.vae.config.scaling_factor).sample
    ref = (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert ours.shape == (2, 16, 12, 3) and ours.dtype == jnp.float32
    assert 0.0 <= float(ours.min()) and float(ours.max()) <= 1.0
    assert_close(ours, ref, what="decoded images")


def test_encode_latents(loaded, torch_pipe):
    pipe, params = loaded
    images = np.random.default_rng(3).uniform(size=(2, 16, 20, 3)).astype(np.float32)
    key = jax.random.key(7)
    ours = pipe.encode_latents(params, images, key)
    with torch.no_grad():
        dist = torch_pipe.vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1).latent_dist
    # Our sample is mean + std * N(0, 1) drawn from ``key`` in NHWC; apply the same noise to the reference.
    eps = np.asarray(jax.random.normal(key, (2, 8, 10, 4))).transpose(0, 3, 1, 2)
    ref = (dist.mean.numpy() + dist.std.numpy() * eps) * torch_pipe.vae.config.scaling_factor
    assert_close(ours, ref, what="encoded latents")
    assert not np.allclose(ours, pipe.encode_latents(params, images, jax.random.key(8)))


def test_safety_flags_match(loaded, torch_pipe):
    pipe, params = loaded
    x = _pixels(n=4, seed=4)
    ours = pipe.check_safety(params, x)
    images = np.zeros((4, 8, 8, 3), np.float32)
    with torch.no_grad():
        _, ref = torch_pipe.safety_checker(images=images, clip_input=torch.from_numpy(x))
    assert ours.tolist() == list(ref)


def test_without_safety_checker(folders):
    pipe, params = ImageVariationPipeline.from_pretrained(folders["converted"], safety_checker=False)
    assert pipe.safety_checker is None and "safety_checker" not in params
    with pytest.raises(ValueError, match="without a safety checker"):
        pipe.check_safety(params, _pixels())


@pytest.mark.parametrize("sample_size", [None, (4, 2)])
def test_output_size_follows_the_unet_config(sample_size):
    """diffusers' default UNet config leaves sample_size unset (only a given size will do); [h, w] is per side."""
    configs = tiny.tiny_configs()
    configs["unet"] = dataclasses.replace(configs["unet"], sample_size=sample_size)
    pipe = ImageVariationPipeline.from_configs(configs)
    f = pipe.vae_scale_factor
    assert pipe.size(8 * f, 4 * f) == (8 * f, 4 * f)
    if sample_size is None:
        with pytest.raises(SettingsError, match="sets no sample_size"):
            pipe.size()
    else:
        assert pipe.size() == (4 * f, 2 * f)

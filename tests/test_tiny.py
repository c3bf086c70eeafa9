"""The built-in ``"tiny"`` model: toy configs that fit together, the same weights and pictures every time."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from PIL import Image

from imvar_jax import ImageVariationPipeline
from imvar_jax.schedulers import DDIMScheduler, PNDMScheduler
from imvar_jax.tiny import tiny_configs, tiny_params


def params_digest(params) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes."""
    h = hashlib.sha256()
    leaves = sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda kv: jax.tree_util.keystr(kv[0]))
    for path, leaf in leaves:
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_configs_fit_together():
    c = tiny_configs()
    assert c["image_encoder"].projection_dim == c["unet"].context_dim
    assert c["vae"].latent_channels == c["unet"].in_channels == c["unet"].out_channels
    assert c["safety_checker"].vision_config == c["image_encoder"]


def test_params_are_the_same_bits_every_time():
    first = tiny_params(0)
    _assert_trees_equal(first, tiny_params(0))
    other = tiny_params(1)
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(other))), \
        "the seed does not change the weights"
    # Random init must not leave whole components constant (zero kernels would make the model a no-op).
    for name in ("unet", "vae", "image_encoder", "safety_checker"):
        assert np.std(np.concatenate([np.ravel(x) for x in jax.tree.leaves(first[name])])) > 0.01, name

    # A fresh process builds the same bits.
    here = Path(__file__).parent
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from test_tiny import params_digest; "
              "from imvar_jax.tiny import tiny_params; print(params_digest(tiny_params(0)))")
    out = subprocess.run([sys.executable, "-c", script, str(here)], capture_output=True, text=True, timeout=300,
                         env=os.environ.copy(), check=True)
    assert out.stdout.strip().splitlines()[-1] == params_digest(first)


def test_from_pretrained_tiny_honours_the_options():
    pipe, params = ImageVariationPipeline.from_pretrained("tiny")
    assert isinstance(pipe.scheduler, PNDMScheduler) and pipe.dtype == jnp.float32
    assert pipe.safety_checker is not None and "safety_checker" in params
    _, built = ImageVariationPipeline.from_pretrained("tiny")
    _assert_trees_equal(params, built)

    pipe, params = ImageVariationPipeline.from_pretrained("tiny", scheduler="ddim", dtype=jnp.bfloat16,
                                                          safety_checker=False)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.dtype == jnp.bfloat16
    assert pipe.safety_checker is None and set(params) == {"unet", "vae", "image_encoder"}
    reference = tiny_params(0)
    for name in params:
        _assert_trees_equal(params[name], jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16), reference[name]))

    with pytest.raises(ValueError, match="revision"):
        ImageVariationPipeline.from_pretrained("tiny", revision="v2.0")
    with pytest.raises(ValueError, match="scheduler"):
        ImageVariationPipeline.from_pretrained("tiny", scheduler="heun")
    with pytest.raises(ValueError, match="^dtype: unsupported 'float64'"):
        ImageVariationPipeline.from_pretrained("tiny", dtype="float64")
    with pytest.raises(ValueError, match="^vae_dtype: unsupported 'int8'"):
        ImageVariationPipeline.from_pretrained("tiny", vae_dtype="int8")
    with pytest.raises(ValueError, match="^attention: unknown 'flash'"):
        ImageVariationPipeline.from_pretrained("tiny", attention="flash")
    with pytest.raises(ValueError, match="^attention: 'cudnn' needs an NVIDIA GPU but the devices are 'cpu'"):
        ImageVariationPipeline.from_pretrained("tiny", attention="cudnn")


def test_generate_gives_the_same_pictures_twice():
    pipe, params = ImageVariationPipeline.from_pretrained("tiny")
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)),
                Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))]
    kwargs = dict(num_images_per_prompt=2, num_inference_steps=2, guidance_scale=3.0)
    first = pipe.generate(pictures, params, seed=0, **kwargs)
    again = pipe.generate(pictures, params, seed=0, **kwargs)
    other = pipe.generate(pictures, params, seed=1, **kwargs)

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert first.images.shape == (4, size, size, 3)
    np.testing.assert_array_equal(first.images, again.images)
    assert not np.array_equal(first.images, other.images), "the seed does not change the pictures"
    # The random safety checker must flag nothing: its pictures are noise, and visible.
    assert first.nsfw_content_detected == [False] * 4
    assert all(np.ptp(picture) > 0 for picture in first.images)

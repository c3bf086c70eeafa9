"""Parity of the Flax VAE with diffusers' PyTorch ``AutoencoderKL``, through the converter."""

from __future__ import annotations

import dataclasses
import json
import math
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from safetensors.torch import load_file, save_file

from helpers import assert_close, randomize_, save_torch
from imvar_jax.convert.common import ConversionError, convert_component, plan
from imvar_jax.convert.vae import SPEC, table
from imvar_jax.models import abstract_params
from imvar_jax.models.config import ConfigError
from imvar_jax.models.vae import AutoencoderKL, VAEConfig, sample_latent

CONFIGS = {
    "tiny": VAEConfig.tiny(),
    # Three levels and two resnets per block: shortcut-free resnets and stacked down/upsamplers.
    "deep": VAEConfig(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                      block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8, latent_channels=4),
    "bare": dataclasses.replace(VAEConfig.tiny(), use_quant_conv=False, use_post_quant_conv=False,
                                mid_block_add_attention=False),
}

SD_V1_PARAMS = 83_653_863


def _torch_model(cfg: VAEConfig, seed: int = 0) -> TorchAutoencoderKL:
    return randomize_(TorchAutoencoderKL(**dataclasses.asdict(cfg)), seed=seed)


def _inputs(cfg: VAEConfig) -> tuple[np.ndarray, np.ndarray]:
    """Non-square NCHW images in [-1, 1] and NCHW latents."""
    rng = np.random.default_rng(0)
    f = cfg.scale_factor
    h, w = 3 * 2 * f, 5 * 2 * f
    images = rng.uniform(-1, 1, (2, cfg.in_channels, h, w)).astype(np.float32)
    latents = rng.standard_normal((2, cfg.latent_channels, h // f, w // f)).astype(np.float32)
    return images, latents


def _nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


@lru_cache(maxsize=None)
def _jitted(cfg: VAEConfig, dtype: jnp.dtype = jnp.float32):
    model = AutoencoderKL(cfg, dtype=dtype)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.encode))
    decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.decode))
    return encode, decode


def _reference(model: TorchAutoencoderKL, images: np.ndarray, latents: np.ndarray):
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(images)).latent_dist
        decoded = model.decode(torch.from_numpy(latents)).sample
    return dist.mean.numpy(), dist.logvar.numpy(), decoded.numpy()


@pytest.fixture(scope="module")
def reference(request):
    cfg = CONFIGS[request.param]
    return request.param, cfg, _torch_model(cfg)


FILES = [("safetensors", torch.float32), ("bin", torch.float32), ("safetensors", torch.float16), ("bin", torch.float16)]
# Every file format for the full configs; the optional-module config needs one.
PARITY_CASES = [(name, *f) for name in CONFIGS if name != "bare" for f in FILES] + [
    ("bare", "safetensors", torch.float32)]


@pytest.mark.parametrize("reference,fmt,dtype", PARITY_CASES, indirect=["reference"])
def test_parity(reference, fmt, dtype, tmp_path):
    name, cfg, model = reference
    save_torch(model, tmp_path, fmt=fmt, dtype=dtype)
    config, params = convert_component(SPEC, tmp_path)
    assert config == cfg
    images, latents = _inputs(cfg)
    ref_mean, ref_logvar, ref_decoded = _reference(model, images, latents)

    encode, decode = _jitted(cfg)
    mean, logvar = encode(params, _nhwc(images))
    decoded = decode(params, _nhwc(latents))
    assert mean.dtype == logvar.dtype == decoded.dtype == jnp.float32
    assert_close(mean, _nhwc(ref_mean), what="mean")
    assert_close(logvar, _nhwc(ref_logvar), what="logvar")
    assert_close(decoded, _nhwc(ref_decoded), what="decoded")


def test_init_creates_every_converted_param():
    cfg = CONFIGS["tiny"]
    images, _ = _inputs(cfg)
    # Shapes only: running init eagerly on CPU takes seconds and proves nothing more.
    reconstruction, variables = jax.eval_shape(AutoencoderKL(cfg).init_with_output, jax.random.key(0),
                                               _nhwc(images))
    expected = jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), abstract_params(cfg))
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), variables["params"]) == expected
    assert reconstruction.shape == _nhwc(images).shape
    assert reconstruction.dtype == jnp.float32


def test_cudnn_attention_is_refused_clearly():
    # The mid-block always attends in float32, which cuDNN flash attention does not take; the
    # refusal names the argument, the dtype and head dim, and what to pass, on any backend.
    cfg = CONFIGS["tiny"]
    images, _ = _inputs(cfg)
    head_dim = cfg.block_out_channels[-1]
    with pytest.raises(ValueError, match=rf"attention_impl='cudnn' .*\(float32, head dim {head_dim}\).*"
                                         r"pass attention_impl='auto' \(picks per call\) or 'xla'"):
        jax.eval_shape(AutoencoderKL(cfg, attention_impl="cudnn").init, jax.random.key(0), _nhwc(images))


def test_logvar_is_clamped(tmp_path):
    cfg = CONFIGS["tiny"]
    save_torch(_torch_model(cfg), tmp_path)
    _, params = convert_component(SPEC, tmp_path)
    images, _ = _inputs(cfg)
    encode, _ = _jitted(cfg)
    n = cfg.latent_channels
    for offset, bound in ((1e4, 20.0), (-1e4, -30.0)):
        bias = np.array(params["quant_conv"]["bias"])
        bias[n:] += offset
        shifted = {**params, "quant_conv": {**params["quant_conv"], "bias": bias}}
        _, logvar = encode(shifted, _nhwc(images))
        np.testing.assert_array_equal(np.asarray(logvar), bound)


def test_sample_latent():
    mean = jnp.arange(24, dtype=jnp.float32).reshape(1, 2, 3, 4)
    logvar = jnp.linspace(-3, 3, 24, dtype=jnp.float32).reshape(1, 2, 3, 4)
    key = jax.random.key(1)
    got = sample_latent(mean, logvar, key)
    want = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    assert not np.array_equal(np.asarray(sample_latent(mean, logvar, jax.random.key(2))), np.asarray(got))


@pytest.mark.parametrize("reference", ["tiny"], indirect=True)
def test_half_precision_compute_stays_close(reference, tmp_path):
    """bfloat16 computation (float32 params): a loose check that no op loses its float32 upcast."""
    name, cfg, model = reference
    save_torch(model, tmp_path)
    _, params = convert_component(SPEC, tmp_path)
    images, latents = _inputs(cfg)
    ref_mean, _, ref_decoded = _reference(model, images, latents)
    encode, decode = _jitted(cfg, jnp.bfloat16)
    mean, _ = encode(params, _nhwc(images))
    decoded = decode(params, _nhwc(latents))
    assert mean.dtype == decoded.dtype == jnp.float32
    assert_close(mean, _nhwc(ref_mean), rel=5e-2, what="bf16 mean")
    assert_close(decoded, _nhwc(ref_decoded), rel=5e-2, what="bf16 decoded")


_LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _rename_attention(path, legacy_shape: bool = False) -> None:
    file = path / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    renamed = {}
    for k, v in state.items():
        for new, old in _LEGACY.items():
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
                if legacy_shape and v.ndim == 2:
                    v = v[:, :, None, None]
        renamed[k] = v.contiguous()
    save_file(renamed, file)


def test_legacy_attention_names(tmp_path):
    cfg = CONFIGS["tiny"]
    model = _torch_model(cfg)
    save_torch(model, tmp_path / "new")
    save_torch(model, tmp_path / "old")
    _rename_attention(tmp_path / "old")
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in load_file(
        tmp_path / "old" / "diffusion_pytorch_model.safetensors")
    _, new = convert_component(SPEC, tmp_path / "new")
    _, old = convert_component(SPEC, tmp_path / "old")
    jax.tree_util.tree_map(np.testing.assert_array_equal, old, new)


def test_legacy_conv_shaped_attention_is_rejected(tmp_path):
    cfg = CONFIGS["tiny"]
    save_torch(_torch_model(cfg), tmp_path)
    _rename_attention(tmp_path, legacy_shape=True)
    with pytest.raises(ConversionError, match=r"attentions\.0\.query\.weight' has shape"):
        convert_component(SPEC, tmp_path)


def test_sd_v1_full_size_table():
    cfg = VAEConfig.sd_v1()
    with torch.device("meta"):
        model = TorchAutoencoderKL(**dataclasses.asdict(cfg))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = abstract_params(cfg)
    steps = plan("vae", table(cfg), shapes, expected)
    assert len(steps) == len(shapes) == 248
    assert sum(math.prod(s.shape) for s in jax.tree_util.tree_leaves(expected)) == SD_V1_PARAMS
    assert sum(math.prod(s) for s in shapes.values()) == SD_V1_PARAMS
    assert cfg.scale_factor == 8


@pytest.mark.parametrize("field,value", [
    ("act_fn", "gelu"),
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]),
    ("shift_factor", 0.0609),
    ("latents_mean", [0.0, 0.0, 0.0, 0.0]),
    ("norm_num_groups", 24),
])
def test_unsupported_config(field, value, tmp_path):
    raw = {**dataclasses.asdict(VAEConfig.tiny()), "_class_name": "AutoencoderKL", field: value}
    with pytest.raises(ConfigError, match=field):
        VAEConfig.from_dict(raw)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=field):
        convert_component(SPEC, tmp_path)

"""Parity of the Flax UNet with diffusers' PyTorch ``UNet2DConditionModel``, through the converter."""

from __future__ import annotations

import json
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from helpers import assert_close, randomize_, save_torch
from imvar_jax.convert.common import convert_component, plan
from imvar_jax.convert.unet import SPEC, table
from imvar_jax.models import abstract_params
from imvar_jax.models.config import ConfigError, to_dict
from imvar_jax.models.layers import nearest_source_indices
from imvar_jax.models.unet import UNet2DConditionModel, UNetConfig

CONFIGS = {
    # The image-variation layout at toy size: int head count, 1x1-conv projections, one resnet per block.
    "tiny": UNetConfig.tiny(),
    # Three levels, per-block head counts and resnet counts, linear projections, stacked transformer
    # blocks, and the non-default embedding/padding options SD-v1 does not use.
    "deep": UNetConfig(
        sample_size=12, in_channels=3, out_channels=5, block_out_channels=(16, 32, 32), layers_per_block=(2, 1, 2),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(1, 2, 4), transformer_layers_per_block=(1, 2, 2), cross_attention_dim=20,
        use_linear_projection=True, upcast_attention=True, norm_num_groups=4, norm_eps=1e-6,
        flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, time_embedding_dim=48),
}

# Per config: the latent size (non-square), the conditioning length and the timesteps the file-format
# tests use; the other conditioning length is covered by test_other_sequence_length.
INPUTS = {
    "tiny": dict(size=(8, 16), tokens=1, timesteps=501),
    "deep": dict(size=(12, 8), tokens=3, timesteps=np.array([10.5, 999.0], np.float32)),
}
OTHER_TOKENS = {"tiny": 4, "deep": 1}
# Latent sizes that are not multiples of the downscale factor (2 for tiny, 4 for deep): the
# downsamplers round (ceil for tiny's padding 1, floor for deep's padding 0) and the upsamplers
# must resize to the skips' sizes, by a plain doubling on some levels and a gather on others.
ODD_SIZES = [(9, 13), (5, 7)]

SD_V1_PARAMS = 859_520_964
SD_V1_TENSORS = 686

# lambdalabs/sd-image-variations-diffusers unet/config.json.
SD_V1_JSON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.8.0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


def _torch_model(cfg: UNetConfig, seed: int = 0) -> TorchUNet:
    return randomize_(TorchUNet(**to_dict(cfg)), seed=seed)


def _inputs(name: str, tokens: int | None = None, size: tuple[int, int] | None = None):
    cfg, spec = CONFIGS[name], INPUTS[name]
    rng = np.random.default_rng(1)
    h, w = size or spec["size"]
    sample = rng.standard_normal((2, cfg.in_channels, h, w)).astype(np.float32)  # NCHW, as torch takes it
    context = rng.standard_normal((2, tokens or spec["tokens"], cfg.context_dim)).astype(np.float32)
    return sample, spec["timesteps"], context


def _nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def _reference(model: TorchUNet, sample, timesteps, context) -> np.ndarray:
    t = torch.from_numpy(timesteps) if isinstance(timesteps, np.ndarray) else timesteps
    with torch.no_grad():
        out = model(torch.from_numpy(sample), t, encoder_hidden_states=torch.from_numpy(context)).sample
    return _nhwc(out.numpy())


@lru_cache(maxsize=None)
def _jitted(cfg: UNetConfig, dtype: jnp.dtype = jnp.float32):
    model = UNet2DConditionModel(cfg, dtype=dtype)
    return jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))


@pytest.fixture(scope="module")
def reference(request):
    cfg = CONFIGS[request.param]
    return request.param, cfg, _torch_model(cfg)


FILES = [("safetensors", torch.float32, None), ("bin", torch.float32, None),
         ("safetensors", torch.float16, None), ("bin", torch.float16, None)]
# Every file format for every config, and one sharded checkpoint.
PARITY_CASES = [(name, *f) for name in CONFIGS for f in FILES] + [("tiny", "safetensors", torch.float32, "20KB")]


@pytest.mark.parametrize("reference,fmt,dtype,shard", PARITY_CASES, indirect=["reference"])
def test_parity(reference, fmt, dtype, shard, tmp_path):
    name, cfg, model = reference
    save_torch(model, tmp_path, fmt=fmt, dtype=dtype, max_shard_size=shard)
    if shard:
        assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    config, params = convert_component(SPEC, tmp_path)
    assert config == cfg
    sample, timesteps, context = _inputs(name)
    ref = _reference(model, sample, timesteps, context)
    out = _jitted(cfg)(params, _nhwc(sample), timesteps, context)
    assert out.dtype == jnp.float32
    assert_close(out, ref, what=f"{name} {fmt} {dtype}")


@pytest.mark.parametrize("reference", list(CONFIGS), indirect=True)
def test_other_sequence_length(reference, tmp_path):
    """Conditioning of length 1 (image variations) and longer, on both configs."""
    name, cfg, model = reference
    save_torch(model, tmp_path)
    _, params = convert_component(SPEC, tmp_path)
    sample, timesteps, context = _inputs(name, OTHER_TOKENS[name])
    ref = _reference(model, sample, timesteps, context)
    assert_close(_jitted(cfg)(params, _nhwc(sample), timesteps, context), ref, what=f"{name} tokens")


@pytest.mark.parametrize("reference", list(CONFIGS), indirect=True)
def test_sizes_not_multiple_of_downscale_factor(reference, tmp_path):
    """Odd latent sizes (e.g. SD-v1 at 520 pixels, latent 65) match diffusers' forward_upsample_size path."""
    name, cfg, model = reference
    save_torch(model, tmp_path)
    _, params = convert_component(SPEC, tmp_path)
    for size in ODD_SIZES:
        assert size[0] % cfg.downscale_factor and size[1] % cfg.downscale_factor
        sample, timesteps, context = _inputs(name, size=size)
        ref = _reference(model, sample, timesteps, context)
        out = _jitted(cfg)(params, _nhwc(sample), timesteps, context)
        assert out.shape == ref.shape
        assert_close(out, ref, what=f"{name} {size}")


def test_nearest_indices_match_torch():
    """torch's nearest resize to an explicit size.

    The range holds SD-v1's 9->17, 17->33, 33->65 (a 520-pixel image) and 13 pairs where computing
    the ratio in float64 instead of torch's float32 would pick a different source pixel.
    """
    for in_size in range(1, 40):
        x = torch.arange(in_size, dtype=torch.float32).view(1, 1, 1, in_size)
        for out_size in range(in_size, 3 * in_size + 2):
            ref = torch.nn.functional.interpolate(x, size=(1, out_size), mode="nearest")[0, 0, 0].long().numpy()
            np.testing.assert_array_equal(nearest_source_indices(in_size, out_size), ref,
                                          err_msg=f"{in_size} -> {out_size}")


@pytest.mark.parametrize("reference", ["tiny"], indirect=True)
def test_half_precision_compute_stays_close(reference, tmp_path):
    """bfloat16 computation (float32 params): a loose check that no op loses its float32 upcast."""
    name, cfg, model = reference
    save_torch(model, tmp_path)
    _, params = convert_component(SPEC, tmp_path)
    sample, timesteps, context = _inputs(name)
    ref = _reference(model, sample, timesteps, context)
    out = _jitted(cfg, jnp.bfloat16)(params, _nhwc(sample), timesteps, context)
    assert out.dtype == jnp.float32
    assert_close(out, ref, rel=5e-2, what="bf16")


def test_sd_v1_full_size_matches_diffusers():
    """The full-size architecture: diffusers' tensor shapes (meta device, no memory) vs our abstract params."""
    cfg = UNetConfig.sd_v1()
    assert UNetConfig.from_dict(SD_V1_JSON) == cfg
    with torch.device("meta"):
        torch_model = TorchUNet(**SD_V1_JSON)
    shapes = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    ours = abstract_params(cfg)
    steps = plan("unet", table(cfg), shapes, ours)
    assert len(steps) == len(shapes) == SD_V1_TENSORS
    leaves = jax.tree_util.tree_leaves(ours)
    assert len(leaves) == SD_V1_TENSORS
    assert sum(int(np.prod(s.shape)) for s in leaves) == SD_V1_PARAMS
    # SD-v1 specifics the reference notes: conv projections and bias-free q/k/v.
    block = ours["down_blocks_0"]["attentions_0"]
    assert block["proj_in"]["kernel"].shape == (1, 1, 320, 320)
    assert set(block["transformer_blocks_0"]["attn1"]["to_q"]) == {"kernel"}
    assert block["transformer_blocks_0"]["ff"]["net_0"]["proj"]["kernel"].shape == (320, 2560)


def test_from_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**SD_V1_JSON, "attention_head_dim": [5, 10, 20, 20], "layers_per_block": [1, 2, 2, 1],
                                "use_linear_projection": True, "upcast_attention": True}))
    cfg = UNetConfig.from_json(path)
    assert cfg.heads == (5, 10, 20, 20) and cfg.resnets_per_block == (1, 2, 2, 1)
    assert cfg.use_linear_projection and cfg.upcast_attention
    hash(cfg)


@pytest.mark.parametrize("field,value", [
    ("class_embed_type", "timestep"), ("num_class_embeds", 10), ("addition_embed_type", "text"),
    ("time_embedding_type", "fourier"), ("resnet_time_scale_shift", "scale_shift"), ("dual_cross_attention", True),
    ("attention_type", "gated"), ("act_fn", "gelu"), ("conv_in_kernel", 5), ("conv_out_kernel", 1),
    ("center_input_sample", True), ("encoder_hid_dim", 16), ("time_cond_proj_dim", 8),
    ("only_cross_attention", True), ("num_attention_heads", 8), ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("mid_block_scale_factor", 2.0), ("class_embeddings_concat", True), ("time_embedding_act_fn", "silu"),
    ("down_block_types", ["AttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "CrossAttnUpBlock2D"]),
    ("attention_head_dim", [8, 8, 8]), ("attention_head_dim", 7),
    ("transformer_layers_per_block", [[1, 2], 1, 1, 1]), ("norm_num_groups", None),
    ("cross_attention_dim", [768, 1024, 768, 768]),
])
def test_unsupported_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        UNetConfig.from_dict({**SD_V1_JSON, field: value})


def test_bad_inputs_raise():
    cfg = CONFIGS["deep"]
    sample, timesteps, context = _inputs("deep")
    params = abstract_params(cfg)
    model = UNet2DConditionModel(cfg)
    x = _nhwc(sample)
    odd = jax.eval_shape(lambda p: model.apply({"params": p}, x[:, :11, :6], timesteps, context), params)
    assert odd.shape == (2, 11, 6, cfg.out_channels)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        jax.eval_shape(lambda p: model.apply({"params": p}, x, timesteps, context[..., :4]), params)
    with pytest.raises(ValueError, match="timesteps"):
        jax.eval_shape(lambda p: model.apply({"params": p}, x, np.zeros(3, np.float32), context), params)


def test_parity_configs_differ():
    """The two parity configs really differ in the properties the tests claim to cover."""
    tiny, deep = CONFIGS["tiny"], CONFIGS["deep"]
    assert isinstance(tiny.attention_head_dim, int) and isinstance(deep.attention_head_dim, tuple)
    assert tiny.use_linear_projection != deep.use_linear_projection
    assert len(tiny.block_out_channels) != len(deep.block_out_channels)
    assert tiny.context_dim != deep.context_dim

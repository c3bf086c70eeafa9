"""Parity of the Flax CLIP image encoder with transformers' ``CLIPVisionModelWithProjection``, through the converter."""

from __future__ import annotations

import copy
import dataclasses
import json
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig as TorchCLIPVisionConfig
from transformers import CLIPVisionModelWithProjection as TorchCLIPVisionModelWithProjection

from helpers import assert_close, randomize_, save_torch
from imvar_jax.convert.clip import IMAGE_ENCODER_SPEC, image_encoder_table
from imvar_jax.convert.common import ConversionError, convert_component, plan
from imvar_jax.models import abstract_params
from imvar_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection
from imvar_jax.models.config import ConfigError

SD_V1_PARAMS = 303_966_208

CONFIGS = {
    "quick_gelu": CLIPVisionConfig.tiny(),
    # Exact-erf GELU, a patch that does not divide the image (torch's stride drops the rest) and another eps.
    "gelu": dataclasses.replace(CLIPVisionConfig.tiny(), hidden_act="gelu", image_size=30, patch_size=7,
                                layer_norm_eps=1e-6, num_hidden_layers=1),
}


def _torch_model(cfg: CLIPVisionConfig, seed: int = 0) -> TorchCLIPVisionModelWithProjection:
    model = TorchCLIPVisionModelWithProjection(TorchCLIPVisionConfig(**dataclasses.asdict(cfg)))
    return randomize_(model, seed=seed)


def _pixels(cfg: CLIPVisionConfig, n: int = 3) -> np.ndarray:
    """NCHW, roughly the range of CLIP-normalised pictures."""
    rng = np.random.default_rng(1)
    return rng.uniform(-2, 2, (n, cfg.num_channels, cfg.image_size, cfg.image_size)).astype(np.float32)


@lru_cache(maxsize=None)
def _encode(cfg: CLIPVisionConfig):
    model = CLIPVisionModelWithProjection(cfg)
    return jax.jit(lambda p, x: model.apply({"params": p}, x, method=CLIPVisionModelWithProjection.encode))


def _check(model: TorchCLIPVisionModelWithProjection, cfg: CLIPVisionConfig, folder) -> tuple[float, float]:
    got_cfg, params = convert_component(IMAGE_ENCODER_SPEC, folder)
    assert got_cfg == cfg
    x = _pixels(cfg)
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(x))
    embeds, hidden = _encode(cfg)(params, jnp.asarray(x.transpose(0, 2, 3, 1)))
    return (assert_close(embeds, ref.image_embeds.numpy(), what="image_embeds"),
            assert_close(hidden, ref.last_hidden_state.numpy(), what="last_hidden_state"))


@pytest.fixture(scope="module")
def reference(request):
    cfg = CONFIGS[request.param]
    return request.param, cfg, _torch_model(cfg)


FILES = [("safetensors", torch.float32, None), ("bin", torch.float32, None), ("safetensors", torch.float16, None),
         ("bin", torch.float16, None), ("safetensors", torch.float32, "40KB")]
# Every file format for the ViT-L-like config; the second architecture needs one.
PARITY_CASES = [(name, *f) for name in CONFIGS if name != "gelu" for f in FILES] + [
    ("gelu", "safetensors", torch.float32, None)]


@pytest.mark.parametrize("reference,fmt,dtype,shard", PARITY_CASES, indirect=["reference"])
def test_parity(reference, fmt, dtype, shard, tmp_path):
    name, cfg, model = reference
    model = copy.deepcopy(model)
    save_torch(model, tmp_path, fmt=fmt, dtype=dtype, max_shard_size=shard)
    if shard:
        assert len(list(tmp_path.glob("*.safetensors"))) > 1
    _check(model, cfg, tmp_path)


@pytest.mark.parametrize("reference", list(CONFIGS), indirect=True)
def test_call_returns_image_embeds_and_jits_in_half_precision(reference, tmp_path):
    _, cfg, model = reference
    save_torch(copy.deepcopy(model), tmp_path)
    _, params = convert_component(IMAGE_ENCODER_SPEC, tmp_path)
    x = jnp.asarray(_pixels(cfg).transpose(0, 2, 3, 1))
    full = CLIPVisionModelWithProjection(cfg).apply({"params": params}, x)
    assert full.shape == (3, cfg.projection_dim)
    half = jax.jit(CLIPVisionModelWithProjection(cfg, dtype=jnp.bfloat16, attention_impl="xla").apply)(
        {"params": params}, x)
    assert half.dtype == jnp.bfloat16
    assert_close(half, full, rel=5e-2, what="bfloat16 image_embeds")


def test_old_position_ids_buffer_is_ignored(tmp_path):
    cfg = CONFIGS["quick_gelu"]
    model = _torch_model(cfg, seed=3)
    save_torch(model, tmp_path)
    f = tmp_path / "model.safetensors"
    state = load_file(f)
    state["vision_model.embeddings.position_ids"] = torch.arange(cfg.num_positions)[None]
    save_file(state, f, metadata={"format": "pt"})
    _check(model, cfg, tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    cfg = CONFIGS["quick_gelu"]
    save_torch(_torch_model(cfg), tmp_path)
    f = tmp_path / "model.safetensors"
    state = load_file(f)
    state["vision_model.extra.weight"] = torch.zeros(2)
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="vision_model.extra.weight"):
        convert_component(IMAGE_ENCODER_SPEC, tmp_path)


def test_wrong_input_size_raises():
    cfg = CONFIGS["quick_gelu"]
    model = CLIPVisionModelWithProjection(cfg)
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_params(cfg))
    with pytest.raises(ValueError, match="doesn't match"):
        model.apply({"params": params}, jnp.zeros((1, cfg.image_size + cfg.patch_size, cfg.image_size, 3)))


def test_full_size_table_matches_transformers():
    cfg = CLIPVisionConfig.sd_v1()
    with torch.device("meta"):
        model = TorchCLIPVisionModelWithProjection(TorchCLIPVisionConfig(**dataclasses.asdict(cfg)))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = abstract_params(cfg)
    steps = plan("image_encoder", image_encoder_table(cfg), shapes, expected, IMAGE_ENCODER_SPEC.ignored)
    assert len(steps) == len(shapes)
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(expected)) == SD_V1_PARAMS


def test_reads_the_published_config(tmp_path):
    # lambdalabs/sd-image-variations-diffusers image_encoder/config.json (architecture fields).
    raw = {"_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPVisionModelWithProjection"],
           "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 1024,
           "image_size": 224, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 4096,
           "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 16,
           "num_channels": 3, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
           "torch_dtype": "float32", "transformers_version": "4.25.0.dev0"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert CLIPVisionConfig.from_json(tmp_path / "config.json") == CLIPVisionConfig.sd_v1()
    assert CLIPVisionConfig.from_dict({}) == CLIPVisionConfig()
    assert hash(CLIPVisionConfig.sd_v1()) == hash(CLIPVisionConfig.sd_v1())


def test_reads_the_vision_tower_of_a_clip_config():
    raw = {"model_type": "clip", "projection_dim": 768,
           "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                             "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 14,
                             "projection_dim": 512}}
    assert CLIPVisionConfig.from_dict(raw) == CLIPVisionConfig.sd_v1()


@pytest.mark.parametrize("field,value", [("hidden_act", "gelu_new"), ("hidden_act", "relu"),
                                         ("model_type", "siglip_vision_model"), ("image_size", [224, 224]),
                                         ("num_attention_heads", 5)])
def test_unsupported_config_raises(field, value):
    raw = dataclasses.asdict(CONFIGS["quick_gelu"]) | {field: value}
    with pytest.raises(ConfigError, match=field):
        CLIPVisionConfig.from_dict(raw)


def test_unsupported_activation_inside_a_clip_config_or_built_directly_raises():
    with pytest.raises(ConfigError, match="hidden_act"):
        CLIPVisionConfig.from_dict({"model_type": "clip", "vision_config": {"hidden_act": "gelu_pytorch_tanh"}})
    with pytest.raises(ConfigError, match="hidden_act"):
        CLIPVisionConfig(hidden_act="silu")

"""Parity of the Flax safety checker with diffusers' ``StableDiffusionSafetyChecker``, through the converter."""

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
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker, cosine_distance
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig

from helpers import assert_close, randomize_, save_torch
from imvar_jax.convert.clip import SAFETY_CHECKER_SPEC, safety_checker_table
from imvar_jax.convert.common import convert_component, plan
from imvar_jax.models import abstract_params
from imvar_jax.models.clip_vision import CLIPVisionConfig
from imvar_jax.models.config import ConfigError
from imvar_jax.models.safety_checker import SafetyChecker, SafetyCheckerConfig

SD_V1_PARAMS = 303_966_208 + (17 + 3) * 768 + 17 + 3

CONFIG = SafetyCheckerConfig.tiny()
TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)

# Designed score per picture: (concept score before the special-care adjustment, special-care score).
# 0: a concept; 1: a special-care hit lifts -0.005 over 0; 2: 0.0002 rounds to 0 in diffusers' forward (not
# flagged) though forward_onnx flags it; 3: -0.005 with no special care; 4: nothing near any concept.
DESIGN = [(0.05, None), (-0.005, 0.05), (0.0002, None), (-0.005, -0.02), (None, None)]
FORWARD_FLAGS = [True, True, False, False, False]
ONNX_FLAGS = [True, True, True, False, False]
# The designed cosine of a picture with its own concept: weights stay near 0.1, where float16 is fine.
TARGET_COSINE = 0.1


def _torch_config(cfg: SafetyCheckerConfig) -> CLIPConfig:
    # The vision sub-config's own projection_dim is unused by the checker; a different value proves it.
    vision = dataclasses.asdict(cfg.vision_config) | {"projection_dim": cfg.projection_dim // 2}
    return CLIPConfig(vision_config=vision, text_config=TEXT, projection_dim=cfg.projection_dim)


def _pixels(cfg: SafetyCheckerConfig) -> np.ndarray:
    v = cfg.vision_config
    rng = np.random.default_rng(2)
    return rng.uniform(-2, 2, (len(DESIGN), v.num_channels, v.image_size, v.image_size)).astype(np.float32)


def _round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).to(torch.float32)


def _directions(embeds: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per picture, the unit part of its embedding orthogonal to the others'; and a unit vector orthogonal to all."""
    n, d = embeds.shape
    own = np.zeros_like(embeds)
    for i in range(n):
        others = np.delete(embeds, i, axis=0)
        q, _ = np.linalg.qr(others.T)  # [D, N-1]
        u = embeds[i] - q @ (q.T @ embeds[i])
        own[i] = u / np.linalg.norm(u)
    q, _ = np.linalg.qr(embeds.T)
    v = rng.standard_normal(d)
    v -= q @ (q.T @ v)
    return own, v / np.linalg.norm(v)


def _design(model: StableDiffusionSafetyChecker, x: np.ndarray, dtype: torch.dtype) -> None:
    """Set concept and special-care embeddings and weights (exact in ``dtype``) so that DESIGN holds."""
    rng = np.random.default_rng(5)
    with torch.no_grad():
        model.to(dtype).to(torch.float32)
        embeds = model.visual_projection(model.vision_model(torch.from_numpy(x))[1]).numpy().astype(np.float64)
        own, away = _directions(embeds, rng)
        d = embeds.shape[1]

        def toward(i: int) -> np.ndarray:
            # Cosine with picture i is TARGET_COSINE, with every other picture 0.
            a = embeds[i] @ own[i] / np.linalg.norm(embeds[i])
            return own[i] + np.sqrt((a / TARGET_COSINE) ** 2 - 1) * away

        concepts = rng.standard_normal((17, d))
        concept_w = np.full(17, 2.0)
        special = rng.standard_normal((3, d))
        special_w = np.full(3, 2.0)
        # Picture i gets concept slot i and, if it has a special-care score, the next free special-care slot.
        special_slot = {i: k for k, i in enumerate(i for i, (_, s) in enumerate(DESIGN) if s is not None)}
        for i, (c, _) in enumerate(DESIGN):
            if c is not None:
                concepts[i] = toward(i)
        for i, k in special_slot.items():
            special[k] = toward(i)
        model.concept_embeds.copy_(_round(torch.tensor(concepts, dtype=torch.float32), dtype))
        model.special_care_embeds.copy_(_round(torch.tensor(special, dtype=torch.float32), dtype))
        emb = torch.tensor(embeds, dtype=torch.float32)
        cos = cosine_distance(emb, model.concept_embeds).numpy()
        special_cos = cosine_distance(emb, model.special_care_embeds).numpy()
        for i, (c, s) in enumerate(DESIGN):
            if c is not None:
                concept_w[i] = cos[i, i] - c
            if s is not None:
                special_w[special_slot[i]] = special_cos[i, special_slot[i]] - s
        model.concept_embeds_weights.copy_(_round(torch.tensor(concept_w, dtype=torch.float32), dtype))
        model.special_care_embeds_weights.copy_(_round(torch.tensor(special_w, dtype=torch.float32), dtype))


def _reference(model: StableDiffusionSafetyChecker, x: np.ndarray):
    """Embeddings, unrounded scores as ours, and the flags of diffusers' forward and forward_onnx."""
    clip_input = torch.from_numpy(x)
    with torch.no_grad():
        emb = model.visual_projection(model.vision_model(clip_input)[1])
        special = cosine_distance(emb, model.special_care_embeds) - model.special_care_embeds_weights
        care = torch.any(torch.round(special, decimals=3) > 0, dim=1)
        concept = cosine_distance(emb, model.concept_embeds) - model.concept_embeds_weights + 0.01 * care[:, None]
        _, forward_flags = model(clip_input=clip_input, images=torch.zeros(len(x), 1))
        _, onnx_flags = model.forward_onnx(clip_input, torch.zeros(len(x), 1))
    return emb.numpy(), special.numpy(), concept.numpy(), list(forward_flags), onnx_flags.tolist()


@lru_cache(maxsize=None)
def _scores(cfg: SafetyCheckerConfig):
    model = SafetyChecker(cfg)
    return (jax.jit(lambda p, x: model.apply({"params": p}, x)),
            jax.jit(lambda p, x: model.apply({"params": p}, x, method=SafetyChecker.scores)))


def _check(model: StableDiffusionSafetyChecker, x: np.ndarray, folder) -> list[float]:
    cfg, params = convert_component(SAFETY_CHECKER_SPEC, folder)
    assert cfg == CONFIG
    emb, special, concept, forward_flags, onnx_flags = _reference(model, x)
    assert forward_flags == FORWARD_FLAGS and onnx_flags == ONNX_FLAGS, "the test's design does not hold"
    call, scores = _scores(cfg)
    nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
    ours_emb, flags = call(params, nhwc)
    assert flags.dtype == jnp.bool_
    assert np.asarray(flags).tolist() == FORWARD_FLAGS
    _, ours_special, ours_concept = scores(params, nhwc)
    return [assert_close(ours_emb, emb, what="image_embeds"),
            assert_close(ours_special, special, what="special_scores"),
            assert_close(ours_concept, concept, what="concept_scores")]


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    # Noise larger than the default keeps the pictures' embeddings apart enough to aim a concept at one of them.
    return randomize_(StableDiffusionSafetyChecker(_torch_config(CONFIG)), seed=4, scale=0.3)


@pytest.mark.parametrize("fmt,dtype", [("safetensors", torch.float32), ("bin", torch.float32),
                                       ("safetensors", torch.float16), ("bin", torch.float16)])
def test_parity(reference, fmt, dtype, tmp_path):
    model = copy.deepcopy(reference)
    x = _pixels(CONFIG)
    _design(model, x, dtype)
    save_torch(model, tmp_path, fmt=fmt, dtype=dtype)
    _check(model, x, tmp_path)


def test_transformers4_layout_with_position_ids(reference, tmp_path):
    """Published checkpoints nest the tower as ``vision_model.vision_model.*`` and may hold the position ids."""
    model = copy.deepcopy(reference)
    x = _pixels(CONFIG)
    _design(model, x, torch.float32)
    save_torch(model, tmp_path)
    f = tmp_path / "model.safetensors"
    state = {(f"vision_model.{k}" if k.startswith("vision_model.") else k): v for k, v in load_file(f).items()}
    state["vision_model.vision_model.embeddings.position_ids"] = torch.arange(CONFIG.vision_config.num_positions)[None]
    assert "vision_model.vision_model.pre_layrnorm.weight" in state
    save_file(state, f, metadata={"format": "pt"})
    _check(model, x, tmp_path)


def test_flags_are_per_picture_under_vmap_and_batching(reference, tmp_path):
    model = copy.deepcopy(reference)
    x = _pixels(CONFIG)
    _design(model, x, torch.float32)
    save_torch(model, tmp_path)
    _, params = convert_component(SAFETY_CHECKER_SPEC, tmp_path)
    call, _ = _scores(CONFIG)
    nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
    order = np.array([4, 2, 0, 3, 1])
    _, flags = call(params, nhwc[order])
    assert np.asarray(flags).tolist() == [FORWARD_FLAGS[i] for i in order]
    _, one_by_one = jax.vmap(lambda xi: call(params, xi[None]))(nhwc)
    assert np.asarray(one_by_one)[:, 0].tolist() == FORWARD_FLAGS


def test_full_size_table_matches_diffusers():
    cfg = SafetyCheckerConfig.sd_v1()
    vision = dataclasses.asdict(cfg.vision_config)
    with torch.device("meta"):
        model = StableDiffusionSafetyChecker(CLIPConfig(vision_config=vision, projection_dim=cfg.projection_dim))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = abstract_params(cfg)
    steps = plan("safety_checker", safety_checker_table(cfg), shapes, expected, SAFETY_CHECKER_SPEC.ignored)
    assert len(steps) == len(shapes)
    # The published layout, one level deeper, fits the same table.
    nested = {(f"vision_model.{k}" if k.startswith("vision_model.") else k): s for k, s in shapes.items()}
    plan("safety_checker", safety_checker_table(cfg), nested, expected, SAFETY_CHECKER_SPEC.ignored)
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(expected)) == SD_V1_PARAMS


def test_reads_the_published_config(tmp_path):
    # The SD v1 safety_checker/config.json layout: an old CLIPConfig whose vision_config_dict
    # (defaults filling the rest) overrides vision_config, and a top-level projection_dim.
    raw = {"architectures": ["StableDiffusionSafetyChecker"], "initializer_factor": 1.0,
           "logit_scale_init_value": 2.6592, "model_type": "clip", "projection_dim": 768,
           "text_config": {"model_type": "clip_text_model", "hidden_size": 768, "projection_dim": 512},
           "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                                "num_hidden_layers": 12},
           "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                             "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14,
                             "image_size": 224, "projection_dim": 512, "layer_norm_eps": 1e-5},
           "vision_config_dict": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                                  "num_hidden_layers": 24, "patch_size": 14},
           "torch_dtype": "float32", "transformers_version": None}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = SafetyCheckerConfig.from_json(tmp_path / "config.json")
    assert cfg == SafetyCheckerConfig.sd_v1()
    theirs = CLIPConfig.from_dict(raw)
    for field in dataclasses.fields(CLIPVisionConfig):
        if field.name != "projection_dim":
            assert getattr(cfg.vision_config, field.name) == getattr(theirs.vision_config, field.name), field.name
    assert cfg.projection_dim == theirs.projection_dim


@pytest.mark.parametrize("raw,field", [
    ({"model_type": "clip", "vision_config": {"hidden_act": "silu"}}, "hidden_act"),
    ({"model_type": "clip", "vision_config_dict": {"hidden_act": "gelu_new"}}, "hidden_act"),
    ({"model_type": "clip_vision_model"}, "model_type"),
    ({"model_type": "clip", "vision_config": {"model_type": "siglip_vision_model"}}, "model_type"),
])
def test_unsupported_config_raises(raw, field):
    with pytest.raises(ConfigError, match=field):
        SafetyCheckerConfig.from_dict(raw)

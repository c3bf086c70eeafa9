"""diffusers' ``StableDiffusionSafetyChecker`` as a Flax linen module, NHWC, jit-able."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Self

import flax.linen as nn
import jax
import jax.numpy as jnp

from imvar_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionTransformer
from imvar_jax.models.config import ConfigError, JsonConfig, check_int
from imvar_jax.models.layers import AttentionImpl

# diffusers fixes these counts in the module, not in the config.
NUM_CONCEPTS = 17
NUM_SPECIAL_CARE = 3

# Added to every concept score of a picture once one of its special-care scores is positive.
SPECIAL_CARE_ADJUSTMENT = 0.01

# diffusers' forward rounds each score to this many decimals before comparing it with 0.
SCORE_DECIMALS = 3


@dataclass(frozen=True)
class SafetyCheckerConfig(JsonConfig):
    """The fields of a safety checker's config.json (a transformers ``CLIPConfig``) that shape the model."""

    vision_config: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512

    def __post_init__(self) -> None:
        if not isinstance(self.vision_config, CLIPVisionConfig):
            raise ConfigError(f"safety_checker: vision_config must be a CLIPVisionConfig, "
                              f"got {type(self.vision_config).__name__}")
        check_int("safety_checker", "projection_dim", self.projection_dim)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Self:
        """Read a ``CLIPConfig`` dict; its keys must be in ``CLIP_CONFIG_KEYS``, its tower's in ``CLIP_VISION_KEYS``."""
        vision = CLIPVisionConfig.from_clip_config(raw, "safety_checker")
        return cls(vision_config=vision, projection_dim=vision.projection_dim)

    @classmethod
    def sd_v1(cls) -> Self:
        """ViT-L/14 with a 768-wide projection, the checker shipped with SD v1 checkpoints."""
        return cls(vision_config=CLIPVisionConfig.sd_v1(), projection_dim=768)

    @classmethod
    def tiny(cls) -> Self:
        vision = CLIPVisionConfig.tiny()
        return cls(vision_config=vision, projection_dim=vision.projection_dim)

    def init_example(self) -> tuple[SafetyChecker, tuple[jax.ShapeDtypeStruct, ...]]:
        """The model and the smallest inputs whose ``init`` creates every param (see ``abstract_params``)."""
        v = self.vision_config
        pixels = jax.ShapeDtypeStruct((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
        return SafetyChecker(self), (pixels,)


class CLIPVisionModel(nn.Module):
    """transformers 4's ``CLIPVisionModel``: the tower nested once more under ``vision_model``."""

    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32
    attention_impl: AttentionImpl = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        return CLIPVisionTransformer(self.config, self.dtype, self.attention_impl,
                                     platform=self.platform, name="vision_model")(pixel_values)


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine similarities ``[N, M]`` of rows of ``a [N, D]`` and ``b [M, D]``, as torch's ``normalize`` then ``mm``."""
    a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    # Full float32 products: a reduced-precision matmul could flip a flag near the threshold.
    return jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _positive(scores: jax.Array) -> jax.Array:
    return jnp.round(scores, SCORE_DECIMALS) > 0


class SafetyChecker(nn.Module):
    """CLIP-normalised pixels ``[N, S, S, C]`` -> ``(image_embeds [N, D], has_nsfw_concept bool[N])``.

    Flags follow diffusers' ``forward`` (what its pipelines call): scores are rounded
    to 3 decimals in float32 before the ``> 0`` test. ``forward_onnx`` skips the
    rounding, so it also flags scores in (0, 0.0005).
    """

    config: SafetyCheckerConfig
    dtype: jnp.dtype = jnp.float32
    attention_impl: AttentionImpl = "auto"
    platform: str | None = None

    def setup(self) -> None:
        d = self.config.projection_dim
        self.vision_model = CLIPVisionModel(self.config.vision_config, self.dtype, self.attention_impl,
                                            platform=self.platform)
        self.visual_projection = nn.Dense(d, use_bias=False, dtype=self.dtype)
        self.concept_embeds = self.param("concept_embeds", nn.initializers.ones, (NUM_CONCEPTS, d))
        self.special_care_embeds = self.param("special_care_embeds", nn.initializers.ones, (NUM_SPECIAL_CARE, d))
        self.concept_embeds_weights = self.param("concept_embeds_weights", nn.initializers.ones, (NUM_CONCEPTS,))
        self.special_care_embeds_weights = self.param("special_care_embeds_weights", nn.initializers.ones,
                                                      (NUM_SPECIAL_CARE,))

    def scores(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(image_embeds [N, D], special_scores [N, 3], concept_scores [N, 17])``, float32, unrounded.

        ``concept_scores`` include the special-care adjustment; ``special_scores`` do not.
        """
        _, pooled = self.vision_model(pixel_values)
        image_embeds = self.visual_projection(pooled)
        emb = image_embeds.astype(jnp.float32)
        special = _cosine(emb, _f32(self.special_care_embeds)) - _f32(self.special_care_embeds_weights)  # [N, 3]
        special_care = jnp.any(_positive(special), axis=1)  # [N]
        adjustment = jnp.where(special_care, jnp.float32(SPECIAL_CARE_ADJUSTMENT), jnp.float32(0.0))
        concept = (_cosine(emb, _f32(self.concept_embeds)) - _f32(self.concept_embeds_weights)) + adjustment[:, None]
        return image_embeds, special, concept

    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        image_embeds, _, concept = self.scores(pixel_values)
        return image_embeds, jnp.any(_positive(concept), axis=1)


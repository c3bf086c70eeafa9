"""transformers' ``CLIPVisionModelWithProjection`` (the image encoder) as a Flax linen module, NHWC."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Self

import flax.linen as nn
import jax
import jax.numpy as jnp

from imvar_jax.models.config import (ConfigError, ConfigKeys, JsonConfig, check_int, check_number, check_value,
                                     field_names, from_dict, short_repr)
from imvar_jax.models.layers import AttentionImpl, conv, dot_product_attention, layer_norm

# transformers' "gelu" is the exact erf form; its default is "quick_gelu".
_ACTIVATIONS = ("quick_gelu", "gelu")

# The CLIPConfig default that a safety checker's config.json may leave out.
_CLIP_PROJECTION_DIM = 512

# Keys every transformers config may hold (4.x wrote them all into nested sub-configs), none of
# which the CLIP vision tower reads: output and return flags, the torch dtype and TorchScript
# switch, attention-kernel choice, text generation and fine-tuning settings, label maps, token
# ids, encoder-decoder wiring and weight tying (a vision tower has neither), and the hub's
# bookkeeping. pruned_heads is the one that would change the model; it is pinned below.
TRANSFORMERS_IGNORED = frozenset({
    "architectures", "transformers_version", "torch_dtype", "dtype", "use_bfloat16", "torchscript",
    "attn_implementation", "return_dict", "output_hidden_states", "output_attentions", "output_scores",
    "return_dict_in_generate", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "tie_encoder_decoder", "tie_word_embeddings", "tf_legacy_loss",
    "gradient_checkpointing", "finetuning_task", "problem_type", "id2label", "label2id", "num_labels",
    "tokenizer_class", "prefix", "task_specific_params", "bos_token_id", "pad_token_id", "eos_token_id",
    "sep_token_id", "decoder_start_token_id", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
})

# A non-empty map removes attention heads, which this port does not implement.
_PRUNED_HEADS = {"pruned_heads": ({},)}


@dataclass(frozen=True)
class CLIPVisionConfig(JsonConfig):
    """The architecture fields of transformers' ``CLIPVisionConfig`` (defaults are transformers')."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512

    def __post_init__(self) -> None:
        check_value("clip_vision", "hidden_act", self.hidden_act, _ACTIVATIONS)
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                    "projection_dim"):
            check_int("clip_vision", key, getattr(self, key))
        for key in ("image_size", "patch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"clip_vision: unsupported config value {key}={short_repr(value)} "
                                  f"(only a single positive integer)")
        check_number("clip_vision", "layer_norm_eps", self.layer_norm_eps, positive=True)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"clip_vision: num_attention_heads={self.num_attention_heads} does not divide "
                              f"hidden_size={self.hidden_size}")
        # A patch that does not divide the picture is fine (the stride drops the rest, as in
        # transformers); one larger than the picture leaves no patch at all.
        if self.patch_size > self.image_size:
            raise ConfigError(f"clip_vision: patch_size={self.patch_size} exceeds image_size={self.image_size}")

    @property
    def num_positions(self) -> int:
        """Patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Self:
        """Read a ``CLIPVisionConfig`` dict (keys in ``CLIP_VISION_KEYS``), or a ``CLIPConfig`` one (see
        ``from_clip_config``)."""
        if raw.get("model_type") == "clip" or "vision_config" in raw or "vision_config_dict" in raw:
            return cls.from_clip_config(raw)
        return from_dict(cls, raw, CLIP_VISION_KEYS)

    @classmethod
    def from_clip_config(cls, raw: Mapping[str, Any], name: str = "clip_vision") -> Self:
        """The vision tower of a ``CLIPConfig`` dict, as a safety checker's config.json holds.

        The tower is ``vision_config`` and the projection width the top-level
        ``projection_dim``; the sub-dict's own ``projection_dim`` belongs to nothing there.
        Its keys must be in ``CLIP_CONFIG_KEYS``, the tower's in ``CLIP_VISION_KEYS``;
        ``name`` names the config in errors.
        """
        CLIP_CONFIG_KEYS.check(raw, name)
        subs = {key: raw[key] for key in ("vision_config", "vision_config_dict") if raw.get(key) is not None}
        for key, sub in subs.items():
            if not isinstance(sub, Mapping):
                raise ConfigError(f"{name}: {key} must be a JSON object")
            # Both are checked: transformers overrides every tower field of vision_config with
            # vision_config_dict's (defaults filling what it omits), but keeps its other keys.
            CLIP_VISION_KEYS.check(sub, f"{name}.{key}")
        projection_dim = check_int(name, "projection_dim", raw.get("projection_dim", _CLIP_PROJECTION_DIM))
        used = "vision_config_dict" if "vision_config_dict" in subs else "vision_config"
        try:
            return from_dict(cls, subs.get(used, {}), CLIP_VISION_KEYS, projection_dim=projection_dim)
        except ConfigError as e:
            # The tower's checks name it "clip_vision"; here it is this config's sub-dict.
            raise ConfigError(f"{name}.{used}: {str(e).removeprefix('clip_vision: ')}") from None

    @classmethod
    def sd_v1(cls) -> Self:
        """ViT-L/14, the image encoder of lambdalabs/sd-image-variations-diffusers."""
        return cls(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   num_channels=3, image_size=224, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                   projection_dim=768)

    @classmethod
    def tiny(cls) -> Self:
        return cls(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                   num_channels=3, image_size=32, patch_size=4, hidden_act="quick_gelu", projection_dim=16)

    def init_example(self) -> tuple[CLIPVisionModelWithProjection, tuple[jax.ShapeDtypeStruct, ...]]:
        """The model and the smallest inputs whose ``init`` creates every param (see ``abstract_params``)."""
        s = self.image_size
        return CLIPVisionModelWithProjection(self), (jax.ShapeDtypeStruct((1, s, s, self.num_channels), jnp.float32),)


CLIP_VISION_KEYS = ConfigKeys(
    "clip_vision", read=field_names(CLIPVisionConfig),
    pinned={"model_type": ("clip_vision_model",), **_PRUNED_HEADS},
    # Dropout is off at inference; the initializer scales only draw fresh weights.
    ignored=TRANSFORMERS_IGNORED | {"attention_dropout", "dropout", "initializer_range", "initializer_factor"})

# A CLIPConfig (the safety checker's config.json) around the vision tower. The checker has no
# text tower and no logit scale, so their settings cannot change it.
CLIP_CONFIG_KEYS = ConfigKeys(
    "clip", read=frozenset({"vision_config", "vision_config_dict", "projection_dim"}),
    pinned={"model_type": ("clip",), **_PRUNED_HEADS},
    ignored=TRANSFORMERS_IGNORED | {"text_config", "text_config_dict", "logit_scale_init_value", "initializer_range",
                                    "initializer_factor"})


def _activation(name: str, x: jax.Array) -> jax.Array:
    if name == "quick_gelu":
        return x * nn.sigmoid(1.702 * x)
    return nn.gelu(x, approximate=False)


class CLIPVisionEmbeddings(nn.Module):
    """Class token plus non-overlapping patches, each with a learned position embedding."""

    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        n, h, w, _ = pixel_values.shape
        if h != cfg.image_size or w != cfg.image_size:
            raise ValueError(f"input image size ({h}*{w}) doesn't match the model ({cfg.image_size}*{cfg.image_size})")
        patches = conv(cfg.hidden_size, cfg.patch_size, self.dtype, "patch_embedding", stride=cfg.patch_size,
                       padding=0, use_bias=False)(pixel_values.astype(self.dtype))
        patches = patches.reshape(n, -1, cfg.hidden_size)  # [N, P*P, D], row-major like torch's flatten(2)
        cls = self.param("class_embedding", nn.initializers.normal(cfg.hidden_size ** -0.5), (cfg.hidden_size,))
        cls = jnp.broadcast_to(cls.astype(self.dtype), (n, 1, cfg.hidden_size))  # [N, 1, D]
        positions = nn.Embed(cfg.num_positions, cfg.hidden_size, dtype=self.dtype,
                             name="position_embedding")(jnp.arange(cfg.num_positions))  # [T, D]
        return jnp.concatenate([cls, patches], axis=1) + positions[None]  # [N, T, D]


class CLIPAttention(nn.Module):
    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32
    attention_impl: AttentionImpl = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = self.config.hidden_size
        q = nn.Dense(d, dtype=self.dtype, name="q_proj")(x)
        k = nn.Dense(d, dtype=self.dtype, name="k_proj")(x)
        v = nn.Dense(d, dtype=self.dtype, name="v_proj")(x)
        # jax.nn.dot_product_attention's default scale is head_dim**-0.5, as CLIP's.
        out = dot_product_attention(q, k, v, self.config.num_attention_heads, implementation=self.attention_impl,
                                    platform=self.platform)
        return nn.Dense(d, dtype=self.dtype, name="out_proj")(out)


class CLIPMLP(nn.Module):
    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.config.intermediate_size, dtype=self.dtype, name="fc1")(x)
        h = _activation(self.config.hidden_act, h)
        return nn.Dense(self.config.hidden_size, dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: attention then MLP, each behind a layer norm and a residual."""

    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32
    attention_impl: AttentionImpl = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        eps = self.config.layer_norm_eps
        h = layer_norm(eps, self.dtype, "layer_norm1")(x)
        x = x + CLIPAttention(self.config, self.dtype, self.attention_impl, platform=self.platform, name="self_attn")(h)
        h = layer_norm(eps, self.dtype, "layer_norm2")(x)
        return x + CLIPMLP(self.config, self.dtype, name="mlp")(h)


class CLIPEncoder(nn.Module):
    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32
    attention_impl: AttentionImpl = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, self.dtype, self.attention_impl,
                                 platform=self.platform, name=f"layers_{i}")(x)
        return x


class CLIPVisionTransformer(nn.Module):
    """The vision tower. Returns ``(last_hidden_state [N, T, D], pooled [N, D])``.

    ``post_layernorm`` applies to the pooled class token only, not to the last hidden state.
    """

    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32
    attention_impl: AttentionImpl = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        eps = self.config.layer_norm_eps
        h = CLIPVisionEmbeddings(self.config, self.dtype, name="embeddings")(pixel_values)
        h = layer_norm(eps, self.dtype, "pre_layrnorm")(h)
        h = CLIPEncoder(self.config, self.dtype, self.attention_impl, platform=self.platform, name="encoder")(h)
        pooled = layer_norm(eps, self.dtype, "post_layernorm")(h[:, 0, :])
        return h, pooled


class CLIPVisionModelWithProjection(nn.Module):
    """The image encoder: pixels ``[N, S, S, C]`` (already CLIP-normalised) -> ``image_embeds [N, projection_dim]``."""

    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32
    attention_impl: AttentionImpl = "auto"
    platform: str | None = None

    def setup(self) -> None:
        self.vision_model = CLIPVisionTransformer(self.config, self.dtype, self.attention_impl, platform=self.platform)
        self.visual_projection = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        return self.encode(pixel_values)[0]

    def encode(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(image_embeds [N, projection_dim], last_hidden_state [N, T, hidden_size])``."""
        hidden, pooled = self.vision_model(pixel_values)
        return self.visual_projection(pooled), hidden


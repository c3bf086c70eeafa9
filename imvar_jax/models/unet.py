"""diffusers' SD-v1 ``UNet2DConditionModel`` as a Flax linen module, NHWC."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Self

import flax.linen as nn
import jax
import jax.numpy as jnp

from imvar_jax.models.config import (ConfigError, ConfigKeys, JsonConfig, check_bool, check_int, check_ints,
                                     check_names, check_number, check_per_block, check_value, field_names, from_dict,
                                     short_repr)
from imvar_jax.models.layers import AttentionImpl, conv, group_norm
from imvar_jax.models.unet_blocks import DownBlock2D, TransformerSpec, UNetMidBlock2DCrossAttn, UpBlock2D

_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")

# Options of diffusers' UNet2DConditionModel that this port does not implement, each with the
# values it accepts (diffusers' default first). Most add an embedding, a projection or another
# block type; several only scale, shift or re-route activations and add no tensor, so nothing but
# this check would notice them. Some (the addition embedding's heads and dims, the simple
# cross-attention blocks' norm) act only together with another pinned option, but a checkpoint
# that sets them was built for that option.
_PINNED = {
    "center_input_sample": (False,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None,),
    "dual_cross_attention": (False,),
    "mid_block_scale_factor": (1,),
    "act_fn": ("silu", "swish"),  # both are SiLU in diffusers
    "num_attention_heads": (None,),  # diffusers itself refuses any other value
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "projection_class_embeddings_input_dim": (None,),
    "addition_embed_type": (None,),
    "addition_embed_type_num_heads": (64,),
    "addition_time_embed_dim": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
}

# The downsampler paddings the model implements (diffusers takes any int).
_DOWNSAMPLE_PADDINGS = (1, 0)

# The frequencies of the sinusoidal timestep embedding span periods up to this.
_MAX_PERIOD = 10000.0


@dataclass(frozen=True)
class UNetConfig(JsonConfig):
    """The fields of diffusers' ``unet/config.json`` that this port reads; defaults are diffusers'.

    ``attention_head_dim`` keeps diffusers' naming quirk: it is the NUMBER of heads per block
    (an int for all blocks or one per block); each head has ``channels // heads`` dims.
    """

    sample_size: int | tuple[int, ...] | None = None
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                       "CrossAttnUpBlock2D")
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False
    time_embedding_dim: int | None = None

    def __post_init__(self) -> None:
        # Types first: the relations checked after them would raise TypeError on a wrong type.
        check_value("unet", "downsample_padding", self.downsample_padding, _DOWNSAMPLE_PADDINGS)
        size = self.sample_size
        sides = size if isinstance(size, tuple) and len(size) == 2 else (size,)
        if size is not None and not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sides):
            raise ConfigError(f"unet: sample_size must be null, a positive integer or [height, width], "
                              f"got {short_repr(size)}")
        check_int("unet", "in_channels", self.in_channels)
        check_int("unet", "out_channels", self.out_channels)
        for key in ("flip_sin_to_cos", "use_linear_projection", "upcast_attention"):
            check_bool("unet", key, getattr(self, key))
        channels = check_ints("unet", "block_out_channels", self.block_out_channels)
        n = len(channels)
        check_names("unet", "down_block_types", self.down_block_types, _DOWN_BLOCKS, n)
        check_names("unet", "up_block_types", self.up_block_types, _UP_BLOCKS, n)
        for key in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim"):
            check_per_block("unet", key, getattr(self, key), n)
        groups = self.norm_num_groups
        # Every resnet and transformer normalises block channels (up blocks: sums of them).
        if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0 or any(c % groups for c in channels):
            raise ConfigError(f"unet: unsupported config value norm_num_groups={short_repr(groups)} "
                              f"(a positive integer dividing block_out_channels={list(channels)})")
        check_number("unet", "norm_eps", self.norm_eps, positive=True)
        if self.time_embedding_dim is not None:
            check_int("unet", "time_embedding_dim", self.time_embedding_dim)
        # The sinusoids' frequencies divide by (half width - freq_shift): at or past zero they become infinite.
        half = channels[0] // 2
        if check_number("unet", "freq_shift", self.freq_shift) >= half:
            raise ConfigError(f"unet: freq_shift must be below half of block_out_channels[0] ({half}), "
                              f"got {self.freq_shift!r}")
        for i in self._attention_blocks():
            heads = self.heads[i]
            if self.block_out_channels[i] % heads:
                raise ConfigError(f"unet: unsupported config value attention_head_dim={self.attention_head_dim!r} "
                                  f"(the head count {heads} must divide block {i}'s {self.block_out_channels[i]} "
                                  f"channels)")
        dims = {self._per_block(self.cross_attention_dim)[i] for i in self._attention_blocks()}
        if len(dims) != 1:
            raise ConfigError(f"unet: unsupported config value cross_attention_dim={self.cross_attention_dim!r} "
                              f"(every cross-attention block must take the same conditioning width)")

    def _per_block(self, value: int | tuple[int, ...]) -> tuple[int, ...]:
        return value if isinstance(value, tuple) else (value,) * len(self.block_out_channels)

    def _attention_blocks(self) -> list[int]:
        """Levels (down-path order) whose down or up block has a Transformer2DModel, plus the mid block's (the last)."""
        n = len(self.block_out_channels)
        return sorted({i for i, t in enumerate(self.down_block_types) if t == "CrossAttnDownBlock2D"}
                      | {n - 1 - i for i, t in enumerate(self.up_block_types) if t == "CrossAttnUpBlock2D"}
                      | {n - 1})

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per block, down-path order (diffusers' ``attention_head_dim``)."""
        return self._per_block(self.attention_head_dim)

    @property
    def resnets_per_block(self) -> tuple[int, ...]:
        """``layers_per_block`` per block, down-path order; each up block has one resnet more."""
        return self._per_block(self.layers_per_block)

    @property
    def transformer_depths(self) -> tuple[int, ...]:
        """BasicTransformerBlocks per Transformer2DModel, per block, down-path order."""
        return self._per_block(self.transformer_layers_per_block)

    @property
    def context_dim(self) -> int:
        """Width of ``encoder_hidden_states`` (the cross-attention blocks all share it)."""
        return self._per_block(self.cross_attention_dim)[self._attention_blocks()[0]]

    @property
    def downscale_factor(self) -> int:
        """The total downsampling, one halving per downsampler (odd sizes round, see the model)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Self:
        """Read a diffusers ``unet/config.json`` dict; every key must be in ``UNET_KEYS``."""
        return from_dict(cls, raw, UNET_KEYS)

    def init_example(self) -> tuple[UNet2DConditionModel, tuple[jax.ShapeDtypeStruct, ...]]:
        """The model and the smallest inputs whose ``init`` creates every param (see ``abstract_params``)."""
        f = self.downscale_factor
        return UNet2DConditionModel(self), (jax.ShapeDtypeStruct((1, f, f, self.in_channels), jnp.float32),
                                            jax.ShapeDtypeStruct((1,), jnp.float32),
                                            jax.ShapeDtypeStruct((1, 1, self.context_dim), jnp.float32))

    @classmethod
    def sd_v1(cls) -> Self:
        """lambdalabs/sd-image-variations-diffusers ``unet/config.json``."""
        return cls(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                   layers_per_block=2, attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32,
                   norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0)

    @classmethod
    def tiny(cls) -> Self:
        return cls(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4,
                   cross_attention_dim=32, norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


UNET_KEYS = ConfigKeys(
    "unet", read=field_names(UNetConfig), pinned=_PINNED,
    # Dropout is off at inference; diffusers' _class_name/_diffusers_version are metadata.
    ignored=frozenset({"dropout"}))


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> jax.Array:
    """diffusers' ``get_timestep_embedding``: ``[B]`` timesteps -> ``[B, dim]`` float32 sinusoids.

    Frequencies are ``exp(-ln(10000) * k / (dim/2 - freq_shift))``; sines come first unless
    ``flip_sin_to_cos`` (SD-v1: cosines first).
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(_MAX_PERIOD) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    angles = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
    parts = [jnp.cos(angles), jnp.sin(angles)] if flip_sin_to_cos else [jnp.sin(angles), jnp.cos(angles)]
    emb = jnp.concatenate(parts, axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))


class UNet2DConditionModel(nn.Module):
    """Predicts the noise in ``sample`` at ``timesteps`` given ``encoder_hidden_states``.

    ``sample`` is NHWC ``[B, H, W, in_channels]`` of any size: each downsampler takes H to
    ceil(H/2) (floor(H/2) with ``downsample_padding=0``), and each upsampler resizes to the size of
    the skip it meets next, as diffusers does when H or W is not a multiple of
    ``config.downscale_factor``; ``timesteps`` a scalar or ``[B]`` (int or float);
    ``encoder_hidden_states`` ``[B, T, config.context_dim]`` (T is 1 for image variations).
    Returns ``[B, H, W, out_channels]`` in float32 whatever ``dtype``, since the scheduler
    step that consumes it must run in float32.
    """

    config: UNetConfig
    dtype: jnp.dtype = jnp.float32
    attention_impl: AttentionImpl = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array | int | float,
                 encoder_hidden_states: jax.Array) -> jax.Array:
        cfg = self.config
        b, _, _, c = sample.shape
        if c != cfg.in_channels:
            raise ValueError(f"unet: sample has {c} channels, the config says in_channels={cfg.in_channels}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != cfg.context_dim:
            raise ValueError(f"unet: encoder_hidden_states must be [B, T, {cfg.context_dim}], "
                             f"got {tuple(encoder_hidden_states.shape)}")
        t = jnp.asarray(timesteps)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, b)):
            raise ValueError(f"unet: timesteps must be a scalar or [{b}], got shape {tuple(t.shape)}")
        t = jnp.broadcast_to(t.reshape(-1), (b,))

        n = len(cfg.block_out_channels)
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        layers = cfg.resnets_per_block
        depth = cfg.transformer_depths

        def spec(i: int) -> TransformerSpec:
            return TransformerSpec(cfg.heads[i], depth[i], cfg.use_linear_projection, cfg.upcast_attention)

        temb_dim = cfg.time_embedding_dim or 4 * cfg.block_out_channels[0]
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = TimestepEmbedding(temb_dim, self.dtype, name="time_embedding")(t_emb.astype(self.dtype))

        context = encoder_hidden_states.astype(self.dtype)
        x = conv(cfg.block_out_channels[0], 3, self.dtype, "conv_in")(sample.astype(self.dtype))

        skips = [x]
        for i, kind in enumerate(cfg.down_block_types):
            x, block_skips = DownBlock2D(
                cfg.block_out_channels[i], layers[i], groups, eps, add_downsample=i < n - 1,
                downsample_padding=cfg.downsample_padding,
                transformer=spec(i) if kind == "CrossAttnDownBlock2D" else None,
                dtype=self.dtype, attention_impl=self.attention_impl, platform=self.platform,
                name=f"down_blocks_{i}")(x, temb, context)
            skips.extend(block_skips)

        x = UNetMidBlock2DCrossAttn(spec(n - 1), groups, eps, self.dtype, self.attention_impl,
                                    platform=self.platform, name="mid_block")(x, temb, context)

        for i, kind in enumerate(cfg.up_block_types):
            level = n - 1 - i
            count = layers[level] + 1
            block_skips, skips = skips[-count:], skips[:-count]
            add_upsample = i < n - 1
            # The upsampled activation is concatenated with the next block's first skip, so it must
            # take that skip's size, which is not twice the current one when a downsampler rounded.
            upsample_size = skips[-1].shape[1:3] if add_upsample else None
            x = UpBlock2D(
                cfg.block_out_channels[level], count, groups, eps, add_upsample=add_upsample,
                transformer=spec(level) if kind == "CrossAttnUpBlock2D" else None,
                dtype=self.dtype, attention_impl=self.attention_impl, platform=self.platform,
                name=f"up_blocks_{i}")(x, block_skips, temb, context, upsample_size)

        x = nn.silu(group_norm(groups, eps, self.dtype, "conv_norm_out")(x))
        return conv(cfg.out_channels, 3, self.dtype, "conv_out")(x).astype(jnp.float32)


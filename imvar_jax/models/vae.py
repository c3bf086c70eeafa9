"""diffusers' ``AutoencoderKL`` (the SD-v1 VAE) as a Flax linen module, NHWC."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Self

import flax.linen as nn
import jax
import jax.numpy as jnp

from imvar_jax.models.config import (ConfigError, ConfigKeys, JsonConfig, check_bool, check_int, check_ints,
                                     check_names, check_number, field_names, from_dict, short_repr)
from imvar_jax.models.layers import (AttentionImpl, Downsample2D, ResnetBlock2D, Upsample2D, conv,
                                     dot_product_attention, group_norm)

# Every norm in diffusers' VAE (resnets, mid-block attention, conv_norm_out) uses this epsilon.
_EPS = 1e-6

# The range diffusers' DiagonalGaussianDistribution clamps the log-variance to.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

# Options of diffusers' AutoencoderKL that this port does not implement, with the values it
# accepts (diffusers' default first). The latent statistics add no tensor: pipelines of other
# models (SD3, Flux) use them to shift and scale the latents, which SD-v1's pipeline never does.
_PINNED = {
    "act_fn": ("silu", "swish"),  # both are SiLU in diffusers
    "shift_factor": (None,),
    "latents_mean": (None,),
    "latents_std": (None,),
}


@dataclass(frozen=True)
class VAEConfig(JsonConfig):
    """The fields of diffusers' ``vae/config.json`` for ``AutoencoderKL``."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        # Types first: the relations checked after them would raise TypeError on a wrong type.
        for key in ("in_channels", "out_channels", "layers_per_block", "latent_channels"):
            check_int("vae", key, getattr(self, key))
        for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
            check_bool("vae", key, getattr(self, key))
        channels = check_ints("vae", "block_out_channels", self.block_out_channels)
        check_names("vae", "down_block_types", self.down_block_types, ("DownEncoderBlock2D",), len(channels))
        check_names("vae", "up_block_types", self.up_block_types, ("UpDecoderBlock2D",), len(channels))
        groups = self.norm_num_groups
        # Every resnet, the mid-block attention and both output norms normalise block channels.
        if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0 or any(c % groups for c in channels):
            raise ConfigError(f"vae: norm_num_groups={short_repr(groups)} must be a positive integer dividing "
                              f"block_out_channels={list(channels)}")
        # Latents are divided by it before decoding.
        check_number("vae", "scaling_factor", self.scaling_factor, positive=True)

    @property
    def scale_factor(self) -> int:
        """Pixels per latent along each side (diffusers' ``vae_scale_factor``)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Self:
        """Read a diffusers ``vae/config.json`` dict; every key must be in ``VAE_KEYS``."""
        return from_dict(cls, raw, VAE_KEYS)

    def init_example(self) -> tuple[AutoencoderKL, tuple[jax.ShapeDtypeStruct, ...]]:
        """The model and the smallest inputs whose ``init`` creates every param (see ``abstract_params``)."""
        f = self.scale_factor
        return AutoencoderKL(self), (jax.ShapeDtypeStruct((1, f, f, self.in_channels), jnp.float32),)

    @classmethod
    def sd_v1(cls) -> Self:
        return cls(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
        )

    @classmethod
    def tiny(cls) -> Self:
        return cls(
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(32, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=16,
        )


VAE_KEYS = ConfigKeys(
    "vae", read=field_names(VAEConfig), pinned=_PINNED,
    # sample_size only sizes diffusers' optional tiles; force_upcast tells diffusers' pipelines to
    # decode float16 in float32, a choice imvar_jax leaves to vae_dtype.
    ignored=frozenset({"sample_size", "force_upcast"}))


class VAEAttention(nn.Module):
    """The mid-block's single-head spatial self-attention: group norm, q/k/v, out projection, residual."""

    groups: int
    dtype: jnp.dtype = jnp.float32
    attention_impl: AttentionImpl = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        hs = group_norm(self.groups, _EPS, self.dtype, "group_norm")(x).reshape(b, h * w, c)  # [B, H*W, C]
        q = nn.Dense(c, dtype=self.dtype, name="to_q")(hs)
        k = nn.Dense(c, dtype=self.dtype, name="to_k")(hs)
        v = nn.Dense(c, dtype=self.dtype, name="to_v")(hs)
        # diffusers builds this block with upcast_softmax: with one 512-wide head the logits
        # are large enough to lose precision in half types. Being float32 and that wide, it is
        # outside cuDNN flash attention, so attention_impl='cudnn' is refused (select_attention).
        out = dot_product_attention(q, k, v, num_heads=1, implementation=self.attention_impl,
                                    platform=self.platform, upcast=True)
        out = nn.Dense(c, dtype=self.dtype, name="to_out_0")(out)
        return x + out.reshape(b, h, w, c)  # [B, H, W, C]


class MidBlock(nn.Module):
    """diffusers' ``UNetMidBlock2D`` without time embedding: resnet, attention, resnet."""

    groups: int
    add_attention: bool = True
    dtype: jnp.dtype = jnp.float32
    attention_impl: AttentionImpl = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = ResnetBlock2D(c, self.groups, _EPS, temb=False, dtype=self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = VAEAttention(self.groups, self.dtype, self.attention_impl, platform=self.platform,
                             name="attentions_0")(x)
        return ResnetBlock2D(c, self.groups, _EPS, temb=False, dtype=self.dtype, name="resnets_1")(x)


class DownEncoderBlock(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, _EPS, temb=False, dtype=self.dtype,
                              name=f"resnets_{i}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, _EPS, temb=False, dtype=self.dtype,
                              name=f"resnets_{i}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    config: VAEConfig
    dtype: jnp.dtype = jnp.float32
    attention_impl: AttentionImpl = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        channels = cfg.block_out_channels
        x = conv(channels[0], 3, self.dtype, "conv_in")(x)
        for i, c in enumerate(channels):
            x = DownEncoderBlock(c, cfg.layers_per_block, cfg.norm_num_groups, add_downsample=i < len(channels) - 1,
                                 dtype=self.dtype, name=f"down_blocks_{i}")(x)
        x = MidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, self.dtype, self.attention_impl,
                     platform=self.platform, name="mid_block")(x)
        x = nn.silu(group_norm(cfg.norm_num_groups, _EPS, self.dtype, "conv_norm_out")(x))
        # Mean and log-variance, stacked on channels.
        return conv(2 * cfg.latent_channels, 3, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
    config: VAEConfig
    dtype: jnp.dtype = jnp.float32
    attention_impl: AttentionImpl = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        channels = tuple(reversed(cfg.block_out_channels))
        x = conv(channels[0], 3, self.dtype, "conv_in")(z)
        x = MidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, self.dtype, self.attention_impl,
                     platform=self.platform, name="mid_block")(x)
        for i, c in enumerate(channels):
            # The decoder has one resnet more per block than the encoder.
            x = UpDecoderBlock(c, cfg.layers_per_block + 1, cfg.norm_num_groups, add_upsample=i < len(channels) - 1,
                               dtype=self.dtype, name=f"up_blocks_{i}")(x)
        x = nn.silu(group_norm(cfg.norm_num_groups, _EPS, self.dtype, "conv_norm_out")(x))
        return conv(cfg.out_channels, 3, self.dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """The KL autoencoder. Call ``encode``/``decode`` through ``apply(..., method=...)``."""

    config: VAEConfig
    dtype: jnp.dtype = jnp.float32
    attention_impl: AttentionImpl = "auto"
    platform: str | None = None

    def setup(self) -> None:
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype, self.attention_impl, platform=self.platform)
        self.decoder = Decoder(cfg, self.dtype, self.attention_impl, platform=self.platform)
        self.quant_conv = conv(2 * cfg.latent_channels, 1, self.dtype, "quant_conv") if cfg.use_quant_conv else None
        self.post_quant_conv = (conv(cfg.latent_channels, 1, self.dtype, "post_quant_conv")
                                if cfg.use_post_quant_conv else None)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``[B, H, W, in_channels]`` pixels in [-1, 1] -> float32 ``(mean, logvar)``, each ``[B, H/f, W/f, latent]``.

        ``logvar`` is clamped as diffusers' ``DiagonalGaussianDistribution`` does.
        """
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)  # [B, h, w, latent] each
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, latents: jax.Array) -> jax.Array:
        """``[B, h, w, latent]`` latents, already divided by ``scaling_factor`` -> float32 ``[B, h*f, w*f, out]``.

        The output is roughly in [-1, 1] and not clamped.
        """
        z = latents
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Reconstruct ``images`` from the posterior mean; touches every parameter, so ``init`` uses it."""
        mean, _ = self.encode(images)
        return self.decode(mean)


def sample_latent(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """One draw from the diagonal Gaussian posterior ``(mean, logvar)`` returned by ``encode``."""
    noise = jax.random.normal(key, mean.shape, jnp.float32)
    return (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * noise).astype(mean.dtype)


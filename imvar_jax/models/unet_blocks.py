"""The blocks of diffusers' SD-v1 ``UNet2DConditionModel`` as Flax linen modules, NHWC.

Module and submodule names follow the PyTorch ones (``attentions_0/transformer_blocks_0/attn1/to_q``)
so that the converter's key table maps one-to-one.
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from imvar_jax.models.layers import (AttentionImpl, Downsample2D, ResnetBlock2D, Upsample2D, conv,
                                     dot_product_attention, group_norm)

# Transformer2DModel hard-codes its GroupNorm epsilon and leaves its LayerNorms at their default,
# whatever the UNet's norm_eps is.
_TRANSFORMER_GROUP_NORM_EPS = 1e-6
_TRANSFORMER_LAYER_NORM_EPS = 1e-5

# BasicTransformerBlock's feed-forward widens by this factor (diffusers' FeedForward mult).
_FF_MULT = 4


@dataclass(frozen=True)
class TransformerSpec:
    """How one block's ``Transformer2DModel``s are built.

    ``num_heads`` is the head count; each head has ``channels // num_heads`` dims, as in diffusers.
    """

    num_heads: int
    num_layers: int = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False


class Attention(nn.Module):
    """diffusers' ``Attention`` as used by ``BasicTransformerBlock``: q/k/v without bias, biased output."""

    num_heads: int
    head_dim: int
    upcast: bool = False
    dtype: jnp.dtype = jnp.float32
    attention_impl: AttentionImpl = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        # x: [B, T, C]; context: [B, S, D] for cross-attention, None for self-attention
        context = x if context is None else context
        inner = self.num_heads * self.head_dim
        to_q = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_q")
        to_k = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_k")
        v = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_v")(context)
        to_out = nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")
        if context.shape[1] == 1 and not self.is_initializing():
            # One key (the image embedding): its softmax weight is exactly 1 for every query,
            # so each position's output is to_out(to_v(context)) and q, k and the scores are moot.
            b, t, c = x.shape
            return jnp.broadcast_to(to_out(v), (b, t, c))  # [B, T, C]
        q, k = to_q(x), to_k(context)
        out = dot_product_attention(q, k, v, self.num_heads, self.attention_impl, self.upcast,
                                    platform=self.platform)  # [B, T, inner]
        return to_out(out)


class GEGLU(nn.Module):
    """One projection to twice the width; the first half is gated by the exact (erf) GELU of the second."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(2 * self.features, dtype=self.dtype, name="proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """``net.0`` is the GEGLU, ``net.1`` a dropout (no params), ``net.2`` the output projection."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        h = GEGLU(dim * _FF_MULT, dtype=self.dtype, name="net_0")(x)
        return nn.Dense(dim, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the conditioning, then the GEGLU feed-forward."""

    num_heads: int
    head_dim: int
    upcast: bool = False
    dtype: jnp.dtype = jnp.float32
    attention_impl: AttentionImpl = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        # x: [B, T, C], context: [B, S, D]
        def attn(name: str) -> Attention:
            return Attention(self.num_heads, self.head_dim, self.upcast, self.dtype, self.attention_impl,
                             platform=self.platform, name=name)

        def norm(name: str) -> nn.LayerNorm:
            return nn.LayerNorm(epsilon=_TRANSFORMER_LAYER_NORM_EPS, dtype=self.dtype, use_fast_variance=False,
                                name=name)

        x = x + attn("attn1")(norm("norm1")(x))
        x = x + attn("attn2")(norm("norm2")(x), context)
        return x + FeedForward(dtype=self.dtype, name="ff")(norm("norm3")(x))


class Transformer2DModel(nn.Module):
    """diffusers' ``Transformer2DModel`` on continuous input: GroupNorm, proj_in, blocks, proj_out, residual."""

    spec: TransformerSpec
    groups: int
    dtype: jnp.dtype = jnp.float32
    attention_impl: AttentionImpl = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        # x: [B, H, W, C], context: [B, S, D]
        b, h, w, c = x.shape
        head_dim = c // self.spec.num_heads
        inner = self.spec.num_heads * head_dim
        residual = x
        x = group_norm(self.groups, _TRANSFORMER_GROUP_NORM_EPS, self.dtype, "norm")(x)
        # The linear variant projects after flattening, the conv variant (a 1x1 conv) before;
        # both are the same per-pixel map, but the parameter layouts differ.
        if self.spec.use_linear_projection:
            x = nn.Dense(inner, dtype=self.dtype, name="proj_in")(x.reshape(b, h * w, c))  # [B, H*W, inner]
        else:
            x = conv(inner, 1, self.dtype, "proj_in")(x).reshape(b, h * w, inner)  # [B, H*W, inner]
        for i in range(self.spec.num_layers):
            x = BasicTransformerBlock(self.spec.num_heads, head_dim, self.spec.upcast_attention, self.dtype,
                                      self.attention_impl, platform=self.platform,
                                      name=f"transformer_blocks_{i}")(x, context)
        if self.spec.use_linear_projection:
            x = nn.Dense(c, dtype=self.dtype, name="proj_out")(x).reshape(b, h, w, c)  # [B, H, W, C]
        else:
            x = conv(c, 1, self.dtype, "proj_out")(x.reshape(b, h, w, inner))  # [B, H, W, C]
        return x + residual


class DownBlock2D(nn.Module):
    """diffusers' ``DownBlock2D``, or ``CrossAttnDownBlock2D`` when ``transformer`` is given.

    Returns the block's output and the skip activations it hands to the up path (one per resnet,
    plus the downsampled output when there is a downsampler).
    """

    out_channels: int
    num_layers: int
    groups: int
    eps: float
    add_downsample: bool
    downsample_padding: int = 1
    transformer: TransformerSpec | None = None
    dtype: jnp.dtype = jnp.float32
    attention_impl: AttentionImpl = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, self.eps, dtype=self.dtype, name=f"resnets_{i}")(x, temb)
            if self.transformer is not None:
                x = Transformer2DModel(self.transformer, self.groups, self.dtype, self.attention_impl,
                                       platform=self.platform, name=f"attentions_{i}")(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.downsample_padding, self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(nn.Module):
    """A resnet, then (transformer, resnet) once, at the channel count of its input."""

    transformer: TransformerSpec
    groups: int
    eps: float
    dtype: jnp.dtype = jnp.float32
    attention_impl: AttentionImpl = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = ResnetBlock2D(c, self.groups, self.eps, dtype=self.dtype, name="resnets_0")(x, temb)
        x = Transformer2DModel(self.transformer, self.groups, self.dtype, self.attention_impl,
                               platform=self.platform, name="attentions_0")(x, context)
        return ResnetBlock2D(c, self.groups, self.eps, dtype=self.dtype, name="resnets_1")(x, temb)


class UpBlock2D(nn.Module):
    """diffusers' ``UpBlock2D``, or ``CrossAttnUpBlock2D`` when ``transformer`` is given.

    ``skips`` holds exactly ``num_layers`` skip activations; they are used last-first, each
    concatenated after the running activation on the channel axis, as torch.cat([h, skip], dim=1).
    ``upsample_size`` is the ``(H, W)`` the upsampler produces (default: twice the input's).
    """

    out_channels: int
    num_layers: int
    groups: int
    eps: float
    add_upsample: bool
    transformer: TransformerSpec | None = None
    dtype: jnp.dtype = jnp.float32
    attention_impl: AttentionImpl = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, skips: list[jax.Array], temb: jax.Array, context: jax.Array,
                 upsample_size: tuple[int, int] | None = None) -> jax.Array:
        if len(skips) != self.num_layers:
            raise ValueError(f"up block needs {self.num_layers} skip activations, got {len(skips)}")
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)  # [B, H, W, C + C_skip]
            x = ResnetBlock2D(self.out_channels, self.groups, self.eps, dtype=self.dtype, name=f"resnets_{i}")(x, temb)
            if self.transformer is not None:
                x = Transformer2DModel(self.transformer, self.groups, self.dtype, self.attention_impl,
                                       platform=self.platform, name=f"attentions_{i}")(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x, upsample_size)
        return x

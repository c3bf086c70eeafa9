"""Building blocks shared by the UNet and the VAE (diffusers' names, NHWC)."""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

# None lets JAX pick; "xla" and "cudnn" force one (see jax.nn.dot_product_attention).
AttentionImpl = Literal["xla", "cudnn"] | None


def group_norm(num_groups: int, epsilon: float, dtype: jnp.dtype, name: str) -> nn.GroupNorm:
    # The two-pass variance matches torch.nn.GroupNorm; the fast E[x^2]-E[x]^2 form drifts past 1e-5.
    return nn.GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=dtype, use_fast_variance=False, name=name)


def layer_norm(epsilon: float, dtype: jnp.dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, use_fast_variance=False, name=name)


def conv(features: int, kernel: int, dtype: jnp.dtype, name: str, stride: int = 1, padding: int | str = "SAME_1",
         use_bias: bool = True) -> nn.Conv:
    """A torch-style Conv2d: ``padding`` is the symmetric pad torch applies (``"SAME_1"`` is kernel // 2)."""
    pad = kernel // 2 if padding == "SAME_1" else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=use_bias, dtype=dtype, name=name)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int,
                          implementation: AttentionImpl = None, upcast: bool = False) -> jax.Array:
    """Multi-head softmax attention on ``[B, T, C]`` projections; returns ``[B, Tq, C]``.

    ``upcast`` computes scores and softmax in float32, as diffusers' ``upcast_attention``.
    """
    b, tq, c = q.shape
    tk = k.shape[1]
    head_dim = c // num_heads
    out_dtype = q.dtype
    if upcast:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    q = q.reshape(b, tq, num_heads, head_dim)  # [B, Tq, N, H]
    k = k.reshape(b, tk, num_heads, head_dim)  # [B, Tk, N, H]
    v = v.reshape(b, tk, num_heads, head_dim)
    out = jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    return out.reshape(b, tq, c).astype(out_dtype)  # [B, Tq, C]


class ResnetBlock2D(nn.Module):
    """diffusers' ``ResnetBlock2D`` (time_scale_shift "default", output_scale_factor 1, silu)."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    temb: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        # x: [B, H, W, Cin], temb: [B, T] or None
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = conv(self.out_channels, 3, self.dtype, "conv1")(h)
        if self.temb:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
        h = conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. ``padding=0`` is the VAE's variant: pad right/bottom by one, as diffusers does."""

    out_channels: int
    padding: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.out_channels, 3, self.dtype, "conv", stride=2, padding=self.padding)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling then a 3x3 conv."""

    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [B, 2H, 2W, C]
        return conv(self.out_channels, 3, self.dtype, "conv")(x)

"""Building blocks shared by the UNet and the VAE (diffusers' names, NHWC)."""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# "auto" picks per backend: "chunked" for long sequences on CPU, else JAX's own choice.
# "xla" and "cudnn" force jax.nn.dot_product_attention's implementation; "chunked" is ours.
AttentionImpl = Literal["auto", "xla", "cudnn", "chunked"]
ATTENTION_IMPLS: tuple[str, ...] = ("auto", "xla", "cudnn", "chunked")

# Below this many scores per head XLA:CPU's fused attention is as fast as chunking.
_CPU_CHUNK_MIN_SCORES = 512 * 512
# Query rows per chunk: a [512, Tk] float32 score block stays in cache for SD's sequence lengths.
_QUERY_CHUNK = 512


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
                          implementation: AttentionImpl = "auto", upcast: bool = False) -> jax.Array:
    """Multi-head softmax attention on ``[B, T, C]`` projections; returns ``[B, Tq, C]``.

    ``upcast`` computes scores and softmax in float32, as diffusers' ``upcast_attention``.
    """
    b, tq, c = q.shape
    tk = k.shape[1]
    head_dim = c // num_heads
    out_dtype = q.dtype
    if upcast:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    if implementation == "auto" and jax.default_backend() == "cpu" and tq * tk >= _CPU_CHUNK_MIN_SCORES:
        implementation = "chunked"
    if implementation == "chunked":
        return _chunked_attention(q, k, v, num_heads).astype(out_dtype)
    q = q.reshape(b, tq, num_heads, head_dim)  # [B, Tq, N, H]
    k = k.reshape(b, tk, num_heads, head_dim)  # [B, Tk, N, H]
    v = v.reshape(b, tk, num_heads, head_dim)
    out = jax.nn.dot_product_attention(q, k, v, implementation=None if implementation == "auto" else implementation)
    return out.reshape(b, tq, c).astype(out_dtype)  # [B, Tq, C]


def _chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int) -> jax.Array:
    """Softmax attention one head and one block of queries at a time.

    On XLA:CPU the fused form materialises every head's full score matrix (1 GiB for SD's
    64x64 latents) and runs memory-bound; a loop over heads and query blocks keeps each
    score block in cache and was 3-6x faster at SD's sizes, with the same math.
    """
    b, tq, c = q.shape
    tk = k.shape[1]
    h = c // num_heads
    chunk = min(_QUERY_CHUNK, tq)
    pad = -tq % chunk
    scale = jnp.asarray(h ** -0.5, q.dtype)
    qh = jnp.pad(q * scale, ((0, 0), (0, pad), (0, 0))).reshape(b, tq + pad, num_heads, h)
    qh = qh.transpose(0, 2, 1, 3).reshape(b * num_heads, (tq + pad) // chunk, chunk, h)  # [BN, Tq/c, c, H]
    kh = k.reshape(b, tk, num_heads, h).transpose(0, 2, 3, 1).reshape(b * num_heads, h, tk)  # [BN, H, Tk]
    vh = v.reshape(b, tk, num_heads, h).transpose(0, 2, 1, 3).reshape(b * num_heads, tk, h)  # [BN, Tk, H]

    def head(args):
        q_blocks, kt, vv = args

        def block(qb):
            s = jnp.matmul(qb, kt, preferred_element_type=jnp.float32)  # [c, Tk]
            p = jnp.exp(s - s.max(axis=-1, keepdims=True))
            out = jnp.matmul(p.astype(vv.dtype), vv, preferred_element_type=jnp.float32)  # [c, H]
            return out / p.sum(axis=-1, keepdims=True)

        return jax.lax.map(block, q_blocks)

    out = jax.lax.map(head, (qh, kh, vh))  # [BN, Tq/c, c, H]
    out = out.reshape(b, num_heads, tq + pad, h)[:, :, :tq].transpose(0, 2, 1, 3)  # [B, Tq, N, H]
    return out.reshape(b, tq, c)


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


def nearest_source_indices(in_size: int, out_size: int) -> np.ndarray:
    """The input index torch's ``F.interpolate(size=..., mode="nearest")`` reads for each output index.

    torch computes ``floor(dst * (in / out))`` with the ratio and the product in float32; float64
    picks a different source for some sizes, so the float32 rounding is reproduced here.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, in_size - 1)


def _resize_nearest(x: jax.Array, out_size: int, axis: int) -> jax.Array:
    in_size = x.shape[axis]
    if out_size == in_size:
        return x
    if out_size == 2 * in_size:
        return jnp.repeat(x, 2, axis=axis)
    return jnp.take(x, nearest_source_indices(in_size, out_size), axis=axis)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling then a 3x3 conv.

    Without ``output_size`` it doubles height and width; with it, it resizes to that ``(H, W)``
    as torch's nearest interpolation does (the UNet's odd-sized skips need it).
    """

    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        # x: [B, H, W, C]
        h, w = output_size if output_size is not None else (2 * x.shape[1], 2 * x.shape[2])
        x = _resize_nearest(_resize_nearest(x, h, axis=1), w, axis=2)  # [B, h, w, C]
        return conv(self.out_channels, 3, self.dtype, "conv")(x)

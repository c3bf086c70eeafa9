"""Building blocks shared by the UNet and the VAE (diffusers' names, NHWC)."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# "auto" picks per target platform and per call (see select_attention); the others force one implementation.
AttentionImpl = Literal["auto", "xla", "cudnn", "chunked", "splash"]
ATTENTION_IMPLS: tuple[str, ...] = ("auto", "xla", "cudnn", "chunked", "splash")
ResolvedAttention = Literal["xla", "cudnn", "chunked", "splash"]

# Below this many scores per head XLA:CPU's fused attention is as fast as chunking, and
# on GPU the full score matrix is small enough not to matter.
_CHUNK_MIN_SCORES = 512 * 512
# Query rows per chunk: a [512, Tk] float32 score block stays in cache for SD's sequence lengths.
_QUERY_CHUNK = 512

# jax 0.10.2's cuDNN flash attention (jax/_src/cudnn/fused_attention_stablehlo.py): check_layout
# takes only fp16/bf16 (or fp8, which jax.nn.dot_product_attention never passes), and
# check_is_flash_attention needs a head dim that is a multiple of 8 and <= 256 from Hopper
# (sm_90) on, <= 128 before. Its only sequence-length rule (even lengths) is for training
# with a bias, which these calls never have.
_CUDNN_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
_CUDNN_HEAD_DIM_MULTIPLE = 8
_CUDNN_HEAD_DIM_MAX = 256
_CUDNN_HEAD_DIM_MAX_PRE_HOPPER = 128

# The splash kernel tiles the head dim and the key axis in 128-wide lanes; queries are padded
# the same way so every block shape is one Mosaic accepts.
_SPLASH_LANES = 128
_SPLASH_BLOCKS = (512, 256, 128)


def select_attention(implementation: AttentionImpl, platform: str, dtype: jax.typing.DTypeLike, tq: int, tk: int,
                     head_dim: int, *, cudnn_max_head_dim: int = _CUDNN_HEAD_DIM_MAX,
                     splash_available: bool = True) -> ResolvedAttention:
    """The attention implementation one call runs, given where and on what it runs.

    ``platform`` is the target devices' (``jax.Device.platform``, or an export platform such as
    ``"cuda"``); ``dtype`` the dtype attention computes in (after any upcast).
    ``cudnn_max_head_dim`` is the widest head the target's cuDNN path takes (256 from Hopper on,
    128 before, 0 without cuDNN) and ``splash_available`` whether the Pallas splash kernel
    imports; ``dot_product_attention`` asks JAX for both.

    "auto": on CPU, "chunked" from 512x512 scores per head (and always in float16), else "xla"; on GPU, "cudnn" where
    cuDNN's flash attention takes the dtype and head dim, else "chunked" for long sequences
    (bounded memory) and "xla" for short ones; on TPU, "splash" where it imports, else "xla".

    A forced implementation is run as asked or refused with a ValueError: "auto" already
    falls back per call, so the only reason to force one is to insist on it, and a silent
    fallback would make e.g. a cuDNN benchmark measure XLA without saying so. "xla" and
    "chunked" run anywhere; "splash" runs off-TPU too, in Pallas interpret mode (slow, for
    testing); "cudnn" is refused for a dtype or head dim its kernel does not take, or off CUDA.
    """
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={implementation!r} is not one of {ATTENTION_IMPLS}")
    dtype = jnp.dtype(dtype)
    gpu = platform in ("gpu", "cuda", "rocm")
    cudnn_fits = (dtype in _CUDNN_DTYPES and head_dim % _CUDNN_HEAD_DIM_MULTIPLE == 0
                  and head_dim <= (cudnn_max_head_dim or _CUDNN_HEAD_DIM_MAX))
    if implementation == "auto":
        long = tq * tk >= _CHUNK_MIN_SCORES
        if platform == "tpu":
            return "splash" if splash_available else "xla"
        if gpu and cudnn_max_head_dim and cudnn_fits:
            return "cudnn"
        if platform == "cpu" and dtype == jnp.float16:
            # XLA:CPU has no float16 dot with float32 accumulation, which jax.nn's XLA path asks for.
            return "chunked"
        return "chunked" if long and (gpu or platform == "cpu") else "xla"
    if implementation == "cudnn":
        # The shape reason first: it holds on every machine, so it is the one worth fixing.
        if not cudnn_fits:
            raise ValueError(
                f"attention_impl='cudnn' cannot run this attention ({dtype.name}, head dim {head_dim}): cuDNN "
                f"flash attention needs float16/bfloat16 and a head dim that is a multiple of "
                f"{_CUDNN_HEAD_DIM_MULTIPLE} and <= {cudnn_max_head_dim or _CUDNN_HEAD_DIM_MAX}; "
                f"pass attention_impl='auto' (picks per call) or 'xla'")
        if not (gpu and cudnn_max_head_dim):
            raise ValueError(f"attention_impl='cudnn' needs a CUDA GPU with cuDNN but the target is {platform!r}; "
                             f"pass attention_impl='auto' (picks per call) or 'xla'")
        return "cudnn"
    if implementation == "splash" and not splash_available:
        raise ValueError("attention_impl='splash' needs jax.experimental.pallas.ops.tpu.splash_attention, which "
                         "does not import here; pass attention_impl='auto' (picks per call) or 'xla'")
    return implementation


def target_platform(platform: str | None) -> str:
    """The platform a module builds its program for: ``platform``, or where it is None the default device's.

    Models take the platform as a field (``from_configs(platform=...)`` sets it from the devices
    a pipeline runs on, or from an export target), so a program lowered for ``cuda`` or ``tpu`` on
    a CPU host gets that target's kernels, not the host's. None is for modules applied directly
    under ``jax.jit`` on the process's default devices.
    """
    return platform if platform is not None else jax.devices()[0].platform


def _cudnn_max_head_dim(platform: str) -> int:
    """The widest head cuDNN flash attention takes on ``platform``'s GPUs; 0 off CUDA or without cuDNN.

    It asks JAX's own cuDNN helpers, which ``jax.nn.dot_product_attention(implementation="cudnn")``
    consults too, so the two never disagree: they read the local cuDNN and the first local GPU's
    compute capability (an export target without a local GPU pins those, tests/test_export.py).
    Not cached, as the answer is the helpers' and cheap.
    """
    if platform not in ("gpu", "cuda"):
        return 0
    try:
        helpers = importlib.import_module("jax._src.cudnn.fused_attention_stablehlo")
        helpers.check_cudnn_version()  # raises where this jaxlib has no cuDNN
        hopper = helpers.check_compute_capability("9.0")
    except (ImportError, AttributeError, RuntimeError):
        return 0
    return _CUDNN_HEAD_DIM_MAX if hopper else _CUDNN_HEAD_DIM_MAX_PRE_HOPPER


@functools.cache
def _splash_module() -> ModuleType | None:
    """The Pallas splash-attention package, or None where this jax build lacks it."""
    try:
        return importlib.import_module("jax.experimental.pallas.ops.tpu.splash_attention")
    except ImportError:
        return None


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
                          implementation: AttentionImpl = "auto", upcast: bool = False,
                          platform: str | None = None) -> jax.Array:
    """Multi-head softmax attention on ``[B, T, C]`` projections; returns ``[B, Tq, C]``.

    ``upcast`` computes scores and softmax in float32, as diffusers' ``upcast_attention``.
    ``implementation`` is resolved per call by ``select_attention`` for ``platform`` (see
    ``target_platform``).
    """
    b, tq, c = q.shape
    tk = k.shape[1]
    head_dim = c // num_heads
    out_dtype = q.dtype
    if upcast:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    platform = target_platform(platform)
    impl = select_attention(implementation, platform, q.dtype, tq, tk, head_dim,
                            cudnn_max_head_dim=_cudnn_max_head_dim(platform),
                            splash_available=_splash_module() is not None)
    if impl == "chunked":
        return _chunked_attention(q, k, v, num_heads, per_head=platform == "cpu").astype(out_dtype)
    q = q.reshape(b, tq, num_heads, head_dim)  # [B, Tq, N, H]
    k = k.reshape(b, tk, num_heads, head_dim)  # [B, Tk, N, H]
    v = v.reshape(b, tk, num_heads, head_dim)
    if impl == "splash":
        out = _splash_attention(q, k, v, interpret=platform != "tpu")
    else:
        out = jax.nn.dot_product_attention(q, k, v, implementation=impl)
    return out.reshape(b, tq, c).astype(out_dtype)  # [B, Tq, C]


def _chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int, per_head: bool) -> jax.Array:
    """Softmax attention one block of queries at a time, bounding the score matrix to a block's.

    On XLA:CPU (``per_head``) the fused form materialises every head's full score matrix (1 GiB
    for SD's 64x64 latents) and runs memory-bound; a loop over heads and query blocks keeps each
    score block in cache and was 3-6x faster at SD's sizes, with the same math. On accelerators
    a sequential loop over heads would starve the device, so every head of a query block runs
    at once and only the memory bound is kept.
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
    # A column of ones makes the second matmul also return the softmax denominator: XLA:CPU's
    # row-sum of the [c, Tk] block was slower than the extra matmul column (about 7% of the
    # attention at 4096 tokens).
    vh = jnp.concatenate([vh, jnp.ones((*vh.shape[:2], 1), vh.dtype)], axis=-1)  # [BN, Tk, H+1]

    def block(qb, kt, vv):
        # qb: [..., c, H], kt: [..., H, Tk], vv: [..., Tk, H+1] with the same leading dims
        s = jnp.matmul(qb, kt, preferred_element_type=jnp.float32)  # [..., c, Tk]
        p = jnp.exp(s - s.max(axis=-1, keepdims=True))
        out = jnp.matmul(p.astype(vv.dtype), vv, preferred_element_type=jnp.float32)  # [..., c, H+1]
        return out[..., :-1] / out[..., -1:]

    if per_head:
        out = jax.lax.map(lambda a: jax.lax.map(lambda qb: block(qb, a[1], a[2]), a[0]), (qh, kh, vh))
    else:
        out = jax.lax.map(lambda qb: block(qb, kh, vh), qh.swapaxes(0, 1)).swapaxes(0, 1)
    # out: [BN, Tq/c, c, H]
    out = out.reshape(b, num_heads, tq + pad, h)[:, :, :tq].transpose(0, 2, 1, 3)  # [B, Tq, N, H]
    return out.reshape(b, tq, c)


def _splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, interpret: bool) -> jax.Array:
    """Pallas's TPU splash (flash) attention on ``[B, T, N, H]``; ``interpret`` runs it off-TPU.

    The kernel wants 128-lane tiles and whole blocks, which SD's shapes are not (head dims
    40/80/160, CLIP's 257 tokens, a single key), so everything is zero-padded: padded q and k
    columns add nothing to the scores, padded v columns only add output columns that are sliced
    off, padded keys (if any) get a segment id of their own so no query attends to them, and
    padded queries are sliced off. The kernel does not scale, so q is scaled by the true head
    dim here.
    """
    _, tq, n, h = q.shape
    tk = k.shape[1]
    # The kernel's softmax is float32 whatever the inputs; Mosaic's matmuls take f32 and bf16.
    dtype = q.dtype if q.dtype in (jnp.float32, jnp.bfloat16) else jnp.float32
    tq_pad, tk_pad, h_pad = (-(-x // _SPLASH_LANES) * _SPLASH_LANES for x in (tq, tk, h))
    kernel = _splash_kernel(n, tq_pad, tk_pad, interpret)

    def prepare(x: jax.Array, t_pad: int) -> jax.Array:
        x = jnp.pad(x.astype(dtype), ((0, 0), (0, t_pad - x.shape[1]), (0, 0), (0, h_pad - h)))
        return x.transpose(0, 2, 1, 3)  # [B, N, T_pad, H_pad]

    q = q.astype(jnp.float32) * (h ** -0.5)
    segments = None
    if tk_pad != tk:
        segments = _splash_module().SegmentIds(q=jnp.zeros((tq_pad,), jnp.int32),
                                                kv=(jnp.arange(tk_pad) >= tk).astype(jnp.int32))
    # The kernel has no batch axis; vmap adds one to its grid.
    out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(prepare(q, tq_pad), prepare(k, tk_pad), prepare(v, tk_pad),
                                                    segments)  # [B, N, Tq_pad, H_pad]
    return out[:, :, :tq, :h].transpose(0, 2, 1, 3)  # [B, Tq, N, H]


@functools.cache
def _splash_kernel(num_heads: int, tq: int, tk: int, interpret: bool) -> Callable[..., jax.Array]:
    """A splash kernel for full (unmasked) attention; cached since building it processes the mask on the host."""
    splash = _splash_module()
    mask = splash.MultiHeadMask([splash.FullMask((tq, tk))] * num_heads)
    block_q, block_kv = (next(s for s in _SPLASH_BLOCKS if t % s == 0) for t in (tq, tk))
    # Forward block sizes only: inference never differentiates through attention. Built eagerly
    # even under jit, so the cached kernel holds concrete mask arrays rather than one trace's tracers.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(mask, block_sizes=splash.BlockSizes(block_q=block_q, block_kv=block_kv),
                                      head_shards=1, q_seq_shards=1, interpret=interpret)


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

"""Shared layers: every attention implementation against PyTorch's scaled_dot_product_attention,
and the per-backend choice between them."""

import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import assert_close

from imvar_jax.models.layers import (
    ATTENTION_IMPLS,
    AttentionImpl,
    _chunked_attention,
    dot_product_attention,
    select_attention,
)


def _reference(q, k, v, heads):
    def split(x):
        b, t, c = x.shape
        return torch.from_numpy(x).reshape(b, t, heads, c // heads).transpose(1, 2)  # [B, N, T, H]

    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    b, n, t, h = out.shape
    return out.transpose(1, 2).reshape(b, t, n * h).numpy()


def _inputs(tq, tk, heads, head_dim, batch=2):
    rng = np.random.default_rng(tq + tk + head_dim)
    return [rng.normal(size=(batch, t, heads * head_dim)).astype(np.float32) for t in (tq, tk, tk)]


# (tq, tk, heads, head dim). Query counts that are and are not multiples of the chunk, one
# below the chunk, and a single key.
_SHAPES = [(1024, 1024, 2, 16), (600, 700, 4, 16), (300, 900, 1, 16), (513, 1, 2, 16)]
# Splash runs in Pallas interpret mode off-TPU, which is slow per block, so its shapes stay small
# but keep what needs padding: head dim 40 (not a multiple of 128), lengths off the 128 grid
# (several query and key blocks, the last key block partly padding), a single key, and one
# case already on the grid (no key padding, so no segment ids).
_SPLASH_SHAPES = [(200, 300, 3, 40), (300, 130, 2, 40), (77, 1, 2, 40), (384, 256, 2, 64)]
# "cudnn" needs a CUDA GPU; off one it is refused (see the select_attention tests below).
_CASES = [(impl, *shape) for impl in ("auto", "xla", "chunked") for shape in _SHAPES]
_CASES += [("splash", *shape) for shape in _SPLASH_SHAPES]


@pytest.mark.parametrize("impl,tq,tk,heads,head_dim", _CASES)
def test_attention_matches_torch(impl, tq, tk, heads, head_dim):
    q, k, v = _inputs(tq, tk, heads, head_dim)
    out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, heads, implementation=impl))(q, k, v)
    assert_close(out, _reference(q, k, v, heads), rel=1e-5, what=f"{impl} {tq}x{tk} head dim {head_dim}")


@pytest.mark.parametrize("tq,tk,heads,head_dim", _SHAPES[1:])
def test_chunked_with_heads_batched_matches_torch(tq, tk, heads, head_dim):
    """The accelerator layout of "chunked" (all heads per query block), run here on CPU."""
    q, k, v = _inputs(tq, tk, heads, head_dim)
    out = jax.jit(lambda q, k, v: _chunked_attention(q, k, v, heads, per_head=False))(q, k, v)
    assert_close(out, _reference(q, k, v, heads), rel=1e-5, what=f"batched heads {tq}x{tk}")


# Inputs rounded to bfloat16 (8 mantissa bits, relative step 2^-8 ~ 4e-3) against a float32
# reference: 3e-2 leaves room for the rounding of q, k, v and of the output. Measured: about
# 6e-3 for splash, the same as XLA's attention on the same bfloat16 inputs.
@pytest.mark.parametrize("impl,upcast", [("chunked", True), ("splash", False), ("splash", True)])
def test_bfloat16(impl, upcast):
    tq, tk, heads, head_dim = (640, 640, 2, 16) if impl == "chunked" else (200, 130, 2, 40)
    q, k, v = _inputs(tq, tk, heads, head_dim, batch=1)
    half = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    out = dot_product_attention(*half, heads, implementation=impl, upcast=upcast)
    assert out.dtype == jnp.bfloat16
    assert_close(np.asarray(out, np.float32), _reference(q, k, v, heads), rel=3e-2, what=f"bf16 {impl}")


def test_attention_impls_match_the_literal():
    assert set(ATTENTION_IMPLS) == set(typing.get_args(AttentionImpl))


# SD-v1's attentions at 64x64 latents (4096 tokens): UNet heads of 40/80/160, CLIP ViT-L/14's
# 16 heads of 64 over 257 tokens, the VAE's one 512-wide head (always float32).
_BF16, _F16, _F32 = jnp.bfloat16, jnp.float16, jnp.float32


@pytest.mark.parametrize("tq,tk,dtype,head_dim,want", [
    (4096, 4096, _F32, 40, "chunked"),
    (512, 512, _F32, 40, "chunked"),   # the threshold itself
    (511, 512, _F32, 40, "xla"),
    (257, 257, _BF16, 64, "xla"),
    (257, 257, _F16, 64, "chunked"),   # XLA:CPU cannot run jax.nn's float16 path at all
    (4096, 4096, _F32, 512, "chunked"),
])
def test_auto_on_cpu(tq, tk, dtype, head_dim, want):
    assert select_attention("auto", "cpu", dtype, tq, tk, head_dim) == want


@pytest.mark.parametrize("tq,tk,dtype,head_dim,max_head_dim,want", [
    (4096, 4096, _F16, 40, 256, "cudnn"),
    (4096, 4096, _BF16, 80, 256, "cudnn"),
    (4096, 4096, _F16, 160, 256, "cudnn"),     # Hopper takes up to 256
    (257, 257, _F16, 64, 128, "cudnn"),        # CLIP on an A100
    (4096, 4096, _F16, 160, 128, "chunked"),   # too wide before Hopper: long ...
    (256, 256, _F16, 160, 128, "xla"),         # ... and short
    (4096, 4096, _F16, 36, 256, "chunked"),    # not a multiple of 8
    (4096, 4096, _F32, 40, 256, "chunked"),    # float32 UNet
    (257, 257, _F32, 64, 256, "xla"),          # float32 CLIP
    (4096, 4096, _F32, 512, 256, "chunked"),   # the VAE
    (4096, 4096, _F16, 40, 0, "chunked"),      # a GPU without cuDNN (ROCm)
])
def test_auto_on_gpu(tq, tk, dtype, head_dim, max_head_dim, want):
    assert select_attention("auto", "gpu", dtype, tq, tk, head_dim, cudnn_max_head_dim=max_head_dim) == want


@pytest.mark.parametrize("dtype,head_dim,tq,tk", [(_BF16, 40, 4096, 4096), (_F32, 512, 4096, 4096),
                                                  (_F32, 64, 257, 257), (_BF16, 80, 4096, 1)])
def test_auto_on_tpu(dtype, head_dim, tq, tk):
    assert select_attention("auto", "tpu", dtype, tq, tk, head_dim) == "splash"
    assert select_attention("auto", "tpu", dtype, tq, tk, head_dim, splash_available=False) == "xla"


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
@pytest.mark.parametrize("impl", ["xla", "chunked", "splash"])
def test_forced_runs_where_it_can(backend, impl):
    # Splash runs off-TPU too (in Pallas interpret mode); xla and chunked run anywhere.
    assert select_attention(impl, backend, _F32, 4096, 4096, 512) == impl


def test_forced_cudnn_runs_on_gpu():
    assert select_attention("cudnn", "gpu", _F16, 64, 64, 40) == "cudnn"
    assert select_attention("cudnn", "gpu", _BF16, 4096, 1, 160, cudnn_max_head_dim=256) == "cudnn"


@pytest.mark.parametrize("impl,backend,dtype,head_dim,kwargs,message", [
    ("cudnn", "gpu", _F32, 512, {}, r"attention_impl='cudnn' .*\(float32, head dim 512\).*<= 256"),
    ("cudnn", "gpu", _F32, 40, {}, r"\(float32, head dim 40\)"),
    ("cudnn", "gpu", _F16, 36, {}, r"\(float16, head dim 36\).*multiple of 8"),
    ("cudnn", "gpu", _F16, 160, {"cudnn_max_head_dim": 128}, r"\(float16, head dim 160\).*<= 128"),
    ("cudnn", "cpu", _F16, 40, {"cudnn_max_head_dim": 0}, r"needs a CUDA GPU .* target is 'cpu'"),
    ("cudnn", "tpu", _BF16, 64, {"cudnn_max_head_dim": 0}, r"needs a CUDA GPU .* target is 'tpu'"),
    ("cudnn", "gpu", _F16, 40, {"cudnn_max_head_dim": 0}, r"needs a CUDA GPU with cuDNN"),
    ("splash", "tpu", _BF16, 40, {"splash_available": False}, r"attention_impl='splash' needs .*splash_attention"),
    ("flash", "gpu", _F16, 40, {}, r"attention_impl='flash' is not one of"),
])
def test_forced_but_impossible_is_refused(impl, backend, dtype, head_dim, kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        select_attention(impl, backend, dtype, 4096, 4096, head_dim, **kwargs)
    assert "\n" not in str(err.value)
    assert "auto" in str(err.value) or impl == "flash"


def test_forced_cudnn_is_refused_before_tracing_on_cpu():
    q = jnp.zeros((1, 64, 80), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"attention_impl='cudnn' needs a CUDA GPU .* target is 'cpu'"):
        dot_product_attention(q, q, q, 2, implementation="cudnn")

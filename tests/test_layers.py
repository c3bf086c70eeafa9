"""Shared layers: every attention implementation against PyTorch's scaled_dot_product_attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import assert_close
from imvar_jax.models.layers import dot_product_attention


def _reference(q, k, v, heads):
    def split(x):
        b, t, c = x.shape
        return torch.from_numpy(x).reshape(b, t, heads, c // heads).transpose(1, 2)  # [B, N, T, H]

    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    b, n, t, h = out.shape
    return out.transpose(1, 2).reshape(b, t, n * h).numpy()


# Query counts that are and are not multiples of the chunk, one below the chunk, and a single key.
@pytest.mark.parametrize("tq,tk,heads", [(1024, 1024, 2), (600, 700, 4), (300, 900, 1), (513, 1, 2)])
@pytest.mark.parametrize("impl", ["auto", "xla", "chunked"])
def test_attention_matches_torch(tq, tk, heads, impl):
    rng = np.random.default_rng(tq + tk)
    q, k, v = (rng.normal(size=(2, t, 16 * heads)).astype(np.float32) for t in (tq, tk, tk))
    out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, heads, implementation=impl))(q, k, v)
    assert_close(out, _reference(q, k, v, heads), rel=1e-5, what=f"{impl} {tq}x{tk}")


def test_chunked_upcast_in_bfloat16():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(1, 640, 32)).astype(np.float32) for _ in range(3))
    half = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    out = dot_product_attention(*half, 2, implementation="chunked", upcast=True)
    assert out.dtype == jnp.bfloat16
    assert_close(np.asarray(out, np.float32), _reference(q, k, v, 2), rel=3e-2, what="bf16 chunked")

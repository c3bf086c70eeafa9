"""Conditioning arithmetic: mixing CLIP image embeddings, and the weights of an interpolation path.

``mix_embeddings`` is traceable and runs inside the sampling program, so the weights are traced
values: changing them never compiles a new program. The weight tables are built on the host.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MIX_METHODS = ("linear", "slerp")


def _slerp(a: jax.Array, b: jax.Array, t: jax.Array) -> jax.Array:
    """Spherical interpolation ``[B, D]`` from ``a`` (t = 0) to ``b`` (t = 1) along the great circle of their
    directions, the norm interpolated linearly (Shoemake, 1985).

    Written as ``a * c_a + b * c_b`` with scalar coefficients so that t = 0 gives exactly ``a`` and t = 1
    exactly ``b``: sin(theta) / sin(theta) and |a| / |a| are exactly 1 in IEEE arithmetic.
    """
    norm_a = jnp.linalg.norm(a, axis=-1, keepdims=True)  # [B, 1]
    norm_b = jnp.linalg.norm(b, axis=-1, keepdims=True)
    t = t[:, None]  # [B, 1]
    cos = jnp.clip(jnp.sum(a * b, axis=-1, keepdims=True) / (norm_a * norm_b), -1.0, 1.0)
    theta = jnp.arccos(cos)
    sin = jnp.sin(theta)
    # Nearly parallel directions: the great circle degenerates, and linear weights are its limit.
    parallel = sin < 1e-6
    safe = jnp.where(parallel, 1.0, sin)
    w_a = jnp.where(parallel, 1 - t, jnp.sin((1 - t) * theta) / safe)
    w_b = jnp.where(parallel, t, jnp.sin(t * theta) / safe)
    norm = (1 - t) * norm_a + t * norm_b
    return a * (w_a * norm / norm_a) + b * (w_b * norm / norm_b)


def mix_embeddings(embeds: jax.Array, weights: jax.Array, method: str = "linear") -> jax.Array:
    """One embedding ``[B, D]`` per row from ``embeds`` ``[B, M, D]`` and non-negative ``weights`` ``[B, M]``.

    The weights are normalised to sum 1 per row; a row whose weights are all 0 gives the zero
    embedding (the "no picture" input of classifier-free guidance). ``"linear"``: the weighted sum.
    ``"slerp"``: spherical interpolation, folded over the sources in order (source m joins the
    running mix with its share w_m / (w_0 + ... + w_m)), so two sources with weights (1 - t, t)
    are slerp(a, b, t). A weight of exactly 1 on one source gives that embedding to the bit.
    """
    if method not in MIX_METHODS:
        raise ValueError(f"method: expected one of {', '.join(MIX_METHODS)}, got {method!r}")
    embeds = embeds.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    total = jnp.sum(weights, axis=1)  # [B]
    empty = total <= 0
    if method == "linear":
        share = weights / jnp.where(empty, 1.0, total)[:, None]  # [B, M]
        mixed = jnp.sum(share[:, :, None] * embeds, axis=1)  # [B, D]
    else:
        mixed, so_far = embeds[:, 0], weights[:, 0]
        for m in range(1, embeds.shape[1]):
            seen = so_far + weights[:, m]
            # Until a source with weight arrives, the running mix is just the newest source.
            t = jnp.where(seen > 0, weights[:, m] / jnp.where(seen > 0, seen, 1.0), 1.0)
            mixed, so_far = _slerp(mixed, embeds[:, m], t), seen
    return jnp.where(empty[:, None], 0.0, mixed)


def path_weights(points: int, frames: int) -> np.ndarray:
    """``[frames, points]`` float32 weights of evenly spaced positions along the path through ``points``
    embeddings in order, frame 0 at the first and the last frame at the last: each row weights the two
    neighbours of its position (1 - t, t)."""
    if points < 2:
        raise ValueError(f"images: interpolation needs at least 2 pictures, got {points}")
    if frames < 2:
        raise ValueError(f"frames: expected at least 2, got {frames}")
    position = np.linspace(0.0, points - 1, frames)  # [frames]
    segment = np.minimum(np.floor(position).astype(np.int64), points - 2)
    t = position - segment
    weights = np.zeros((frames, points), np.float64)
    rows = np.arange(frames)
    weights[rows, segment] = 1 - t
    weights[rows, segment + 1] = t
    return weights.astype(np.float32)


def check_weights(weights: Any, count: int, name: str = "mix_weights") -> np.ndarray:
    """``weights`` as ``[count]`` float32: finite, non-negative, with a positive sum."""
    try:
        w = np.asarray(weights, np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {count} numbers, got {weights!r}"[:200]) from None
    if w.shape != (count,):
        raise ValueError(f"{name}: expected {count} numbers (one per picture), got shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"{name}: expected finite weights >= 0 with a positive sum, got {w.tolist()}")
    return w.astype(np.float32)


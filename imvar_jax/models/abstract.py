"""The params tree of any of the four models as shapes only, traced without allocating weights."""

from __future__ import annotations

import functools
from typing import Any, Hashable, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike


class ModelConfig(Hashable, Protocol):
    """What ``abstract_params`` needs of a config: its model and inputs that make ``init`` create every param."""

    def init_example(self) -> tuple[nn.Module, tuple[jax.ShapeDtypeStruct, ...]]: ...


def abstract_params(config: ModelConfig, dtype: DTypeLike = jnp.float32) -> dict[str, Any]:
    """``config``'s params tree with ``jax.ShapeDtypeStruct`` leaves of ``dtype``; nothing is allocated or computed.

    A new tree each call, from one trace per config: tracing the full-size UNet's ``init`` takes over a
    second, and loading, checking and warming up all ask for the same trees.
    """
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), _traced(config))


@functools.lru_cache(maxsize=16)
def _traced(config: ModelConfig) -> dict[str, Any]:
    module, inputs = config.init_example()
    return jax.eval_shape(lambda *xs: module.init(jax.random.key(0), *xs), *inputs)["params"]

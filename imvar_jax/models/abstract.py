"""The params tree of any of the four models as shapes only, traced without allocating weights."""

from __future__ import annotations

from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike


class ModelConfig(Protocol):
    """What ``abstract_params`` needs of a config: its model and inputs that make ``init`` create every param."""

    def init_example(self) -> tuple[nn.Module, tuple[jax.ShapeDtypeStruct, ...]]: ...


def abstract_params(config: ModelConfig, dtype: DTypeLike = jnp.float32) -> dict[str, Any]:
    """``config``'s params tree with ``jax.ShapeDtypeStruct`` leaves of ``dtype``; nothing is allocated or computed."""
    module, inputs = config.init_example()
    shapes = jax.eval_shape(lambda *xs: module.init(jax.random.key(0), *xs), *inputs)["params"]
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes)

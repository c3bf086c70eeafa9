"""The optimizer: AdamW with global-norm clipping and a linear warm-up, over the trainable part of the UNet.

Defaults are the image-variation model card's recipe: AdamW (b1 0.9, b2 0.999, weight decay
1e-2, eps 1e-8; Loshchilov & Hutter, arXiv:1711.05101), gradients clipped to global norm 1.0,
the learning rate warmed up linearly from 0 to 1e-4 over 1000 steps and then constant, as
diffusers' ``get_constant_schedule_with_warmup`` (the first update uses rate 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from ..settings import SettingsError

Trainable = Literal["all", "attn"]
TRAINABLE: tuple[str, ...] = ("all", "attn")


@dataclass(frozen=True)
class TrainConfig:
    """What shapes an optimizer update and the objective's randomness; checked when built (errors name the field)."""

    learning_rate: float = 1e-4
    warmup_steps: int = 1000
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 1e-2
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    accumulate: int = 1  # micro-batches per update (optax.MultiSteps)
    ema_decay: float = 0.9999
    p_uncond: float = 0.1
    trainable: Trainable = "all"

    def __post_init__(self) -> None:
        def number(name: str, low: float, high: float, low_open: bool = False) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < low or value > high or (low_open and value == low):
                bound = f"{'(' if low_open else '['}{low}, {high}]"
                raise SettingsError(f"{name}: expected a number in {bound}, got {value!r}")

        number("learning_rate", 0.0, 1.0, low_open=True)
        number("b1", 0.0, 1.0)
        number("b2", 0.0, 1.0)
        number("weight_decay", 0.0, 1.0)
        number("eps", 0.0, 1.0, low_open=True)
        number("max_grad_norm", 0.0, math.inf, low_open=True)
        number("ema_decay", 0.0, 1.0)
        number("p_uncond", 0.0, 1.0)
        for name, low in (("warmup_steps", 0), ("accumulate", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SettingsError(f"{name}: expected an integer >= {low}, got {value!r}")
        if self.trainable not in TRAINABLE:
            raise SettingsError(f"trainable: expected one of {', '.join(TRAINABLE)}, got {self.trainable!r}")


def trainable_mask(unet_params: Any, trainable: Trainable) -> Any:
    """A tree of bools like ``unet_params``: True where a param trains.

    ``"attn"`` trains only the cross-attention layers (every ``attn2``: the layers that read the
    image embedding), the first stage of the image-variation v2 recipe.
    """
    def trains(path: tuple[Any, ...], _: Any) -> bool:
        return trainable == "all" or any(getattr(k, "key", None) == "attn2" for k in path)

    return jax.tree_util.tree_map_with_path(trains, unet_params)


def warmed_up(peak: Any, warmup_steps: Any, update: Any) -> Any:
    """The learning rate of update ``update`` (from 0): ``peak * update / warmup_steps`` during the warm-up, then
    ``peak``; as diffusers' ``get_constant_schedule_with_warmup``. Works on numbers and on traced arrays."""
    return peak * jnp.where(update < warmup_steps, update / jnp.maximum(warmup_steps, 1), 1.0)


def learning_rate(config: TrainConfig) -> optax.Schedule:
    return lambda update: warmed_up(config.learning_rate, config.warmup_steps, update)


def _adamw(learning_rate: Any, warmup_steps: Any, b1: Any, b2: Any, eps: Any, weight_decay: Any,
           max_grad_norm: Any) -> optax.GradientTransformation:
    # optax.adamw's chain, with the clipping before it and the warm-up inside it. Called by
    # inject_hyperparams with the hyperparameters as arrays from the optimizer state.
    return optax.chain(optax.clip_by_global_norm(max_grad_norm),
                       optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                       optax.add_decayed_weights(weight_decay),
                       optax.scale_by_learning_rate(lambda update: warmed_up(learning_rate, warmup_steps, update)))


def make_optimizer(config: TrainConfig, unet_params: Any) -> optax.GradientTransformation:
    """The update rule for ``unet_params``: frozen params get zero updates; clipping sees only trainable gradients.

    The numbers (rate, warm-up, betas, eps, decay, clipping) live in the optimizer state
    (``optax.inject_hyperparams``), so runs that differ only in them share one compiled step;
    only ``trainable`` and ``accumulate`` shape the program. With ``accumulate`` > 1 the
    gradients of that many calls are averaged before one update (``optax.MultiSteps``); the
    schedule counts updates, not calls.
    """
    # Every number a float32 array: an int would be stored weakly typed, and orbax restores it strongly
    # typed, so a resumed run would compile its step again.
    train = optax.inject_hyperparams(_adamw, hyperparam_dtype=jnp.float32)(
        learning_rate=config.learning_rate, warmup_steps=float(config.warmup_steps), b1=config.b1, b2=config.b2,
        eps=config.eps, weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm)
    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable_mask(unet_params, config.trainable))
    optimizer = optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)
    if config.accumulate > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=config.accumulate)
    return optimizer

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


def learning_rate(config: TrainConfig) -> optax.Schedule:
    if config.warmup_steps == 0:
        return optax.constant_schedule(config.learning_rate)
    return optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps),
                                 optax.constant_schedule(config.learning_rate)], [config.warmup_steps])


def make_optimizer(config: TrainConfig, unet_params: Any) -> optax.GradientTransformation:
    """The update rule for ``unet_params``: frozen params get zero updates; clipping sees only trainable gradients.

    With ``accumulate`` > 1 the gradients of that many calls are averaged before one update
    (``optax.MultiSteps``); the schedule counts updates, not calls.
    """
    train = optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                        optax.adamw(learning_rate(config), b1=config.b1, b2=config.b2, eps=config.eps,
                                    weight_decay=config.weight_decay))
    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable_mask(unet_params, config.trainable))
    optimizer = optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)
    if config.accumulate > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=config.accumulate)
    return optimizer

"""One training step as a pure function: ``(state, batch) -> (state, metrics)``, jittable over any placement.

Every random draw of example ``i`` at update ``n`` (its noise, timestep and whether its
condition is dropped) comes from ``fold_in(fold_in(key(seed), n), i)`` with ``i`` the example's
index in the global batch, so the loss curve depends on the seed and the data only, not on how
the batch is spread over devices. Under ``jax.jit`` with the batch sharded over a mesh and the
state replicated, XLA averages the gradients across devices (the loss is the global mean).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from ..models.unet import UNet2DConditionModel
from .objective import NoiseSchedule, conditions, denoising_loss
from .optim import TrainConfig


@struct.dataclass
class TrainState:
    step: jax.Array  # int32: optimizer updates (micro-steps with accumulation) done
    params: Any  # the UNet's float32 master params
    opt_state: Any
    ema: Any  # float32 exponential moving average of ``params``
    seed: jax.Array  # uint32 [2]: the run's key data
    # The run's numbers the step reads, as arrays so that runs differing in them share one program.
    ema_decay: jax.Array  # float32
    p_uncond: jax.Array  # float32: the probability of the zero embedding


class Batch(NamedTuple):
    latents: jax.Array  # float32 [B, h, w, C]: VAE latents, already times scaling_factor
    embeds: jax.Array  # float32 [B, D]: each picture's CLIP image embedding
    index: jax.Array  # int32 [B]: each example's position in the global batch


def init_state(params: Any, optimizer: optax.GradientTransformation, config: TrainConfig, seed: int) -> TrainState:
    """The state before the first step: float32 copies of ``params``, the EMA equal to them, ``config``'s numbers."""
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    return TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params),
                      ema=jax.tree.map(jnp.copy, params),
                      seed=jax.random.key_data(jax.random.key(seed)),
                      ema_decay=jnp.float32(config.ema_decay), p_uncond=jnp.float32(config.p_uncond))


def example_draws(seed: jax.Array, step: jax.Array, index: jax.Array, shape: tuple[int, ...],
                  num_train_timesteps: int, embeds: jax.Array, p_uncond: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per example: noise ``[B, *shape]``, timestep ``[B]`` and context ``[B, 1, D]``, from (seed, step, index)."""
    base = jax.random.fold_in(jax.random.wrap_key_data(seed), step)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(index)  # [B]
    split = jax.vmap(lambda k: jax.random.split(k, 3))(keys)  # [B, 3]
    noise = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(split[:, 0])
    timesteps = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_train_timesteps))(split[:, 1])
    drop = jax.vmap(lambda k: jax.random.uniform(k, ()))(split[:, 2]) < p_uncond  # [B]
    return noise, timesteps.astype(jnp.int32), conditions(embeds, drop)


def train_step(unet: UNet2DConditionModel, schedule: NoiseSchedule, optimizer: optax.GradientTransformation,
               state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    """One call: loss and gradients of the batch, an optimizer update (or an accumulation), the EMA."""
    noise, timesteps, context = example_draws(state.seed, state.step, batch.index, batch.latents.shape[1:],
                                              schedule.num_train_timesteps, batch.embeds, state.p_uncond)

    def loss_of(params):
        return denoising_loss(unet, params, schedule, batch.latents, noise, timesteps, context)

    loss, grads = jax.value_and_grad(loss_of)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = state.ema_decay
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema, params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics


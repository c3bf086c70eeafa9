"""DDIM: denoising diffusion implicit models (Song, Meng & Ermon, 2020, arXiv:2010.02502).

x_{t-1} = sqrt(a_{t-1}) x0_pred + sqrt(1 - a_{t-1} - sigma_t^2) eps + sigma_t z   (eq. 12)
sigma_t(eta) = eta sqrt((1 - a_{t-1}) / (1 - a_t)) sqrt(1 - a_t / a_{t-1})      (eq. 16)
with a = alpha_bar; eta = 0 is the deterministic DDIM, eta = 1 ancestral DDPM sampling.
"""

from __future__ import annotations

import dataclasses
from numbers import Real
from typing import Any, ClassVar, Mapping, Self

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .common import (SchedulerConfig, alphas_cumprod, check_num_inference_steps, check_sample_shape, check_start,
                     check_timestep_range, descending_timesteps, exportable, final_alpha_cumprod, padded)


@exportable
@struct.dataclass
class DDIMState:
    timesteps: jax.Array  # int32 [n]
    init_noise_sigma: jax.Array  # float32 scalar
    alpha_t: jax.Array  # float32 [n]: alpha_bar at timesteps[i]
    alpha_prev: jax.Array  # float32 [n]: alpha_bar one inference step later
    length: jax.Array  # int32 scalar: the loop's real number of steps; the tables may be padded past it


@dataclasses.dataclass(frozen=True)
class DDIMScheduler:
    config: SchedulerConfig
    kind: ClassVar[str] = "ddim"
    draws_noise: ClassVar[bool] = True
    # Its noise enters as eta * sigma * z: at eta 0 (the default) there is nothing to draw.
    noise_only_with_eta: ClassVar[bool] = True

    @classmethod
    def from_config(cls, raw: Mapping[str, Any]) -> Self:
        return cls(SchedulerConfig.from_dict(raw, cls.kind))

    def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...], start: int = 0,
                      padded_to: int | None = None) -> DDIMState:
        """DDIM keeps no history, so ``sample_shape`` only fixes the interface and a run may begin at any
        loop step ``start`` (img2img) with the same tables.
        ``padded_to`` pads the tables to that many loop steps (``common.padded``)."""
        cfg = self.config
        n = check_num_inference_steps(num_inference_steps, cfg)
        check_sample_shape(sample_shape)
        check_start(start, n)
        timesteps = np.round(descending_timesteps(cfg, n)).astype(np.int64)  # [n]
        check_timestep_range(timesteps, cfg)
        # The previous timestep is one stride of T // n back whatever the spacing, as in
        # diffusers; past 0 it is the "clean" end of the chain.
        prev = timesteps - cfg.num_train_timesteps // n
        table = alphas_cumprod(cfg)
        alpha_prev = np.where(prev >= 0, table[np.maximum(prev, 0)], final_alpha_cumprod(cfg))
        return DDIMState(
            timesteps=jnp.asarray(padded(timesteps, n, padded_to), jnp.int32),
            init_noise_sigma=jnp.float32(1.0),
            alpha_t=jnp.asarray(padded(table[timesteps], n, padded_to), jnp.float32),
            alpha_prev=jnp.asarray(padded(alpha_prev, n, padded_to), jnp.float32),
            length=jnp.int32(n),
        )

    def add_noise(self, state: DDIMState, original: jax.Array, noise: jax.Array, step_index: jax.Array) -> jax.Array:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps at loop step ``step_index`` (the forward process, DDPM eq. 4)."""
        a_t = state.alpha_t[step_index]
        return jnp.sqrt(a_t) * original + jnp.sqrt(1 - a_t) * noise

    def scale_model_input(self, state: DDIMState, sample: jax.Array, step_index: jax.Array) -> jax.Array:
        return sample

    def step(self, state: DDIMState, model_output: jax.Array, step_index: jax.Array, sample: jax.Array, *,
             eta: jax.Array | float = 0.0, variance_noise: jax.Array | None = None) -> tuple[jax.Array, DDIMState]:
        """One DDIM step. ``variance_noise`` (standard normal, the sample's shape) is z of eq. 12;
        it is required unless eta is 0. With eta = 0 the noise term is exactly 0 * z, so the
        result equals the deterministic update to the bit (for finite z)."""
        if variance_noise is None and not (isinstance(eta, Real) and eta == 0):
            raise ValueError("variance_noise: required when eta may be non-zero (DDIM adds sigma_t * noise)")
        cfg = self.config
        e = jnp.asarray(model_output).astype(jnp.float32)
        x = jnp.asarray(sample).astype(jnp.float32)
        a_t = state.alpha_t[step_index]
        a_prev = state.alpha_prev[step_index]
        b_t = 1 - a_t

        if cfg.prediction_type == "epsilon":
            x0 = (x - jnp.sqrt(b_t) * e) / jnp.sqrt(a_t)
            eps = e
        else:
            # v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho, 2022), solved for x0 and eps.
            x0 = jnp.sqrt(a_t) * x - jnp.sqrt(b_t) * e
            eps = jnp.sqrt(a_t) * e + jnp.sqrt(b_t) * x
        if cfg.clip_sample:
            x0 = jnp.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)

        variance = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)
        std = jnp.asarray(eta, jnp.float32) * jnp.sqrt(variance)
        prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev - std ** 2) * eps
        if variance_noise is not None:
            prev = prev + std * jnp.asarray(variance_noise).astype(jnp.float32)
        return prev, state

"""DPM-Solver++(2M): the multistep second-order solver of Lu et al. (2022, arXiv:2211.01095), data prediction.

In log-SNR time lambda = log(alpha / sigma) (alpha = 1 / sqrt(s^2 + 1), sigma = s alpha for the
noise level s), one step from lambda_s to lambda_t = lambda_s + h is (Algorithm 2)

    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) (D0 + D1 / 2),
    D0 = x0_s,  D1 = (x0_s - x0_prev) / r,  r = h_prev / h,

with x0 the data prediction of the current and previous step. The first step, with no previous
prediction, and the last, to s = 0, are first order (D1 = 0), as diffusers' ``lower_order_final``
and ``final_sigmas_type="zero"`` have it. ``use_karras_sigmas`` spaces the noise levels as
Karras et al. (2022), eq. 5.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Self

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .common import (SchedulerConfig, check_num_inference_steps, check_sample_shape, check_start,
                     check_timestep_range, descending_timesteps, exportable, karras_sigmas, padded,
                     train_sigmas)


@exportable
@struct.dataclass
class DPMState:
    timesteps: jax.Array  # int32 [n]
    init_noise_sigma: jax.Array  # float32 scalar: 1, the solver works on variance-preserving latents
    sigmas: jax.Array  # float32 [n + 1], ending at 0
    first_order: jax.Array  # bool [n]: the run's first step and the last take the first-order update
    previous: jax.Array  # float32 [*sample]: the previous step's data prediction x0
    length: jax.Array  # int32 scalar: the loop's real number of steps; the tables may be padded past it


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepScheduler:
    config: SchedulerConfig
    kind: ClassVar[str] = "dpmpp-2m"
    draws_noise: ClassVar[bool] = False

    @classmethod
    def from_config(cls, raw: Mapping[str, Any]) -> Self:
        return cls(SchedulerConfig.from_dict(raw, cls.kind))

    def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...], start: int = 0,
                      padded_to: int | None = None) -> DPMState:
        """``start`` > 0 begins the run at that loop step (img2img), which is then first order, as a run's
        first step has no previous prediction. ``padded_to`` pads the tables to that many loop steps
        (``common.padded``)."""
        cfg = self.config
        n = check_num_inference_steps(num_inference_steps, cfg)
        shape = check_sample_shape(sample_shape)
        total = cfg.num_train_timesteps
        # n + 1 points, the last (timestep 0) dropped: diffusers' spacings for this solver.
        if cfg.timestep_spacing == "linspace":
            timesteps = np.linspace(0, total - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif cfg.timestep_spacing == "leading":
            ratio = total // (n + 1)
            timesteps = (np.arange(n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg.steps_offset
        else:
            timesteps = descending_timesteps(cfg, n).astype(np.int64)  # "trailing"
        check_timestep_range(timesteps, cfg)
        if cfg.use_karras_sigmas:
            timesteps, sigmas = karras_sigmas(cfg, n)
        else:
            table = train_sigmas(cfg)
            sigmas = np.interp(timesteps, np.arange(len(table)), table)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)  # [len(timesteps) + 1]
        steps = np.arange(len(timesteps))
        first_order = (steps == check_start(start, len(timesteps))) | (steps == len(timesteps) - 1)
        loop = len(timesteps)
        return DPMState(timesteps=jnp.asarray(padded(timesteps, loop, padded_to), jnp.int32),
                        init_noise_sigma=jnp.float32(1.0), sigmas=jnp.asarray(padded(sigmas, loop, padded_to)),
                        first_order=jnp.asarray(padded(first_order, loop, padded_to)),
                        previous=jnp.zeros(shape, jnp.float32), length=jnp.int32(loop))

    def add_noise(self, state: DPMState, original: jax.Array, noise: jax.Array, step_index: jax.Array) -> jax.Array:
        """x = alpha x0 + sigma eps (variance preserving) at the noise level of loop step ``step_index``."""
        alpha = 1 / jnp.sqrt(state.sigmas[step_index] ** 2 + 1)
        return alpha * original + (state.sigmas[step_index] * alpha) * noise

    def scale_model_input(self, state: DPMState, sample: jax.Array, step_index: jax.Array) -> jax.Array:
        return sample

    def step(self, state: DPMState, model_output: jax.Array, step_index: jax.Array, sample: jax.Array, *,
             eta: jax.Array | float = 0.0, variance_noise: jax.Array | None = None) -> tuple[jax.Array, DPMState]:
        """One DPM-Solver++(2M) step; deterministic, so ``eta`` and ``variance_noise`` are ignored."""
        e = jnp.asarray(model_output).astype(jnp.float32)
        x = jnp.asarray(sample).astype(jnp.float32)
        i = step_index

        def alpha_sigma(s):
            alpha = 1 / jnp.sqrt(s ** 2 + 1)
            return alpha, s * alpha

        alpha_s, sigma_s = alpha_sigma(state.sigmas[i])
        alpha_t, sigma_t = alpha_sigma(state.sigmas[i + 1])
        alpha_p, sigma_p = alpha_sigma(state.sigmas[jnp.maximum(i - 1, 0)])
        if self.config.prediction_type == "epsilon":
            x0 = (x - sigma_s * e) / alpha_s
        else:
            x0 = alpha_s * x - sigma_s * e  # v = alpha eps - sigma x0 (Salimans & Ho, 2022)
        lambda_t = jnp.log(alpha_t) - jnp.log(sigma_t)  # +inf at the last step, where sigma_t = 0
        lambda_s = jnp.log(alpha_s) - jnp.log(sigma_s)
        lambda_p = jnp.log(alpha_p) - jnp.log(sigma_p)
        h = lambda_t - lambda_s
        first = (sigma_t / sigma_s) * x - (alpha_t * (jnp.exp(-h) - 1.0)) * x0
        d1 = (x0 - state.previous) / ((lambda_s - lambda_p) / h)
        second = first - 0.5 * (alpha_t * (jnp.exp(-h) - 1.0)) * d1
        # jnp.where, not a cond: the unused second-order value (inf/NaN at the ends) never reaches the result.
        prev = jnp.where(state.first_order[i], first, second)
        return prev, state.replace(previous=x0)


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepKarrasScheduler(DPMSolverMultistepScheduler):
    """DPM-Solver++(2M) on Karras et al.'s noise levels (``use_karras_sigmas=True`` whatever the config says)."""

    kind: ClassVar[str] = "dpmpp-2m-karras"

"""Euler and Euler ancestral samplers in the sigma parameterisation x = x0 + sigma * eps (Karras et al., 2022).

Euler integrates the probability-flow ODE dx/dsigma = (x - x0_pred) / sigma with one explicit
step per noise level (Karras et al., Algorithm 1 without the second-order correction, as
diffusers' ``EulerDiscreteScheduler`` with ``s_churn = 0``). Euler ancestral steps down to
sigma_down and adds fresh noise of std sigma_up, where sigma_up^2 = sigma_next^2 (sigma^2 -
sigma_next^2) / sigma^2 and sigma_down^2 = sigma_next^2 - sigma_up^2 (the DDPM ancestral step
written in sigmas, as k-diffusion's ``sample_euler_ancestral``), so it needs noise every step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Self

import jax
import jax.numpy as jnp
from flax import struct

from .common import (SchedulerConfig, check_num_inference_steps, check_sample_shape, check_start, exportable,
                     padded, sigma_schedule)


def ode_derivative(prediction_type: str, model_output: jax.Array, sigma: jax.Array, x: jax.Array) -> jax.Array:
    """dx/dsigma = (x - x0_pred) / sigma of the probability-flow ODE, x0 predicted from the UNet's output at
    noise level sigma (float32; shared with LMS)."""
    e = jnp.asarray(model_output).astype(jnp.float32)
    if prediction_type == "epsilon":
        x0 = x - sigma * e
    else:
        # v-prediction on the scaled input x / sqrt(sigma^2 + 1) (Salimans & Ho, 2022).
        x0 = e * (-sigma / jnp.sqrt(sigma ** 2 + 1)) + x / (sigma ** 2 + 1)
    return (x - x0) / sigma


@exportable
@struct.dataclass
class EulerState:
    timesteps: jax.Array  # float32 [n]: fractional under "linspace" spacing, the UNet takes them as is
    init_noise_sigma: jax.Array  # float32 scalar
    sigmas: jax.Array  # float32 [n + 1], ending at 0
    length: jax.Array  # int32 scalar: the loop's real number of steps; the tables may be padded past it


@dataclasses.dataclass(frozen=True)
class EulerDiscreteScheduler:
    config: SchedulerConfig
    kind: ClassVar[str] = "euler"
    draws_noise: ClassVar[bool] = False

    @classmethod
    def from_config(cls, raw: Mapping[str, Any]) -> Self:
        return cls(SchedulerConfig.from_dict(raw, cls.kind))

    def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...], start: int = 0,
                      padded_to: int | None = None) -> EulerState:
        """The Euler samplers keep no history, so ``sample_shape`` only fixes the interface and a run may begin
        at any loop step ``start`` (img2img) with the same tables.
        ``padded_to`` pads the tables to that many loop steps (``common.padded``)."""
        n = check_num_inference_steps(num_inference_steps, self.config)
        check_sample_shape(sample_shape)
        check_start(start, n)
        timesteps, sigmas, init_noise_sigma = sigma_schedule(self.config, n)
        return EulerState(timesteps=jnp.asarray(padded(timesteps, n, padded_to), jnp.float32),
                          init_noise_sigma=jnp.float32(init_noise_sigma),
                          sigmas=jnp.asarray(padded(sigmas, n, padded_to)), length=jnp.int32(n))

    def add_noise(self, state: EulerState, original: jax.Array, noise: jax.Array, step_index: jax.Array) -> jax.Array:
        """x = x0 + sigma * eps at the noise level of loop step ``step_index``."""
        return original + noise * state.sigmas[step_index]

    def scale_model_input(self, state: EulerState, sample: jax.Array, step_index: jax.Array) -> jax.Array:
        """x / sqrt(sigma^2 + 1): the UNet was trained on variance-preserving inputs sqrt(a) x."""
        return sample / jnp.sqrt(state.sigmas[step_index] ** 2 + 1)

    def _derivative(self, model_output: jax.Array, sigma: jax.Array, x: jax.Array) -> jax.Array:
        return ode_derivative(self.config.prediction_type, model_output, sigma, x)

    def step(self, state: EulerState, model_output: jax.Array, step_index: jax.Array, sample: jax.Array, *,
             eta: jax.Array | float = 0.0, variance_noise: jax.Array | None = None) -> tuple[jax.Array, EulerState]:
        """One Euler step from sigma_i to sigma_{i+1}; deterministic, so ``eta`` and ``variance_noise`` are ignored."""
        x = jnp.asarray(sample).astype(jnp.float32)
        sigma = state.sigmas[step_index]
        return x + self._derivative(model_output, sigma, x) * (state.sigmas[step_index + 1] - sigma), state


@dataclasses.dataclass(frozen=True)
class EulerAncestralDiscreteScheduler(EulerDiscreteScheduler):
    kind: ClassVar[str] = "euler-a"
    draws_noise: ClassVar[bool] = True
    noise_only_with_eta: ClassVar[bool] = False  # its step is always fully ancestral

    def step(self, state: EulerState, model_output: jax.Array, step_index: jax.Array, sample: jax.Array, *,
             eta: jax.Array | float = 0.0, variance_noise: jax.Array | None = None) -> tuple[jax.Array, EulerState]:
        """One ancestral step; ``variance_noise`` (standard normal, the sample's shape) is required. ``eta`` is
        ignored (the step is always fully ancestral, as diffusers' class has it)."""
        if variance_noise is None:
            raise ValueError("variance_noise: required by the Euler ancestral step (it adds sigma_up * noise)")
        x = jnp.asarray(sample).astype(jnp.float32)
        sigma, sigma_next = state.sigmas[step_index], state.sigmas[step_index + 1]
        sigma_up = jnp.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
        sigma_down = jnp.sqrt(sigma_next ** 2 - sigma_up ** 2)
        x = x + self._derivative(model_output, sigma, x) * (sigma_down - sigma)
        return x + jnp.asarray(variance_noise).astype(jnp.float32) * sigma_up, state

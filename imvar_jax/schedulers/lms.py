"""Linear multistep (order 4) in the sigma parameterisation of Karras et al. (2022), as in
k-diffusion's ``sample_lms``.

With x = x0 + sigma * eps the probability-flow ODE is dx/dsigma = (x - x0_pred) / sigma.
Each step integrates the Lagrange interpolant of the last (up to) four derivatives over
[sigma_i, sigma_{i+1}]; the weights are exact integrals of the Lagrange basis polynomials,
computed on the host in ``set_timesteps`` (the reference integrates them numerically).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Self

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from numpy.polynomial import Polynomial

from .common import (SchedulerConfig, check_num_inference_steps, check_sample_shape, check_start, exportable,
                     padded, sigma_schedule)
from .euler import ode_derivative

ORDER = 4


@exportable
@struct.dataclass
class LMSState:
    timesteps: jax.Array  # float32 [n]: fractional under "linspace" spacing, the UNet takes them as is
    init_noise_sigma: jax.Array  # float32 scalar
    sigmas: jax.Array  # float32 [n + 1], ending at 0
    coeffs: jax.Array  # float32 [n, ORDER]: weights of the newest..oldest derivative at step i
    derivatives: jax.Array  # float32 [ORDER, *sample]: dx/dsigma history, newest first
    length: jax.Array  # int32 scalar: the loop's real number of steps; the tables may be padded past it


@dataclasses.dataclass(frozen=True)
class LMSDiscreteScheduler:
    config: SchedulerConfig
    kind: ClassVar[str] = "lms"
    draws_noise: ClassVar[bool] = False

    @classmethod
    def from_config(cls, raw: Mapping[str, Any]) -> Self:
        return cls(SchedulerConfig.from_dict(raw, cls.kind))

    def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...], start: int = 0,
                      padded_to: int | None = None) -> LMSState:
        """``start`` > 0 begins the run at that loop step (img2img). The tables stay those of the whole run: as in
        diffusers, step ``start + j`` weighs its j + 1 derivatives with the full run's weights for that step
        (the rest meet the zeros of the empty history). ``padded_to`` pads the tables to that many loop
        steps (``common.padded``)."""
        cfg = self.config
        n = check_num_inference_steps(num_inference_steps, cfg)
        shape = check_sample_shape(sample_shape)
        check_start(start, n)
        timesteps, sigmas, init_noise_sigma = sigma_schedule(cfg, n)
        return LMSState(
            timesteps=jnp.asarray(padded(timesteps, n, padded_to), jnp.float32),
            init_noise_sigma=jnp.float32(init_noise_sigma),
            sigmas=jnp.asarray(padded(sigmas, n, padded_to)),
            coeffs=jnp.asarray(padded(lms_coefficients(sigmas), n, padded_to), jnp.float32),
            derivatives=jnp.zeros((ORDER, *shape), jnp.float32),
            length=jnp.int32(n),
        )

    def add_noise(self, state: LMSState, original: jax.Array, noise: jax.Array, step_index: jax.Array) -> jax.Array:
        """x = x0 + sigma * eps at the noise level of loop step ``step_index``."""
        return original + noise * state.sigmas[step_index]

    def scale_model_input(self, state: LMSState, sample: jax.Array, step_index: jax.Array) -> jax.Array:
        """x / sqrt(sigma^2 + 1): the UNet was trained on variance-preserving inputs sqrt(a) x."""
        sigma = state.sigmas[step_index]
        return sample / jnp.sqrt(sigma ** 2 + 1)

    def step(self, state: LMSState, model_output: jax.Array, step_index: jax.Array, sample: jax.Array, *,
             eta: jax.Array | float = 0.0, variance_noise: jax.Array | None = None) -> tuple[jax.Array, LMSState]:
        """One linear multistep step; deterministic, so ``eta`` and ``variance_noise`` are ignored."""
        x = jnp.asarray(sample).astype(jnp.float32)
        derivative = ode_derivative(self.config.prediction_type, model_output, state.sigmas[step_index], x)
        history = jnp.concatenate([derivative[None], state.derivatives[:-1]])
        coeffs = state.coeffs[step_index]
        # Until the history is full the missing terms have weight 0 (and hold zeros).
        update = coeffs[0] * history[0]
        for k in range(1, ORDER):
            update = update + coeffs[k] * history[k]
        return x + update, state.replace(derivatives=history)


def lms_coefficients(sigmas: np.ndarray, order: int = ORDER) -> np.ndarray:
    """``[len(sigmas) - 1, order]`` float64: at step i, the integral over [sigma_i, sigma_{i+1}] of
    the Lagrange basis polynomial of node sigma_{i-j} (j = 0 newest), over the min(i + 1, order)
    newest nodes; unused orders are 0.

    Each basis polynomial has degree < order, so integrating its coefficients is exact.
    """
    nodes = sigmas.astype(np.float64)
    out = np.zeros((len(nodes) - 1, order))
    for i in range(len(nodes) - 1):
        used = nodes[i - np.arange(min(i + 1, order))]  # newest first
        for j, node in enumerate(used):
            basis = Polynomial([1.0])
            for other in np.delete(used, j):
                basis = basis * Polynomial([-other, 1.0]) / (node - other)  # (tau - other) / (node - other)
            antiderivative = basis.integ()
            out[i, j] = antiderivative(nodes[i + 1]) - antiderivative(nodes[i])
    return out

"""PNDM / PLMS: pseudo numerical methods for diffusion models (Liu et al., 2022, arXiv:2202.09778).

Every step maps x_t to x_{t-delta} with the paper's transfer part phi (eq. 9), fed by a
combined noise estimate e' (eqs. 12-13, Algorithm 2). With ``skip_prk_steps`` (the SD
checkpoints' setting) e' comes from the pseudo linear multistep method (PLMS: 4th-order
Adams-Bashforth on the noise predictions), started as in crowsonkb's PLMS sampler for
latent diffusion: one plain step, then the same step redone with the mean of the two
predictions (an improved-Euler step that costs one extra UNet call), then orders 2, 3
and 4. Without it, three pseudo Runge-Kutta steps (PRK: classical RK4 weights, four UNet
calls each) fill the history first.

The schedule logic runs on the host: ``set_timesteps`` records for every loop step which
combination rule it uses and the alpha_bar pair phi reads; ``step`` picks the rule with
``lax.switch`` on that record, so it traces under jit, vmap and pmap.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Self

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .common import (SchedulerConfig, alphas_cumprod, check_num_inference_steps, check_sample_shape, check_start,
                     check_timestep_range, descending_timesteps, exportable, final_alpha_cumprod, padded)

# Combination rules, one per loop step (PNDMState.mode).
_PLMS_FIRST, _PLMS_REDO, _AB2, _AB3, _AB4, _RK_STAGE1, _RK_STAGE23, _RK_STAGE4 = range(8)
_ORDER = 4  # PLMS order: the history holds the last four noise estimates


@exportable
@struct.dataclass
class PNDMState:
    timesteps: jax.Array  # int32 [L]: what the UNet sees at loop step i
    init_noise_sigma: jax.Array  # float32 scalar
    alpha_t: jax.Array  # float32 [L]: alpha_bar of the step's start
    alpha_prev: jax.Array  # float32 [L]: alpha_bar of the step's end
    mode: jax.Array  # int32 [L]: combination rule of step i
    ets: jax.Array  # float32 [4, *sample]: noise estimates entering PLMS, newest first
    cur_sample: jax.Array  # float32 [*sample]: x_t that the redo / Runge-Kutta stages restart from
    rk_sum: jax.Array  # float32 [*sample]: (e1 + 2 e2 + 2 e3) / 6 of the Runge-Kutta step in progress
    length: jax.Array  # int32 scalar: the loop's real number of steps; the tables may be padded past it


@dataclasses.dataclass(frozen=True)
class PNDMScheduler:
    config: SchedulerConfig
    kind: ClassVar[str] = "pndm"
    draws_noise: ClassVar[bool] = False

    @classmethod
    def from_config(cls, raw: Mapping[str, Any]) -> Self:
        return cls(SchedulerConfig.from_dict(raw, cls.kind))

    def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...], start: int = 0,
                      padded_to: int | None = None) -> PNDMState:
        """The tables for a run over loop steps ``start`` .. L-1 (``start`` > 0: img2img). As in diffusers,
        such a run counts its PLMS warm-up from its own first step. ``padded_to`` pads the tables to that
        many loop steps (``common.padded``)."""
        cfg = self.config
        n = check_num_inference_steps(num_inference_steps, cfg)
        shape = check_sample_shape(sample_shape)
        if not cfg.skip_prk_steps and n < _ORDER:
            raise ValueError(f"num_inference_steps: PNDM with Runge-Kutta warm-up (skip_prk_steps=false) "
                             f"needs at least {_ORDER}, got {n}")
        base = np.round(descending_timesteps(cfg, n)).astype(np.int64)  # [n], largest first
        check_timestep_range(base, cfg)
        # The step size phi assumes, also under "trailing"/"linspace" spacing, where it may not
        # match the gap to the next timestep: diffusers' PNDM does the same.
        delta = cfg.num_train_timesteps // n
        if cfg.skip_prk_steps:
            calls, t_from, t_to, mode = _plms_schedule(base, delta, check_start(start, n))
        else:
            if start:
                raise ValueError("start: PNDM with Runge-Kutta warm-up (skip_prk_steps=false) runs only from "
                                 "the first step (strength 1)")
            calls, t_from, t_to, mode = _prk_plms_schedule(base, delta)

        table = alphas_cumprod(cfg)
        final = final_alpha_cumprod(cfg)
        alpha_prev = np.array([table[t] if t >= 0 else final for t in t_to], np.float32)
        zeros = jnp.zeros(shape, jnp.float32)
        loop = len(calls)
        return PNDMState(
            timesteps=jnp.asarray(padded(calls, loop, padded_to), jnp.int32),
            init_noise_sigma=jnp.float32(1.0),
            alpha_t=jnp.asarray(padded(table[np.asarray(t_from)], loop, padded_to), jnp.float32),
            alpha_prev=jnp.asarray(padded(alpha_prev, loop, padded_to)),
            mode=jnp.asarray(padded(mode, loop, padded_to), jnp.int32),
            ets=jnp.zeros((_ORDER, *shape), jnp.float32),
            cur_sample=zeros,
            rk_sum=zeros,
            length=jnp.int32(loop),
        )

    def add_noise(self, state: PNDMState, original: jax.Array, noise: jax.Array, step_index: jax.Array) -> jax.Array:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps at the start of loop step ``step_index``, a run's first step
        (the forward process, DDPM eq. 4)."""
        a_t = state.alpha_t[step_index]
        return jnp.sqrt(a_t) * original + jnp.sqrt(1 - a_t) * noise

    def scale_model_input(self, state: PNDMState, sample: jax.Array, step_index: jax.Array) -> jax.Array:
        return sample

    def step(self, state: PNDMState, model_output: jax.Array, step_index: jax.Array, sample: jax.Array, *,
             eta: jax.Array | float = 0.0, variance_noise: jax.Array | None = None) -> tuple[jax.Array, PNDMState]:
        """One loop step: ``(x at the next timestep, updated state)``. PNDM is deterministic,
        so ``eta`` and ``variance_noise`` are accepted for a uniform interface and ignored."""
        e = jnp.asarray(model_output).astype(jnp.float32)
        x = jnp.asarray(sample).astype(jnp.float32)

        def push(ets: jax.Array) -> jax.Array:
            return jnp.concatenate([e[None], ets[:-1]])

        # Each rule: (e', the x_t phi starts from, ets, cur_sample, rk_sum).
        def plms_first(s: PNDMState):
            return e, x, push(s.ets), x, s.rk_sum

        def plms_redo(s: PNDMState):
            # Improved Euler: repeat the first step from the same x_t with the mean of the
            # predictions at both ends; this prediction does not enter the history.
            return (e + s.ets[0]) / 2, s.cur_sample, s.ets, s.cur_sample, s.rk_sum

        def ab2(s: PNDMState):
            ets = push(s.ets)
            return (3 * ets[0] - ets[1]) / 2, x, ets, s.cur_sample, s.rk_sum

        def ab3(s: PNDMState):
            ets = push(s.ets)
            return (23 * ets[0] - 16 * ets[1] + 5 * ets[2]) / 12, x, ets, s.cur_sample, s.rk_sum

        def ab4(s: PNDMState):
            # PLMS: e' = (55 e_t - 59 e_{t+d} + 37 e_{t+2d} - 9 e_{t+3d}) / 24.
            ets = push(s.ets)
            return (jnp.float32(1 / 24) * (55 * ets[0] - 59 * ets[1] + 37 * ets[2] - 9 * ets[3]),
                    x, ets, s.cur_sample, s.rk_sum)

        def rk_stage1(s: PNDMState):
            # PRK: e1 = eps(x_t, t) moves x_t half a step; it alone enters the history.
            return e, x, push(s.ets), x, jnp.float32(1 / 6) * e

        def rk_stage23(s: PNDMState):
            # e2 (then e3) = eps at the half step; each restarts from x_t.
            return e, s.cur_sample, s.ets, s.cur_sample, s.rk_sum + jnp.float32(1 / 3) * e

        def rk_stage4(s: PNDMState):
            # e' = (e1 + 2 e2 + 2 e3 + e4) / 6 takes x_t the whole step.
            return (s.rk_sum + jnp.float32(1 / 6) * e, s.cur_sample, s.ets, s.cur_sample,
                    jnp.zeros_like(s.rk_sum))

        rules = (plms_first, plms_redo, ab2, ab3, ab4, rk_stage1, rk_stage23, rk_stage4)
        eps, x_t, ets, cur_sample, rk_sum = jax.lax.switch(state.mode[step_index], rules, state)
        prev = _transfer(x_t, eps, state.alpha_t[step_index], state.alpha_prev[step_index],
                         self.config.prediction_type)
        return prev, state.replace(ets=ets, cur_sample=cur_sample, rk_sum=rk_sum)


def _transfer(x_t: jax.Array, eps: jax.Array, alpha_t: jax.Array, alpha_prev: jax.Array,
              prediction_type: str) -> jax.Array:
    """phi(x_t, e', t, t - delta), PNDM eq. 9: the DDIM (eta = 0) step written so that the
    coefficient of e' stays well conditioned."""
    if prediction_type == "v_prediction":
        eps = jnp.sqrt(alpha_t) * eps + jnp.sqrt(1 - alpha_t) * x_t
    sample_coeff = jnp.sqrt(alpha_prev / alpha_t)
    denom = alpha_t * jnp.sqrt(1 - alpha_prev) + jnp.sqrt(alpha_t * (1 - alpha_t) * alpha_prev)
    return sample_coeff * x_t - (alpha_prev - alpha_t) * eps / denom


def _plms_schedule(base: np.ndarray, delta: int, start: int = 0) -> tuple[list[int], list[int], list[int], list[int]]:
    """UNet timesteps, phi's (from, to) timesteps and the rule of each PLMS loop step.

    The first timestep is visited twice (the plain step, then its redo), so n steps make
    n + 1 calls, e.g. 3 steps at spacing 333: [667, 334, 334, 1]. A run that begins at call
    ``start`` counts its warm-up from there (diffusers' img2img slices these calls and its
    PNDM's counter starts at 0); the entries before ``start`` are never read.
    """
    if len(base) == 1:
        return [int(base[0])], [int(base[0])], [int(base[0]) - delta], [_PLMS_FIRST]
    calls = [int(base[0]), int(base[1]), *(int(t) for t in base[1:])]
    t_from, t_to, mode = [], [], []
    for i, t in enumerate(calls):
        counter = i - start
        if counter == 1:
            # The redo reruns the first step from its start, reading alpha_bar one stride above this
            # call: that step's start under "leading" spacing, as diffusers has it under any.
            t_from.append(t + delta)
            t_to.append(t)
        else:
            t_from.append(t)
            t_to.append(t - delta)
        mode.append((_PLMS_FIRST, _PLMS_REDO, _AB2, _AB3)[counter] if 0 <= counter < 4 else _AB4)
    return calls, t_from, t_to, mode


def _prk_plms_schedule(base: np.ndarray, delta: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """As ``_plms_schedule``, for three pseudo Runge-Kutta steps from the three largest timesteps
    (four UNet calls each) and then PLMS of order 4 from the fourth-largest on: n + 9 calls.

    Runge-Kutta step k goes from b_k to b_{k+1}; its half-step calls sit at b_{k+1} + delta/2,
    while stage 1 moves x to b_k - delta/2. The two agree for an even delta with "leading"
    spacing; otherwise we keep diffusers' placement so both samplers take the same path.
    """
    half = delta // 2
    calls, t_from, t_to, mode = [], [], [], []
    for k in range(3):
        t, nxt = int(base[k]), int(base[k + 1])
        calls += [t, nxt + half, nxt + half, nxt]
        t_from += [t] * 4
        t_to += [t - half, nxt + half, nxt, nxt]
        mode += [_RK_STAGE1, _RK_STAGE23, _RK_STAGE23, _RK_STAGE4]
    for t in base[3:]:
        calls.append(int(t))
        t_from.append(int(t))
        t_to.append(int(t) - delta)
        mode.append(_AB4)
    return calls, t_from, t_to, mode

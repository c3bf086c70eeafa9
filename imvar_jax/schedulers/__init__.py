"""Pure-JAX samplers for the denoising loop: PNDM/PLMS, DDIM, LMS, Euler, Euler ancestral and DPM-Solver++(2M).

Each scheduler is a frozen, hashable object built from a diffusers ``scheduler_config.json``
dict. ``set_timesteps`` runs on the host and returns a state pytree of float32/int32
arrays; ``scale_model_input`` and ``step`` are traceable functions of (state, loop index),
so a whole sampling run fits in one ``lax.fori_loop`` under jit, vmap or pmap::

    state = sched.set_timesteps(n, x.shape)
    x = x * state.init_noise_sigma
    # loop i over range(len(state.timesteps)):
    eps = unet(sched.scale_model_input(state, x, i), state.timesteps[i])
    x, state = sched.step(state, eps, i, x, eta=eta, variance_noise=noise_i)
"""

from __future__ import annotations

from typing import Any, Mapping

from .common import SchedulerConfig, check_scheduler_config
from .ddim import DDIMScheduler, DDIMState
from .dpm import DPMSolverMultistepKarrasScheduler, DPMSolverMultistepScheduler, DPMState
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, EulerState
from .lms import LMSDiscreteScheduler, LMSState
from .pndm import PNDMScheduler, PNDMState

Scheduler = (PNDMScheduler | DDIMScheduler | LMSDiscreteScheduler | EulerDiscreteScheduler
             | EulerAncestralDiscreteScheduler | DPMSolverMultistepScheduler)

# Each one's ``draws_noise`` says whether its step takes fresh noise (DDIM for eta, Euler ancestral always), and
# for those that do, ``noise_only_with_eta`` whether they need none at eta 0.
SCHEDULERS: dict[str, type[Scheduler]] = {
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "lms": LMSDiscreteScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "dpmpp-2m": DPMSolverMultistepScheduler,
    "dpmpp-2m-karras": DPMSolverMultistepKarrasScheduler,
}


# The checkpoint's own scheduler (lambdalabs/sd-image-variations-diffusers' scheduler_config.json),
# for folders that lack one and for the built-in tiny model.
SD_V1_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False,
}


def make_scheduler(name: str, raw_config: Mapping[str, Any]) -> Scheduler:
    """The scheduler ``name`` configured from ``raw_config`` (any diffusers scheduler's config dict,
    read with the defaults of the class being built, as diffusers' ``from_config`` does)."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler: unknown {name!r} (choose one of {', '.join(SCHEDULERS)})")
    return SCHEDULERS[name].from_config(raw_config)


__all__ = [
    "SCHEDULERS", "SD_V1_SCHEDULER_CONFIG", "DDIMScheduler", "DDIMState", "DPMSolverMultistepKarrasScheduler",
    "DPMSolverMultistepScheduler", "DPMState", "EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerState", "LMSDiscreteScheduler", "LMSState", "PNDMScheduler", "PNDMState", "Scheduler", "SchedulerConfig",
    "check_scheduler_config", "make_scheduler",
]

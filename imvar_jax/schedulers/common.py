"""Scheduler config, the training noise schedule and the inference timestep spacings.

Everything here runs on the host in numpy, once per ``set_timesteps``; the traced
per-step math lives in the scheduler modules.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, Mapping

import jax
import numpy as np

from imvar_jax.errors import ConfigError

KINDS = ("pndm", "ddim", "lms", "euler", "euler-a", "dpmpp-2m", "dpmpp-2m-karras")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# The keys each diffusers class reads from scheduler_config.json, with that class's own
# default. diffusers' ``from_config`` fills a key the dict lacks from the class being
# built, not from the class that wrote the file: DDIM built from the checkpoint's PNDM
# config therefore clips x0 (DDIM's clip_sample=True), which the file never mentions.
_COMMON_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 0,
}
_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "pndm": {**_COMMON_DEFAULTS, "skip_prk_steps": False, "set_alpha_to_one": False},
    "ddim": {**_COMMON_DEFAULTS, "clip_sample": True, "set_alpha_to_one": True, "thresholding": False,
             "clip_sample_range": 1.0, "rescale_betas_zero_snr": False},
    "lms": {**_COMMON_DEFAULTS, "timestep_spacing": "linspace"},
    "euler": {**_COMMON_DEFAULTS, "timestep_spacing": "linspace"},
    "euler-a": {**_COMMON_DEFAULTS, "timestep_spacing": "linspace"},
    "dpmpp-2m": {**_COMMON_DEFAULTS, "timestep_spacing": "linspace", "use_karras_sigmas": False},
    # DPMSolverMultistepScheduler with use_karras_sigmas forced on, whatever the file says.
    "dpmpp-2m-karras": {**_COMMON_DEFAULTS, "timestep_spacing": "linspace", "use_karras_sigmas": True},
}
# LMS sigma reschedulings we do not implement; each must be absent or false.
_LMS_UNSUPPORTED_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
# Options of diffusers' Euler and DPM-Solver classes we implement only at these values (their defaults);
# a config that sets another value is refused by the scheduler built from it.
_EULER_ONLY = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
               "interpolation_type": "linear", "timestep_type": "discrete", "final_sigmas_type": "zero",
               "sigma_min": None, "sigma_max": None}
_DPM_ONLY = {"solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
             "euler_at_final": False, "final_sigmas_type": "zero", "use_exponential_sigmas": False,
             "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False, "variance_type": None,
             "lambda_min_clipped": -math.inf, "use_dynamic_shifting": False}
_ONLY: dict[str, dict[str, Any]] = {"lms": {flag: False for flag in _LMS_UNSUPPORTED_FLAGS}, "euler": _EULER_ONLY,
                                    "dpmpp-2m": _DPM_ONLY, "dpmpp-2m-karras": _DPM_ONLY}
_FLAGS = ("set_alpha_to_one", "skip_prk_steps", "clip_sample", "thresholding", "rescale_betas_zero_snr",
          "use_karras_sigmas")
# Trained models use 1000; the bound keeps a hostile file from sizing the host-side tables
# (alpha_bar, timesteps) beyond memory.
MAX_TRAIN_TIMESTEPS = 1_000_000


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler fields of diffusers' ``scheduler_config.json`` (hashable).

    Build it with ``from_dict``, which applies the defaults of the diffusers class being
    built. A field that class does not read keeps the neutral default below and is ignored.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    set_alpha_to_one: bool = False
    skip_prk_steps: bool = False
    steps_offset: int = 0
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    thresholding: bool = False
    rescale_betas_zero_snr: bool = False
    use_karras_sigmas: bool = False

    def __post_init__(self) -> None:
        _check_values(dataclasses.asdict(self), "scheduler config")
        if self.thresholding:
            raise ConfigError("scheduler config: thresholding=true (dynamic thresholding) is not supported")
        if self.rescale_betas_zero_snr:
            raise ConfigError("scheduler config: rescale_betas_zero_snr=true is not supported")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], kind: str) -> SchedulerConfig:
        """Read ``raw`` (a ``scheduler_config.json`` dict of any scheduler class) as diffusers'
        ``<kind>`` scheduler would: keys that class does not read are ignored, missing ones
        take that class's defaults."""
        if not isinstance(raw, Mapping):
            raise TypeError(f"scheduler config: expected a mapping, got {type(raw).__name__}")
        if kind not in _CLASS_DEFAULTS:
            raise ValueError(f"kind: unknown scheduler kind {kind!r} (choose one of {', '.join(KINDS)})")
        values = _class_values(raw, kind, "scheduler config")
        if kind == "lms":
            _check_lms_flags(raw, "scheduler config")
        implicit = raw.get("_use_default_values") or ()
        for key, only in _ONLY.get(kind, {}).items():
            if key in raw and key not in implicit and raw[key] != only:
                raise ConfigError(f"scheduler config: {key}={_short_json(raw[key])} is not supported by the "
                                  f"{kind} scheduler (only {_short_json(only)})")
        if kind == "dpmpp-2m-karras":
            values["use_karras_sigmas"] = True
        _check_values(values, "scheduler config")
        if values["trained_betas"] is not None:
            values["trained_betas"] = tuple(float(b) for b in values["trained_betas"])
        for name in ("beta_start", "beta_end", "clip_sample_range"):
            if name in values:
                values[name] = float(values[name])
        return cls(**values)


def check_scheduler_config(raw: Mapping[str, Any], where: str = "scheduler config") -> None:
    """Raise ``ConfigError`` (naming ``where`` and the key) on a value of the wrong type or out of range for any
    supported scheduler, so a bad file fails when it is read, whichever scheduler is picked later.

    Options a scheduler does not implement (``thresholding=true``, Karras sigmas, ...) are left to the
    scheduler that is built: the others ignore them, as diffusers' classes do.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    for kind in KINDS:
        _check_values(_class_values(raw, kind, where), where)
    _check_lms_flags(raw, where)


def _check_lms_flags(raw: Mapping[str, Any], where: str) -> None:
    for flag in _LMS_UNSUPPORTED_FLAGS:
        if flag in raw and not isinstance(raw[flag], bool):
            raise ConfigError(f"{where}: {flag} must be true or false, got {_short(raw[flag])}")


def _class_values(raw: Mapping[str, Any], kind: str, where: str) -> dict[str, Any]:
    """The values diffusers' ``<kind>`` class takes from ``raw``, its own defaults filling the rest."""
    # A config diffusers built in memory lists the keys it filled from its own class's
    # defaults; from_config gives those the new class's defaults instead.
    implicit = raw.get("_use_default_values")
    if implicit is None:
        implicit = []
    if not isinstance(implicit, (list, tuple)) or not all(isinstance(k, str) for k in implicit):
        raise ConfigError(f"{where}: _use_default_values must be a list of key names, got {_short(implicit)}")
    return {name: raw[name] if name in raw and name not in implicit else default
            for name, default in _CLASS_DEFAULTS[kind].items()}


def _short_json(value: Any) -> str:
    """A config value as its JSON file writes it (true, null, -Infinity), cut short."""
    try:
        return _short_text(json.dumps(value))
    except (TypeError, ValueError):
        return _short(value)


def _short_text(text: str) -> str:
    return text if len(text) <= 60 else text[:57] + "..."


def _short(value: Any) -> str:
    # Values in messages stay short and on one line, whatever a config holds.
    return _short_text(repr(value))


def _is_number(value: Any) -> bool:
    # JSON's true is an int in Python; a flag must not pass for a number.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_values(values: Mapping[str, Any], where: str) -> None:
    """Types and ranges of the scheduler fields present in ``values`` (those one class reads)."""
    total = values["num_train_timesteps"]
    _check_int(where, "num_train_timesteps", total, 1, MAX_TRAIN_TIMESTEPS)
    _check_int(where, "steps_offset", values["steps_offset"], 0, total - 1)
    for name in _FLAGS:
        if name in values and not isinstance(values[name], bool):
            raise ConfigError(f"{where}: {name} must be true or false, got {_short(values[name])}")
    for name in ("beta_start", "beta_end", "clip_sample_range"):
        if name in values and not _is_number(values[name]):
            raise ConfigError(f"{where}: {name} must be a finite number, got {_short(values[name])}")
    # diffusers checks none of these; outside them the schedule divides by zero or takes the root
    # of a negative number (a beta of 1 makes alpha_bar 0 from that step on).
    if not 0.0 < values["beta_start"] <= values["beta_end"] < 1.0:
        raise ConfigError(f"{where}: beta_start and beta_end must satisfy 0 < beta_start <= beta_end < 1, got "
                          f"beta_start={values['beta_start']!r}, beta_end={values['beta_end']!r}")
    if "clip_sample_range" in values and values["clip_sample_range"] <= 0:
        raise ConfigError(f"{where}: clip_sample_range must be > 0, got {values['clip_sample_range']!r}")
    _check_choice(where, "beta_schedule", values["beta_schedule"], BETA_SCHEDULES)
    _check_choice(where, "prediction_type", values["prediction_type"], PREDICTION_TYPES)
    _check_choice(where, "timestep_spacing", values["timestep_spacing"], TIMESTEP_SPACINGS)
    betas = values["trained_betas"]
    if betas is not None:
        if not isinstance(betas, (list, tuple)) or not all(_is_number(b) for b in betas):
            raise ConfigError(f"{where}: trained_betas must be null or a list of numbers, got {_short(betas)}")
        if len(betas) != total:
            raise ConfigError(f"{where}: trained_betas has {len(betas)} values, num_train_timesteps is {total}")
        if not all(0.0 < b < 1.0 for b in betas):
            raise ConfigError(f"{where}: trained_betas must all lie in (0, 1)")


def _check_int(where: str, name: str, value: Any, minimum: int, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ConfigError(f"{where}: {name} must be an integer in [{minimum}, {maximum}], got {_short(value)}")


def _check_choice(where: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{where}: unsupported {name}={_short(value)} (supported: {', '.join(choices)})")


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=float32)`` to the bit.

    torch rounds start, end and the step to float32, then forms each value as one fused
    multiply-add from the nearer end (so both ends are exact); a float64 evaluation rounded
    once to float32 is that fused operation.
    """
    lo, hi = np.float64(np.float32(start)), np.float64(np.float32(end))
    if n == 1:
        return np.array([lo], np.float32)
    step = np.float64(np.float32((np.float32(end) - np.float32(start)) / np.float32(n - 1)))
    idx = np.arange(n, dtype=np.float64)
    values = np.where(idx < n // 2, lo + step * idx, hi - step * (n - 1 - idx))
    return values.astype(np.float32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule (Improved DDPM, eq. 17): betas from alpha_bar ratios."""
    t = np.arange(n + 1, dtype=np.float64) / n
    alpha_bar = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta).astype(np.float32)


@functools.lru_cache(maxsize=16)
def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """The training schedule's cumulative products of (1 - beta), ``[num_train_timesteps]`` float32.

    diffusers builds betas in float32, ``1 - beta`` in float32 and takes the cumulative
    product in torch's CPU kernel, which accumulates in float64 and rounds each entry;
    we do the same steps so the table agrees with diffusers' to the last bit or so.
    The returned array is shared (cached) and read-only.
    """
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, np.float32)
    elif config.beta_schedule == "linear":
        betas = _torch_linspace_f32(config.beta_start, config.beta_end, n)
    elif config.beta_schedule == "scaled_linear":
        # Linear in sqrt(beta): the latent-diffusion schedule.
        root = _torch_linspace_f32(config.beta_start ** 0.5, config.beta_end ** 0.5, n)
        betas = root * root
    else:
        betas = _cosine_betas(n)
    alphas = np.float32(1.0) - betas
    out = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
    out.flags.writeable = False
    return out


def final_alpha_cumprod(config: SchedulerConfig) -> np.float32:
    """alpha_bar "before" timestep 0: 1 when ``set_alpha_to_one`` (a clean x0), else alpha_bar_0."""
    return np.float32(1.0) if config.set_alpha_to_one else alphas_cumprod(config)[0]


def check_num_inference_steps(num_inference_steps: Any, config: SchedulerConfig) -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise TypeError(f"num_inference_steps: expected an int, got {type(num_inference_steps).__name__}")
    n = int(num_inference_steps)
    if not 1 <= n <= config.num_train_timesteps:
        raise ValueError(f"num_inference_steps: must be in [1, {config.num_train_timesteps}] "
                         f"(num_train_timesteps), got {n}")
    return n


def start_step(num_inference_steps: int, strength: float) -> int:
    """The loop step an img2img run of ``strength`` in (0, 1] starts at: diffusers' img2img rule (its
    ``get_timesteps``), which runs the last ``int(num_inference_steps * strength)`` steps.

    Every scheduler here has diffusers' ``order`` 1, so the step is also the index into the timesteps.
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength: expected a number in (0, 1], got {strength!r}")
    run = min(int(num_inference_steps * strength), num_inference_steps)
    if run < 1:
        raise ValueError(f"strength: {strength!r} of {num_inference_steps} steps runs no step "
                         f"(at least 1 / num_inference_steps = {1 / num_inference_steps:.4g} is needed)")
    return num_inference_steps - run


def padded(table: Any, loop_steps: int, padded_to: int | None) -> np.ndarray:
    """A per-loop-step ``table`` (``loop_steps`` entries, or one more for sigmas) padded by repeating its last
    entry to ``padded_to`` loop steps, so that every step count up to ``padded_to`` gives a state of one shape
    (one compiled program); the loop stops at the state's ``length`` and never reads the padding."""
    table = np.asarray(table)
    if padded_to is None:
        return table
    if isinstance(padded_to, bool) or not isinstance(padded_to, (int, np.integer)) or padded_to < loop_steps:
        raise ValueError(f"padded_to: expected an int of at least the {loop_steps} loop steps, got {padded_to!r}")
    extra = int(padded_to) - loop_steps
    return np.concatenate([table, np.repeat(table[-1:], extra, axis=0)]) if extra else table


def check_start(start: Any, length: int) -> int:
    """``start`` as the first loop step of a schedule of ``length`` loop steps (0 for a full run)."""
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or not 0 <= start < length:
        raise ValueError(f"start: expected an int in [0, {length}), got {start!r}")
    return int(start)


def check_sample_shape(sample_shape: Any) -> tuple[int, ...]:
    if not isinstance(sample_shape, (tuple, list)) or not all(
            isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in sample_shape):
        raise TypeError(f"sample_shape: expected a tuple of non-negative ints, got {sample_shape!r}")
    return tuple(int(d) for d in sample_shape)


def descending_timesteps(config: SchedulerConfig, n: int) -> np.ndarray:
    """The ``n`` inference timesteps, largest first, float64, before any per-scheduler rounding.

    The three spacings of Lin et al., "Common Diffusion Noise Schedules and Sample Steps
    are Flawed" (Table 2), computed with diffusers' own numpy expressions so the values
    agree to the bit. "linspace" is left unrounded: LMS keeps the fractions, the others round.
    """
    total = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, total - 1, n)[::-1].copy()
    if config.timestep_spacing == "leading":
        ratio = total // n
        return (np.arange(n) * ratio)[::-1].astype(np.float64) + config.steps_offset
    # "trailing": diffusers' float arange overshoots by one entry for some n (61, 103, ...),
    # which would add a step at timestep -1; the first n entries are the intended schedule.
    return np.round(np.arange(total, 0, -total / n))[:n] - 1


def train_sigmas(config: SchedulerConfig) -> np.ndarray:
    """The noise level of each training timestep, sigma = sqrt((1 - a) / a) with a = alpha_bar, float32 as
    diffusers computes it: the variance-exploding view x = x0 + sigma * eps of the schedule."""
    a = alphas_cumprod(config)
    return np.sqrt((np.float32(1) - a) / a)


def sigma_schedule(config: SchedulerConfig, n: int) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """The sigma-parameterised samplers' tables (diffusers' LMS and Euler classes):
    ``(timesteps float32 [n], sigmas float32 [n + 1] ending at 0, init_noise_sigma)``.

    Sigmas are read off the training ones at the (possibly fractional) timesteps by linear
    interpolation. The starting latents' scale is the std of x0 + sigma_max * eps for unit-variance
    x0 under "leading" spacing, and sigma_max alone otherwise, as diffusers has it.
    """
    timesteps = descending_timesteps(config, n).astype(np.float32)  # [n]
    table = train_sigmas(config)
    sigmas = np.interp(timesteps, np.arange(len(table)), table)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)  # [n + 1]
    sigma_max = sigmas.max()
    if config.timestep_spacing == "leading":
        return timesteps, sigmas, np.sqrt(sigma_max * sigma_max + np.float32(1))
    return timesteps, sigmas, sigma_max


def karras_sigmas(config: SchedulerConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Karras et al. (2022), eq. 5: n sigmas from sigma_max to sigma_min, uniform in sigma^(1/rho), rho = 7,
    and the (rounded) training timestep of each, interpolated in log sigma as diffusers' ``_sigma_to_t``.
    Returns ``(timesteps int64 [n], sigmas float64 [n])``."""
    table = train_sigmas(config)
    log_table = np.log(table)
    rho = 7.0
    ramp = np.linspace(0, 1, n)
    low, high = float(table[0]) ** (1 / rho), float(table[-1]) ** (1 / rho)
    sigmas = (high + ramp * (low - high)) ** rho  # [n], largest first
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    below = np.cumsum(log_sigma[None, :] - log_table[:, None] >= 0, axis=0).argmax(axis=0)
    below = below.clip(max=len(table) - 2)  # the training timestep at or below each sigma
    lo, hi = log_table[below], log_table[below + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    timesteps = np.round((1 - w) * below + w * (below + 1)).astype(np.int64)
    return timesteps, sigmas


def check_timestep_range(timesteps: np.ndarray, config: SchedulerConfig) -> None:
    """Integer timesteps index alpha_bar: any outside [0, T) would read a wrong entry."""
    if timesteps.size and (timesteps.min() < 0 or timesteps.max() >= config.num_train_timesteps):
        raise ValueError(f"num_inference_steps: with timestep_spacing={config.timestep_spacing!r} and "
                         f"steps_offset={config.steps_offset} the schedule reaches timestep "
                         f"{int(timesteps.max())}, outside [0, {config.num_train_timesteps})")


def exportable(state_class: type) -> type:
    """Register a scheduler state (a ``flax.struct.dataclass``) for ``jax.export`` serialization.

    Exported programs take the state as an argument, and ``Exported.serialize()`` refuses pytree
    nodes it has no name for. These states have no static fields, so their aux data is empty.
    """
    def serialize(aux: Any) -> bytes:
        if aux != ():
            raise ValueError(f"{state_class.__name__}: unexpected static fields {aux!r}")
        return b""

    return jax.export.register_pytree_node_serialization(
        state_class, serialized_name=f"imvar_jax.schedulers.{state_class.__name__}",
        serialize_auxdata=serialize, deserialize_auxdata=lambda _: ())

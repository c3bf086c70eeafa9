"""Schedulers against diffusers' PyTorch schedulers: configs, timesteps, whole sampling trajectories."""

from __future__ import annotations

import functools
import inspect

from unittest import mock

import diffusers
import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_ancestral
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import assert_close
from imvar_jax.schedulers import (SCHEDULERS, DDIMScheduler, LMSDiscreteScheduler, PNDMScheduler, SchedulerConfig,
                                  make_scheduler)
from imvar_jax.schedulers.common import alphas_cumprod, final_alpha_cumprod
from imvar_jax.schedulers.lms import lms_coefficients

# diffusers' LMS converts torch tensors with np.array, which numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# lambdalabs/sd-image-variations-diffusers' scheduler/scheduler_config.json (REFERENCE.md).
CHECKPOINT = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False,
    "trained_betas": None,
}
REFERENCE = {
    "pndm": diffusers.PNDMScheduler,
    "ddim": diffusers.DDIMScheduler,
    "lms": diffusers.LMSDiscreteScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "euler-a": diffusers.EulerAncestralDiscreteScheduler,
    "dpmpp-2m": diffusers.DPMSolverMultistepScheduler,
    "dpmpp-2m-karras": diffusers.DPMSolverMultistepScheduler,
}
# What our scheduler name implies on top of the config file, for the reference built from it.
REFERENCE_CONFIG = {"dpmpp-2m-karras": {"use_karras_sigmas": True}}


def reference_scheduler(name: str, raw: dict):
    return REFERENCE[name].from_config({**raw, **REFERENCE_CONFIG.get(name, {})})
SHAPE = (2, 4, 6, 6)  # any layout: every scheduler is elementwise
REL = 1e-5  # max abs error / max |reference| at every step of the trajectory

# (scheduler, overrides of the checkpoint config, num_inference_steps, eta)
CASES = [
    *[("pndm", {}, n, 0.0) for n in (1, 3, 5, 10, 50)],
    *[("pndm", {"skip_prk_steps": False}, n, 0.0) for n in (4, 9, 50)],  # 9: odd stride 111
    ("pndm", {"timestep_spacing": "trailing"}, 10, 0.0),
    ("pndm", {"timestep_spacing": "linspace"}, 10, 0.0),  # the redo reads alpha_bar at 888 + 100, not 999
    ("pndm", {"skip_prk_steps": False, "timestep_spacing": "linspace"}, 7, 0.0),
    ("pndm", {"prediction_type": "v_prediction", "set_alpha_to_one": True}, 10, 0.0),
    *[("ddim", {}, n, 0.0) for n in (3, 5, 10, 50)],  # clip_sample=True: DDIM's default
    ("ddim", {"clip_sample": False, "set_alpha_to_one": True}, 10, 0.0),
    ("ddim", {"clip_sample": True, "clip_sample_range": 0.5, "set_alpha_to_one": True}, 10, 0.0),
    ("ddim", {"prediction_type": "v_prediction", "clip_sample": False}, 10, 0.0),
    ("ddim", {"timestep_spacing": "trailing", "clip_sample": False}, 10, 0.0),
    ("ddim", {"timestep_spacing": "linspace", "clip_sample": False}, 10, 0.0),
    ("ddim", {"clip_sample": False}, 10, 0.5),
    ("ddim", {"clip_sample": False}, 50, 1.0),
    *[("lms", {}, n, 0.0) for n in (1, 3, 5, 10, 50)],
    ("lms", {"timestep_spacing": "leading"}, 10, 0.0),
    ("lms", {"timestep_spacing": "trailing"}, 10, 0.0),
    ("lms", {"prediction_type": "v_prediction"}, 10, 0.0),
    *[(name, {}, n, 0.0) for name in ("euler", "euler-a") for n in (1, 3, 20, 50)],
    *[(name, {"timestep_spacing": spacing}, 10, 0.0) for name in ("euler", "euler-a")
      for spacing in ("leading", "trailing")],
    *[(name, {"prediction_type": "v_prediction"}, 10, 0.0) for name in ("euler", "euler-a")],
    *[(name, {}, n, 0.0) for name in ("dpmpp-2m", "dpmpp-2m-karras") for n in (1, 2, 3, 20, 50)],
    *[("dpmpp-2m", {"timestep_spacing": spacing}, 10, 0.0) for spacing in ("leading", "trailing")],
    *[(name, {"prediction_type": "v_prediction"}, 10, 0.0) for name in ("dpmpp-2m", "dpmpp-2m-karras")],
]


def _ids(case) -> str:
    name, over, n, eta = case
    return "-".join([name, *(f"{k}={v}" for k, v in over.items()), f"n{n}", *([f"eta{eta}"] if eta else [])])


def _inputs(steps: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Starting latents, one random "UNet output" per loop step and the DDIM noise per step."""
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(SHAPE, dtype=np.float32)
    eps = rng.standard_normal((steps, *SHAPE), dtype=np.float32)
    noise = rng.standard_normal((steps, *SHAPE), dtype=np.float32)
    return x0, eps, noise


def _fake_unet(eps, inp, t):
    # Random output plus terms in the scaled input and the timestep, so a wrong
    # scale_model_input or timestep changes the trajectory.
    return eps + 0.1 * inp + t / 1000


def run_reference(name: str, ref, x0: np.ndarray, eps: np.ndarray, noise: np.ndarray, eta: float) -> np.ndarray:
    """diffusers' sampling loop; returns the latents after every step ``[L, *SHAPE]``."""
    x = torch.from_numpy(x0) * ref.init_noise_sigma
    out = []
    for i, t in enumerate(ref.timesteps):
        inp = ref.scale_model_input(x, t)
        e = _fake_unet(torch.from_numpy(eps[i]), inp, float(t))
        kwargs = {"eta": eta, "variance_noise": torch.from_numpy(noise[i])} if name == "ddim" and eta else {}
        # Euler ancestral draws its noise inside step; it gets step i's noise, as ours does.
        with mock.patch.object(euler_ancestral, "randn_tensor", lambda *a, _z=noise[i], **k: torch.from_numpy(_z)):
            x = ref.step(e, t, x, **kwargs).prev_sample
        out.append(x.numpy().copy())
    return np.stack(out)


@functools.partial(jax.jit, static_argnums=0)
def run_ours(sched, state, x0: jax.Array, eps: jax.Array, noise: jax.Array, eta: jax.Array) -> jax.Array:
    """Our loop, as the sampler runs it: one ``fori_loop`` over the state's timesteps."""
    steps = state.timesteps.shape[0]

    def body(i, carry):
        x, st, traj = carry
        t = st.timesteps[i]
        inp = sched.scale_model_input(st, x, i)
        e = _fake_unet(eps[i], inp, t.astype(jnp.float32))
        x, st = sched.step(st, e, i, x, eta=eta, variance_noise=noise[i])
        return x, st, traj.at[i].set(x)

    x = x0 * state.init_noise_sigma
    traj = jnp.zeros((steps, *x0.shape), jnp.float32)
    return jax.lax.fori_loop(0, steps, body, (x, state, traj))[2]


def _both(name: str, overrides: dict, n: int):
    raw = {**CHECKPOINT, **overrides}
    ours = make_scheduler(name, raw)
    ref = reference_scheduler(name, raw)
    ref.set_timesteps(n)
    return ours, ours.set_timesteps(n, SHAPE), ref


def _assert_trajectory(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: {ours.shape[0]} steps, reference {ref.shape[0]}"
    for i in range(ref.shape[0]):
        assert_close(ours[i], ref[i], rel=REL, what=f"{what} step {i}")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_trajectory_matches_diffusers(case):
    name, overrides, n, eta = case
    sched, state, ref = _both(name, overrides, n)
    np.testing.assert_array_equal(np.asarray(state.timesteps), ref.timesteps.numpy())
    np.testing.assert_allclose(float(state.init_noise_sigma), float(ref.init_noise_sigma), rtol=1e-6)
    assert state.init_noise_sigma.dtype == jnp.float32 and state.init_noise_sigma.shape == ()

    x0, eps, noise = _inputs(len(ref.timesteps), seed=n)
    expected = run_reference(name, ref, x0, eps, noise, eta)
    got = np.asarray(run_ours(sched, state, x0, eps, noise, jnp.float32(eta)))
    _assert_trajectory(got, expected, _ids(case))


def test_pndm_timesteps_of_the_checkpoint():
    # The UNet call sequences REFERENCE.md records for the checkpoint's PLMS.
    sched = PNDMScheduler.from_config(CHECKPOINT)
    assert np.asarray(sched.set_timesteps(3, SHAPE).timesteps).tolist() == [667, 334, 334, 1]
    assert np.asarray(sched.set_timesteps(5, SHAPE).timesteps).tolist() == [801, 601, 601, 401, 201, 1]
    assert len(sched.set_timesteps(50, SHAPE).timesteps) == 51


def test_vmap_over_eta_and_inputs():
    """Two DDIM runs with different eta, latents and noise in one vmapped program."""
    n, etas = 10, (0.0, 0.8)
    sched, state, _ = _both("ddim", {"clip_sample": False}, n)
    runs = [_inputs(n, seed=100 + k) for k in range(2)]
    stacked = [np.stack(parts) for parts in zip(*runs)]
    got = jax.vmap(run_ours, in_axes=(None, None, 0, 0, 0, 0))(sched, state, *stacked, jnp.asarray(etas))
    for k, eta in enumerate(etas):
        ref = REFERENCE["ddim"].from_config({**CHECKPOINT, "clip_sample": False})
        ref.set_timesteps(n)
        _assert_trajectory(np.asarray(got[k]), run_reference("ddim", ref, *runs[k], eta), f"vmap eta={eta}")


def test_pmap_runge_kutta_warmup():
    """PNDM with its Runge-Kutta warm-up, a replica per device, state broadcast."""
    n, devices = 5, 2
    sched, state, _ = _both("pndm", {"skip_prk_steps": False}, n)
    runs = [_inputs(len(state.timesteps), seed=200 + k) for k in range(devices)]
    stacked = [np.stack(parts) for parts in zip(*runs)]
    program = jax.pmap(lambda st, x0, e, z: run_ours(sched, st, x0, e, z, jnp.float32(0)),
                       in_axes=(None, 0, 0, 0), devices=jax.devices()[:devices])
    got = program(state, *stacked)
    for k in range(devices):
        ref = REFERENCE["pndm"].from_config({**CHECKPOINT, "skip_prk_steps": False})
        ref.set_timesteps(n)
        _assert_trajectory(np.asarray(got[k]), run_reference("pndm", ref, *runs[k], 0.0), f"pmap device {k}")


def test_ddim_eta_zero_is_exactly_deterministic():
    sched, state, _ = _both("ddim", {}, 10)
    x0, eps, noise = _inputs(1, seed=7)
    step = jax.jit(lambda x, e, z, eta: sched.step(state, e, 3, x, eta=eta, variance_noise=z)[0])
    plain = jax.jit(lambda x, e: sched.step(state, e, 3, x)[0])
    np.testing.assert_array_equal(np.asarray(step(x0, eps[0], noise[0], jnp.float32(0))),
                                  np.asarray(plain(x0, eps[0])))


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_low_precision_inputs_keep_float32_state(name):
    sched, state, _ = _both(name, {"skip_prk_steps": False} if name == "pndm" else {}, 5)
    x0, eps, noise = _inputs(1, seed=3)
    dtypes = jax.tree.map(lambda a: a.dtype, state)
    prev, new = sched.step(state, jnp.asarray(eps[0], jnp.bfloat16), 0, jnp.asarray(x0, jnp.bfloat16),
                           eta=jnp.float32(0.5), variance_noise=jnp.asarray(noise[0], jnp.bfloat16))
    assert prev.dtype == jnp.float32
    assert jax.tree.map(lambda a: a.dtype, new) == dtypes


@pytest.mark.parametrize("overrides", [
    {},
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"trained_betas": np.linspace(1e-4, 0.03, 1000).tolist()},
], ids=["scaled_linear", "linear", "squaredcos_cap_v2", "trained_betas"])
def test_alphas_cumprod_match(overrides):
    raw = {**CHECKPOINT, **overrides}
    ours = alphas_cumprod(PNDMScheduler.from_config(raw).config)
    ref = diffusers.PNDMScheduler.from_config(raw).alphas_cumprod.numpy()
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("raw", [CHECKPOINT, {}], ids=["checkpoint", "empty"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_config_defaults_follow_the_class_built(name, raw):
    """diffusers fills the keys a config lacks from the class being built (DDIM from the
    PNDM checkpoint config gets clip_sample=True, set_alpha_to_one from the file)."""
    ours = make_scheduler(name, raw).config
    ref = reference_scheduler(name, raw).config
    reads = inspect.signature(REFERENCE[name].__init__).parameters
    fields = [f for f in SchedulerConfig.__dataclass_fields__ if f in reads]
    assert {"prediction_type", "timestep_spacing", "steps_offset"} <= set(fields)
    for field in fields:
        assert getattr(ours, field) == ref[field], field


def test_lms_coefficients_match_numerical_integration():
    ref = diffusers.LMSDiscreteScheduler.from_config(CHECKPOINT)
    ref.set_timesteps(50)
    ours = lms_coefficients(ref.sigmas.numpy())
    expected = np.zeros_like(ours)
    for i in range(50):
        order = min(i + 1, 4)
        expected[i, :order] = [ref.get_lms_coefficient(order, i, j) for j in range(order)]
    assert_close(ours, expected, rel=1e-5, what="lms coefficients")


def test_schedulers_are_hashable_static_values():
    assert hash(make_scheduler("ddim", CHECKPOINT)) == hash(DDIMScheduler.from_config(dict(CHECKPOINT)))
    assert make_scheduler("lms", CHECKPOINT) == LMSDiscreteScheduler.from_config(CHECKPOINT)


@pytest.mark.parametrize("name, overrides, field", [
    ("pndm", {"beta_schedule": "cosine"}, "beta_schedule"),
    ("ddim", {"prediction_type": "sample"}, "prediction_type"),
    ("lms", {"prediction_type": "x0"}, "prediction_type"),
    ("ddim", {"thresholding": True}, "thresholding"),
    ("ddim", {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ("pndm", {"timestep_spacing": "uniform"}, "timestep_spacing"),
    ("lms", {"use_karras_sigmas": True}, "use_karras_sigmas"),
    ("ddim", {"steps_offset": -1}, "steps_offset"),
    ("pndm", {"trained_betas": [0.1, 0.2]}, "trained_betas"),
])
def test_bad_config_names_the_field(name, overrides, field):
    with pytest.raises(ValueError, match=field):
        make_scheduler(name, {**CHECKPOINT, **overrides})


def test_bad_arguments():
    with pytest.raises(ValueError, match="scheduler.*pndm, ddim, lms, euler, euler-a, dpmpp-2m, dpmpp-2m-karras"):
        make_scheduler("heun", CHECKPOINT)
    for name in SCHEDULERS:
        sched = make_scheduler(name, CHECKPOINT)
        for n in (0, 1001):
            with pytest.raises(ValueError, match="num_inference_steps"):
                sched.set_timesteps(n, SHAPE)
        with pytest.raises(TypeError, match="num_inference_steps"):
            sched.set_timesteps(5.0, SHAPE)
    with pytest.raises(ValueError, match="num_inference_steps.*Runge-Kutta"):
        make_scheduler("pndm", {**CHECKPOINT, "skip_prk_steps": False}).set_timesteps(3, SHAPE)
    with pytest.raises(ValueError, match="num_inference_steps.*steps_offset"):
        make_scheduler("ddim", CHECKPOINT).set_timesteps(1000, SHAPE)  # 999 + offset 1 = 1000
    ddim = make_scheduler("ddim", CHECKPOINT)
    state = ddim.set_timesteps(5, SHAPE)
    with pytest.raises(ValueError, match="variance_noise"):
        ddim.step(state, jnp.zeros(SHAPE), 0, jnp.zeros(SHAPE), eta=0.5)


def test_dpm_solver_at_20_steps_beats_the_first_order_samplers_on_an_exact_ode(capsys):
    """The claim behind 20-step samplers (Lu et al., 2022), where the exact answer is known: for data
    x0 ~ N(0, s^2) the ideal noise prediction is eps = sqrt(1 - a) x_t / (a s^2 + 1 - a), and the
    probability-flow ODE in x~ = x / sqrt(a), sigma = sqrt((1 - a) / a) is dx~/dsigma = sigma x~ / (s^2 + sigma^2),
    so x~ grows as sqrt(s^2 + sigma^2) from each sampler's first noise level to its last. (The tiny model's
    random UNet is no denoiser: its trajectories do not converge as steps grow, so it cannot show this.)

    Measured (s = 0.5, MSE at 20 steps): DPM-Solver++(2M) 1.9e-3, with Karras sigmas 4.5e-5, DDIM 3.0e-3,
    Euler 3.7e-3, PNDM 5.4e-5, LMS 5.5e-7: DPM-Solver++ beats the first-order samplers, not the fourth-order
    multistep ones (PNDM's PLMS, LMS) on this smooth problem; every sampler converges as steps grow.
    """
    s2 = 0.5 ** 2
    x_start = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    errors = {}
    for name in ("dpmpp-2m", "dpmpp-2m-karras", "ddim", "euler", "pndm", "lms"):
        sched = make_scheduler(name, {**CHECKPOINT, "clip_sample": False})
        state = sched.set_timesteps(20, SHAPE)
        table = alphas_cumprod(sched.config).astype(np.float64)
        # sigma at any (fractional) timestep, interpolated as the sigma samplers read it off the training table
        train = jnp.asarray(np.sqrt((1 - table) / table), jnp.float32)

        def ideal(x, t, train=train):
            sigma = jnp.interp(t.astype(jnp.float32), jnp.arange(train.shape[0], dtype=jnp.float32), train)
            a = 1 / (1 + sigma ** 2)
            return jnp.sqrt(1 - a) * x / (a * s2 + 1 - a)

        def body(i, carry, sched=sched):
            x, st = carry
            eps = ideal(sched.scale_model_input(st, x, i), st.timesteps[i])
            return sched.step(st, eps, i, x)

        x0 = jnp.asarray(x_start) * state.init_noise_sigma
        got = np.asarray(jax.jit(lambda st, x: jax.lax.fori_loop(0, st.timesteps.shape[0], body, (x, st))[0])(
            state, x0))
        if name in ("euler", "lms"):  # they work on x~ itself and end at sigma = 0
            sigma0 = float(state.sigmas[0])
            exact = np.asarray(x0) * np.sqrt(s2) / np.sqrt(s2 + sigma0 ** 2)
        else:
            a0 = table[int(state.timesteps[0])]
            # DPM-Solver ends at sigma = 0; PNDM and DDIM at alpha_bar "before" timestep 0.
            a_end = 1.0 if name.startswith("dpmpp") else float(final_alpha_cumprod(sched.config))
            sigma0, sigma_end = np.sqrt((1 - a0) / a0), np.sqrt((1 - a_end) / a_end)
            exact = np.sqrt(a_end) * (x_start / np.sqrt(a0)) * np.sqrt(s2 + sigma_end ** 2) / np.sqrt(s2 + sigma0 ** 2)
        errors[name] = float(np.mean((got - exact) ** 2))
    with capsys.disabled():
        print("\nMSE to the exact ODE solution at 20 steps: "
              + ", ".join(f"{name} {err:.2e}" for name, err in errors.items()))
    for dpm in ("dpmpp-2m", "dpmpp-2m-karras"):
        assert errors[dpm] < min(errors["ddim"], errors["euler"]), errors
    assert errors["dpmpp-2m-karras"] < errors["dpmpp-2m"], errors

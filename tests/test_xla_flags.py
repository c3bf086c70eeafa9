"""The opt-in XLA:CPU flag: importing changes nothing, when applying it works, that it keeps the math."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import assert_close
from imvar_jax import ImageVariationPipeline
from imvar_jax.xla_flags import CPU_FLAGS, OPT_IN, OPT_OUT

FLAG = CPU_FLAGS[0]


def _run(script: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", OPT_OUT, OPT_IN)}
    environ.update(env)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=environ,
                         check=True)
    return out.stdout.strip().splitlines()[-1]


_REPORT = ("import os, imvar_jax, jax; from jax._src import xla_bridge; "
           "assert not xla_bridge.backends_are_initialized(), 'importing imvar_jax started a backend'; "
           "imvar_jax.apply_cpu_flags(); jax.devices(); print(repr(os.environ.get('XLA_FLAGS')))")


def test_import_changes_nothing_in_the_process():
    script = ("import os, imvar_jax, imvar_jax.cli, imvar_jax.batch, imvar_jax.pipeline; "
              "print(repr(os.environ.get('XLA_FLAGS')))")
    assert _run(script) == repr(None)
    assert _run(script, XLA_FLAGS="--xla_force_host_platform_device_count=2") == repr(
        "--xla_force_host_platform_device_count=2")


@pytest.mark.parametrize("asked", [False, True])
def test_the_command_line_applies_them_only_when_asked(asked):
    script = "import sys, os; from imvar_jax.cli import main; main(['info', '--model', 'tiny'])"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", OPT_OUT, OPT_IN)}
    if asked:
        env[OPT_IN] = "1"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True,
                         env=env).stdout
    assert f"XLA_FLAGS: {FLAG!r}" in out if asked else "XLA_FLAGS: ''" in out


def test_apply_adds_the_flags_before_any_backend_starts():
    assert _run(_REPORT) == repr(FLAG)
    assert _run(_REPORT, XLA_FLAGS="--xla_force_host_platform_device_count=2") == repr(
        f"--xla_force_host_platform_device_count=2 {FLAG}")


def test_the_users_flags_win():
    mine = FLAG.split("=")[0] + "=individual_dot"
    assert _run(_REPORT, XLA_FLAGS=mine) == repr(mine)
    assert _run(_REPORT, **{OPT_OUT: "1"}) == repr(None)


def test_too_late_changes_nothing():
    script = ("import os, jax; jax.devices(); from imvar_jax.xla_flags import apply_cpu_flags; "
              "added = apply_cpu_flags(); print(repr((added, os.environ.get('XLA_FLAGS'))))")
    assert _run(script) == repr(((), None))


def test_same_outputs_with_xla_defaults(tmp_path):
    """The tiny model's UNet and VAE decode with the opt-in flag match XLA's defaults to float rounding."""
    pipe, params = ImageVariationPipeline.from_pretrained("tiny", safety_checker=False)
    session = FLAG in os.environ["XLA_FLAGS"]  # the suite runs on XLA's defaults unless IMVAR_JAX_FAST_CPU=1
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(2, 4, 8, 8)).astype(np.float32)
    embeds = rng.normal(size=(2, 1, pipe.unet.config.cross_attention_dim)).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", latents=latents, embeds=embeds)
    script = (
        "import sys, numpy as np; from imvar_jax import ImageVariationPipeline; x = np.load(sys.argv[1]); "
        "pipe, params = ImageVariationPipeline.from_pretrained('tiny', safety_checker=False); "
        "eps = np.asarray(pipe.predict_noise(params, x['latents'], 501, x['embeds'])); "
        "img = np.asarray(pipe.decode_latents(params, x['latents'])); np.savez(sys.argv[2], eps=eps, img=img)")
    # The other setting than this session's, in a process of its own (XLA reads its flags once).
    other = "" if session else FLAG
    environ = {**{k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", OPT_IN)}, OPT_OUT: "1",
               "XLA_FLAGS": other}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "inputs.npz"), str(tmp_path / "other.npz")],
                   env=environ, timeout=300, check=True, capture_output=True)
    other_run = np.load(tmp_path / "other.npz")
    assert_close(pipe.predict_noise(params, latents, 501, embeds), other_run["eps"], rel=1e-5,
                 what="UNet, with the opt-in flag and without")
    assert_close(pipe.decode_latents(params, latents), other_run["img"], rel=1e-5,
                 what="VAE decode, with the opt-in flag and without")

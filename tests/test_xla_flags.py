"""The XLA:CPU flags imvar-jax adopts: importing changes nothing, when applying them works, and that they keep the math."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from helpers import assert_close
from imvar_jax import ImageVariationPipeline
from imvar_jax.xla_flags import CPU_FLAGS, OPT_OUT

FLAG = CPU_FLAGS[0]


def _run(script: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", OPT_OUT)}
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


def test_the_command_line_applies_them():
    script = "import sys, os; from imvar_jax.cli import main; main(['info', '--model', 'tiny'])"
    assert f"XLA_FLAGS: {FLAG!r}" in subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True,
        env={k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", OPT_OUT)}).stdout


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
    """The tiny model's UNet and VAE decode under XLA's default flags match ours to float rounding."""
    pipe, params = ImageVariationPipeline.from_pretrained("tiny", safety_checker=False)
    assert FLAG in os.environ["XLA_FLAGS"], "the test session runs with the adopted flags"
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(2, 4, 8, 8)).astype(np.float32)
    embeds = rng.normal(size=(2, 1, pipe.unet.config.cross_attention_dim)).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", latents=latents, embeds=embeds)
    script = (
        "import sys, numpy as np; from imvar_jax import ImageVariationPipeline; x = np.load(sys.argv[1]); "
        "pipe, params = ImageVariationPipeline.from_pretrained('tiny', safety_checker=False); "
        "eps = np.asarray(pipe.predict_noise(params, x['latents'], 501, x['embeds'])); "
        "img = np.asarray(pipe.decode_latents(params, x['latents'])); np.savez(sys.argv[2], eps=eps, img=img)")
    environ = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    environ[OPT_OUT] = "1"
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "inputs.npz"), str(tmp_path / "defaults.npz")],
                   env=environ, timeout=300, check=True, capture_output=True)
    defaults = np.load(tmp_path / "defaults.npz")
    assert_close(pipe.predict_noise(params, latents, 501, embeds), defaults["eps"], rel=1e-5,
                 what="UNet, adopted vs default XLA flags")
    assert_close(pipe.decode_latents(params, latents), defaults["img"], rel=1e-5,
                 what="VAE decode, adopted vs default XLA flags")

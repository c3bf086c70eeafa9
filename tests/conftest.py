"""Test setup: 8 virtual CPU devices so pmap paths run here; no network."""

import os

# Must be set before JAX is imported anywhere in the test session.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The suite runs on the XLA:CPU flags the imvar-jax command runs on: XLA's defaults, or with
# IMVAR_JAX_FAST_CPU=1 the opt-in flag (tests/test_xla_flags.py checks it keeps the math).
from imvar_jax.xla_flags import apply_cpu_flags, asked_for  # noqa: E402

if asked_for():
    apply_cpu_flags()

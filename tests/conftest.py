"""Test setup: 8 virtual CPU devices so pmap paths run here; no network."""

import os

# Must be set before JAX is imported anywhere in the test session.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The suite runs on the XLA:CPU flags the imvar-jax command adopts (tests/test_xla_flags.py checks
# they keep the math); importing imvar_jax itself sets nothing.
from imvar_jax.xla_flags import apply_cpu_flags  # noqa: E402

apply_cpu_flags()

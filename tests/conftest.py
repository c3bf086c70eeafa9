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


def pytest_configure(config) -> None:
    """One persistent compilation cache for the session, so a program that many tests build identically
    (the tiny model's, mostly) is compiled once: it halves the time of a generate call here. Loaded
    executables are the ones compiled, and JAX logs "Finished XLA compilation" for a cache hit too,
    so the compile-counting tests see the same events."""
    import shutil
    import tempfile

    import jax

    path = tempfile.mkdtemp(prefix="imvar-jax-test-compile-cache-")
    config.add_cleanup(lambda: shutil.rmtree(path, ignore_errors=True))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_executable_cache_after_a_test():
    """The command line turns the executable cache on process-wide; an in-process CLI test must not leave it
    on for the next test, whose programs would then be loaded instead of compiled (and not counted)."""
    yield
    from imvar_jax import executables

    executables.disable()


# The files that take longest (about 700, 530, 280 and 100 s of a worker's time in a CI run on the
# 2-core machine), started first: with `--dist loadfile --no-loadscope-reorder` each worker takes
# the next whole file when it finishes one, so the short files fill in at the end instead of one
# long file starting last on a worker while the other sits idle.
LONGEST_FIRST = ("test_training.py", "test_sampling.py", "test_multiprocess.py", "test_serving.py")


def pytest_collection_modifyitems(config, items) -> None:
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: every file keeps its own tests' order

"""An XLA:CPU flag measured faster for SD's models, and opt-in: it makes pictures depend on the device count.

With XLA's default YNNPACK fusions, XLA:CPU hands SD's 3x3 convolutions to YNNPACK, which was
slower than its own convolutions on the project's machine; turning those fusions off made
the full-size UNet step 10-21% faster and kept every output within float rounding (1e-6
relative) of PyTorch's (BENCHMARKS.md, "Choosing the XLA:CPU flag"). But XLA's own convolutions
round differently in a process with another number of CPU devices (jax 0.10.2: the same
one-device UNet call differs by 2e-6 between processes of 1 and 8 devices; with XLA's defaults
it is bit-identical), which breaks imvar-jax's promise that the same command writes the same
bytes on 1 process x 8 devices and on 2 x 4. So nothing applies it unless asked:
``IMVAR_JAX_FAST_CPU=1`` makes the ``imvar-jax`` command (and the test suite) call
``apply_cpu_flags()`` first thing; the benchmark scripts call it to measure the fastest CPU
setting; API users call ``imvar_jax.apply_cpu_flags()`` before anything runs on JAX. XLA reads
``XLA_FLAGS`` once, when JAX starts its backends. Importing imvar_jax changes nothing.

``apply_cpu_flags()`` leaves them out when the user's ``XLA_FLAGS`` already sets the same flag
(the user's value wins), when ``IMVAR_JAX_KEEP_XLA_FLAGS=1``, when a backend already started
(too late to take effect), and on a jaxlib other than the measured one: XLA aborts the process
on a flag it does not know, and these are experimental flags that may be renamed.
"""

from __future__ import annotations

import os

CPU_FLAGS: tuple[str, ...] = ("--xla_cpu_experimental_ynn_fusion_type=",)
OPT_OUT = "IMVAR_JAX_KEEP_XLA_FLAGS"
OPT_IN = "IMVAR_JAX_FAST_CPU"
_MEASURED_JAXLIB = "0.10."


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        # Without a way to tell, assume the worst: a flag set too late would silently do nothing.
        return True


def apply_cpu_flags() -> tuple[str, ...]:
    """Append ``CPU_FLAGS`` to ``XLA_FLAGS`` where the module docstring's rules allow; return those added."""
    import jaxlib

    if _is_set(OPT_OUT) or not jaxlib.__version__.startswith(_MEASURED_JAXLIB):
        return ()
    if _backends_started():
        return ()
    current = os.environ.get("XLA_FLAGS", "")
    added = tuple(flag for flag in CPU_FLAGS if flag.split("=")[0] not in current)
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


def asked_for() -> bool:
    """Whether ``IMVAR_JAX_FAST_CPU`` asks entry points that do not otherwise apply the flags to apply them."""
    return _is_set(OPT_IN)


def _is_set(variable: str) -> bool:
    return os.environ.get(variable, "0") not in ("", "0")

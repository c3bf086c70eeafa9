"""Self-attention alone, at the UNet's shapes: XLA's fused attention, ours chunked, PyTorch's SDPA.

Times ``imvar_jax.models.layers.dot_product_attention`` with ``implementation="xla"``
(``jax.nn.dot_product_attention``) and ``"chunked"`` (our query-chunked form, per head on CPU),
and ``torch.nn.functional.scaled_dot_product_attention``, on the same float32 ``[B, T, C]``
projections (``C = heads x head dim``; SD-v1's first UNet level is 8 heads of 40), for each
token count in ``--tokens`` (4096 is the 64x64-latent level, 1024 the 32x32 one). Each time
is the median of ``--repeats`` calls after a warm-up call (ours jitted, compile excluded), or
of more calls (up to 200) for a case whose first timed call is shorter than
``--min-seconds / --repeats``. Also the max relative difference from PyTorch's output and what
``attention="auto"`` picks there. No weights are needed; a few seconds to a minute on 2 cores.

    python benchmarks/bench_attention.py [--tokens 256 1024 4096] [--repeats 5]
    IMVAR_JAX_KEEP_XLA_FLAGS=1 python benchmarks/bench_attention.py   # on XLA's default flags
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import time

from provenance import code_version

# Short calls are repeated up to this many times to fill --min-seconds.
MAX_CALLS = 200


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096], help="sequence lengths")
    p.add_argument("--batch", type=int, default=2, help="batch (2: one guided step of one picture)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=40)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per case at least (median reported)")
    p.add_argument("--min-seconds", type=float, default=1.0,
                   help="short cases get about this much timed time (at most %d calls)" % MAX_CALLS)
    return p.parse_args()


def _median_seconds(fn, repeats: int, min_seconds: float) -> float:
    """Median of at least ``repeats`` calls after a warm-up, and of enough calls to fill ``min_seconds``."""
    fn()  # warm-up (and compile for ours)
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    times = [once]
    for _ in range(max(repeats, min(MAX_CALLS, math.ceil(min_seconds / max(once, 1e-6)))) - 1):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    # imvar-jax's adopted XLA:CPU flag, before anything starts a JAX backend;
    # IMVAR_JAX_KEEP_XLA_FLAGS=1 measures XLA's defaults.
    from imvar_jax.xla_flags import apply_cpu_flags

    apply_cpu_flags()
    args = parse_args()
    import jax
    import jaxlib
    import numpy as np
    import torch

    from imvar_jax.models.layers import dot_product_attention, select_attention

    torch.set_grad_enabled(False)
    print(f"jax {jax.__version__} / jaxlib {jaxlib.__version__} on {jax.devices()[0].platform}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), {os.cpu_count()} cpus; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; code {code_version()}; "
          f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}", flush=True)
    b, n, h = args.batch, args.heads, args.head_dim
    rng = np.random.default_rng(0)
    rows = []
    for t in args.tokens:
        q, k, v = (rng.normal(size=(b, t, n * h)).astype(np.float32) for _ in range(3))
        times, outs = {}, {}
        for impl in ("xla", "chunked"):
            fn = jax.jit(lambda q, k, v, impl=impl: dot_product_attention(q, k, v, n, implementation=impl))
            times[impl] = _median_seconds(lambda fn=fn: jax.block_until_ready(fn(q, k, v)), args.repeats,
                                           args.min_seconds)
            outs[impl] = np.asarray(fn(q, k, v), np.float64)
        tq, tk, tv = (torch.from_numpy(x).reshape(b, t, n, h).transpose(1, 2) for x in (q, k, v))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        times["torch"] = _median_seconds(lambda: sdpa(tq, tk, tv), args.repeats, args.min_seconds)
        ref = sdpa(tq, tk, tv).transpose(1, 2).reshape(b, t, n * h).double().numpy()
        diff = max(float(np.max(np.abs(outs[i] - ref)) / np.max(np.abs(ref))) for i in outs)
        auto = select_attention("auto", jax.default_backend(), np.float32, t, t, h)
        rows.append((t, times["xla"], times["chunked"], times["torch"], auto, diff))
        print(f"[{b}, {t}, {n}, {h}]: xla {times['xla']:.4f} s, chunked {times['chunked']:.4f} s, "
              f"torch {times['torch']:.4f} s; auto picks {auto}; max rel diff {diff:.1e}", flush=True)
    print(f"\nmedian of >= {args.repeats} calls (short cases: about {args.min_seconds:g} s of calls) after a "
          f"warm-up, float32\n")
    print("| [B, T, heads, head dim] | XLA fused (s) | ours chunked (s) | PyTorch SDPA (s) | "
          "\"auto\" on this backend | max rel diff vs PyTorch |\n|---|---|---|---|---|---|")
    for t, a, c, r, auto, diff in rows:
        print(f"| [{b}, {t}, {n}, {h}] | {a:.4f} | {c:.4f} | {r:.4f} | {auto} | {diff:.1e} |")


if __name__ == "__main__":
    main()

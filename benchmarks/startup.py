"""Start-up of ``imvar-jax generate`` with the persistent compilation cache: a cold process, then a warm one.

Writes one random input picture, points ``IMVAR_JAX_CACHE`` at a new empty folder, and runs
the same ``imvar-jax generate`` command twice, one process after the other, each writing to a
new ``--out`` (so both sample; the second reads the programs the first compiled). Prints the
wall time of each whole process (interpreter start, imports, loading, compiling or reading the
cache, sampling, PNG writing) and the size of the compile cache the first one wrote.

The CLI runs on XLA's default flags unless ``IMVAR_JAX_FAST_CPU=1`` in the environment (which
reaches both processes) makes it apply imvar-jax's opt-in XLA:CPU flag (imvar_jax/xla_flags.py).

    python benchmarks/startup.py [--model tiny] [--steps 2] [-- EXTRA GENERATE OPTIONS]
    python benchmarks/startup.py --model /tmp/bench/flax --steps 1 -- --size 256x256 --no-safety-checker
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import code_version


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="--model for imvar-jax generate (default tiny)")
    p.add_argument("--steps", type=int, default=2, help="--steps for imvar-jax generate (default 2)")
    p.add_argument("extra", nargs="*", help="more imvar-jax generate options, after --")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    import numpy as np
    from PIL import Image

    work = Path(tempfile.mkdtemp(prefix="imvar-startup-"))
    try:
        picture = work / "input.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(picture)
        cache = work / "cache"
        cache.mkdir()
        env = {**os.environ, "IMVAR_JAX_CACHE": str(cache)}
        # What the imvar-jax console script runs, with this interpreter.
        base = [sys.executable, "-m", "imvar_jax.cli", "generate", str(picture), "--model", args.model,
                "--steps", str(args.steps), "--num-per-image", "1", *args.extra]
        print(f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; {os.cpu_count()} cpus; "
              f"XLA_FLAGS in the environment={os.environ.get('XLA_FLAGS', '')!r}, IMVAR_JAX_FAST_CPU="
              f"{os.environ.get('IMVAR_JAX_FAST_CPU', '')!r}; code {code_version()}", flush=True)
        print("command: IMVAR_JAX_CACHE=<empty folder> " + " ".join(base[3:]) + " --out <new folder>", flush=True)
        seconds = {}
        for phase in ("cold", "warm"):
            start = time.perf_counter()
            subprocess.run([*base, "--out", str(work / f"out-{phase}")], env=env, check=True)
            seconds[phase] = time.perf_counter() - start
            cache_mib = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**20
            print(f"{phase} cache: {seconds[phase]:.1f} s (cache now {cache_mib:.2f} MiB)", flush=True)
        print("\n| model and settings | first process (cold cache) | second process (warm cache) |\n|---|---|---|")
        settings = " ".join([f"--model {args.model} --steps {args.steps}", *args.extra])
        print(f"| `{settings}` | {seconds['cold']:.1f} s | {seconds['warm']:.1f} s |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

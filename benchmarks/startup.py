"""Start-up of ``imvar-jax generate`` with its caches: a cold process, then a warm one.

Writes one random input picture, points ``IMVAR_JAX_CACHE`` at a new empty folder, and runs
the same ``imvar-jax generate`` command twice, one process after the other, each writing to a
new ``--out`` (so both sample; the second loads the sampling program the first compiled from the
executable cache, and the small programs from JAX's compilation cache). Prints the wall time of
each whole process (interpreter start, imports, loading, compiling or reading the caches,
sampling, PNG writing), the part the command itself reports for getting the sampling program
("compiled in X s" cold, "loaded the compiled program ... in Y s" warm) with their ratio, and the
size of the caches the first process wrote. There is no PyTorch row: diffusers compiles nothing.

The CLI runs on XLA's default flags unless ``IMVAR_JAX_FAST_CPU=1`` in the environment (which
reaches both processes) makes it apply imvar-jax's opt-in XLA:CPU flag (imvar_jax/xla_flags.py).

    python benchmarks/startup.py [--model tiny] [--steps 2] [-- EXTRA GENERATE OPTIONS]
    python benchmarks/startup.py --model /tmp/bench/flax --steps 1 -- --size 256x256 --no-safety-checker
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
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
        seconds, program = {}, {}
        for phase in ("cold", "warm"):
            start = time.perf_counter()
            done = subprocess.run([*base, "--out", str(work / f"out-{phase}")], env=env, check=True,
                                  stderr=subprocess.PIPE, text=True)
            seconds[phase] = time.perf_counter() - start
            sys.stderr.write(done.stderr)
            # The sampling program's own line: "compiled in X s" (cold) or "loaded ... in Y s" (warm).
            found = re.findall(r"(?:compiled in|loaded the compiled program .* in) ([0-9.]+) s$", done.stderr, re.M)
            program[phase] = sum(map(float, found)) if found else float("nan")
            cache_mib = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**20
            print(f"{phase} caches: {seconds[phase]:.1f} s, sampling program {program[phase]:.1f} s "
                  f"(caches now {cache_mib:.2f} MiB)", flush=True)
        print("\n| model and settings | first process (cold) | second process (warm) | sampling program: "
              "compiled (cold) | loaded (warm) | warm / cold |\n|---|---|---|---|---|---|")
        settings = " ".join([f"--model {args.model} --steps {args.steps}", *args.extra])
        print(f"| `{settings}` | {seconds['cold']:.1f} s | {seconds['warm']:.1f} s | {program['cold']:.1f} s | "
              f"{program['warm']:.2f} s | {program['warm'] / program['cold']:.3f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

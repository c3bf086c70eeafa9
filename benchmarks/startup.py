"""Start-up of ``imvar-jax generate`` with its caches: a cold process, then a warm one.

Writes one random input picture, points ``IMVAR_JAX_CACHE`` at a new empty folder, and runs
the same ``imvar-jax generate`` command twice, one process after the other, each writing to a
new ``--out`` (so both sample; the second loads the sampling program the first compiled from the
executable cache, and the small programs from JAX's compilation cache). Both get the sampling
program on a second thread while the weights load. Prints the wall time of each whole process
(interpreter start, imports, loading, compiling or reading the caches, sampling, PNG writing), the
parts the command itself reports: getting the sampling program ("compiled in X s" cold, "loaded
the compiled program ... in Y s" warm), loading the weights, and how long after the weights the
program was ready (what getting it adds to the start), with the warm/cold ratios, and the size of
the caches the first process wrote. There is no PyTorch row: diffusers compiles nothing.

Then, on the now warm caches, three more processes through the Python API, in turn (``--repeats``
times, the order rotating): ``from_pretrained`` alone (the weights, no program),
``from_pretrained`` followed by ``warm_up`` (the program loaded after the weights), and
``from_pretrained(warm_up=...)`` (loaded alongside them). Each prints the seconds from the start of
``from_pretrained`` to having the weights and, but for the first, the program. What the program
adds to a warm start is each of the last two less the first. It is set against a compile on its
own: one more API process, on new empty caches, compiles the program after the weights (the
command's cold compile above ran alongside the weights, slowed by them). All in one run on one
machine.

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
    p.add_argument("--size", default=None, help="HxW for both the command and the API processes")
    p.add_argument("--repeats", type=int, default=2, help="API process pairs on the warm caches (default 2)")
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
        size = [] if args.size is None else ["--size", args.size]
        base = [sys.executable, "-m", "imvar_jax.cli", "generate", str(picture), "--model", args.model,
                "--steps", str(args.steps), "--num-per-image", "1", *size, *args.extra]
        print(f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; {os.cpu_count()} cpus; "
              f"XLA_FLAGS in the environment={os.environ.get('XLA_FLAGS', '')!r}, IMVAR_JAX_FAST_CPU="
              f"{os.environ.get('IMVAR_JAX_FAST_CPU', '')!r}; code {code_version()}", flush=True)
        print("command: IMVAR_JAX_CACHE=<empty folder> " + " ".join(base[3:]) + " --out <new folder>", flush=True)
        seconds, program, weights, after = {}, {}, {}, {}
        for phase in ("cold", "warm"):
            start = time.perf_counter()
            done = subprocess.run([*base, "--out", str(work / f"out-{phase}")], env=env, check=True,
                                  stderr=subprocess.PIPE, text=True)
            seconds[phase] = time.perf_counter() - start
            sys.stderr.write(done.stderr)
            # The sampling program's own line: "compiled in X s" (cold) or "loaded ... in Y s" (warm).
            found = re.findall(r"(?:compiled in|loaded the compiled program .* in) ([0-9.]+) s$", done.stderr, re.M)
            program[phase] = sum(map(float, found)) if found else float("nan")
            ready = re.search(r"weights loaded in ([0-9.]+) s; the sampling program was ready ([0-9.]+) s after",
                              done.stderr)
            weights[phase], after[phase] = map(float, ready.groups()) if ready else (float("nan"),) * 2
            cache_mib = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**20
            print(f"{phase} caches: {seconds[phase]:.1f} s, sampling program {program[phase]:.1f} s, weights "
                  f"{weights[phase]:.1f} s, program ready {after[phase]:.1f} s after the weights "
                  f"(caches now {cache_mib:.2f} MiB)", flush=True)
        print("\n| model and settings | first process (cold) | second process (warm) | sampling program: "
              "compiled (cold) | loaded (warm) | loaded / compiled | weights (cold, warm) | program ready after "
              "the weights (cold, warm) | warm's wait / cold compile |\n|---|---|---|---|---|---|---|---|---|")
        settings = " ".join([f"--model {args.model} --steps {args.steps}", *size, *args.extra])
        print(f"| `{settings}` | {seconds['cold']:.1f} s | {seconds['warm']:.1f} s | {program['cold']:.1f} s | "
              f"{program['warm']:.2f} s | {program['warm'] / program['cold']:.3f} | {weights['cold']:.1f} s, "
              f"{weights['warm']:.1f} s | {after['cold']:.1f} s, {after['warm']:.2f} s | "
              f"{after['warm'] / program['cold']:.3f} |")
        ready: dict[str, list[float]] = {"none": [], "after": [], "alongside": []}
        orders = list(ready)
        for r in range(args.repeats):
            for order in orders[r % 3:] + orders[:r % 3]:
                done = subprocess.run([sys.executable, "-c", _API, args.model, order, args.size or ""], env=env,
                                      check=True, capture_output=True, text=True)
                ready[order].append(float(done.stdout.split()[0]))
        fresh = work / "fresh-cache"
        fresh.mkdir()
        done = subprocess.run([sys.executable, "-c", _API, args.model, "after", args.size or ""],
                              env={**env, "IMVAR_JAX_CACHE": str(fresh)}, check=True, capture_output=True, text=True)
        alone = float(done.stdout.split()[-1])
        mean = {order: sum(times) / len(times) for order, times in ready.items()}
        print(f"\nwarm caches, {args.repeats} API processes each: weights alone {_spread(ready['none'])}; weights "
              f"and then the program {_spread(ready['after'])}; both alongside {_spread(ready['alongside'])}")
        print(f"compiled after the weights on empty caches: {alone:.1f} s")
        print(f"what the program adds to the weights (means): after them {mean['after'] - mean['none']:.2f} s "
              f"({(mean['after'] - mean['none']) / alone:.3f} of that compile), alongside them "
              f"{mean['alongside'] - mean['none']:.2f} s ({(mean['alongside'] - mean['none']) / alone:.3f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _spread(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f} s" if len(values) > 1 else f"{values[0]:.1f} s"


# One API process: from_pretrained, then the program (or both at once, or no program). Prints the seconds to have
# them, and last the seconds it took to get the program alone (compiled, or loaded from the executable cache).
_API = """
import sys, time
import numpy as np
from imvar_jax import ImageVariationPipeline, hub
model, order, size = sys.argv[1:]
hub.enable_compile_cache()
hub.enable_executable_cache()
start = time.perf_counter()
def first_call(pipe):
    side = pipe.image_encoder.config.image_size
    h, w = pipe.size(*map(int, size.split("x"))) if size else pipe.size()
    return dict(images=np.zeros((1, 3, side, side), np.float32), height=h, width=w, num_inference_steps=1)
import jax
devices = jax.local_devices()[:1]
if order == "alongside":
    pipe, params = ImageVariationPipeline.from_pretrained(model, safety_checker=False, devices=devices,
                                                          warm_up=first_call)
elif order == "none":
    pipe, params = ImageVariationPipeline.from_pretrained(model, safety_checker=False, devices=devices)
else:
    pipe, params = ImageVariationPipeline.from_pretrained(model, safety_checker=False, devices=devices)
    began = time.perf_counter()
    pipe.warm_up(params, **first_call(pipe))
    program = time.perf_counter() - began
print(time.perf_counter() - start)
if order == "after":
    print(program)
"""


if __name__ == "__main__":
    main()

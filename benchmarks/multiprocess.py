"""One ``imvar-jax generate`` job as 1 process x D CPU devices and as P processes x D/P, on this machine.

Writes ``--inputs`` random pictures, then runs the same command twice into new output folders:
once as one process with ``JAX_NUM_CPU_DEVICES=D``, once as P processes on 127.0.0.1 joined with
``--coordinator``/``--num-processes``/``--process-id`` (``JAX_NUM_CPU_DEVICES=D/P`` each). Prints
each job's wall time (from the first start to the last exit: imports, loading, compiling,
sampling, writing), their ratio, and how many output files are byte-identical. On one CPU host
the processes share the same cores, so parity is the best to expect; the figure shows what
joining and exchanging plans cost, not a speed-up.

    python benchmarks/multiprocess.py [--processes 2] [--devices 8] [--inputs 20] [-- EXTRA GENERATE OPTIONS]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from provenance import code_version


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--devices", type=int, default=8, help="CPU devices of the whole job (default 8)")
    p.add_argument("--inputs", type=int, default=20)
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("extra", nargs="*", help="more imvar-jax generate options, after --")
    return p.parse_args()


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    env["JAX_NUM_CPU_DEVICES"] = str(devices)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _job(processes: int, devices: int, command: list[str], out: Path) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    procs = []
    for i in range(processes):
        job = [] if processes == 1 else ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
                                         "--process-id", str(i)]
        procs.append(subprocess.Popen([*command, "--out", str(out), *job], env=_env(devices // processes),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"a process exited with {p.returncode}:\n{err[-2000:]}")
    return time.perf_counter() - start


def _digests(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def main() -> None:
    args = parse_args()
    if args.devices % args.processes:
        raise SystemExit("--devices must divide by --processes")
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "in").mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.inputs):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / "in" / f"p{i:03d}.png")
        command = [sys.executable, "-m", "imvar_jax.cli", "generate", str(root / "in"), "--model", args.model,
                   "--steps", str(args.steps), "--num-per-image", "2", "--no-compile-cache", *args.extra]
        one = _job(1, args.devices, command, root / "one")
        many = _job(args.processes, args.devices, command, root / "many")
        a, b = _digests(root / "one"), _digests(root / "many")
    same = sum(a[k] == b.get(k) for k in a)
    print(f"imvar-jax {code_version()}, jax {jax.__version__}, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} "
          f"UTC, {os.cpu_count()} cores")
    print(f"model {args.model}, {args.inputs} inputs x 2, {args.steps} steps, {args.devices} CPU devices")
    print(f"1 process x {args.devices}: {one:.1f} s; {args.processes} processes x {args.devices // args.processes}: "
          f"{many:.1f} s; ratio {many / one:.2f}")
    print(f"byte-identical output files: {same} of {len(a)}")


if __name__ == "__main__":
    main()

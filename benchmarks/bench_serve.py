"""Load test of ``imvar-jax serve`` on 127.0.0.1: batched concurrent clients vs one request at a time.

Starts the real server (``python -m imvar_jax.cli serve``) in a child process, waits for
``/health``, then, with the ``openai`` SDK as the client:

1. **one at a time**: a single client sends ``--sequential`` requests one after another, so every
   program call carries one request (its ``--n`` pictures, the rest of the call padding);
2. **batched**: ``--clients`` threads each send ``--per-client`` requests back to back, so the
   worker fills calls with pictures of several requests.

Each phase prints pictures/s, requests/s, p50/p95/max request latency, and the server's own
counters for the phase (program calls, pictures, padded slots); the last line is the batched
phase's throughput over the one-at-a-time phase's. There is no PyTorch row: diffusers has no
server to compare with, so the comparison is the server against itself without batching.
Bounded: a fixed number of requests, each with ``--timeout`` seconds, against 127.0.0.1 only.

    python benchmarks/bench_serve.py [--model tiny] [--size 64x64] [--steps 10] [--devices 8]
        [--batch-per-device 2] [--clients 32] [--per-client 2] [--sequential 16] [--n 2]
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from provenance import code_version


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="--model for imvar-jax serve (default tiny)")
    p.add_argument("--size", default="64x64", help="the one served size, WxH (default 64x64)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per picture (default 10)")
    p.add_argument("--devices", type=int, default=8,
                   help="virtual XLA:CPU devices of the server (default 8; ignored off CPU)")
    p.add_argument("--batch-per-device", type=int, default=2, help="pictures per device per call (default 2)")
    p.add_argument("--max-wait-ms", type=float, default=50, help="the server's --max-wait-ms (default 50)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients of the batched phase (default 32)")
    p.add_argument("--per-client", type=int, default=2, help="requests per client in the batched phase (default 2)")
    p.add_argument("--sequential", type=int, default=16, help="requests of the one-at-a-time phase (default 16)")
    p.add_argument("--n", type=int, default=2, help="pictures per request (default 2)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one request may take (default 600)")
    p.add_argument("extra", nargs="*", help="more imvar-jax serve options, after --")
    return p.parse_args()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(port: int) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/health")
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        conn.close()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _phase(name: str, port: int, picture: Path, threads: int, per_thread: int, n: int, timeout: float) -> float:
    import warnings

    import openai

    # The SDK marks the variations endpoint deprecated (for OpenAI's DALL-E 2); the server keeps it.
    warnings.filterwarnings("ignore", "deprecated", DeprecationWarning)

    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(t: int) -> None:
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=timeout)
        for r in range(per_thread):
            start = time.perf_counter()
            try:
                with open(picture, "rb") as f:
                    answer = api.images.create_variation(image=f, n=n, response_format="b64_json",
                                                         extra_body={"seed": t * 1000 + r})
                assert len(answer.data) == n
            except Exception as e:  # counted and printed: a benchmark that lost requests says so
                with lock:
                    failures.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                latencies.append(time.perf_counter() - start)

    before = _health(port)[1]["stats"]
    start = time.perf_counter()
    workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    after = _health(port)[1]["stats"]
    counts = {k: after[k] - before[k] for k in after}
    pictures = len(latencies) * n
    print(f"{name}: {threads} client(s) x {per_thread} request(s) x {n} pictures in {wall:.2f} s: "
          f"{pictures / wall:.3f} pictures/s, {len(latencies) / wall:.3f} requests/s; latency p50 "
          f"{_percentile(latencies, 0.5):.3f} s, p95 {_percentile(latencies, 0.95):.3f} s, max {max(latencies):.3f} s; "
          f"server: {counts['calls']} calls, {counts['pictures']} pictures, {counts['padded_slots']} padded slots"
          + (f"; {len(failures)} FAILED: {failures[0]}" if failures else ""), flush=True)
    return pictures / wall


def main() -> None:
    args = parse_args()
    import numpy as np
    from PIL import Image

    work = Path(tempfile.mkdtemp(prefix="imvar-bench-serve-"))
    picture = work / "input.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(picture)
    port = _free_port()
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}").strip()
    command = [sys.executable, "-m", "imvar_jax.cli", "serve", "--model", args.model, "--size", args.size,
               "--steps", str(args.steps), "--port", str(port), "--batch-per-device", str(args.batch_per_device),
               "--max-wait-ms", str(args.max_wait_ms),
               "--max-queue", str(max(256, args.clients * args.per_client * args.n)), *args.extra]
    import jax
    import jaxlib

    print(f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; {os.cpu_count()} cpus; "
          f"jax {jax.__version__}, jaxlib {jaxlib.__version__}; code {code_version()}", flush=True)
    print("server: " + " ".join(command[3:]) + f" (XLA_FLAGS={env['XLA_FLAGS']!r})", flush=True)
    log = open(work / "server.log", "w+")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work)
    try:
        started = time.perf_counter()
        while True:
            if server.poll() is not None:
                log.seek(0)
                sys.exit(f"the server exited with {server.returncode}:\n{log.read()[-3000:]}")
            try:
                status, health = _health(port)
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        print(f"ready after {time.perf_counter() - started:.1f} s: {health['devices']} devices, "
              f"{health['pictures_per_call']} pictures per call", flush=True)
        single = _phase("one at a time", port, picture, 1, args.sequential, args.n, args.timeout)
        batched = _phase("batched", port, picture, args.clients, args.per_client, args.n, args.timeout)
        print(f"batched / one at a time: {batched / single:.2f}x the pictures per second", flush=True)
    finally:
        server.terminate()
        code = server.wait(120)
        log.close()
        print(f"server stopped by SIGTERM, exit code {code}", flush=True)


if __name__ == "__main__":
    main()

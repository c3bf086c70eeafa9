"""``imvar-jax generate`` as a job of several real processes on 127.0.0.1, joined with jax.distributed.

Each process gets its CPU devices through ``JAX_NUM_CPU_DEVICES`` (the suite's forced device count
is taken out of their environment: it crashes CPU collectives, openxla/xla#16430), and their CPU
collectives go through gloo. A job of 2 processes x 4 devices must write the same bytes and the same
manifest as 1 process x 8 devices, finish a job another process count left half done, and fail
within a bounded time when a process is missing.

The jobs run on XLA's default CPU flags: with the opt-in ``IMVAR_JAX_FAST_CPU`` flag XLA:CPU's
convolutions round differently in processes with 4 and 8 devices (imvar_jax/xla_flags.py), and
a picture or two of 40 came out one level apart; on the defaults every file is byte-identical.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from imvar_jax.batch.inputs import MANIFEST
from imvar_jax.xla_flags import CPU_FLAGS, OPT_IN

DEVICES = 8
INPUTS = 20  # three calls of 8 inputs: the job has a middle to be killed in
COMMAND = ["--model", "tiny", "--steps", "2", "--num-per-image", "2", "--seed", "11", "--no-compile-cache"]
DEADLINE_S = 600


def _env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != OPT_IN}
    dropped = ("--xla_force_host_platform_device_count", *(f.split("=")[0] for f in CPU_FLAGS))
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(dropped)]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_NUM_CPU_DEVICES"] = str(devices)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(processes: int, inputs: Path, out: Path, cwd: Path, present: int | None = None, timeout_s: int = 60,
           ) -> list[subprocess.Popen]:
    """The same command in ``processes`` processes (``present``: only the first few of them start)."""
    port = _free_port()
    procs = []
    for i in range(processes if present is None else present):
        job = [] if processes == 1 else ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
                                         "--process-id", str(i), "--process-timeout", str(timeout_s)]
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "imvar_jax.cli", "generate", str(inputs), "--out", str(out), *COMMAND, *job],
            cwd=cwd, env=_env(DEVICES // processes), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    results = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append((p.returncode, stdout, stderr))
    return results


def _files(out: Path) -> dict[str, str]:
    """Every file in OUT by relative path, as its SHA-256 (hidden files included: none may be left)."""
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multiprocess")
    inputs = root / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(5)
    for i in range(INPUTS):
        Image.fromarray(rng.integers(0, 256, (18 + i % 5, 22, 3), dtype=np.uint8)).save(inputs / f"p{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def single(work: Path) -> dict[str, str]:
    """The job done by one process with 8 devices: the reference."""
    ((code, stdout, stderr),) = _finish(_start(1, work / "inputs", work / "single", work))
    assert code == 0, stderr
    assert f"done {INPUTS * 2}," in stdout
    return _files(work / "single")


def test_two_processes_write_the_bytes_one_process_writes(work: Path, single: dict[str, str]):
    results = _finish(_start(2, work / "inputs", work / "two", work))
    for code, stdout, stderr in results:
        assert code == 0, stderr
        # Every process reports the whole job.
        assert f"done {INPUTS * 2}, skipped 0" in stdout, stdout
    files = _files(work / "two")
    assert MANIFEST in files and files[MANIFEST] == single[MANIFEST]  # the merged manifest, byte for byte
    assert files == single  # every PNG and grid, byte for byte


def test_a_killed_job_finishes_with_another_process_count(work: Path, single: dict[str, str]):
    out = work / "killed"
    procs = _start(2, work / "inputs", out, work, timeout_s=20)  # a dead process is noticed after 20 s
    deadline = time.monotonic() + DEADLINE_S
    # Kill process 1 as soon as the first call's pictures are on disk: the job is then in its middle.
    while not any(out.glob("*/1.png")) and time.monotonic() < deadline and procs[1].poll() is None:
        time.sleep(0.05)
    assert procs[1].poll() is None, "the job ended before it could be killed"
    procs[1].send_signal(signal.SIGKILL)
    start = time.monotonic()
    code0 = procs[0].wait(timeout=DEADLINE_S)
    procs[1].communicate()
    _, stderr0 = procs[0].communicate()
    # JAX's runtime stops the survivor once the dead process misses its heartbeats (--process-timeout 20).
    assert code0 != 0
    assert time.monotonic() - start < 90, stderr0
    left = _files(out)
    assert 0 < sum(rel.endswith("/0.png") for rel in left) < INPUTS
    # Each finished PNG is one the job keeps; a temporary file the kill left is cleared by the next run.
    assert all(rel in single for rel in left if rel.endswith(".png") and not Path(rel).name.startswith(".imvar-tmp-"))

    ((code, stdout, stderr),) = _finish(_start(1, work / "inputs", out, work))
    assert code == 0, stderr
    assert "skipped 0" not in stdout
    assert _files(out) == single


def test_a_process_that_never_joins_fails_the_job_in_bounded_time(work: Path):
    out = work / "alone"
    start = time.monotonic()
    ((code, _, stderr),) = _finish(_start(2, work / "inputs", out, work, present=1, timeout_s=10))
    # JAX's runtime ends the process itself once registration times out (a fatal log, not an exception).
    assert code != 0
    assert time.monotonic() - start < 60  # the 10 s it waits, plus starting Python and JAX
    assert "process 0 of 2 joining the job at 127.0.0.1:" in stderr and "waiting up to 10 s" in stderr
    assert "DEADLINE_EXCEEDED" in stderr and "RegisterTask" in stderr, stderr
    assert "Traceback" not in stderr
    assert not out.exists()


def test_two_processes_train_the_run_one_process_trains(work: Path, tmp_path: Path):
    """``imvar-jax train`` as 2 processes x 4 devices against this process's 8: the same batches, so the same
    losses and gradient norms (float rounding apart: the gradients are summed in another order), every
    checkpoint written once, and the result exported by process 0 while process 1 waits for it."""
    import json

    from imvar_jax.cli import main

    pictures = tmp_path / "pictures"
    pictures.mkdir()
    rng = np.random.default_rng(5)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(pictures / f"p{i}.png")
    common = ["train", str(pictures), "--model", "tiny", "--steps", "3", "--batch-size", "8", "--lr", "1e-3",
              "--warmup", "1", "--save-every", "2", "--seed", "2", "--export", "both", "--no-compile-cache"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0

    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "imvar_jax.cli", *common, "--out", str(tmp_path / "two"),
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
                               "--process-timeout", "120"],
                              cwd=work, env=_env(DEVICES // 2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    for rc, _, stderr in _finish(procs):
        assert rc == 0, stderr[-3000:]

    def lines(run: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    one, two = lines("one"), lines("two")
    assert [(m["step"], m["lr"]) for m in two] == [(m["step"], m["lr"]) for m in one] and len(one) == 3
    # Measured: 2e-7 relative between the job and one process (both on XLA's default CPU flags).
    for a, b in zip(one, two):
        np.testing.assert_allclose([b["loss"], b["grad_norm"]], [a["loss"], a["grad_norm"]], rtol=1e-5)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one" / "checkpoints").iterdir())
    exports = [tmp_path / run / "export" / "step-000003" for run in ("one", "two")]
    assert sorted(p.name for p in exports[1].iterdir()) == ["diffusers", "diffusers-ema", "jax", "jax-ema"]
    from imvar_jax import ImageVariationPipeline

    tuned = [ImageVariationPipeline.from_pretrained(str(e / "jax"), safety_checker=False)[1]["unet"] for e in exports]
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tuned[0]), jax.tree.leaves(tuned[1])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))

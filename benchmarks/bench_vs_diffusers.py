"""Ours vs diffusers' PyTorch pipeline in one invocation, on the same full-size random SD-v1 weights.

For each backend present (the CPU always: ours float32 vs PyTorch float32; a GPU when JAX's
default backend is "gpu" and torch sees CUDA: ours in its default dtype, bfloat16, vs diffusers
float16 with its default SDPA attention), every measurement runs in a child process pinned to
that backend and the parent prints ratios ours / reference and a Markdown table:

- ``unet32``, ``unet64``: one classifier-free-guided UNet step (batch 2: uncond + cond) on 32x32
  and 64x64 latents, median of ``--repeats`` after a warm-up; ``unet64b16``: batch 16 (8 guided
  pictures) at 64x64, GPU only. Also the max relative difference of the outputs, and achieved
  FLOP/s: XLA's FLOP count of the compiled UNet program over each side's time, and as a fraction
  of the machine's measured matmul peak (best of a large square matmul in JAX and in torch).
- ``e2e``: seconds per picture at ``--size`` (512) for ``--full-steps`` (50) PNDM steps, guidance
  7.5, batch 1, no safety checker, same pixel values and starting latents on both sides, each
  side in its own process (own peak RSS). On a GPU the full step count is run; on the CPU it is
  extrapolated from ``--steps`` (e.g. 2 and 4; the best of ``--e2e-repeats`` calls each) with
  time = fixed + per UNet call x calls (PNDM without Runge-Kutta warm-up makes steps + 1 calls).
  Also guided steps per second (1 / per call) and the max pixel difference at the largest step
  count run.
- ``compile``: our compile time (first call minus second call of the same program) in a process
  with a fresh persistent compile cache, then in a second process on the same cache, and that
  second process's wall time from start to its first picture.

Builds the checkpoint in ``DIR/torch`` and converts it to ``DIR/flax`` when absent (reused).

    python benchmarks/bench_vs_diffusers.py --workdir /tmp/bench [--cases unet32 unet64 e2e compile]
        [--repeats 3] [--steps 2 4] [--size 512] [--backends cpu gpu] [--json results.json]

Smallest check of every code path (on 2 CPU cores, a few minutes):

    python benchmarks/bench_vs_diffusers.py --workdir /tmp/bench --cases unet32 --repeats 1
    python benchmarks/bench_vs_diffusers.py --workdir /tmp/bench --cases e2e compile --size 256 --steps 1 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# The sibling scripts (imported where used) hold the checkpoint builder, the timing helper and the
# shared inputs; the folder is on sys.path when this file runs as a script, and made so otherwise.
sys.path.insert(0, str(Path(__file__).resolve().parent))

CASES = ("unet32", "unet64", "unet64b16", "e2e", "compile")
# (batch, latent size) per UNet case; batch 2 is one guided step of one picture.
UNET_CASES = {"unet32": (2, 32), "unet64": (2, 64), "unet64b16": (16, 64)}
GPU_ONLY = {"unet64b16"}
GUIDANCE = 7.5
TIMESTEP = 501
EMBED_DIM = 768
MATMUL_REPEATS = 5
GIB = 2**30
# Table cell for measurements that have no diffusers counterpart (ours only).
NO_REF = "-"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench"),
                   help="folder holding (or receiving) the torch/ and flax/ checkpoints")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="subset of measurements")
    p.add_argument("--backends", nargs="+", choices=("cpu", "gpu"), default=None,
                   help="subset of the backends present (default: all of them)")
    p.add_argument("--repeats", type=int, default=3, help="timed UNet calls per case (median reported)")
    p.add_argument("--e2e-repeats", type=int, default=2,
                   help="timed end-to-end calls per step count and side, after a first call (best reported)")
    p.add_argument("--steps", type=int, nargs="+", default=[2, 4],
                   help="step counts the end-to-end time is fitted on (on a GPU the full count is run too)")
    p.add_argument("--full-steps", type=int, default=50, help="step count the end-to-end figure is for")
    p.add_argument("--size", type=int, default=512, help="picture size for e2e and compile")
    p.add_argument("--json", type=Path, default=None, help="also write every raw number here")
    # Child-process options, set by the parent only.
    p.add_argument("--worker", choices=("probe", "unet", "e2e_ours", "e2e_diffusers", "compile"),
                   help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--points", type=int, nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.worker and len(set(args.steps)) < 2:
        p.error("--steps: give at least two different step counts (the CPU figure is a straight-line fit)")
    return args


# ----------------------------------------------------------------------------
# Child processes
# ----------------------------------------------------------------------------


def _torch_device(backend: str) -> tuple[str, Any]:
    import torch

    return ("cuda", torch.float16) if backend == "gpu" else ("cpu", torch.float32)


def _sync(backend: str) -> None:
    import torch

    if backend == "gpu":
        torch.cuda.synchronize()


def _host_peak_gib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _jax_device_peak_gib() -> float | None:
    import jax

    stats = jax.local_devices()[0].memory_stats()  # None on XLA:CPU
    return stats["peak_bytes_in_use"] / GIB if stats and "peak_bytes_in_use" in stats else None


def _torch_device_peak_gib(backend: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / GIB if backend == "gpu" else None


def _load_ours(workdir: Path) -> tuple[Any, dict]:
    from imvar_jax import ImageVariationPipeline

    # dtype=None: our default for the backend (float32 on CPU, bfloat16 on GPU).
    return ImageVariationPipeline.from_pretrained(workdir / "flax", dtype=None, safety_checker=False)


def _flops(cost: dict | list | None) -> float:
    """The "flops" entry of ``Compiled.cost_analysis()``, which is a dict or (older JAX) a list of dicts."""
    if isinstance(cost, dict):
        cost = [cost]
    return float(sum(c.get("flops", 0.0) for c in cost or []))


def work_probe(args: argparse.Namespace) -> dict:
    import diffusers
    import flax
    import jax
    import jaxlib
    import torch

    cuda = torch.cuda.is_available()
    return {"jax_backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "torch_cuda": cuda, "torch_device_name": torch.cuda.get_device_name(0) if cuda else None,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                         "torch": torch.__version__, "diffusers": diffusers.__version__}}


def _matmul_peaks(backend: str) -> dict:
    """Best-of-N large square matmul, JAX and torch, in the dtype each side runs the UNet in."""
    import jax
    import jax.numpy as jnp
    import torch

    n = 8192 if backend == "gpu" else 4096
    flop = 2.0 * n**3
    jdtype = jnp.bfloat16 if backend == "gpu" else jnp.float32
    ka, kb = jax.random.split(jax.random.key(0))
    a, b = jax.random.normal(ka, (n, n), jdtype), jax.random.normal(kb, (n, n), jdtype)
    mm = jax.jit(jnp.matmul)
    jax.block_until_ready(mm(a, b))
    best_jax = float("inf")
    for _ in range(MATMUL_REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(mm(a, b))
        best_jax = min(best_jax, time.perf_counter() - start)
    del a, b

    device = "cuda" if backend == "gpu" else "cpu"
    tdtype = torch.bfloat16 if backend == "gpu" else torch.float32
    ta, tb = torch.randn(n, n, dtype=tdtype, device=device), torch.randn(n, n, dtype=tdtype, device=device)
    torch.matmul(ta, tb)
    _sync(backend)
    best_torch = float("inf")
    for _ in range(MATMUL_REPEATS):
        start = time.perf_counter()
        torch.matmul(ta, tb)
        _sync(backend)
        best_torch = min(best_torch, time.perf_counter() - start)
    return {"n": n, "dtype": str(jnp.dtype(jdtype)), "jax_flops_per_s": flop / best_jax,
            "torch_flops_per_s": flop / best_torch}


def work_unet(args: argparse.Namespace) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_grad_enabled(False)
    backend = args.backend
    device, tdtype = _torch_device(backend)
    # On a GPU, JAX takes 75% of its memory up front (its default); the torch UNet runs in the
    # rest, which holds float16 weights and a batch-16 step with room to spare.
    pipe, params = _load_ours(args.workdir)
    unet = UNet2DConditionModel.from_pretrained(str(args.workdir / "torch" / "unet"), torch_dtype=tdtype)
    unet = unet.to(device).eval()
    result = {"ours_dtype": str(pipe.dtype), "ref_dtype": str(tdtype).removeprefix("torch."),
              "ref_attention": sorted({type(p).__name__ for p in unet.attn_processors.values()}),
              "torch_threads": torch.get_num_threads(), "matmul": _matmul_peaks(backend), "cases": {}}
    rng = np.random.default_rng(0)
    for name in (c for c in args.cases if c in UNET_CASES):
        batch, size = UNET_CASES[name]
        lat = rng.normal(size=(batch, 4, size, size)).astype(np.float32)
        emb = rng.normal(size=(batch, 1, EMBED_DIM)).astype(np.float32)
        result["cases"][name] = _unet_case(args, pipe, params, unet, lat, emb)
    return result


def _unet_case(args: argparse.Namespace, pipe: Any, params: dict, unet: Any, lat: np.ndarray,
               emb: np.ndarray) -> dict:
    """One UNet call, ours and the reference, on the same latents and embeddings."""
    import jax
    import torch
    from bench_components import timed

    device, tdtype = _torch_device(args.backend)
    # Compiled ahead of time through pipe.predict_noise (its own jit is inlined): the program
    # timed is the one whose FLOPs XLA counts, and the UNet is compiled once, not twice.
    start = time.perf_counter()
    compiled = jax.jit(pipe.predict_noise).lower(params, lat, TIMESTEP, emb).compile()
    compile_s = time.perf_counter() - start
    t_ours, y_ours = timed(lambda: jax.block_until_ready(compiled(params, lat, TIMESTEP, emb)), args.repeats)

    x = torch.from_numpy(lat).to(device, tdtype)
    e = torch.from_numpy(emb).to(device, tdtype)

    def ref() -> torch.Tensor:
        y = unet(x, TIMESTEP, encoder_hidden_states=e).sample
        _sync(args.backend)
        return y

    t_ref, y_ref = timed(ref, args.repeats)
    a = np.asarray(y_ours, np.float64)
    b = y_ref.double().cpu().numpy()
    return {"batch": lat.shape[0], "latent": lat.shape[-1], "ours_s": t_ours, "ref_s": t_ref,
            "flops": _flops(compiled.cost_analysis()), "compile_s": compile_s,
            "max_rel_diff": float(np.max(np.abs(a - b)) / np.max(np.abs(b)))}


def work_e2e_ours(args: argparse.Namespace) -> dict:
    from bench_pipeline import inputs

    pipe, params = _load_ours(args.workdir)
    pixel_values, latents = inputs(args.size)
    seconds, compile_s, images = {}, {}, None
    for n in args.points:
        call = {"num_inference_steps": n, "guidance_scale": GUIDANCE, "height": args.size, "width": args.size,
                "latents": latents}
        # The scheduler's tables are padded, so only the first step count compiles: the first call of a later
        # count differs from its best by the machine's noise alone.
        start = time.perf_counter()
        pipe(pixel_values, params, 0, **call)
        first = time.perf_counter() - start
        runs = []
        for _ in range(args.e2e_repeats):
            start = time.perf_counter()
            images = pipe(pixel_values, params, 0, **call).images  # numpy: the program has finished
            runs.append(time.perf_counter() - start)
        # The best run: a shared machine only ever adds time.
        seconds[n] = min(runs)
        compile_s[n] = first - seconds[n]
    np.save(args.out, images)
    return {"dtype": str(pipe.dtype), "seconds": seconds, "compile_s": compile_s,
            "host_peak_gib": _host_peak_gib(), "device_peak_gib": _jax_device_peak_gib()}


def work_e2e_diffusers(args: argparse.Namespace) -> dict:
    import torch
    from bench_pipeline import inputs
    from diffusers import StableDiffusionImageVariationPipeline

    torch.set_grad_enabled(False)
    device, tdtype = _torch_device(args.backend)
    pipe = StableDiffusionImageVariationPipeline.from_pretrained(
        args.workdir / "torch", safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        torch_dtype=tdtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    pixel_values, latents = inputs(args.size)
    call = {"image": torch.from_numpy(pixel_values).to(device, tdtype), "guidance_scale": GUIDANCE,
            "height": args.size, "width": args.size, "output_type": "np"}
    # The pipeline moves given latents to its device but keeps their dtype: cast them here.
    lat = torch.from_numpy(latents).to(device, tdtype)
    # One untimed 1-step call at the same shapes: allocator and kernel-selection warm-up, as our
    # side gets a first call.
    pipe(latents=lat, num_inference_steps=1, **call)
    seconds, calls, images = {}, {}, None
    for n in args.points:
        runs = []
        for _ in range(args.e2e_repeats):
            start = time.perf_counter()
            images = pipe(latents=lat, num_inference_steps=n, **call).images  # numpy: waits for the device
            runs.append(time.perf_counter() - start)
        seconds[n] = min(runs)
        calls[n] = len(pipe.scheduler.timesteps)
    pipe.scheduler.set_timesteps(args.full_steps)
    calls[args.full_steps] = len(pipe.scheduler.timesteps)
    np.save(args.out, images)
    return {"dtype": str(tdtype).removeprefix("torch."), "seconds": seconds, "calls": calls,
            "attention": sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()}),
            "host_peak_gib": _host_peak_gib(), "device_peak_gib": _torch_device_peak_gib(args.backend)}


def work_compile(args: argparse.Namespace) -> dict:
    from bench_pipeline import inputs

    from imvar_jax.hub import enable_compile_cache

    # Before anything compiles, so every program of this process goes through the cache.
    enable_compile_cache(args.cache_dir)
    pipe, params = _load_ours(args.workdir)
    pixel_values, latents = inputs(args.size)
    n = args.points[0]
    call = {"num_inference_steps": n, "guidance_scale": GUIDANCE, "height": args.size, "width": args.size,
            "latents": latents}
    start = time.perf_counter()
    pipe(pixel_values, params, 0, **call)
    first = time.perf_counter() - start
    start_to_first_image = time.time() - args.t0
    start = time.perf_counter()
    pipe(pixel_values, params, 0, **call)
    second = time.perf_counter() - start
    cache_bytes = sum(f.stat().st_size for f in args.cache_dir.rglob("*") if f.is_file())
    return {"dtype": str(pipe.dtype), "steps": n, "first_s": first, "second_s": second, "compile_s": first - second,
            "start_to_first_image_s": start_to_first_image, "cache_mib": cache_bytes / 2**20,
            "host_peak_gib": _host_peak_gib(), "device_peak_gib": _jax_device_peak_gib()}


WORKERS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "probe": work_probe, "unet": work_unet, "e2e_ours": work_e2e_ours, "e2e_diffusers": work_e2e_diffusers,
    "compile": work_compile}


# ----------------------------------------------------------------------------
# Parent
# ----------------------------------------------------------------------------


def run_child(args: argparse.Namespace, worker: str, backend: str, *extra: str) -> dict:
    """Run one worker in a fresh process on ``backend`` ("default": whatever JAX and torch pick)."""
    env = dict(os.environ)
    if backend == "cpu":
        # Pins both frameworks to the CPU, also on a machine with a GPU.
        env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, __file__, "--workdir", str(args.workdir), "--worker", worker, "--backend", backend,
           "--repeats", str(args.repeats), "--e2e-repeats", str(args.e2e_repeats), "--size", str(args.size),
           "--full-steps", str(args.full_steps), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"worker {worker} on {backend} failed with exit status {proc.returncode}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def ensure_checkpoint(workdir: Path) -> None:
    from bench_components import build_reference, convert

    src, dst = workdir / "torch", workdir / "flax"
    if not (src / "model_index.json").is_file():
        print(f"building random full-size SD-v1 weights in {src}", flush=True)
        workdir.mkdir(parents=True, exist_ok=True)
        build_reference(src)
    if not dst.exists():
        seconds, rss = convert(src, dst)
        print(f"converted to {dst} in {seconds:.1f} s (peak RSS {rss:.2f} GiB)", flush=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def fit(points: dict[int, float], calls: dict[int, int]) -> tuple[float, float]:
    """Least-squares ``seconds = fixed + per_call * calls`` over the step counts run; (fixed, per_call)."""
    x = np.array([calls[n] for n in points], np.float64)
    y = np.array(list(points.values()), np.float64)
    per_call, fixed = np.polyfit(x, y, 1)
    return float(fixed), float(per_call)


def run_e2e(args: argparse.Namespace, backend: str, tmp: Path) -> dict:
    points = sorted(set(args.steps) | ({args.full_steps} if backend == "gpu" else set()))
    res: dict[str, Any] = {"points": points}
    for side in ("ours", "diffusers"):
        print(f"[{backend}] e2e {side}: {args.size}x{args.size}, steps {points}", flush=True)
        res[side] = run_child(args, f"e2e_{side}", backend, "--points", *map(str, points),
                              "--out", str(tmp / f"{backend}-{side}.npy"))
    # JSON turned the step-count keys into strings.
    # Both sides run the same PNDM schedule (the pixel difference checks it); diffusers' scheduler
    # gives the UNet call count of each step count.
    calls = {int(k): v for k, v in res["diffusers"]["calls"].items()}
    for side in ("ours", "diffusers"):
        secs = {int(k): v for k, v in res[side]["seconds"].items()}
        fixed, per_call = fit(secs, calls)
        measured = secs.get(args.full_steps)
        res[side]["fit"] = {"fixed_s": fixed, "per_call_s": per_call, "steps_per_s": 1.0 / per_call,
                            "full_s": measured if measured is not None else fixed + per_call * calls[args.full_steps],
                            "extrapolated": measured is None}
    a, b = (np.load(tmp / f"{backend}-{side}.npy").astype(np.float64) for side in ("ours", "diffusers"))
    res["max_pixel_diff"] = float(np.max(np.abs(a - b)))
    res["calls"] = calls
    return res


def run_compile(args: argparse.Namespace, backend: str) -> dict:
    # Compile time does not depend on the step count (the sampling loop is one lax.fori_loop), so
    # the CPU compiles the cheapest program it also runs; a GPU the full-length one.
    steps = args.full_steps if backend == "gpu" else min(args.steps)
    cache = Path(tempfile.mkdtemp(prefix="imvar-compile-cache-"))
    try:
        res = {}
        for phase in ("cold", "warm"):
            print(f"[{backend}] compile, {phase} cache: {args.size}x{args.size}, {steps} steps", flush=True)
            res[phase] = run_child(args, "compile", backend, "--points", str(steps), "--cache-dir", str(cache),
                                   "--t0", repr(time.time()))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return res


def _fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def title(res: dict) -> str:
    """The dtypes (and diffusers' attention processors) the workers report having run."""
    unet, e2e = res.get("unet") or {}, res.get("e2e") or {}
    ours = (unet.get("ours_dtype") or e2e.get("ours", {}).get("dtype")
            or res.get("compile", {}).get("cold", {}).get("dtype"))
    ref = unet.get("ref_dtype") or e2e.get("diffusers", {}).get("dtype")
    attention = unet.get("ref_attention") or e2e.get("diffusers", {}).get("attention")
    return (f"ours {ours}" + (f" vs diffusers {ref}" if ref else "")
            + (f"; diffusers attention: {', '.join(attention)}" if attention else ""))


def section(args: argparse.Namespace, backend: str, res: dict) -> list[str]:
    """Markdown table rows (measure, ours, reference, ratio, notes) for one backend."""
    rows: list[tuple[str, Any, Any, str]] = []
    unet = res.get("unet")
    if unet:
        mm = unet["matmul"]
        peak = max(mm["jax_flops_per_s"], mm["torch_flops_per_s"])
        rows.append(("matmul peak (TFLOP/s)", mm["jax_flops_per_s"] / 1e12, mm["torch_flops_per_s"] / 1e12,
                     f"{mm['dtype']} {mm['n']}x{mm['n']}, best of {MATMUL_REPEATS}; peak = {peak / 1e12:.3g}"))
        for c in unet["cases"].values():
            what = f"batch {c['batch']}, {c['latent']}x{c['latent']} latents"
            rows.append((f"UNet step, {what} (s)", c["ours_s"], c["ref_s"],
                         (f"median of {args.repeats}; max rel diff {c['max_rel_diff']:.1e}; "
                          f"our compile {c['compile_s']:.1f} s")))
            f = c["flops"]
            rows.append((f"UNet achieved TFLOP/s, {what}", f / c["ours_s"] / 1e12, f / c["ref_s"] / 1e12,
                         (f"{f / 1e12:.3g} TFLOP per call (XLA's count); "
                          f"{100 * f / c['ours_s'] / peak:.0f}% / {100 * f / c['ref_s'] / peak:.0f}% of peak")))
    e2e = res.get("e2e")
    if e2e:
        o, d = e2e["ours"], e2e["diffusers"]
        full = args.full_steps
        largest = max(e2e["points"])
        how = ("measured" if not o["fit"]["extrapolated"] else
               f"extrapolated: fixed + {e2e['calls'][full]} x per call, fitted on "
               f"{', '.join(map(str, e2e['points']))} steps")
        rows.append((f"end to end {args.size}x{args.size}, {full} steps (s/picture)", o["fit"]["full_s"],
                     d["fit"]["full_s"], f"{how}; max pixel diff at {largest} steps {e2e['max_pixel_diff']:.1e}"))
        rows.append(("guided steps/s (UNet loop iterations)", o["fit"]["steps_per_s"], d["fit"]["steps_per_s"],
                     "1 / fitted seconds per UNet call (batch 2)"))
        rows.append(("fixed cost per picture (s)", o["fit"]["fixed_s"], d["fit"]["fixed_s"],
                     "fit intercept: image encode, VAE decode, overheads"))
        for i, n in enumerate(e2e["points"]):
            extra = o["compile_s"][str(n)]
            first = (f"our first call minus best {extra:+.1f} s (the compile)" if i == 0 else
                     f"our first call minus best {extra:+.1f} s (nothing compiled: one program for every step count)")
            rows.append((f"end to end, measured at {n} steps (s)", o["seconds"][str(n)], d["seconds"][str(n)],
                         f"{e2e['calls'][n]} UNet calls; {first}"))
        rows.append(("host peak RSS, e2e process (GiB)", o["host_peak_gib"], d["host_peak_gib"], "weights included"))
        rows.append(("device peak memory, e2e process (GiB)", o["device_peak_gib"], d["device_peak_gib"],
                     "JAX peak_bytes_in_use / torch max_memory_allocated"))
    comp = res.get("compile")
    if comp:
        cold, warm = comp["cold"], comp["warm"]
        what = f"{args.size}x{args.size}, {cold['steps']} steps"
        rows.append(("our compile, cold cache (s)", cold["compile_s"], NO_REF,
                     (f"{what}; first call {cold['first_s']:.1f} s minus second {cold['second_s']:.1f} s; "
                      f"fresh cache dir, {cold['cache_mib']:.3g} MiB written")))
        rows.append(("our compile, warm cache (s)", warm["compile_s"], NO_REF,
                     f"{100 * warm['compile_s'] / cold['compile_s']:.0f}% of cold; a second process, same cache"))
        rows.append(("process start to first picture, warm cache (s)", warm["start_to_first_image_s"], NO_REF,
                     "imports, loading weights, cache reads, one picture"))
        rows.append(("host peak RSS, compile processes cold / warm (GiB)",
                     f"{cold['host_peak_gib']:.3g} / {warm['host_peak_gib']:.3g}", NO_REF, ""))
        if cold["device_peak_gib"] is not None:
            rows.append(("device peak memory, compile processes cold / warm (GiB)",
                         f"{cold['device_peak_gib']:.3g} / {warm['device_peak_gib']:.3g}", NO_REF, ""))
    lines = [f"### {backend}: {title(res)}", "", "| measure | ours | diffusers | ours/diffusers | notes |",
             "|---|---|---|---|---|"]
    for measure, a, b, notes in rows:
        numeric = isinstance(a, float) and isinstance(b, float) and b != 0
        lines.append(f"| {measure} | {_fmt(a)} | {_fmt(b)} | "
                     f"{f'{a / b:.2f}' if numeric else '-'} | {notes} |")
    return lines


def main() -> None:
    args = parse_args()
    if args.worker:
        # Before any JAX work: imvar-jax's XLA:CPU flags take effect only if no backend has started.
        from imvar_jax.xla_flags import apply_cpu_flags

        apply_cpu_flags()
        print("RESULT " + json.dumps(WORKERS[args.worker](args)), flush=True)
        return
    ensure_checkpoint(args.workdir)
    facts = run_child(args, "probe", "default")
    present = ["cpu"] + (["gpu"] if facts["jax_backend"] == "gpu" and facts["torch_cuda"] else [])
    backends = [b for b in present if args.backends is None or b in args.backends]
    v = facts["versions"]
    header = (f"backends {', '.join(backends)} (present: {', '.join(present)}); cpu: {cpu_model()}, "
              f"{os.cpu_count()} cores"
              + (f"; gpu: {facts['device_kind']}" if "gpu" in present else "")
              + f"; jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, torch {v['torch']}, "
              f"diffusers {v['diffusers']}; XLA_FLAGS in the children={facts['xla_flags']!r}; "
              f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(header, flush=True)

    report: dict[str, Any] = {"header": header, "facts": facts, "args": {
        k: (str(x) if isinstance(x, Path) else x) for k, x in vars(args).items() if x is not None}, "backends": {}}
    lines = [header, "", "Ratios are ours / diffusers: below 1 is faster for times, above 1 is faster for rates.", ""]
    with tempfile.TemporaryDirectory(prefix="imvar-bench-") as tmp:
        for backend in backends:
            res: dict[str, Any] = {}
            unet_cases = [c for c in args.cases if c in UNET_CASES and (backend == "gpu" or c not in GPU_ONLY)]
            if unet_cases:
                print(f"[{backend}] UNet: {', '.join(unet_cases)}", flush=True)
                res["unet"] = run_child(args, "unet", backend, "--cases", *unet_cases)
                mm = res["unet"]["matmul"]
                print(f"  matmul {mm['dtype']} {mm['n']}^2: JAX {mm['jax_flops_per_s'] / 1e12:.3g} TFLOP/s, "
                      f"torch {mm['torch_flops_per_s'] / 1e12:.3g} TFLOP/s; peak = the higher", flush=True)
                for c in res["unet"]["cases"].values():
                    print(f"  batch {c['batch']} {c['latent']}x{c['latent']}: ours {c['ours_s']:.3f} s, "
                          f"diffusers {c['ref_s']:.3f} s, ratio {c['ours_s'] / c['ref_s']:.2f}", flush=True)
            if "e2e" in args.cases:
                res["e2e"] = run_e2e(args, backend, Path(tmp))
                o, d = res["e2e"]["ours"]["fit"], res["e2e"]["diffusers"]["fit"]
                print(f"  {args.full_steps} steps: ours {o['full_s']:.1f} s, diffusers {d['full_s']:.1f} s, "
                      f"ratio {o['full_s'] / d['full_s']:.2f}", flush=True)
            if "compile" in args.cases:
                res["compile"] = run_compile(args, backend)
                cold, warm = res["compile"]["cold"]["compile_s"], res["compile"]["warm"]["compile_s"]
                print(f"  compile: cold {cold:.1f} s, warm {warm:.1f} s ({100 * warm / cold:.0f}% of cold)", flush=True)
            report["backends"][backend] = res
            if res:
                lines += [*section(args, backend, res), ""]
    print("\n" + "\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

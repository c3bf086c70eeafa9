"""End-to-end image variations, full-size random SD-v1 weights: ours vs diffusers in the same run.

Each side runs in its own child process (so each peak RSS is its own) on the same pixel
values and starting latents: a few guided PNDM steps at 256x256 and 512x512, one picture.
Prints seconds per picture (second call), our compile time (first call minus second),
peak host RSS, the ratio ours / diffusers and the max pixel difference.

Needs the random checkpoint that ``bench_components.py --workdir DIR`` writes (DIR/torch and
DIR/flax).

    python benchmarks/bench_pipeline.py --workdir DIR [--steps 3] [--sizes 256 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True, help="folder holding torch/ and flax/ checkpoints")
    p.add_argument("--steps", type=int, default=3, help="PNDM steps (UNet calls are steps + 1)")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--worker", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    return p.parse_args()


def inputs(size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    pixel_values = rng.normal(size=(1, 3, 224, 224)).astype(np.float32)
    latents = rng.normal(size=(1, 4, size // 8, size // 8)).astype(np.float32)
    return pixel_values, latents


def run_ours(args: argparse.Namespace) -> dict:
    from imvar_jax import ImageVariationPipeline

    pipe, params = ImageVariationPipeline.from_pretrained(args.workdir / "flax", safety_checker=False)
    pixel_values, latents = inputs(args.size)
    call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.size, width=args.size,
                latents=latents)
    start = time.perf_counter()
    pipe(pixel_values, params, 0, **call)
    first = time.perf_counter() - start
    start = time.perf_counter()
    images = pipe(pixel_values, params, 0, **call).images
    second = time.perf_counter() - start
    return {"seconds": second, "compile": first - second, "images": images.tolist()}


def run_diffusers(args: argparse.Namespace) -> dict:
    import torch
    from diffusers import StableDiffusionImageVariationPipeline

    pipe = StableDiffusionImageVariationPipeline.from_pretrained(args.workdir / "torch", safety_checker=None,
                                                                  feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pixel_values, latents = inputs(args.size)
    call = dict(image=torch.from_numpy(pixel_values), num_inference_steps=args.steps,
                guidance_scale=args.guidance, height=args.size, width=args.size, output_type="np")
    times, images = [], None
    with torch.no_grad():
        for _ in range(2):
            start = time.perf_counter()
            images = pipe(latents=torch.from_numpy(latents), **call).images
            times.append(time.perf_counter() - start)
    return {"seconds": times[1], "compile": 0.0, "images": images.tolist()}


def worker(args: argparse.Namespace) -> None:
    result = run_ours(args) if args.worker == "ours" else run_diffusers(args)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(result))


def main() -> None:
    # imvar-jax's adopted XLA:CPU flag, before anything starts a JAX backend (children inherit it);
    # IMVAR_JAX_KEEP_XLA_FLAGS=1 measures XLA's defaults.
    from imvar_jax.xla_flags import apply_cpu_flags

    apply_cpu_flags()
    args = parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    for size in args.sizes:
        res = {}
        for side in ("ours", "diffusers"):
            cmd = [sys.executable, __file__, "--workdir", str(args.workdir), "--steps", str(args.steps),
                   "--guidance", str(args.guidance), "--worker", side, "--size", str(size)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res[side] = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        diff = float(np.max(np.abs(np.asarray(res["ours"]["images"]) - np.asarray(res["diffusers"]["images"]))))
        o, d = res["ours"], res["diffusers"]
        rows.append((size, o["seconds"], d["seconds"], o["compile"], o["peak_rss_gib"], d["peak_rss_gib"], diff))
        print(f"{size}x{size}: ours {o['seconds']:.1f} s (compile {o['compile']:.1f} s, "
              f"RSS {o['peak_rss_gib']:.1f} GiB)  diffusers {d['seconds']:.1f} s (RSS {d['peak_rss_gib']:.1f} GiB)"
              f"  ratio {o['seconds'] / d['seconds']:.2f}"
              f"  max pixel diff {diff:.1e}", flush=True)
    print(f"\n{args.steps} PNDM steps ({args.steps + 1} UNet calls), guidance {args.guidance}, 1 picture\n")
    print("| size | ours (s/picture) | diffusers (s/picture) | ours/diffusers | our compile (s) "
          "| our peak RSS (GiB) | diffusers peak RSS (GiB) | max pixel diff |\n|---|---|---|---|---|---|---|---|")
    for size, a, b, c, ra, rb, diff in rows:
        print(f"| {size}x{size} | {a:.1f} | {b:.1f} | {a / b:.2f} | {c:.1f} | {ra:.1f} | {rb:.1f} | {diff:.1e} |")


if __name__ == "__main__":
    main()

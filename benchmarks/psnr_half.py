"""Half precision vs float32 on the same weights: PSNR of the final pictures.

Runs our pipeline on one converted checkpoint (the full-size random one that
``bench_components.py --workdir DIR`` writes to DIR/flax, or ``tiny``) in float32, then in each
half-precision setting, with the same pixel values and starting latents, and prints the PSNR of
each setting's pictures against the float32 ones, with the largest pixel difference.

    python benchmarks/psnr_half.py --model /tmp/bench/flax [--size 256] [--steps 4]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from imvar_jax import ImageVariationPipeline


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="converted folder, diffusers folder or 'tiny' (default)")
    p.add_argument("--size", type=int, default=None, help="picture size in pixels (default: the model's)")
    p.add_argument("--steps", type=int, default=4, help="PNDM steps (default 4)")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--pictures", type=int, default=2, help="inputs, one variation each (default 2)")
    p.add_argument("--half", nargs="+", choices=("bfloat16", "float16"), default=["bfloat16", "float16"],
                   help="half-precision dtypes to compare, each with its own VAE dtype and a float32 VAE")
    return p.parse_args()


def psnr(images: np.ndarray, reference: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(images, np.float64) - reference) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def run(args: argparse.Namespace, dtype: str, vae_dtype: str | None) -> tuple[np.ndarray, float]:
    pipe, params = ImageVariationPipeline.from_pretrained(args.model, dtype=dtype, vae_dtype=vae_dtype,
                                                          safety_checker=False)
    size = args.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    rng = np.random.default_rng(0)
    s = pipe.image_encoder.config.image_size
    pixel_values = rng.normal(size=(args.pictures, 3, s, s)).astype(np.float32)
    f = pipe.vae_scale_factor
    latents = rng.normal(size=(args.pictures, pipe.unet.config.in_channels, size // f, size // f)).astype(np.float32)
    start = time.perf_counter()
    images = pipe(pixel_values, params, 0, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  height=size, width=size, latents=latents).images
    return images, time.perf_counter() - start


def main() -> None:
    # imvar-jax's adopted XLA:CPU flag, before anything starts a JAX backend;
    # IMVAR_JAX_KEEP_XLA_FLAGS=1 measures XLA's defaults.
    from imvar_jax.xla_flags import apply_cpu_flags

    apply_cpu_flags()
    args = parse_args()
    reference, seconds = run(args, "float32", None)
    print(f"{args.model}: {args.pictures} pictures, {args.steps} PNDM steps, guidance {args.guidance}; "
          f"float32 took {seconds:.1f} s", flush=True)
    rows = []
    for dtype, vae_dtype in [(half, vae) for half in args.half for vae in (None, "float32")]:
        images, seconds = run(args, dtype, vae_dtype)
        finite = bool(np.all(np.isfinite(images)))
        rows.append((dtype, vae_dtype or dtype, psnr(images, reference), float(np.max(np.abs(images - reference))),
                     finite, seconds))
        print(f"{dtype} (VAE {vae_dtype or dtype}): PSNR {rows[-1][2]:.1f} dB, max pixel diff {rows[-1][3]:.3f}, "
              f"finite {finite}, {seconds:.1f} s", flush=True)
    print("\n| dtype | VAE dtype | PSNR vs float32 (dB) | max pixel diff | all finite |\n|---|---|---|---|---|")
    for dtype, vae, value, diff, finite, _ in rows:
        print(f"| {dtype} | {vae} | {value:.1f} | {diff:.3f} | {finite} |")


if __name__ == "__main__":
    main()

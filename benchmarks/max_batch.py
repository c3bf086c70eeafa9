"""Largest per-device batch of the full-size sampling program that fits a device's memory.

Compiles the whole guided sampling program (CLIP encode, the denoising loop, VAE decode) of
the full-size SD-v1 image-variation model for abstract params (``jax.ShapeDtypeStruct``, so
no weights are needed) at increasing per-device batches, and reads XLA's own buffer
assignment from ``compiled.memory_analysis()``: arguments (the params and inputs), outputs
and temporaries. A batch fits when their sum is within ``--budget-gib``.

The figures are those of the backend this runs on. XLA:CPU and XLA:GPU assign buffers
differently (XLA:CPU also widens bfloat16 convolutions to float32 internally), so the CPU
answer estimates, and does not replace, a run on the accelerator itself.

    python benchmarks/max_batch.py [--dtype bfloat16] [--size 512] [--budget-gib 16]
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from imvar_jax.models import abstract_params
from imvar_jax.models.clip_vision import CLIPVisionConfig
from imvar_jax.models.unet import UNetConfig
from imvar_jax.models.vae import VAEConfig
from imvar_jax.pipeline import ImageVariationPipeline
from imvar_jax.schedulers import SD_V1_SCHEDULER_CONFIG
from imvar_jax.precision import resolve_dtypes
from imvar_jax.sampling import Models, SampleOptions, sample

GIB = 2**30


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", help="params and activations (default bfloat16)")
    p.add_argument("--vae-dtype", default=None, help="the VAE's dtype (default: --dtype)")
    p.add_argument("--size", type=int, default=512, help="picture height and width in pixels (default 512)")
    p.add_argument("--budget-gib", type=float, default=16.0, help="device memory to fit in (default 16)")
    p.add_argument("--steps", type=int, default=50, help="PNDM steps (memory does not depend on them)")
    return p.parse_args()


def memory_at(pipe: ImageVariationPipeline, params: dict, batch: int, size: int, steps: int) -> dict[str, float]:
    """XLA's memory figures (GiB) for ``batch`` pictures per device, plus the compile time."""
    latent = size // pipe.vae_scale_factor
    opts = SampleOptions(num_images_per_prompt=1, latent_size=(latent, latent), do_cfg=True, latents_given=False,
                         with_callback=False, scheduler=pipe.scheduler)
    state = pipe.scheduler.set_timesteps(steps, (batch, latent, latent, pipe.unet.config.in_channels))
    s = pipe.image_encoder.config.image_size
    program = jax.jit(functools.partial(sample, Models(pipe.unet, pipe.vae, pipe.image_encoder), opts))
    start = time.perf_counter()
    compiled = program.lower(
        params, jax.ShapeDtypeStruct((batch, 3, s, s), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jax.random.key(0).dtype), None, jnp.float32(7.5), jnp.float32(0.0), state,
        jnp.int32(1), jnp.int32(1)).compile()
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    if stats is None:
        raise SystemExit(f"the {jax.default_backend()} backend reports no memory analysis")
    alias = getattr(stats, "alias_size_in_bytes", 0)
    figures = {"arguments": stats.argument_size_in_bytes / GIB, "outputs": stats.output_size_in_bytes / GIB,
               "temporaries": stats.temp_size_in_bytes / GIB, "code": stats.generated_code_size_in_bytes / GIB}
    figures["total"] = (stats.argument_size_in_bytes + stats.output_size_in_bytes - alias
                        + stats.temp_size_in_bytes + stats.generated_code_size_in_bytes) / GIB
    figures["compile_s"] = seconds
    return figures


def main() -> None:
    # imvar-jax's adopted XLA:CPU flag, before anything starts a JAX backend;
    # IMVAR_JAX_KEEP_XLA_FLAGS=1 measures XLA's defaults.
    from imvar_jax.xla_flags import apply_cpu_flags

    apply_cpu_flags()
    args = parse_args()
    dtype, vae_dtype = resolve_dtypes(args.dtype, args.vae_dtype, jax.local_devices()[0].platform)
    configs = {"unet": UNetConfig.sd_v1(), "vae": VAEConfig.sd_v1(), "image_encoder": CLIPVisionConfig.sd_v1()}
    pipe = ImageVariationPipeline.from_configs(configs, dtype=dtype, vae_dtype=vae_dtype,
                                               scheduler_config=dict(SD_V1_SCHEDULER_CONFIG))
    params = {"unet": abstract_params(configs["unet"], dtype), "vae": abstract_params(configs["vae"], vae_dtype),
              "image_encoder": abstract_params(configs["image_encoder"], dtype)}
    print(f"jax {jax.__version__}, backend {jax.default_backend()} ({jax.devices()[0].device_kind}); "
          f"dtype {dtype.name}, VAE {vae_dtype.name}; {args.size}x{args.size}, guided; "
          f"budget {args.budget_gib:g} GiB", flush=True)

    rows: dict[int, dict[str, float]] = {}

    def measure(batch: int) -> float:
        if batch not in rows:
            rows[batch] = memory_at(pipe, params, batch, args.size, args.steps)
            r = rows[batch]
            print(f"batch {batch:3d}: total {r['total']:6.2f} GiB (arguments {r['arguments']:.2f}, temporaries "
                  f"{r['temporaries']:.2f}, outputs {r['outputs']:.2f}); compiled in {r['compile_s']:.0f} s",
                  flush=True)
        return rows[batch]["total"]

    # Past small batches (where activations still fit in buffers XLA reuses) memory grows
    # linearly: two larger points predict the boundary, then its neighbours are compiled to
    # confirm it with XLA's own figures.
    if measure(1) > args.budget_gib:
        raise SystemExit(f"even one picture needs {rows[1]['total']:.2f} GiB")
    low, high = 8, 16
    per_picture = max((measure(high) - measure(low)) / (high - low), 1e-3)
    best = max(1, high + int(np.floor((args.budget_gib - rows[high]["total"]) / per_picture)))
    while best > 1 and measure(best) > args.budget_gib:
        best -= 1
    while measure(best + 1) <= args.budget_gib:
        best += 1
    print(f"\nlargest batch within {args.budget_gib:g} GiB: {best} pictures per device "
          f"({rows[best]['total']:.2f} GiB; {best + 1} needs {rows[best + 1]['total']:.2f} GiB)")
    print("\n| pictures per device | total (GiB) | arguments | temporaries | outputs |\n|---|---|---|---|---|")
    for batch in sorted(rows):
        r = rows[batch]
        print(f"| {batch} | {r['total']:.2f} | {r['arguments']:.2f} | {r['temporaries']:.2f} | {r['outputs']:.2f} |")


if __name__ == "__main__":
    main()

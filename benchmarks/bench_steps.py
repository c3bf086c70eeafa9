"""What padding the scheduler's tables costs per denoising step, against diffusers' step, in one run.

The pipeline pads every scheduler table to ``TABLE_STEPS`` loop steps, so one compiled program
serves every step count, and stops the loop at the state's traced length. This times the
compiled sampling program (image encoding, the guided loop, decoding) at two step counts, with
padded tables (one executable for both) and with exact ones (one executable each, the loop's
trip count static), and diffusers' pipeline at the same two counts; the per-step cost of each
is the difference of the two times over the difference of UNet calls. One picture, PNDM,
guidance 3, float32, one CPU device.

    python benchmarks/bench_steps.py --model /tmp/bench/flax --torch /tmp/bench/torch --size 256 --steps 4 8
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from pathlib import Path

from provenance import code_version


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="converted Flax folder")
    p.add_argument("--torch", type=Path, required=True, help="the same weights as a PyTorch diffusers folder")
    p.add_argument("--size", type=int, default=256, help="picture side in pixels (default 256)")
    p.add_argument("--steps", type=int, nargs=2, default=(4, 8), help="two step counts (default 4 8)")
    p.add_argument("--repeats", type=int, default=2, help="runs per measurement, the fastest kept (default 2)")
    return p.parse_args()


def fastest(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    args = parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from diffusers import StableDiffusionImageVariationPipeline

    from imvar_jax import ImageVariationPipeline, apply_cpu_flags
    from imvar_jax.pipeline import TABLE_STEPS
    from imvar_jax.sampling import Conditioning, Models, SampleOptions, sample

    apply_cpu_flags()
    print(f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; {os.cpu_count()} cpus; "
          f"jax {jax.__version__}, torch {torch.__version__}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
          f"code {code_version()}", flush=True)
    # The reference first, so that a folder it cannot read fails before the long part.
    reference = StableDiffusionImageVariationPipeline.from_pretrained(
        args.torch, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    pipe, params = ImageVariationPipeline.from_pretrained(args.model, safety_checker=False, dtype="float32")
    f = pipe.vae_scale_factor
    latent = (args.size // f, args.size // f)
    s = pipe.image_encoder.config.image_size
    rng = np.random.default_rng(0)
    pixel_values = rng.normal(size=(1, 3, s, s)).astype(np.float32)
    latents = rng.normal(size=(1, 4, *latent)).astype(np.float32)
    one = jnp.ones((1, 1), jnp.float32)
    cond = Conditioning(jnp.asarray(pixel_values)[:, None], one, 0 * one)
    keys = jax.random.split(jax.random.key(0), 1)
    models = Models(pipe.unet, pipe.vae, pipe.image_encoder)
    calls = {n: int(pipe.scheduler.set_timesteps(n, (1, *latent, 4)).length) for n in args.steps}

    ours = {}
    for padded in (True, False):
        opts = SampleOptions(num_images_per_prompt=1, latent_size=latent, do_cfg=True, latents_given=True,
                             with_callback=False, scheduler=pipe.scheduler, padded_tables=padded)
        program = jax.jit(lambda p, x, state, o=opts: sample(models, o, p, cond, keys, x, jnp.float32(3.0),
                                                              jnp.float32(0.0), state, jnp.int32(1),
                                                              jnp.int32(0)).images)
        for n in args.steps:
            state = pipe.scheduler.set_timesteps(n, (1, *latent, 4), padded_to=TABLE_STEPS if padded else None)
            start = time.perf_counter()
            compiled = program.lower(params, jnp.asarray(latents), state).compile()
            print(f"ours, {'padded' if padded else 'exact'} tables, {n} steps: compiled in "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
            ours[padded, n] = fastest(lambda: compiled(params, jnp.asarray(latents), state).block_until_ready(),
                                      args.repeats)
            print(f"  {ours[padded, n]:.2f} s", flush=True)

    theirs = {}
    with torch.no_grad():
        for n in args.steps:
            theirs[n] = fastest(lambda: reference(torch.from_numpy(pixel_values), height=args.size, width=args.size,
                                                  num_inference_steps=n, guidance_scale=3.0,
                                                  latents=torch.from_numpy(latents), output_type="np"),
                                args.repeats)

    low, high = args.steps
    extra = calls[high] - calls[low]

    def per_step(times) -> float:
        return (times[high] - times[low]) / extra

    padded = per_step({n: ours[True, n] for n in args.steps})
    exact = per_step({n: ours[False, n] for n in args.steps})
    torch_step = per_step(theirs)
    print(f"\n{args.size}x{args.size}, one picture, guided PNDM ({calls[low]} and {calls[high]} UNet calls):")
    print("| | padded tables (one program) | exact tables (a program per count) | diffusers |\n|---|---|---|---|")
    print(f"| {low} steps | {ours[True, low]:.2f} s | {ours[False, low]:.2f} s | {theirs[low]:.2f} s |")
    print(f"| {high} steps | {ours[True, high]:.2f} s | {ours[False, high]:.2f} s | {theirs[high]:.2f} s |")
    print(f"| per step | {padded:.3f} s | {exact:.3f} s | {torch_step:.3f} s |")
    print(f"padded / exact per step: {padded / exact:.3f}; ours (padded) / diffusers per step: "
          f"{padded / torch_step:.3f}")


if __name__ == "__main__":
    main()

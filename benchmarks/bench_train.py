"""Fine-tuning: our training step against diffusers' UNet with torch AdamW, and what fits a device.

``speed``: one training step (the denoising loss, its gradients, AdamW with global-norm clipping,
the EMA) of a mid-size UNet, ours (``imvar_jax.training.train_step``, jitted, float32) and the
PyTorch reference (diffusers' ``UNet2DConditionModel`` from the same weights, ``torch.optim.AdamW``,
``clip_grad_norm_``, an EMA by ``torch._foreach_lerp_``), same config, batch and resolution, in
the same run; prints the median step time of each and their ratio, and where the time goes: the
UNet's forward alone and forward + backward of the loss, for each.

``memory``: the full-size SD-v1 UNet's training step at 512x512 (64x64 latents) compiled for
abstract params, float32 master params, Adam states and EMA, bfloat16 compute, the state donated;
XLA's ``memory_analysis()`` per batch size, for ``--trainable all`` and ``attn``, and the largest
per-device batch within each ``--budget-gib`` from a line through two batch sizes, confirmed by
compiling that batch and the next. The figures are XLA:CPU's buffer assignment when run here: an
estimate of an accelerator's, not a measurement on one.

    python benchmarks/bench_train.py speed [--batch 4] [--latent 32] [--steps 5]
    python benchmarks/bench_train.py memory [--budget-gib 16 80] [--trainable all attn]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import code_version  # noqa: E402

from imvar_jax.models import abstract_params  # noqa: E402
from imvar_jax.models.config import to_dict  # noqa: E402
from imvar_jax.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from imvar_jax.schedulers import SD_V1_SCHEDULER_CONFIG  # noqa: E402
from imvar_jax.training import Batch, NoiseSchedule, TrainConfig, init_state, make_optimizer, train_step  # noqa: E402
from imvar_jax.training.objective import denoising_loss  # noqa: E402

GIB = 2**30
# Between the tiny test model and SD-v1 (320, 640, 1280, 1280; 860M params): two cross-attention
# levels and a plain one, two resnets per level, 8 heads of 32 channels.
MID = UNetConfig(sample_size=32, block_out_channels=(128, 256, 256), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 attention_head_dim=8, cross_attention_dim=256, norm_num_groups=32)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    speed = sub.add_parser("speed", help="step time, ours vs diffusers + torch AdamW, mid-size UNet")
    speed.add_argument("--batch", type=int, default=4)
    speed.add_argument("--latent", type=int, default=32, help="latent height and width (default 32: 256x256)")
    speed.add_argument("--steps", type=int, default=5, help="timed steps of each (median reported)")
    memory = sub.add_parser("memory", help="full-size UNet at 512: memory per batch, largest batch per budget")
    memory.add_argument("--budget-gib", type=float, nargs="+", default=[16.0, 80.0])
    memory.add_argument("--trainable", nargs="+", default=["all", "attn"], choices=["all", "attn"])
    memory.add_argument("--dtype", default="bfloat16", help="compute dtype (default bfloat16)")
    memory.add_argument("--points", type=int, nargs=2, default=[1, 4], help="two batch sizes for the line")
    return p.parse_args()


def _config(trainable: str = "all") -> TrainConfig:
    return TrainConfig(learning_rate=1e-4, warmup_steps=0, trainable=trainable)


def _step_program(cfg: UNetConfig, dtype, optimizer, schedule):
    unet = UNet2DConditionModel(cfg, dtype=dtype, platform=jax.devices()[0].platform)
    return jax.jit(lambda s, b: train_step(unet, schedule, optimizer, s, b), donate_argnums=0)


def speed(args: argparse.Namespace) -> None:
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    from imvar_jax.convert.common import convert_component
    from imvar_jax.convert.unet import SPEC

    torch.manual_seed(0)
    reference = TorchUNet(**to_dict(MID)).train()
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        _, params = convert_component(SPEC, folder)
    count = sum(p.numel() for p in reference.parameters())
    b, s, c = args.batch, args.latent, MID.in_channels
    print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads); backend "
          f"{jax.default_backend()}; XLA_FLAGS {os.environ.get('XLA_FLAGS', '')!r}; code {code_version()}\nmid-size UNet, {count / 1e6:.1f}M params; batch {b}, "
          f"{s}x{s} latents ({s * 8}x{s * 8} pictures), float32, trainable all", flush=True)

    schedule = NoiseSchedule.from_config(SD_V1_SCHEDULER_CONFIG)
    config = _config()
    optimizer = make_optimizer(config, params)
    step = _step_program(MID, jnp.float32, optimizer, schedule)
    state = init_state(params, optimizer, config, seed=0)
    rng = np.random.default_rng(0)
    batch = Batch(jnp.asarray(rng.standard_normal((b, s, s, c)), jnp.float32),
                  jnp.asarray(rng.standard_normal((b, MID.context_dim)), jnp.float32), jnp.arange(b, dtype=jnp.int32))
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    print(f"ours: first step (compile + run) {time.perf_counter() - start:.1f} s", flush=True)
    ours = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        ours.append(time.perf_counter() - start)

    alphas = torch.from_numpy(np.asarray(schedule.alphas_cumprod, np.float32))
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    ema = [p.detach().clone() for p in reference.parameters()]
    latents = torch.from_numpy(rng.standard_normal((b, c, s, s)).astype(np.float32))
    context = torch.from_numpy(rng.standard_normal((b, 1, MID.context_dim)).astype(np.float32))

    def torch_step() -> None:
        noise = torch.randn_like(latents)
        t = torch.randint(0, schedule.num_train_timesteps, (b,))
        a = alphas[t].view(b, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise  # Ho et al. 2020, eq. 4
        loss = torch.nn.functional.mse_loss(reference(noisy, t, encoder_hidden_states=context).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, list(reference.parameters()), 1 - 0.9999)

    torch_step()  # warm-up: allocator and AdamW state
    theirs = []
    for _ in range(args.steps):
        start = time.perf_counter()
        torch_step()
        theirs.append(time.perf_counter() - start)
    o, t = statistics.median(ours), statistics.median(theirs)
    print(f"\nstep time (median of {args.steps}): ours {o:.3f} s, diffusers + torch AdamW {t:.3f} s; "
          f"ours / PyTorch = {o / t:.2f}", flush=True)

    # Where the time goes: the same UNet's forward, and forward + backward of the loss, each side.
    unet = UNet2DConditionModel(MID, dtype=jnp.float32, platform=jax.devices()[0].platform)
    timesteps = jnp.arange(b, dtype=jnp.int32) * (schedule.num_train_timesteps // b)
    jl, jc = batch.latents, batch.embeds[:, None, :]
    forward = jax.jit(lambda p: unet.apply({"params": p}, jl, timesteps, jc))
    backward = jax.jit(jax.grad(lambda p: denoising_loss(unet, p, schedule, jl, jl, timesteps, jc)))
    t_torch = torch.from_numpy(np.asarray(timesteps)).long()

    def torch_forward() -> None:
        with torch.no_grad():
            reference(latents, t_torch, encoder_hidden_states=context)

    def torch_backward() -> None:
        reference.zero_grad(set_to_none=True)
        out = reference(latents, t_torch, encoder_hidden_states=context).sample
        torch.nn.functional.mse_loss(out, latents).backward()

    def median_time(f) -> float:
        jax.block_until_ready(f())
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            jax.block_until_ready(f())
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    p = state.params
    rows = [("UNet forward", median_time(lambda: forward(p)), median_time(torch_forward)),
            ("loss forward + backward", median_time(lambda: backward(p)), median_time(torch_backward))]
    print("\n| part | ours (s) | PyTorch (s) | ours / PyTorch |\n|---|---|---|---|")
    for name, a, c in rows + [("whole step", o, t)]:
        print(f"| {name} | {a:.3f} | {c:.3f} | {a / c:.2f} |")


def memory(args: argparse.Namespace) -> None:
    from imvar_jax.precision import parse_dtype

    cfg = UNetConfig.sd_v1()
    dtype = parse_dtype(args.dtype)
    schedule = NoiseSchedule.from_config(SD_V1_SCHEDULER_CONFIG)
    params = abstract_params(cfg, jnp.float32)
    latent = 64
    print(f"jax {jax.__version__}, backend {jax.default_backend()} ({jax.devices()[0].device_kind}); "
          f"code {code_version()}\nfull-size SD-v1 UNet, {latent * 8}x{latent * 8} pictures, float32 master "
          f"params, Adam states and EMA, {dtype.name} compute, state donated", flush=True)
    for trainable in args.trainable:
        config = _config(trainable)
        optimizer = make_optimizer(config, params)
        state = jax.eval_shape(lambda p: init_state(p, optimizer, config, seed=0), params)
        step = _step_program(cfg, dtype, optimizer, schedule)
        rows: dict[int, dict[str, float]] = {}

        def measure(b: int) -> float:
            if b not in rows:
                batch = Batch(jax.ShapeDtypeStruct((b, latent, latent, cfg.in_channels), jnp.float32),
                              jax.ShapeDtypeStruct((b, cfg.context_dim), jnp.float32),
                              jax.ShapeDtypeStruct((b,), jnp.int32))
                start = time.perf_counter()
                stats = step.lower(state, batch).compile().memory_analysis()
                alias = getattr(stats, "alias_size_in_bytes", 0)
                rows[b] = {"arguments": stats.argument_size_in_bytes / GIB,
                           "temporaries": stats.temp_size_in_bytes / GIB,
                           "total": (stats.argument_size_in_bytes + stats.output_size_in_bytes - alias
                                     + stats.temp_size_in_bytes + stats.generated_code_size_in_bytes) / GIB,
                           "compile_s": time.perf_counter() - start}
                r = rows[b]
                print(f"  {trainable}: batch {b:3d}: total {r['total']:6.2f} GiB (arguments {r['arguments']:.2f}, "
                      f"temporaries {r['temporaries']:.2f}); compiled in {r['compile_s']:.0f} s", flush=True)
            return rows[b]["total"]

        low, high = args.points
        per_picture = max((measure(high) - measure(low)) / (high - low), 1e-3)
        for budget in args.budget_gib:
            best = max(1, low + int(np.floor((budget - rows[low]["total"]) / per_picture)))
            while best > 1 and measure(best) > budget:
                best -= 1
            if measure(best) > budget:
                print(f"  {trainable}: within {budget:g} GiB nothing fits: one picture needs "
                      f"{rows[best]['total']:.2f} GiB", flush=True)
                continue
            while measure(best + 1) <= budget:
                best += 1
            print(f"  {trainable}: largest batch within {budget:g} GiB: {best} per device "
                  f"({rows[best]['total']:.2f} GiB; {best + 1} needs {rows[best + 1]['total']:.2f} GiB)", flush=True)
        print("\n| trainable | pictures per device | total (GiB) | arguments | temporaries |\n|---|---|---|---|---|")
        for b in sorted(rows):
            r = rows[b]
            print(f"| {trainable} | {b} | {r['total']:.2f} | {r['arguments']:.2f} | {r['temporaries']:.2f} |")
        print(flush=True)


def main() -> None:
    # imvar-jax's XLA:CPU flag, before anything starts a JAX backend (IMVAR_JAX_KEEP_XLA_FLAGS=1: XLA's defaults).
    from imvar_jax.xla_flags import apply_cpu_flags

    apply_cpu_flags()
    args = parse_args()
    speed(args) if args.what == "speed" else memory(args)


if __name__ == "__main__":
    main()

"""Full-size SD-v1 image-variation components: ours vs PyTorch in the same run.

Builds random-weight PyTorch models with the full SD-v1 image-variations architecture,
saves them in the diffusers layout, converts them with ``imvar-jax convert`` in a child
process (timing it and reading its peak RSS), then times, on the same inputs:
one UNet forward (batch 2, 64x64 and 32x32 latents), one VAE decode (64x64 latent) and one
CLIP image encode (batch 1, 224x224). Prints each ratio ours / PyTorch and the max relative
difference of the outputs.

    python benchmarks/bench_components.py [--workdir DIR] [--xla-flags "..."] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=None, help="where to keep the random checkpoint (reused)")
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for our side, e.g. --xla_cpu_use_onednn=true")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (median reported)")
    p.add_argument("--only", nargs="*", default=None, help="subset of cases: unet64 unet32 vae clip")
    return p.parse_args()


def build_reference(folder: Path):
    """Random full-size PyTorch components saved as a diffusers folder (reused if present)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionImageVariationPipeline, UNet2DConditionModel
    from transformers import CLIPVisionConfig as TorchCLIPVisionConfig
    from transformers import CLIPVisionModelWithProjection

    from imvar_jax.models.clip_vision import CLIPVisionConfig
    from imvar_jax.models.config import to_dict
    from imvar_jax.models.unet import UNetConfig
    from imvar_jax.models.vae import VAEConfig

    if (folder / "model_index.json").is_file():
        return (UNet2DConditionModel.from_pretrained(str(folder / "unet")).eval(),
                AutoencoderKL.from_pretrained(str(folder / "vae")).eval(),
                CLIPVisionModelWithProjection.from_pretrained(str(folder / "image_encoder")).eval())
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(to_dict(UNetConfig.sd_v1())).eval()
    vae = AutoencoderKL.from_config(to_dict(VAEConfig.sd_v1())).eval()
    clip = CLIPVisionModelWithProjection(TorchCLIPVisionConfig(**to_dict(CLIPVisionConfig.sd_v1()))).eval()
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    StableDiffusionImageVariationPipeline(vae=vae, image_encoder=clip, unet=unet, scheduler=scheduler,
                                          safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False).save_pretrained(str(folder))
    return unet, vae, clip


def convert(folder: Path, out: Path) -> tuple[float, float]:
    """Run the converter in a child process; return (seconds, peak RSS in GiB)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "imvar_jax.cli", "convert", str(folder), str(out)], check=True)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, peak_kib / 2**20


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up (and compile for ours)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    args = parse_args()
    if args.xla_flags:
        # XLA reads its flags once, when JAX initialises its backends: set them before importing JAX.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    # imvar-jax's adopted XLA:CPU flag, after --xla-flags so that a value given there wins, and
    # before anything starts a JAX backend; IMVAR_JAX_KEEP_XLA_FLAGS=1 measures XLA's defaults.
    from imvar_jax.xla_flags import apply_cpu_flags

    apply_cpu_flags()
    import jax
    import numpy as np
    import torch

    from imvar_jax import ImageVariationPipeline

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="imvar-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    src, dst = workdir / "torch", workdir / "flax"
    torch.set_grad_enabled(False)
    unet, vae, clip = build_reference(src)
    if dst.exists():
        conv_s, conv_rss = float("nan"), float("nan")
    else:
        conv_s, conv_rss = convert(src, dst)
    pipe, params = ImageVariationPipeline.from_pretrained(dst)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}, "
          f"{os.cpu_count()} cpus, torch threads {torch.get_num_threads()}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"conversion: {conv_s:.1f} s, peak RSS {conv_rss:.2f} GiB")

    rng = np.random.default_rng(0)
    rows = []

    def case(name, ours, ref, shape_note):
        if args.only and name not in args.only:
            return
        t_ours, y_ours = timed(lambda: jax.block_until_ready(ours()), args.repeats)
        t_ref, y_ref = timed(ref, args.repeats)
        y_ours, y_ref = np.asarray(y_ours, np.float64), np.asarray(y_ref, np.float64)
        rel = float(np.max(np.abs(y_ours - y_ref)) / np.max(np.abs(y_ref)))
        rows.append((name, shape_note, t_ours, t_ref, t_ours / t_ref, rel))
        print(f"{name:8s} {shape_note:28s} ours {t_ours:7.3f} s  torch {t_ref:7.3f} s  "
              f"ratio {t_ours / t_ref:5.2f}  max rel diff {rel:.1e}", flush=True)

    for size in (64, 32):
        lat = rng.normal(size=(2, 4, size, size)).astype(np.float32)
        emb = rng.normal(size=(2, 1, 768)).astype(np.float32)
        case(f"unet{size}", lambda: pipe.predict_noise(params, lat, 501, emb),
             lambda: unet(torch.from_numpy(lat), 501, encoder_hidden_states=torch.from_numpy(emb)).sample.numpy(),
             f"batch 2, latents {size}x{size}")

    z = rng.normal(size=(1, 4, 64, 64)).astype(np.float32)
    case("vae", lambda: pipe.decode_latents(params, z),
         lambda: (vae.decode(torch.from_numpy(z) / vae.config.scaling_factor).sample / 2 + 0.5)
         .clamp(0, 1).permute(0, 2, 3, 1).numpy(), "decode 64x64 -> 512x512")

    px = rng.normal(size=(1, 3, 224, 224)).astype(np.float32)
    case("clip", lambda: pipe.encode_image(params, px),
         lambda: clip(torch.from_numpy(px)).image_embeds.unsqueeze(1).numpy(), "encode batch 1, 224x224")

    print("\n| case | input | ours (s) | PyTorch (s) | ours/PyTorch | max rel diff |\n|---|---|---|---|---|---|")
    for name, note, a, b, r, rel in rows:
        print(f"| {name} | {note} | {a:.3f} | {b:.3f} | {r:.2f} | {rel:.1e} |")


if __name__ == "__main__":
    main()

"""Full-size SD-v1 programs exported with ``jax.export`` per platform: time to export and size.

For each platform (``cpu``, ``cuda``, ``tpu``; any of them from any host) it builds the full-size
pipeline in bfloat16 with abstract params (no weights), exports the guided 50-step sampling
program and the UNet alone (``imvar_jax.export``), and prints the seconds it took, the size of
the serialized StableHLO and of ``Exported.serialize()``, and which custom-call kernels it holds
(tests/test_export.py counts them per call site).
Off a GPU, JAX knows no cuDNN; ``--cuda-target`` (default 9.0 with cuDNN 9.10, as on an H100)
answers JAX's cuDNN helpers for that target, as tests/test_export.py does. There is no PyTorch
counterpart: these are the sizes of what would be shipped to, or cached for, each platform.

    python benchmarks/export_sizes.py [--platforms cpu cuda tpu] [--steps 50] [--cuda-target 9.0]
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import time

from provenance import code_version


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--platforms", nargs="+", default=["cpu", "cuda", "tpu"])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cuda-target", default="9.0", help="compute capability answered off a GPU (default 9.0)")
    return p.parse_args()


def _pin_cuda(capability: str) -> None:
    import jax._src.cudnn.fused_attention_stablehlo as helpers

    target = tuple(int(x) for x in capability.split("."))
    helpers.check_cudnn_version = lambda: 91000
    helpers.check_compute_capability = lambda c: target >= tuple(int(x) for x in c.split("."))
    helpers.is_cuda_compute_capability_equal = lambda c: target == tuple(int(x) for x in c.split("."))


def main() -> None:
    args = parse_args()
    from imvar_jax.xla_flags import apply_cpu_flags

    apply_cpu_flags()
    import jax

    from imvar_jax import CLIPVisionConfig, ImageVariationPipeline, UNetConfig, VAEConfig
    from imvar_jax.export import abstract_params, export_sample, export_unet

    pinned = "cuda" in args.platforms and not any(d.platform == "gpu" for d in jax.devices())
    if pinned:
        _pin_cuda(args.cuda_target)
    configs = {"unet": UNetConfig.sd_v1(), "vae": VAEConfig.sd_v1(), "image_encoder": CLIPVisionConfig.sd_v1()}
    print(f"imvar-jax {code_version()}, jax {jax.__version__}, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} "
          f"UTC, host {jax.devices()[0].device_kind}, {os.cpu_count()} cores"
          + (f"; cuda exported for sm_{args.cuda_target.replace('.', '')} with cuDNN 9.10 answered" if pinned
             else ""))
    print(f"{'platform':8} {'program':22} {'export s':>9} {'StableHLO MiB':>14} {'serialized MiB':>15}  kernels")
    for platform in args.platforms:
        pipe = ImageVariationPipeline.from_configs(configs, dtype="bfloat16", platform=platform)
        params = abstract_params(pipe)
        programs = {
            f"sample ({args.steps} steps, 512px)": lambda: export_sample(pipe, params, num_inference_steps=args.steps),
            "UNet (batch 2, 64x64)": lambda: export_unet(pipe.unet, params["unet"], batch=2, latent_size=(64, 64)),
        }
        for name, build in programs.items():
            start = time.perf_counter()
            exported = build()
            seconds = time.perf_counter() - start
            kernels = sorted(set(re.findall(r"custom_call @([\w$.]+)", exported.mlir_module())))
            print(f"{platform:8} {name:22} {seconds:9.1f} {len(exported.mlir_module_serialized) / 2**20:14.2f} "
                  f"{len(exported.serialize()) / 2**20:15.2f}  {', '.join(kernels) or '-'}")


if __name__ == "__main__":
    main()

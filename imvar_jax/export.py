"""Ahead-of-time export of the sampling program and the UNet with ``jax.export``, for any platform.

A pipeline's modules are built for one target platform (``from_configs(platform=...)``), so a
CPU host can export for ``"cuda"`` or ``"tpu"``: the program carries that target's attention
kernels (cuDNN flash attention, Mosaic splash) and dtypes, never the host's. Params may be
arrays or ``jax.ShapeDtypeStruct`` trees (``abstract_params``): exporting needs no weights.

The exported sampling program is ``sample``'s guided loop without a host callback (a program
that calls back into Python cannot be serialized), called as::

    exported.call(params, pixel_values, key_data, guidance_scale, eta, sched_state) -> Sampled

with ``pixel_values`` ``[N, 3, S, S]`` float32, ``key_data`` ``[N*k, 2]`` uint32
(``jax.random.key_data`` of ``parallel.picture_keys``), ``guidance_scale`` and ``eta`` float32
scalars and ``sched_state`` the scheduler's ``set_timesteps(steps, (N*k, h, w, 4))``.
``Exported.serialize()`` works on it: the scheduler states and ``Sampled`` are registered for
serialization.

cuDNN's fused-attention custom calls are not among the custom calls ``jax.export`` guarantees
stable, so a cuda export that uses them is allowed explicitly and must run on a jaxlib whose
cuDNN kernels read the same call (in practice: the same jaxlib version).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import export as jax_export

from .models import abstract_params as _abstract_params
from .models.layers import target_platform
from .models.unet import UNet2DConditionModel
from .pipeline import ImageVariationPipeline
from .sampling import Conditioning, Models, Sampled, SampleOptions, sample

# jax.Device.platform says "gpu" for NVIDIA GPUs; jax.export names the platform "cuda".
_EXPORT_NAMES = {"gpu": "cuda"}
# Targets of jax's cuDNN fused attention (jax/_src/cudnn/fused_attention_stablehlo.py), forward only.
CUDNN_ATTENTION_TARGETS: tuple[str, ...] = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaScaleBiasSoftmax")

_COMPONENTS = ("unet", "vae", "image_encoder")


def export_platform(platform: str) -> str:
    """The ``jax.export`` name of a device platform (``"gpu"`` is ``"cuda"``)."""
    return _EXPORT_NAMES.get(platform, platform)


def abstract_params(pipe: ImageVariationPipeline) -> dict[str, Any]:
    """The sampling program's params (``unet``, ``vae``, ``image_encoder``) as shapes in the pipeline's dtypes."""
    modules = {"unet": pipe.unet, "vae": pipe.vae, "image_encoder": pipe.image_encoder}
    return {name: _abstract_params(m.config, m.dtype) for name, m in modules.items()}


def _shapes(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def _export(fn: Any, platform: str, *args: Any) -> jax_export.Exported:
    checks = ([jax_export.DisabledSafetyCheck.custom_call(t) for t in CUDNN_ATTENTION_TARGETS]
              if platform == "cuda" else [])
    return jax_export.export(jax.jit(fn), platforms=(platform,), disabled_checks=checks)(*args)


def export_sample(pipe: ImageVariationPipeline, params: dict[str, Any], *, batch: int = 1,
                  num_images_per_prompt: int = 1, num_inference_steps: int = 50, guidance: bool = True,
                  height: int | None = None, width: int | None = None) -> jax_export.Exported:
    """The whole sampling program (encode, denoising loop, decode) for ``batch`` inputs, exported for
    ``pipe.platform``; ``guidance`` False exports the unguided program (guidance scale <= 1)."""
    height, width = pipe.size(height, width)
    f = pipe.vae_scale_factor
    latent = (height // f, width // f)
    rows = batch * num_images_per_prompt
    channels = pipe.unet.config.in_channels
    opts = SampleOptions(num_images_per_prompt=num_images_per_prompt, latent_size=latent, do_cfg=guidance,
                         latents_given=False, with_callback=False, scheduler=pipe.scheduler)
    models = Models(pipe.unet, pipe.vae, pipe.image_encoder)

    def program(params, pixel_values, key_data, guidance_scale, eta, sched_state) -> Sampled:
        zero = jnp.int32(0)
        one_source = jnp.ones((pixel_values.shape[0], 1), jnp.float32)  # each input conditions its own pictures
        cond = Conditioning(pixel_values[:, None], one_source, jnp.zeros_like(one_source))
        return sample(models, opts, params, cond, jax.random.wrap_key_data(key_data), None,
                      guidance_scale, eta, sched_state, zero, zero)

    s = pipe.image_encoder.config.image_size
    state = jax.eval_shape(lambda: pipe.scheduler.set_timesteps(num_inference_steps, (rows, *latent, channels)))
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    return _export(program, export_platform(pipe.platform), _shapes({n: params[n] for n in _COMPONENTS}),
                   jax.ShapeDtypeStruct((batch, 3, s, s), jnp.float32),
                   jax.ShapeDtypeStruct((rows, 2), jnp.uint32), scalar, scalar, state)


def export_unet(unet: UNet2DConditionModel, params: Any, *, batch: int, latent_size: tuple[int, int],
                context_length: int = 1) -> jax_export.Exported:
    """The UNet alone, exported for its platform: ``(params, sample [B, h, w, C] NHWC, timesteps [B] int32,
    context [B, context_length, D]) -> [B, h, w, C]`` in the UNet's dtype, as the sampling loop calls it."""
    cfg = unet.config

    def program(params, x, t, context):
        return unet.apply({"params": params}, x, t, context)

    platform = export_platform(target_platform(unet.platform))
    return _export(program, platform, _shapes(params),
                   jax.ShapeDtypeStruct((batch, *latent_size, cfg.in_channels), unet.dtype),
                   jax.ShapeDtypeStruct((batch,), jnp.int32),
                   jax.ShapeDtypeStruct((batch, context_length, cfg.context_dim), unet.dtype))

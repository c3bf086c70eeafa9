"""User API: load a checkpoint and run the model pieces in diffusers' public layouts."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .convert.checkpoint import (
    is_converted,
    iter_torch_components,
    load_converted,
    parse_dtype,
    resolve_source,
)
from .models.clip_vision import CLIPVisionModelWithProjection
from .models.safety_checker import SafetyChecker
from .models.unet import UNet2DConditionModel
from .models.vae import AutoencoderKL, sample_latent


def _nchw_to_nhwc(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 2, 3, 1))


def _nhwc_to_nchw(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 3, 1, 2))


def _read_optional_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass
class ImageVariationPipeline:
    """Stable Diffusion Image Variations in Flax: the modules plus the checkpoint's configs.

    Params live outside the pipeline (a plain dict with ``"unet"``, ``"vae"``,
    ``"image_encoder"`` and optionally ``"safety_checker"``), so they can be
    replicated, sharded or saved independently.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    image_encoder: CLIPVisionModelWithProjection
    safety_checker: SafetyChecker | None = None
    scheduler_config: dict[str, Any] | None = None
    feature_extractor_config: dict[str, Any] | None = None
    dtype: Any = jnp.float32
    _jitted: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.scale_factor

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike = "lambdalabs/sd-image-variations-diffusers", *,
                        dtype: Any = jnp.float32, revision: str | None = None, safety_checker: bool = True,
                        attention_impl: str | None = None) -> tuple["ImageVariationPipeline", dict[str, Any]]:
        """Load a converted Flax folder, a PyTorch diffusers folder (converted in memory) or a hub id.

        ``dtype`` is the dtype of params and activations. Returns ``(pipeline, params)``.
        """
        np_dtype = parse_dtype(dtype)
        root = resolve_source(path, revision)
        loader = load_converted if is_converted(root) else iter_torch_components
        configs: dict[str, Any] = {}
        params: dict[str, Any] = {}
        for name, config, p in loader(root, np_dtype, include_safety_checker=safety_checker):
            configs[name] = config
            params[name] = jax.tree.map(jnp.asarray, p)
        jdtype = jnp.dtype(np_dtype)
        pipe = cls(
            unet=UNet2DConditionModel(configs["unet"], dtype=jdtype, attention_impl=attention_impl),
            vae=AutoencoderKL(configs["vae"], dtype=jdtype, attention_impl=attention_impl),
            image_encoder=CLIPVisionModelWithProjection(configs["image_encoder"], dtype=jdtype,
                                                        attention_impl=attention_impl),
            safety_checker=(SafetyChecker(configs["safety_checker"], dtype=jdtype, attention_impl=attention_impl)
                            if "safety_checker" in configs else None),
            scheduler_config=_read_optional_json(root / "scheduler" / "scheduler_config.json"),
            feature_extractor_config=_read_optional_json(root / "feature_extractor" / "preprocessor_config.json"),
            dtype=jdtype,
        )
        return pipe, params

    def _jit(self, name: str, fn):
        if name not in self._jitted:
            self._jitted[name] = jax.jit(fn)
        return self._jitted[name]

    def encode_image(self, params: dict[str, Any], pixel_values: jax.Array) -> jax.Array:
        """CLIP image embeddings ``[N, 1, D]`` from pixel values ``[N, 3, S, S]`` (CLIPImageProcessor's output)."""

        def run(p, x):
            embeds = self.image_encoder.apply({"params": p}, _nchw_to_nhwc(x.astype(self.dtype)))
            return embeds[:, None, :]  # [N, 1, D]

        return self._jit("encode_image", run)(params["image_encoder"], jnp.asarray(pixel_values))

    def predict_noise(self, params: dict[str, Any], latents: jax.Array, timestep: jax.Array | int,
                      image_embeds: jax.Array) -> jax.Array:
        """UNet noise prediction; ``latents`` and the result are ``[N, C, h, w]`` as in diffusers."""

        def run(p, x, t, ctx):
            out = self.unet.apply({"params": p}, _nchw_to_nhwc(x.astype(self.dtype)), t, ctx.astype(self.dtype))
            return _nhwc_to_nchw(out)

        return self._jit("predict_noise", run)(params["unet"], jnp.asarray(latents), jnp.asarray(timestep),
                                               jnp.asarray(image_embeds))

    def decode_latents(self, params: dict[str, Any], latents: jax.Array) -> jax.Array:
        """Scaled latents ``[N, C, h, w]`` -> images ``[N, H, W, 3]`` float32 in [0, 1]."""
        scale = self.vae.config.scaling_factor

        def run(p, z):
            z = _nchw_to_nhwc(z.astype(jnp.float32) / scale).astype(self.dtype)
            x = self.vae.apply({"params": p}, z, method=AutoencoderKL.decode)
            return jnp.clip(x.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

        return self._jit("decode_latents", run)(params["vae"], jnp.asarray(latents))

    def encode_latents(self, params: dict[str, Any], images: jax.Array, key: jax.Array) -> jax.Array:
        """Images ``[N, H, W, 3]`` in [0, 1] -> latents sampled with ``key`` and scaled, ``[N, C, h, w]``."""
        scale = self.vae.config.scaling_factor

        def run(p, x, k):
            x = (x.astype(jnp.float32) * 2 - 1).astype(self.dtype)
            mean, logvar = self.vae.apply({"params": p}, x, method=AutoencoderKL.encode)
            z = sample_latent(mean.astype(jnp.float32), logvar.astype(jnp.float32), k)
            return _nhwc_to_nchw(z * scale)

        return self._jit("encode_latents", run)(params["vae"], jnp.asarray(images), key)

    def check_safety(self, params: dict[str, Any], pixel_values: jax.Array) -> np.ndarray:
        """The safety checker's flags ``bool[N]`` for CLIP-preprocessed pictures ``[N, 3, S, S]``."""
        if self.safety_checker is None or "safety_checker" not in params:
            raise ValueError("this pipeline was loaded without a safety checker")

        def run(p, x):
            _, flags = self.safety_checker.apply({"params": p}, _nchw_to_nhwc(x.astype(self.dtype)))
            return flags

        return np.asarray(self._jit("check_safety", run)(params["safety_checker"], jnp.asarray(pixel_values)))

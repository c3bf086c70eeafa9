"""``"tiny"``: a toy-sized random-weight model built in-process, for trying the tools without a download.

Its pictures are noise. It exists so that the CLI, notebooks and tests can run the whole
pipeline (preprocessing, guided sampling on every device, decoding, the safety checker) in
seconds on a CPU, with no PyTorch and no network.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .models import abstract_params
from .models.clip_vision import CLIPVisionConfig
from .models.safety_checker import SafetyCheckerConfig
from .models.unet import UNetConfig
from .models.vae import VAEConfig
from .preprocessing import CLIP_MEAN, CLIP_STD

# Concept scores are cosine similarities (at most 1) minus these weights, plus at most 0.01
# once a special-care score is positive; weights of 2 keep every score below 0, so the random
# checker never blacks out a picture and the tiny model's output stays visible noise.
_SAFETY_WEIGHT = 2.0


def tiny_configs() -> dict[str, Any]:
    """The four component configs, from the models' ``tiny()`` presets made to fit together.

    The presets are sized independently: the image encoder's projection must be the UNet's
    cross-attention width, and the VAE's latent channels the UNet's in/out channels. The default
    picture is 64x64 (the UNet's sample size 8 times the VAE's factor 8).
    """
    unet = UNetConfig.tiny()
    vision = dataclasses.replace(CLIPVisionConfig.tiny(), projection_dim=unet.context_dim)
    # Four levels, so the VAE downsamples by 8 as SD's does: --size 512x512 means 64x64 latents, not the
    # 256x256 (attention over 65k tokens) that the two-level preset would give.
    vae = dataclasses.replace(VAEConfig.tiny(), latent_channels=unet.in_channels,
                              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                              block_out_channels=(32, 32, 64, 64))
    return {
        "unet": unet,
        "vae": vae,
        "image_encoder": vision,
        "safety_checker": SafetyCheckerConfig(vision_config=vision, projection_dim=vision.projection_dim),
    }


def tiny_feature_extractor_config(image_size: int) -> dict[str, Any]:
    """A ``CLIPImageProcessor`` config (as ``preprocessor_config.json`` holds it) for ``image_size`` pictures."""
    return {
        "image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True, "do_resize": True,
        "size": {"shortest_edge": image_size}, "resample": 3, "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size}, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
    }


def _init_device() -> jax.Device:
    # Random normals are computed with backend-specific math; drawing them on the CPU gives
    # the same bits whichever accelerator the pipeline then runs on.
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return jax.local_devices()[0]


def _scaled(name: str, noise: np.ndarray) -> np.ndarray:
    """Standard normals -> one leaf, at the scale flax's default initializers give it."""
    if name == "kernel":  # lecun-normal variance, 1 / fan_in (HWIO conv and (in, out) dense kernels)
        return noise * math.prod(noise.shape[:-1]) ** -0.5
    if name == "scale":  # norm gains near 1, not exactly 1, so a swapped gain would show
        return 1.0 + 0.1 * noise
    return 0.1 * noise  # biases, embeddings, the checker's concept embeddings


def tiny_params(seed: int = 0) -> dict[str, Any]:
    """float32 numpy params of every component: ``module.init``'s tree, filled from one normal draw keyed by ``seed``.

    The tree comes from tracing ``module.init`` abstractly; running it would also run each
    model's forward pass, which costs about 30 s of compiling (or of op-by-op dispatch) on a
    2-core CPU, against well under a second for one ``jax.random.normal`` over all values.
    """
    configs = tiny_configs()
    shapes = {name: abstract_params(config) for name, config in configs.items()}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    sizes = [math.prod(leaf.shape) for _, leaf in leaves]
    with jax.default_device(_init_device()):
        noise = np.asarray(jax.random.normal(jax.random.key(seed), (sum(sizes),), jnp.float32))
    values = []
    for (path, leaf), start, size in zip(leaves, np.cumsum([0, *sizes[:-1]]), sizes):
        values.append(_scaled(path[-1].key, noise[start:start + size].reshape(leaf.shape)))
    params = jax.tree_util.tree_unflatten(treedef, values)
    checker = params["safety_checker"]
    for name in ("concept_embeds_weights", "special_care_embeds_weights"):
        checker[name] = np.full_like(checker[name], _SAFETY_WEIGHT)
    return params


def open_tiny(include_safety_checker: bool = True, seed: int = 0,
              ) -> tuple[dict[str, Any], Callable[[str, Any], dict[str, Any]]]:
    """The components' configs and a function ``(name, dtype) -> params``, as ``open_converted`` gives for a folder.

    Every dtype is cast from the same float32 draw (made at the first read), so a float32 VAE here
    has the float32 model's exact weights. ``seed`` picks the weights: the same bits on every call and
    process.
    """
    configs = {n: c for n, c in tiny_configs().items() if n != "safety_checker" or include_safety_checker}
    drawn: dict[str, Any] = {}

    def read(name: str, dtype: Any) -> dict[str, Any]:
        if not drawn:
            drawn.update(tiny_params(seed))
        return jax.tree.map(lambda a: a.astype(np.dtype(dtype)), drawn.pop(name))

    return configs, read

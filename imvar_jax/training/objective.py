"""The training objective the checkpoint was trained with: predict the noise of the DDPM forward process.

For a picture's latents ``z`` (the VAE posterior sampled with an explicit key, times the VAE's
``scaling_factor``), noise ``e ~ N(0, I)`` and a timestep ``t`` uniform over the training
timesteps, the forward process (Ho et al., 2020, arXiv:2006.11239, eq. 4) gives

    z_t = sqrt(alpha_bar_t) * z + sqrt(1 - alpha_bar_t) * e

and the loss is the simple objective (eq. 14): ``mean((eps_theta(z_t, t, c) - e) ** 2)``. The
condition ``c`` is the picture's own CLIP image embedding, or the zero embedding with
probability ``p_uncond``: the "no image" input classifier-free guidance samples with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ConfigError
from ..models.unet import UNet2DConditionModel
from ..schedulers.common import SchedulerConfig, alphas_cumprod


@dataclass(frozen=True)
class NoiseSchedule:
    """The checkpoint's training noise schedule (its scheduler config's betas), as ``alpha_bar`` per timestep."""

    alphas_cumprod: np.ndarray  # float32 [num_train_timesteps]

    @classmethod
    def from_config(cls, raw: Mapping[str, Any]) -> "NoiseSchedule":
        """From a ``scheduler_config.json`` dict. diffusers' trainers build a ``DDPMScheduler`` from it, which reads
        the beta fields with the defaults DDIM's reader has."""
        config = SchedulerConfig.from_dict(raw, "ddim")
        if config.prediction_type != "epsilon":
            raise ConfigError(f"scheduler config: prediction_type={config.prediction_type!r}: training predicts "
                              f"the noise ('epsilon'), as the image-variation checkpoint does")
        return cls(alphas_cumprod(config))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def __hash__(self) -> int:
        return hash(self.alphas_cumprod.tobytes())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoiseSchedule) and np.array_equal(self.alphas_cumprod, other.alphas_cumprod)


def noisy_latents(schedule: NoiseSchedule, z: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """``z_t`` of eq. 4 for latents ``z`` ``[B, h, w, C]``, noise of the same shape and int ``timesteps`` ``[B]``."""
    abar = jnp.asarray(schedule.alphas_cumprod)[timesteps]  # [B]
    a = jnp.sqrt(abar)[:, None, None, None]
    s = jnp.sqrt(1.0 - abar)[:, None, None, None]
    return a * z.astype(jnp.float32) + s * noise.astype(jnp.float32)


def conditions(embeds: jax.Array, drop: jax.Array) -> jax.Array:
    """The UNet's context ``[B, 1, D]``: each picture's embedding ``[B, D]``, or zeros where ``drop`` ``[B]``."""
    return jnp.where(drop[:, None], 0.0, embeds)[:, None, :].astype(jnp.float32)


def denoising_loss(unet: UNet2DConditionModel, unet_params: Any, schedule: NoiseSchedule, z: jax.Array,
                   noise: jax.Array, timesteps: jax.Array, context: jax.Array) -> jax.Array:
    """The mean squared error of the UNet's noise prediction (eq. 14), float32, over a batch ``[B, h, w, C]``.

    The UNet computes in its own dtype; its output and the loss are float32, as the checkpoint's
    trainers compute the loss in float32 whatever the mixed-precision setting.
    """
    z_t = noisy_latents(schedule, z, noise, timesteps)
    eps = unet.apply({"params": unet_params}, z_t.astype(unet.dtype), timesteps, context.astype(unet.dtype))
    return jnp.mean((eps.astype(jnp.float32) - noise.astype(jnp.float32)) ** 2)

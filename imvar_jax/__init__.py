"""imvar-jax: Stable Diffusion Image Variations in JAX/Flax."""

from .convert.checkpoint import convert_checkpoint
from .convert.common import ConversionError
from .models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection
from .models.config import ConfigError
from .models.safety_checker import SafetyChecker, SafetyCheckerConfig
from .models.unet import UNet2DConditionModel, UNetConfig
from .models.vae import AutoencoderKL, VAEConfig
from .pipeline import ImageVariationPipeline

__version__ = "0.1.0"

__all__ = [
    "AutoencoderKL",
    "CLIPVisionConfig",
    "CLIPVisionModelWithProjection",
    "ConfigError",
    "ConversionError",
    "ImageVariationPipeline",
    "SafetyChecker",
    "SafetyCheckerConfig",
    "UNet2DConditionModel",
    "UNetConfig",
    "VAEConfig",
    "convert_checkpoint",
]

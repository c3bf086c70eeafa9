"""imvar-jax: Stable Diffusion Image Variations in JAX/Flax."""


from .convert.checkpoint import convert_checkpoint
from .convert.common import ConversionError
from .models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection
from .models.config import ConfigError
from .models.safety_checker import SafetyChecker, SafetyCheckerConfig
from .models.unet import UNet2DConditionModel, UNetConfig
from .models.vae import AutoencoderKL, VAEConfig
from .parallel import image_keys, replicate, shard, unreplicate, unshard
from .pipeline import ImageVariationOutput, ImageVariationPipeline
from .preprocessing import prepare_inputs, to_pil
from .schedulers import DDIMScheduler, LMSDiscreteScheduler, PNDMScheduler, make_scheduler
from .xla_flags import apply_cpu_flags

# Importing the modules above starts no JAX backend (tests/test_xla_flags.py checks), so the
# flags still take effect; XLA reads them only when a backend starts.
apply_cpu_flags()

__version__ = "0.1.0"

__all__ = [
    "AutoencoderKL",
    "CLIPVisionConfig",
    "CLIPVisionModelWithProjection",
    "ConfigError",
    "ConversionError",
    "DDIMScheduler",
    "ImageVariationOutput",
    "ImageVariationPipeline",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "SafetyChecker",
    "SafetyCheckerConfig",
    "UNet2DConditionModel",
    "UNetConfig",
    "VAEConfig",
    "convert_checkpoint",
    "image_keys",
    "make_scheduler",
    "prepare_inputs",
    "replicate",
    "shard",
    "to_pil",
    "unreplicate",
    "unshard",
]

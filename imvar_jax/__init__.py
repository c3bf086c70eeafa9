"""imvar-jax: Stable Diffusion Image Variations in JAX/Flax."""


from .conditioning import mix_embeddings, path_weights
from .convert.checkpoint import convert_checkpoint
from .convert.common import ConversionError
from .errors import NonFiniteError
from .export import export_sample, export_unet
from .memory import InsufficientMemoryError
from .models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection
from .models.config import ConfigError
from .models.safety_checker import SafetyChecker, SafetyCheckerConfig
from .models.unet import UNet2DConditionModel, UNetConfig
from .models.vae import AutoencoderKL, VAEConfig
from .parallel import Placement, image_keys, replicate, shard, unreplicate, unshard
from .pipeline import ImageVariationOutput, ImageVariationPipeline
from .preprocessing import prepare_inputs, to_pil
from .schedulers import (DDIMScheduler, DPMSolverMultistepKarrasScheduler, DPMSolverMultistepScheduler,
                         EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LMSDiscreteScheduler, PNDMScheduler,
                         make_scheduler)
from .settings import GenerationSettings, SettingsError
from .xla_flags import apply_cpu_flags

__version__ = "0.1.0"

__all__ = [
    "AutoencoderKL",
    "CLIPVisionConfig",
    "CLIPVisionModelWithProjection",
    "ConfigError",
    "ConversionError",
    "DDIMScheduler",
    "DPMSolverMultistepKarrasScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "GenerationSettings",
    "ImageVariationOutput",
    "ImageVariationPipeline",
    "InsufficientMemoryError",
    "LMSDiscreteScheduler",
    "NonFiniteError",
    "PNDMScheduler",
    "Placement",
    "SafetyChecker",
    "SafetyCheckerConfig",
    "SettingsError",
    "UNet2DConditionModel",
    "UNetConfig",
    "VAEConfig",
    "apply_cpu_flags",
    "convert_checkpoint",
    "export_sample",
    "export_unet",
    "image_keys",
    "make_scheduler",
    "mix_embeddings",
    "path_weights",
    "prepare_inputs",
    "replicate",
    "shard",
    "to_pil",
    "unreplicate",
    "unshard",
]

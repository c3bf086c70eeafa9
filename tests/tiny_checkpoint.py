"""A tiny random-weight ``StableDiffusionImageVariationPipeline`` built offline, in every file format."""

from __future__ import annotations

from pathlib import Path

import torch

from helpers import randomize_

TINY_PROJECTION = 32


def build_torch_pipeline(seed: int = 0):
    """All components at toy sizes, with every parameter randomised."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionImageVariationPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, cross_attention_dim=TINY_PROJECTION, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=16)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, projection_dim=TINY_PROJECTION, hidden_act="quick_gelu")
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision))
    safety_checker = StableDiffusionSafetyChecker(
        CLIPConfig(vision_config=vision, text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                                          num_attention_heads=4, projection_dim=TINY_PROJECTION),
                   projection_dim=TINY_PROJECTION))
    for i, m in enumerate((unet, vae, image_encoder, safety_checker)):
        randomize_(m, seed=seed + i)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    feature_extractor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return StableDiffusionImageVariationPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler, safety_checker=safety_checker,
        feature_extractor=feature_extractor)


def save_pipeline(pipe, path: Path, fmt: str = "safetensors", dtype: torch.dtype = torch.float32) -> Path:
    """``save_pretrained`` the whole pipeline; ``fmt="bin"`` rewrites every component as a ``.bin`` pickle."""
    from helpers import save_torch

    pipe.save_pretrained(str(path))
    for name in ("unet", "vae", "image_encoder", "safety_checker"):
        for f in (path / name).glob("*.safetensors"):
            f.unlink()
        save_torch(getattr(pipe, name), path / name, fmt=fmt, dtype=dtype)
    return path

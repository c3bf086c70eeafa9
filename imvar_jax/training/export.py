"""A run's fine-tuned UNet as whole pipelines: a diffusers folder and the imvar-jax folder converted from it.

RUN/export/step-NNNNNN/diffusers-ema/   the EMA params: StableDiffusionImageVariationPipeline.from_pretrained
RUN/export/step-NNNNNN/jax-ema/         the same converted (ImageVariationPipeline.from_pretrained)
RUN/export/step-NNNNNN/diffusers/, jax/ the raw params, likewise

Every other component is the base model's, read again at export time with its safety checker
(the run itself never loads the checker). The imvar-jax folder is made by running the converter
on the diffusers one, so both hold the same bits and the converter's checks see every file.
A step folder already exported is left as it is: a run resumed past its end exports a new step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..convert.checkpoint import convert_checkpoint, is_converted
from ..convert.to_torch import save_diffusers_pipeline
from ..loading import load_model
from ..schedulers import SD_V1_SCHEDULER_CONFIG
from ..tiny import tiny_feature_extractor_config

EXPORTS = ("ema", "raw", "both")


def export_folder(run: str | os.PathLike, step: int) -> Path:
    return Path(run) / "export" / f"step-{step:06d}"


def export_unets(model: str, unets: Mapping[str, Mapping[str, Any]], folder: str | os.PathLike,
                 log: Callable[[str], None] = print) -> list[Path]:
    """For each ``suffix -> UNet params`` of ``unets``, ``folder``/diffusers``suffix`` and jax``suffix``.

    ``model`` is the base the UNet was fine-tuned from (as ``from_pretrained`` names it).
    Returns the folders written; those already there are skipped.
    """
    folder = Path(folder)
    loaded = None
    written = []
    for suffix, unet in unets.items():
        diffusers, jax_folder = folder / f"diffusers{suffix}", folder / f"jax{suffix}"
        if not diffusers.is_dir():
            if loaded is None:
                loaded = load_model(model, revision=None, dtype=np.float32, vae_dtype=np.float32,
                                    safety_checker=True, put=np.asarray)
            encoder = loaded.configs["image_encoder"]
            save_diffusers_pipeline(
                loaded.configs, {**loaded.params, "unet": unet},
                loaded.scheduler_config or SD_V1_SCHEDULER_CONFIG,
                loaded.feature_extractor_config or tiny_feature_extractor_config(encoder.image_size), diffusers)
            written.append(diffusers)
        if not is_converted(jax_folder):
            convert_checkpoint(diffusers, jax_folder, "float32", source_name=str(diffusers))
            written.append(jax_folder)
    for path in written:
        log(f"exported {path}")
    return written

"""Fine-tuning the image-variation UNet: the objective, the optimizer and one pure training step.

Built on the same models, schedulers and placement as generation. This package does not
import the pipeline or the CLI: a training entry point sits above it.
"""

from .objective import NoiseSchedule, conditions, denoising_loss, noisy_latents
from .optim import TrainConfig, make_optimizer, trainable_mask
from .step import Batch, TrainState, init_state, train_step

__all__ = ["Batch", "NoiseSchedule", "TrainConfig", "TrainState", "conditions", "denoising_loss", "init_state",
           "make_optimizer", "noisy_latents", "train_step", "trainable_mask"]

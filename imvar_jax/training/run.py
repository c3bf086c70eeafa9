"""A training run in a folder: settings, encoded data, checkpoints, metrics and sample grids, resumable.

RUN/settings.json   what the run was started with (a resume reads it back; nothing else may change)
RUN/encoded.npz     the pictures' latents and embeddings (training.data.precompute's cache)
RUN/checkpoints/    orbax checkpoints every ``save_every`` steps, the last ``keep`` kept
RUN/metrics.jsonl   one line per step: step, loss, gradient norm, learning rate, seconds
RUN/samples/        every ``sample_every`` steps, step-NNNNNN.png: variations of the first pictures (EMA params),
                    one row per picture, the picture itself first
RUN/export/         at the end, the fine-tuned pipeline in both formats (training.export): step-NNNNNN/diffusers-ema/
                    and jax-ema/ from the EMA params, diffusers/ and jax/ from the raw ones, as ``export`` says

The batch of each step is global (``batch_size`` pictures over every device of the placement, of
every process of a job joined with ``imvar_jax.distributed``); the state is replicated and the
batch split, so XLA averages the gradients across devices. Every process draws the same global
batch from the loader and hands the placement only its own devices' rows, so the batches, and
with them the loss curve, are the same for any number of processes and devices. Process 0 alone
writes the run's files other than checkpoints (which every process writes its part of).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from PIL import Image

from .. import distributed
from ..batch.inputs import InputError, collect_inputs, decode_image, read_input
from ..models.unet import UNet2DConditionModel
from ..parallel import Placement
from ..precision import default_dtype
from ..settings import SettingsError
from .checkpoints import RunCheckpoints
from .data import loader, precompute
from .export import EXPORTS, export_folder, export_unets
from .objective import NoiseSchedule
from .optim import TrainConfig, learning_rate, make_optimizer
from .step import Batch, init_state, train_step

SETTINGS_FILE = "settings.json"
METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class RunSettings:
    """One training run; checked when built, recorded in RUN/settings.json."""

    data: tuple[str, ...]
    model: str = "tiny"
    steps: int = 1000
    batch_size: int = 8
    size: tuple[int, int] | None = None  # training resolution (h, w); default the model's
    seed: int = 0
    save_every: int = 500
    keep: int = 3
    sample_every: int = 0  # 0: no sample grids
    sample_steps: int = 20  # denoising steps of the sample grids
    dtype: str | None = None  # compute dtype; default per platform (bfloat16 on TPU/GPU, float32 on CPU)
    export: str = "ema"  # which params the end of the run exports: "ema", "raw" or "both"
    optim: TrainConfig = TrainConfig()

    def __post_init__(self) -> None:
        if not self.data:
            raise SettingsError("data: no pictures named")
        for name, low in (("steps", 1), ("batch_size", 1), ("save_every", 1), ("keep", 1), ("seed", 0),
                          ("sample_every", 0), ("sample_steps", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SettingsError(f"{name}: expected an integer >= {low}, got {value!r}")
        if self.export not in EXPORTS:
            raise SettingsError(f"export: expected one of {', '.join(EXPORTS)}, got {self.export!r}")

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["data"] = list(self.data)
        out["size"] = None if self.size is None else list(self.size)
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "RunSettings":
        return cls(**{**raw, "data": tuple(raw["data"]), "size": None if raw["size"] is None else tuple(raw["size"]),
                      "optim": TrainConfig(**raw["optim"])})


SAMPLE_PICTURES = 2  # validation pictures in each grid
SAMPLE_VARIATIONS = 3  # variations of each


def _sample_pictures(sources: tuple[str, ...], count: int) -> list[Image.Image]:
    """The first ``count`` usable pictures of the data, decoded (they are fixed for the whole run)."""
    files, _ = collect_inputs(sources)
    found = []
    for f in files:
        try:
            found.append(decode_image(read_input(f.path)[0]).convert("RGB"))
        except InputError:
            continue
        if len(found) == count:
            break
    return found


def _write_grid(pipe: Any, params: dict[str, Any], pictures: list[Image.Image], size: tuple[int, int],
                steps: int, seed: int, path: Path) -> None:
    """One row per picture: the picture (resized to ``size``), then its variations with ``params``."""
    out = pipe.generate(pictures, params, seed=seed, num_images_per_prompt=SAMPLE_VARIATIONS,
                        num_inference_steps=steps, height=size[0], width=size[1],
                        devices=jax.local_devices()[:1]).images  # [N*k, H, W, 3]
    h, w = size
    grid = np.zeros((len(pictures) * h, (SAMPLE_VARIATIONS + 1) * w, 3), np.uint8)
    for i, picture in enumerate(pictures):
        grid[i * h:(i + 1) * h, :w] = np.asarray(picture.resize((w, h), Image.Resampling.BICUBIC))
        for j in range(SAMPLE_VARIATIONS):
            grid[i * h:(i + 1) * h, (j + 1) * w:(j + 2) * w] = np.round(out[i * SAMPLE_VARIATIONS + j] * 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, path)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the metric lines of steps up to ``last_step``: a killed run may have logged steps it did not save."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def train(settings: RunSettings | None, run: str | os.PathLike, *, resume: bool = False, steps: int | None = None,
          log: Callable[[str], None] = print,
          progress: Callable[[dict[str, Any], int], None] | None = None) -> Path:
    """Train as ``settings`` say into the folder ``run``; with ``resume``, continue the run saved there.

    Returns the folder. A new run refuses a folder that already holds a run; a resumed one
    takes its settings from the folder (``settings`` must then be None) and continues from the
    latest checkpoint, bit-identical on CPU to a run that was never stopped; ``steps`` there
    extends (never shortens) the recorded number of steps. ``progress(line, steps)`` is called after
    every step with its metrics line (as RUN/metrics.jsonl has it) and the run's number of steps;
    without it each step is one ``log`` line.
    """
    from ..pipeline import ImageVariationPipeline

    folder = Path(run).absolute()
    recorded = folder / SETTINGS_FILE
    if resume:
        if settings is not None:
            raise ValueError("settings: a resumed run uses the settings it recorded; pass None")
        if not recorded.is_file():
            raise FileNotFoundError(f"{folder}: no training run to resume ({SETTINGS_FILE} is missing)")
        settings = RunSettings.from_json(json.loads(recorded.read_text()))
        if steps is not None:
            if steps < settings.steps:
                raise SettingsError(f"steps: the run was started for {settings.steps}; a resume may extend it, "
                                    f"not shorten it to {steps}")
            settings = dataclasses.replace(settings, steps=steps)
    elif settings is None:
        raise ValueError("settings: needed for a new run")
    elif recorded.exists():
        raise FileExistsError(f"{folder}: already holds a training run; pass --resume to continue it")

    # Every process has checked the folder before any of them writes to it.
    distributed.barrier("train-checked")
    main = jax.process_index() == 0
    placement = Placement.of(None)
    if settings.batch_size % len(placement):
        raise SettingsError(f"batch_size: {settings.batch_size} does not split over {len(placement)} devices")
    pipe, params = ImageVariationPipeline.from_pretrained(settings.model, safety_checker=False, dtype="float32")
    size = pipe.size(*(settings.size or (None, None)))
    compute = settings.dtype or default_dtype(placement.platform)
    unet = UNet2DConditionModel(pipe.unet.config, dtype=compute, platform=placement.platform)
    schedule = NoiseSchedule.from_config(pipe.scheduler_config or {})
    optimizer = make_optimizer(settings.optim, params["unet"])

    folder.mkdir(parents=True, exist_ok=True)
    encoded, misses = precompute(pipe, params, settings.data, size=size, seed=settings.seed,
                                 cache=folder / "encoded.npz", model_id=settings.model)
    for what, reason in misses:
        log(f"skipped {what}: {reason}")
    log(f"{len(encoded.latents)} pictures, {settings.batch_size} per step on {len(placement)} devices")

    data = iter(loader(encoded, batch_size=settings.batch_size, seed=settings.seed))
    # Recorded once the run can start: a run refused above leaves no settings behind, so the same
    # command can be run again once its cause is fixed (the encoded cache it wrote is reused).
    if main and (not resume or steps is not None):
        tmp = recorded.with_name(recorded.name + ".tmp")
        tmp.write_text(json.dumps(settings.to_json(), indent=1) + "\n")
        os.replace(tmp, recorded)
    checkpoints = RunCheckpoints(folder / "checkpoints", save_every=settings.save_every, keep=settings.keep)
    samples = _sample_pictures(settings.data, SAMPLE_PICTURES) if settings.sample_every else []
    state = init_state(params["unet"], optimizer, settings.optim, settings.seed)
    if resume and checkpoints.latest_step() is not None:
        state, extra = checkpoints.restore(state)
        data.set_state(extra["data"].encode())
        log(f"resumed at step {int(state.step)}")
    if main:
        _truncate_metrics(folder / METRICS_FILE, int(state.step))
    state = placement.whole(state)
    # The state is donated: checkpoints and sample grids copy it to the host before the next step replaces it.
    step_fn = jax.jit(lambda s, b: train_step(unet, schedule, optimizer, s, b), donate_argnums=0)
    rate = learning_rate(settings.optim)
    index = np.arange(settings.batch_size, dtype=np.int32)
    with open(folder / METRICS_FILE, "a") if main else contextlib.nullcontext() as metrics_file:
        while int(state.step) < settings.steps:
            start = time.perf_counter()
            records = next(data)  # the global batch; split reads this process's rows of it
            batch = Batch(placement.split(records["latents"]), placement.split(records["embeds"]),
                          placement.split(index))
            step = int(state.step)
            state, metrics = step_fn(state, batch)
            line = {"step": step + 1, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                    "lr": float(rate(step // settings.optim.accumulate)), "seconds": time.perf_counter() - start}
            if main:
                metrics_file.write(json.dumps(line) + "\n")
                metrics_file.flush()
                if progress is not None:
                    progress(line, settings.steps)
                else:
                    log(f"step {line['step']}/{settings.steps} loss {line['loss']:.4f}")
            checkpoints.save(step + 1, state, {"data": data.get_state().decode(), "step": step + 1},
                             force=step + 1 == settings.steps)
            if settings.sample_every and (step + 1) % settings.sample_every == 0 and main:
                ema = jax.tree.map(np.asarray, state.ema)
                _write_grid(pipe, {**params, "unet": ema}, samples, size, settings.sample_steps, settings.seed,
                            folder / "samples" / f"step-{step + 1:06d}.png")
    checkpoints.wait()
    checkpoints.close()
    if main:
        trees = {"ema": {"-ema": state.ema}, "raw": {"": state.params},
                 "both": {"-ema": state.ema, "": state.params}}[settings.export]
        export_unets(settings.model, {k: jax.tree.map(np.asarray, t) for k, t in trees.items()},
                     export_folder(folder, int(state.step)), log=log)
    # The job ends together: JAX's shutdown barrier would time out on a process 0 still exporting.
    distributed.barrier("train-exported")
    return folder

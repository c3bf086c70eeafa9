"""The batch run: plan each input against what is on disk, prepare inputs ahead, sample, write behind.

Three threads share the work. A reader thread reads each input once (hashing the same bytes),
checks its outputs, and decodes and preprocesses the inputs that still need something, at most
one batch ahead of the devices. The main thread runs one program call per batch. A writer
thread encodes and writes the PNGs, manifest lines and grids of the batch before.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from .. import hub
from ..parallel import Placement
from ..pipeline import ImageVariationPipeline
from ..preprocessing import to_pil, to_rgb
from ..settings import GenerationSettings, SettingsError
from . import outputs
from .inputs import GRID, InputError, InputFile, collect_inputs, decode_image, read_input


@dataclass
class RunSummary:
    """What a run did. ``done``/``skipped`` count variation PNGs; ``failures`` are ``(input, reason)``."""

    done: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"done {self.done}, skipped {self.skipped} (already complete), failed {len(self.failures)}, "
                f"{self.images_per_second:.2f} images/s")


@dataclass
class _Work:
    """One input that still needs something: the variations to generate and/or its grid, with what they need."""

    item: InputFile
    sha256: str
    missing: list[int]
    grid: bool
    pixel_values: np.ndarray | None = None  # [1, 3, S, S] when variations are missing
    thumbnail: Image.Image | None = None  # the input at the output size, for the grid


@dataclass
class _Batch:
    """What the reader found for a run of inputs: outputs already done, failures, and the inputs to work on."""

    works: list[_Work] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # manifest records of finished outputs
    failures: list[tuple[str, str]] = field(default_factory=list)
    dropped: int = 0  # pictures that will not be generated (already done, or their input failed)

    @property
    def sampled(self) -> list[_Work]:
        return [w for w in self.works if w.missing]


class _Runner:
    def __init__(self, out: Path, settings: GenerationSettings, report: Callable[[str], None], progress: bool,
                 devices: Sequence[jax.Device] | None):
        self.out = out
        self.settings = settings
        self.report = report
        self.progress = progress
        self.devices = list(Placement.of(devices).devices)
        self.summary = RunSummary()
        self.records: dict[str, dict[str, Any]] = {}
        self.bar: tqdm | None = None  # set while generating

    def fail(self, display: str, reason: str) -> None:
        self.summary.failures.append((display, reason))
        self.report(f"{display}: {reason}")

    # -- reader thread ---------------------------------------------------

    def plan(self, item: InputFile, pipe: ImageVariationPipeline, resolved: GenerationSettings,
             batch: _Batch) -> _Work | None:
        """Read ``item`` once, check its outputs, and decode and preprocess it if anything is left to write."""
        k = resolved.num_images_per_prompt
        height, width = resolved.size
        try:
            data, sha = read_input(item.path)
        except InputError as e:
            batch.failures.append((item.display, str(e)))
            batch.dropped += k
            return None
        folder = self.out / item.name
        missing = []
        for j in range(k):
            found = outputs.read_png_text(folder / f"{j}.png", (width, height))
            if outputs.is_current(found, resolved, sha, outputs.picture_index(item, j, k)):
                batch.skipped.append(outputs.record(item, sha, j, resolved, outputs.nsfw_flag(found.get("nsfw"))))
                batch.dropped += 1
            else:
                missing.append(j)
        grid = resolved.grid and not outputs.is_current(
            outputs.read_png_text(folder / GRID, outputs.sheet_size(k + 1, (width, height))), resolved, sha,
            outputs.grid_index(item, k))
        if not missing and not grid:
            return None
        work = _Work(item, sha, missing, grid)
        try:
            picture = decode_image(data)
            del data  # the decoded picture is all that is needed from here on
            try:
                rgb = to_rgb(picture, name=item.display)
                if missing:
                    work.pixel_values = pipe.prepare_inputs([rgb], resolved.preprocessing)
            except (ValueError, OSError) as e:
                raise InputError(str(e).removeprefix(f"{item.display}: ")) from None
        except InputError as e:
            batch.failures.append((item.display, str(e)))
            batch.dropped += len(missing)
            return None
        if grid:
            work.thumbnail = rgb.resize((width, height), Image.Resampling.BICUBIC)
        return work

    def batches(self, items: list[InputFile], pipe: ImageVariationPipeline, resolved: GenerationSettings,
                ) -> Iterator[_Batch]:
        """Batches of at most ``len(devices) * batch_size`` inputs to sample (the last may be short), or of
        inputs that only need their grid; each also carries the finished outputs and failures met on the way."""
        per_call = len(self.devices) * resolved.batch_size
        found = _Batch()  # finished outputs and failures since the last batch
        sampled: list[_Work] = []
        grid_only: list[_Work] = []

        def take(works: list[_Work]) -> _Batch:
            nonlocal found
            batch, found = found, _Batch()
            batch.works = works
            return batch

        for item in items:
            work = self.plan(item, pipe, resolved, found)
            if work is None:
                continue
            (sampled if work.missing else grid_only).append(work)
            if len(sampled) == per_call:
                yield take(sampled + grid_only)
                sampled, grid_only = [], []
            elif len(grid_only) == per_call:  # a grid-only batch: nothing to sample, thumbnails bounded
                yield take(grid_only)
                grid_only = []
        if sampled or grid_only or found.skipped or found.failures:
            yield take(sampled + grid_only)

    # -- main thread -----------------------------------------------------

    def absorb(self, batch: _Batch) -> None:
        """Account for what the reader found: failures reported, finished outputs counted and recorded."""
        for display, reason in batch.failures:
            self.fail(display, reason)
        for entry in batch.skipped:
            self.records[entry["path"]] = entry
        self.summary.skipped += len(batch.skipped)
        if batch.dropped:
            self.bar.total -= batch.dropped
            self.bar.refresh()

    def sample(self, works: list[_Work], pipe: ImageVariationPipeline, params: dict[str, Any],
               resolved: GenerationSettings) -> tuple[np.ndarray, list[bool] | None]:
        """One program call for ``works``' pictures, padded to the same picture count every call (one compile)."""
        s = resolved
        k = s.num_images_per_prompt
        height, width = s.size
        result = pipe.generate(
            np.concatenate([w.pixel_values for w in works]), params, s.seed, num_images_per_prompt=k,
            first_index=[outputs.picture_index(w.item, 0, k) for w in works], devices=self.devices,
            slots=len(self.devices) * s.batch_size * k, num_inference_steps=s.steps, guidance_scale=s.guidance,
            height=height, width=width, eta=s.eta, preprocessing=s.preprocessing)
        return result.images, result.nsfw_content_detected

    # -- writer thread ---------------------------------------------------

    def write(self, batch: _Batch, images: np.ndarray | None, flags: list[bool] | None,
              resolved: GenerationSettings) -> None:
        """Each missing variation as a PNG, then its manifest line; then the input's grid from the same pictures."""
        k = resolved.num_images_per_prompt
        height, width = resolved.size
        r = 0  # the work's place among the sampled ones
        for work in batch.works:
            item = work.item
            folder = self.out / item.name
            fresh: dict[int, Image.Image] = {}
            if work.missing:
                for j in work.missing:
                    n = r * k + j
                    nsfw = None if flags is None else flags[n]
                    (picture,) = to_pil(images[n])
                    outputs.write_png(folder / f"{j}.png", picture,
                                      outputs.output_text(resolved, work.sha256, outputs.picture_index(item, j, k),
                                                          nsfw))
                    entry = outputs.record(item, work.sha256, j, resolved, nsfw)
                    outputs.append_record(self.out, entry)
                    self.records[entry["path"]] = entry
                    self.summary.done += 1
                    self.bar.update(1)
                    fresh[j] = picture
                r += 1
            if work.grid:
                tiles = [work.thumbnail] + [fresh[j] if j in fresh else _read_rgb(folder / f"{j}.png")
                                            for j in range(k)]
                outputs.write_png(folder / GRID, outputs.contact_sheet(tiles, (width, height)),
                                  outputs.output_text(resolved, work.sha256, outputs.grid_index(item, k), grid=True))
            work.pixel_values = work.thumbnail = None

    # -- the run ---------------------------------------------------------

    def generate(self, items: list[InputFile], pipe: ImageVariationPipeline, params: dict[str, Any],
                 resolved: GenerationSettings) -> None:
        self.bar = tqdm(total=len(items) * resolved.num_images_per_prompt, unit="img", desc="generating",
                        disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        # The reader prepares batch b+1 while the devices compute batch b, and the writer writes batch b-1.
        # At most one batch waits on either side; leaving the block lets their work finish.
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="imvar-jax-writer") as writer, \
                    ThreadPoolExecutor(max_workers=1, thread_name_prefix="imvar-jax-reader") as reader:
                batches = self.batches(items, pipe, resolved)
                ahead: Future[_Batch | None] = reader.submit(next, batches, None)
                pending: Future[None] | None = None
                while (batch := ahead.result()) is not None:
                    ahead = reader.submit(next, batches, None)
                    self.absorb(batch)
                    sampled = batch.sampled
                    images, flags = self.sample(sampled, pipe, params, resolved) if sampled else (None, None)
                    if pending is not None:
                        pending.result()
                    pending = writer.submit(self.write, batch, images, flags, resolved)
                if pending is not None:
                    pending.result()
        finally:
            self.bar.close()

    def run(self, items: list[InputFile]) -> RunSummary:
        s = self.settings
        # Loaded straight onto every device: one copy of the weights per device, none left behind on the first.
        pipe, params = ImageVariationPipeline.from_pretrained(
            s.model, revision=s.revision, scheduler=s.scheduler, dtype=s.dtype, vae_dtype=s.vae_dtype,
            attention=s.attention, safety_checker=s.safety_checker, devices=self.devices)
        resolved = pipe.resolve(s, hub.recorded_revision(s.model, s.revision))
        start = time.perf_counter()
        self.generate(items, pipe, params, resolved)
        self.summary.seconds = time.perf_counter() - start
        outputs.rewrite_manifest(self.out, self.records)
        return self.summary


def _read_rgb(path: Path) -> Image.Image:
    """A variation written by an earlier run, for a grid."""
    with Image.open(path) as image:
        return image.convert("RGB")


def _report_stderr(line: str) -> None:
    tqdm.write(line, file=sys.stderr)


def run_generate(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, settings: GenerationSettings, *,
                 report: Callable[[str], None] | None = None, progress: bool | None = None,
                 devices: Sequence[jax.Device] | None = None) -> RunSummary:
    """Generate ``settings.num_images_per_prompt`` variations of every input into ``out``; see ``imvar_jax.batch``.

    ``inputs``: files, folders and glob patterns (``collect_inputs``). Inputs that cannot be used
    are reported through ``report`` (default: a line on stderr) as ``"<input>: <reason>"``, listed in
    the summary's ``failures`` and skipped. ``progress``: show a progress bar (default: when stderr is
    a terminal). ``devices``: where to run (default every local device); each program call takes
    ``len(devices) * settings.batch_size`` inputs, padded to the same picture count every time, so
    the run compiles once. Raises SettingsError for settings that do not fit the loaded model (such
    as ``size``); the model's own load errors propagate.
    """
    if not isinstance(settings, GenerationSettings):
        raise TypeError(f"settings: expected a GenerationSettings, got {type(settings).__name__}")
    out_dir = Path(os.path.abspath(os.path.expanduser(os.fspath(out))))
    if out_dir.exists() and not out_dir.is_dir():
        raise SettingsError(f"out: {out_dir} exists and is not a folder")
    runner = _Runner(out_dir, settings, report or _report_stderr,
                     sys.stderr.isatty() if progress is None else progress, devices)
    items, misses = collect_inputs(inputs, exclude=out_dir)
    for spec, reason in misses:
        runner.fail(spec, reason)
    if not items:
        return runner.summary
    return runner.run(items)

"""The batch run: plan each input against what is on disk, prepare inputs ahead, sample, write behind.

Three threads share the work. A reader thread reads each input once (hashing the same bytes),
checks its outputs, and decodes and preprocesses the inputs that still need something, at most
one batch ahead of the devices. The main thread runs one program call per batch. A writer
thread encodes and writes the PNGs, manifest lines and grids of the batch before.
"""

from __future__ import annotations

import contextlib
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
from ..errors import NonFiniteError
from ..memory import GIB, InsufficientMemoryError
from ..parallel import Placement
from ..pipeline import ImageVariationPipeline
from ..preprocessing import to_pil, to_rgb
from ..settings import GenerationSettings, SettingsError
from . import outputs
from .inputs import GRID, InputError, InputFile, collect_inputs, decode_image, printable, read_input
from .outputs import OutFolder, OutputError


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
    def __init__(self, out: Path, settings: GenerationSettings, report: Callable[[str], None],
                 note: Callable[[str], None], progress: bool, devices: Sequence[jax.Device] | None):
        self.out = out
        self.folder: OutFolder | None = None  # set once the output folder is opened
        self.settings = settings
        self.report = report
        self.note = note
        self.progress = progress
        self.devices = list(Placement.of(devices).devices)
        self.summary = RunSummary()
        self.records: dict[str, dict[str, Any]] = {}
        self.bar: tqdm | None = None  # set while generating

    def open_folder(self) -> None:
        self.folder = OutFolder.open(self.out)
        if self.folder.removed_temporary:
            self.note(f"removed {self.folder.removed_temporary} temporary file(s) left by an interrupted run "
                      f"in {printable(str(self.out))}")

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
        folder = self.folder.path / item.name
        missing = []
        done = 0
        try:
            if os.path.lexists(folder) and (os.path.islink(folder) or not folder.is_dir()):
                raise InputError(f"its output folder {printable(str(folder))} is a file or a link; move it away")
            for j in range(k):
                path = folder / f"{j}.png"
                found = outputs.read_png_text(path, (width, height))
                if outputs.is_current(found, resolved, sha, outputs.picture_index(item, j, k)):
                    batch.skipped.append(outputs.record(item, sha, j, resolved,
                                                        outputs.nsfw_flag(found.get("nsfw"))))
                    done += 1
                else:
                    _check_replaceable(path)
                    missing.append(j)
            grid_path = folder / GRID
            grid = resolved.grid and not outputs.is_current(
                outputs.read_png_text(grid_path, outputs.sheet_size(k + 1, (width, height))), resolved, sha,
                outputs.grid_index(item, k))
            if grid:
                _check_replaceable(grid_path)
        except InputError as e:
            batch.failures.append((item.display, str(e)))
            batch.dropped += k
            return None
        batch.dropped += done
        if not missing and not grid:
            return None
        work = _Work(item, sha, missing, grid)
        try:
            picture = decode_image(data)
            del data  # the decoded picture is all that is needed from here on
            rgb = to_rgb(picture, name=item.display)
            if missing:
                work.pixel_values = pipe.prepare_inputs([rgb], resolved.preprocessing)
            if grid:
                work.thumbnail = rgb.resize((width, height), Image.Resampling.BICUBIC)
        except InputError as e:
            batch.failures.append((item.display, str(e)))
            batch.dropped += len(missing)
            return None
        except Exception as e:  # EXIF, ICC and plugin code can raise anything on hostile bytes: this input fails
            reason = printable(str(e).removeprefix(f"{item.display}: ")) or type(e).__name__
            batch.failures.append((item.display, f"cannot use this picture ({reason})"))
            batch.dropped += len(missing)
            return None
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
               resolved: GenerationSettings) -> tuple[np.ndarray, list[bool] | None, dict[int, str]]:
        """One program call for ``works``' pictures, padded to the same picture count every call (one compile).

        Also returns the pictures (by global index) that went non-finite, with where: those are not written.
        """
        s = resolved
        k = s.num_images_per_prompt
        height, width = s.size
        try:
            result = pipe.generate(
                np.concatenate([w.pixel_values for w in works]), params, s.seed, num_images_per_prompt=k,
                first_index=[outputs.picture_index(w.item, 0, k) for w in works], devices=self.devices,
                slots=len(self.devices) * s.batch_size * k, num_inference_steps=s.steps, guidance_scale=s.guidance,
                height=height, width=width, eta=s.eta, preprocessing=s.preprocessing)
            bad: dict[int, str] = {}
        except NonFiniteError as e:
            result, bad = e.output, dict(e.pictures)
        except InsufficientMemoryError as e:
            if e.fits == 0:
                raise  # not even one picture per device: the pipeline's message names the size
            # The pipeline speaks of slots; a run is laid out by --batch-size and --num-per-image.
            raise SettingsError(f"batch_size: {s.batch_size} input(s) x {k} picture(s) per device at {height}x{width} "
                                f"need {e.needed / GIB:.1f} GiB per device, {e.available / GIB:.1f} GiB free; at "
                                f"most {e.fits} picture(s) per device fit: lower --batch-size or --num-per-image"
                                ) from None
        return result.images, result.nsfw_content_detected, bad

    # -- writer thread ---------------------------------------------------

    def write(self, batch: _Batch, images: np.ndarray | None, flags: list[bool] | None, bad: dict[int, str],
              resolved: GenerationSettings) -> None:
        """Each missing variation as a PNG, then its manifest line; then the input's grid from the same pictures.

        An input whose pictures went non-finite, or whose folder cannot be written, fails alone.
        """
        k = resolved.num_images_per_prompt
        height, width = resolved.size
        r = 0  # the work's place among the sampled ones
        for work in batch.works:
            item = work.item
            fresh: dict[int, Image.Image] = {}
            try:
                nonfinite = [f"picture {n}: {bad[n]}" for n in
                             (outputs.picture_index(item, j, k) for j in work.missing) if n in bad]
                if nonfinite:
                    raise InputError(f"sampling produced non-finite values, not written ({'; '.join(nonfinite)})")
                folder = self.folder.folder(item.name)
                for j in work.missing:
                    n = r * k + j
                    nsfw = None if flags is None else flags[n]
                    (picture,) = to_pil(images[n])
                    outputs.write_png(folder / f"{j}.png", picture,
                                      outputs.output_text(resolved, work.sha256, outputs.picture_index(item, j, k),
                                                          nsfw))
                    entry = outputs.record(item, work.sha256, j, resolved, nsfw)
                    outputs.append_record(self.folder.path, entry)
                    self.records[entry["path"]] = entry
                    self.summary.done += 1
                    self.bar.update(1)
                    fresh[j] = picture
                if work.grid:
                    tiles = [work.thumbnail] + [fresh[j] if j in fresh else _read_rgb(folder / f"{j}.png")
                                                for j in range(k)]
                    outputs.write_png(folder / GRID, outputs.contact_sheet(tiles, (width, height)),
                                      outputs.output_text(resolved, work.sha256, outputs.grid_index(item, k),
                                                          grid=True))
            except (InputError, OutputError) as e:
                self.fail(item.display, str(e))
            finally:
                r += 1 if work.missing else 0
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
                    images, flags, bad = self.sample(sampled, pipe, params, resolved) if sampled else (None, None, {})
                    if pending is not None:
                        pending.result()
                    pending = writer.submit(self.write, batch, images, flags, bad, resolved)
                if pending is not None:
                    pending.result()
        finally:
            self.bar.close()

    def run(self, items: list[InputFile], start_over: bool) -> RunSummary:
        s = self.settings
        # Loaded straight onto every device: one copy of the weights per device, none left behind on the first.
        pipe, params = ImageVariationPipeline.from_pretrained(
            s.model, revision=s.revision, scheduler=s.scheduler, dtype=s.dtype, vae_dtype=s.vae_dtype,
            attention=s.attention, safety_checker=s.safety_checker, devices=self.devices)
        resolved = pipe.resolve(s, hub.recorded_revision(s.model, s.revision))
        if self.folder is None:
            self.open_folder()
        if start_over:
            removed = self.folder.start_over()
            if removed:
                self.note(f"--start-over: removed {removed} earlier output(s) from {printable(str(self.out))}")
        elif (conflict := self.folder.conflicts(resolved, resolved=True)) is not None:
            raise OutputError(conflict)
        start = time.perf_counter()
        try:
            self.generate(items, pipe, params, resolved)
        finally:
            # Even when the run stops early, the manifest ends up describing exactly the files present.
            earlier = {rel: text for rel, text in self.folder.outputs.items() if Path(rel).name != GRID}
            outputs.rewrite_manifest(self.folder.path, self.records, earlier)
        self.summary.seconds = time.perf_counter() - start
        return self.summary


def _check_replaceable(path: Path) -> None:
    """InputError unless ``path`` is absent or an imvar-jax output (complete or not): never replace a stranger's
    file, or write through a link."""
    if os.path.lexists(path) and outputs.png_chunks(path) is None:
        raise InputError(f"{printable(str(path))} exists and was not written by imvar-jax; not overwritten "
                         f"(move it away, or choose another --out)")


def _read_rgb(path: Path) -> Image.Image:
    """A variation written by an earlier run, for a grid."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as e:
        raise InputError(f"cannot read {printable(str(path))} for the grid ({e})") from None


def _report_stderr(line: str) -> None:
    tqdm.write(line, file=sys.stderr)


def run_generate(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, settings: GenerationSettings, *,
                 report: Callable[[str], None] | None = None, note: Callable[[str], None] | None = None,
                 progress: bool | None = None, devices: Sequence[jax.Device] | None = None,
                 start_over: bool = False) -> RunSummary:
    """Generate ``settings.num_images_per_prompt`` variations of every input into ``out``; see ``imvar_jax.batch``.

    ``inputs``: files, folders and glob patterns (``collect_inputs``). Inputs that cannot be used
    are reported through ``report`` (default: a line on stderr) as ``"<input>: <reason>"``, listed in
    the summary's ``failures`` and skipped; ``note`` (default stderr) gets what the run cleaned up.
    ``progress``: show a progress bar (default: when stderr is a terminal). ``devices``: where to
    run (default every local device); each program call takes ``len(devices) * settings.batch_size``
    inputs, padded to the same picture count every time, so the run compiles once.

    ``out`` is locked for the run. If it holds imvar-jax outputs made with other settings, the run
    refuses (OutputError naming the settings) unless ``start_over``, which first deletes every
    earlier imvar-jax output and the manifest there (another program's files are never touched).
    Raises SettingsError for settings that do not fit the loaded model (such as ``size``),
    OutputError when ``out`` cannot be used; the model's own load errors propagate.
    """
    if not isinstance(settings, GenerationSettings):
        raise TypeError(f"settings: expected a GenerationSettings, got {type(settings).__name__}")
    out_dir = Path(os.path.abspath(os.path.expanduser(os.fspath(out))))
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        raise OutputError(f"out: {printable(str(out_dir))} exists and is not a folder")
    runner = _Runner(out_dir, settings, report or _report_stderr, note or _report_stderr,
                     sys.stderr.isatty() if progress is None else progress, devices)
    items, misses = collect_inputs(inputs, exclude=out_dir)
    for spec, reason in misses:
        runner.fail(spec, reason)
    if not items:
        return runner.summary
    # An existing OUT is locked and checked before the model loads; a new one is made only once the
    # model has loaded, so a run that fails before producing anything leaves nothing behind.
    created = not os.path.lexists(out_dir)
    try:
        if out_dir.exists():
            runner.open_folder()
            if not start_over and (conflict := runner.folder.conflicts(settings, resolved=False)) is not None:
                raise OutputError(conflict)
        else:
            outputs.check_creatable(out_dir)
        return runner.run(items, start_over)
    finally:
        if runner.folder is not None:
            runner.folder.close()
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only if this run made it and wrote nothing into it

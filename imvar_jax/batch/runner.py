"""The batch run: plan each input against what is on disk, prepare inputs ahead, sample, write behind.

Three threads share the work. A reader thread reads each input once (hashing the same bytes),
checks its outputs, and decodes and preprocesses the inputs that still need something, at most
one batch ahead of the devices. The main thread runs one program call per batch. A writer
thread encodes and writes the PNGs, manifest lines and grids of the batch before.

A job over several processes (``imvar_jax.distributed``) runs the same command in every process
over the same inputs and one shared OUT. The inputs are planned a chunk at a time, each process
reading its share, and the plans are exchanged, so every process forms the same batches and makes
the same program calls over the devices of all of them. An input's pictures all lie on one device
(a call holds ``batch_size`` inputs per device), so each process prepares only the inputs its own
devices vary and writes their pictures and grids. Process 0 alone locks OUT, clears it and checks
it against the settings; each process appends its manifest lines to its own part file, and
process 0 merges them into the manifest once every process has written.

An input ending ``.npy`` is a CLIP image embedding; a program call holds either pictures or
embeddings, so the two kinds form their own batches. A negative picture (or embedding) is every
input's unconditional half; below strength 1 each picture input starts from its own picture, so
the decoded pictures are kept until their call (and an embedding input, having none, fails).
"""

from __future__ import annotations

import hashlib
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

from .. import distributed, hub
from ..errors import NonFiniteError
from ..memory import GIB, InsufficientMemoryError
from ..parallel import Placement
from ..pipeline import ImageVariationPipeline
from ..preprocessing import to_pil, to_rgb
from ..settings import GenerationSettings, SettingsError
from . import outputs
from .inputs import (GRID, InputError, InputFile, Source, check_embedding_size, collect_inputs, decode_embedding,
                     decode_image, is_embedding, printable, read_input, read_source)
from .outputs import manifest_part
from .outputs import OutFolder, OutputError

# An img2img start for rows another process's devices run: never prepared here, it only fills the list.
_ELSEWHERE = Image.new("RGB", (1, 1))


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
    pixel_values: np.ndarray | None = None  # [1, 3, S, S] when variations of a picture are missing
    embedding: np.ndarray | None = None  # [1, D] when variations of an embedding are missing
    init_picture: Image.Image | None = None  # the decoded picture, when variations start from it (strength < 1)
    thumbnail: Image.Image | None = None  # the input at the output size, for the grid
    prepared: bool = False  # whether this process read and prepared it (another process may have planned it)
    failed: bool = False  # it could not be prepared here: this process writes none of its pictures

    @property
    def embedded(self) -> bool:
        """Whether the input is an embedding (told by its name, so every process of a job agrees)."""
        return is_embedding(self.item.path)

    def release(self) -> None:
        self.pixel_values = self.embedding = self.init_picture = self.thumbnail = None


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
                 note: Callable[[str], None], progress: bool | None, devices: Sequence[jax.Device] | None,
                 negative: Source | None = None):
        self.out = out
        self.negative = negative
        self.negative_sha = None if negative is None else negative.sha256
        self.negative_embeds: np.ndarray | None = None  # a negative picture's embedding, for embedding batches
        self.folder: OutFolder | None = None  # set once the output folder is opened
        self.settings = settings
        self.report = report
        self.note = note
        self.job = distributed.current()
        # None: a bar on a terminal, else a line per finished call (a log file still shows the run moving).
        self.progress = bool(progress) and self.job.is_main
        self.progress_lines = progress is None and self.job.is_main
        self.started = time.monotonic()
        self.pictures_done = 0  # this run's, for the progress lines (a disabled bar counts nothing)
        self.placement = Placement.of(devices)
        self.devices = list(self.placement.devices)
        self.summary = RunSummary()
        self.records: dict[str, dict[str, Any]] = {}
        self.bar: tqdm | None = None  # set while generating

    def open_folder(self) -> None:
        """Process 0 opens (creates, locks, clears, surveys) OUT; the others use it once process 0 is done."""
        self.folder = OutFolder.open(self.out, lock=self.job.is_main)
        if self.folder.removed_temporary:
            self.note(f"removed {self.folder.removed_temporary} temporary file(s) left by an interrupted run "
                      f"in {printable(str(self.out))}")

    def main_first(self, name: str, step: Callable[[], None]) -> None:
        """``step`` on process 0, then on the others (a single process: just ``step``). An OutputError on
        process 0 is raised on every process, with its message."""
        if not self.job.is_multiprocess:
            step()
            return
        error = None
        if self.job.is_main:
            try:
                step()
            except OutputError as e:
                error = str(e)
        error = distributed.agree(name, error)
        if error is not None:
            raise OutputError(error)
        if not self.job.is_main:
            step()

    def fail(self, display: str, reason: str) -> None:
        self.summary.failures.append((display, reason))
        self.report(f"{display}: {reason}")

    # -- reader thread ---------------------------------------------------

    def plan(self, item: InputFile, pipe: ImageVariationPipeline, resolved: GenerationSettings,
             batch: _Batch) -> _Work | None:
        """Read ``item`` once, check its outputs, and decode and preprocess it if anything is left to write."""
        k = resolved.num_images_per_prompt
        height, width = resolved.size
        if is_embedding(item.path) and resolved.strength < 1:
            batch.failures.append((item.display, "an embedding (.npy) has no picture to start from: --strength "
                                                 "below 1 needs picture inputs"))
            batch.dropped += k
            return None
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
                if outputs.is_current(found, resolved, sha, outputs.picture_index(item, j, k), self.negative_sha):
                    batch.skipped.append(outputs.record(item, sha, j, resolved, outputs.nsfw_flag(found.get("nsfw")),
                                                        self.negative))
                    done += 1
                else:
                    _check_replaceable(path)
                    missing.append(j)
            grid_path = folder / GRID
            grid = resolved.grid and not outputs.is_current(
                outputs.read_png_text(grid_path, outputs.sheet_size(k + 1, (width, height))), resolved, sha,
                outputs.grid_index(item, k), self.negative_sha)
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
        reason = self.prepare(work, data, pipe, resolved, bool(missing), grid)
        if reason is not None:
            batch.failures.append((item.display, reason))
            batch.dropped += len(missing)
            return None
        return work

    def prepare(self, work: _Work, data: bytes | None, pipe: ImageVariationPipeline, resolved: GenerationSettings,
                pixels: bool, thumbnail: bool) -> str | None:
        """Decode ``work``'s input (``data``, else read again and checked against its hash) into its pixel values
        (an embedding input: its embedding), the picture img2img starts from, and/or its grid thumbnail; the
        reason it cannot be used, or None."""
        item = work.item
        try:
            if data is None:
                data, sha = read_input(item.path)
                if sha != work.sha256:
                    raise InputError("changed while this run was going on; run again")
            if work.embedded:
                embedding = decode_embedding(data)
                check_embedding_size(embedding, pipe.image_encoder.config.projection_dim)
                if pixels:
                    work.embedding = embedding
                if thumbnail:
                    work.thumbnail = Image.new("RGB", resolved.size[::-1], outputs.NO_PICTURE)
                work.prepared = True
                return None
            picture = decode_image(data)
            del data  # the decoded picture is all that is needed from here on
            rgb = to_rgb(picture, name=item.display)
            if pixels:
                work.pixel_values = pipe.prepare_inputs([rgb], resolved.preprocessing)
                if resolved.strength < 1:
                    work.init_picture = rgb
            if thumbnail:
                work.thumbnail = rgb.resize(resolved.size[::-1], Image.Resampling.BICUBIC)
        except InputError as e:
            return str(e)
        except Exception as e:  # EXIF, ICC and plugin code can raise anything on hostile bytes: this input fails
            reason = printable(str(e).removeprefix(f"{item.display}: ")) or type(e).__name__
            return f"cannot use this picture ({reason})"
        work.prepared = True
        return None

    def planned(self, items: list[InputFile], pipe: ImageVariationPipeline, resolved: GenerationSettings,
                found: _Batch) -> Iterator[_Work]:
        """The inputs that need something, in order. Several processes plan a chunk of inputs at a time, each its
        own share (read, hashed, checked, prepared there), and exchange what they found, so every process
        goes on with the same list; a work planned elsewhere carries no data here."""
        job = self.job
        if not job.is_multiprocess:
            for item in items:
                if (work := self.plan(item, pipe, resolved, found)) is not None:
                    yield work
            return
        chunk_size = len(self.devices) * resolved.batch_size
        for start in range(0, len(items), chunk_size):
            chunk = items[start:start + chunk_size]
            # Contiguous shares: with nothing done yet, the process that plans an input also makes its pictures.
            mine = [item for pos, item in enumerate(chunk) if pos * job.num_processes // len(chunk) == job.process_id]
            dropped_before = found.dropped
            works = {w.item.index: w for item in mine if (w := self.plan(item, pipe, resolved, found)) is not None}
            shared = distributed.gather(f"plan-{start}", {
                "works": [[w.item.index, w.sha256, w.missing, w.grid] for w in works.values()],
                "dropped": found.dropped - dropped_before})
            by_index = {item.index: item for item in chunk}
            found.dropped = dropped_before + sum(part["dropped"] for part in shared)  # the job's, for the bar
            for index, sha, missing, grid in sorted(w for part in shared for w in part["works"]):
                yield works.get(index) or _Work(by_index[index], sha, missing, grid)

    def batches(self, items: list[InputFile], pipe: ImageVariationPipeline, resolved: GenerationSettings,
                ) -> Iterator[_Batch]:
        """Batches of at most ``len(devices) * batch_size`` inputs to sample (the last may be short), all pictures
        or all embeddings, or of inputs that only need their grid; each also carries the finished outputs and
        failures met on the way."""
        per_call = len(self.devices) * resolved.batch_size
        found = _Batch()  # finished outputs and failures since the last batch
        waiting: dict[bool, list[_Work]] = {False: [], True: []}  # inputs to sample, by whether embedded
        grid_only: list[_Work] = []

        def take(works: list[_Work]) -> _Batch:
            # ``found`` stays one object, the one ``planned`` adds to; its contents move to the batch.
            batch = _Batch(works, found.skipped, found.failures, found.dropped)
            found.skipped, found.failures, found.dropped = [], [], 0
            self.localize(batch, pipe, resolved)
            return batch

        for work in self.planned(items, pipe, resolved, found):
            sampled = waiting[work.embedded]
            (sampled if work.missing else grid_only).append(work)
            if len(sampled) == per_call:
                yield take(sampled + grid_only)
                waiting[work.embedded], grid_only = [], []
            elif len(grid_only) == per_call:  # a grid-only batch: nothing to sample, thumbnails bounded
                yield take(grid_only)
                grid_only = []
        pictures, embeddings = waiting[False], waiting[True]
        if embeddings:
            yield take(embeddings)
        if pictures or grid_only or found.skipped or found.failures:
            yield take(pictures + grid_only)

    def is_local(self, r: int) -> bool:
        """Whether this process's devices vary the r-th sampled input of a call: device r // batch_size does."""
        device = self.devices[r // self.settings.batch_size]
        return device.process_index == self.job.process_id

    def localize(self, batch: _Batch, pipe: ImageVariationPipeline, resolved: GenerationSettings) -> None:
        """Make this process hold exactly what its devices need of ``batch``: works planned by another process
        are prepared here, those another process's devices vary are let go."""
        if not self.job.is_multiprocess:
            return
        for r, work in enumerate(batch.sampled):
            if not self.is_local(r):
                work.release()
            elif not work.prepared:
                reason = self.prepare(work, None, pipe, resolved, True, work.grid)
                if reason is not None:
                    work.failed = True
                    batch.failures.append((work.item.display, reason))

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
               resolved: GenerationSettings) -> tuple[dict[int, np.ndarray], dict[int, bool] | None, dict[int, str]]:
        """One program call for ``works``' pictures, padded to the same picture count every call (one compile).

        Returns this process's pictures and their safety flags by position ``r*k + j``, and the pictures (by
        global index) that went non-finite, with where: those are not written.
        """
        s = resolved
        k = s.num_images_per_prompt
        height, width = s.size
        options: dict[str, Any] = {}
        as_embeds, with_init, negative_arg = self.call_form(works[0].embedded, s)
        # Rows this process's devices do not use may hold anything: zeros for works prepared elsewhere.
        if works[0].embedded:
            pictures, embeds = None, self.embeddings(works, pipe, params, s)
        else:
            side = pipe.image_encoder.config.image_size
            pictures = np.concatenate([np.zeros((1, 3, side, side), np.float32) if w.pixel_values is None
                                       else w.pixel_values for w in works])
            embeds = None
            if as_embeds:
                pictures, embeds = None, self.embeddings(works, pipe, params, s, pictures)
            if with_init:
                options["init_image"] = [w.init_picture or _ELSEWHERE for w in works]
        if negative_arg == "negative_image":
            options[negative_arg] = self.negative.picture
        elif negative_arg is not None:
            options[negative_arg] = self.negative_embedding(pipe, params, s)
        try:
            result = pipe.generate(pictures, params, s.seed, first_index=[outputs.picture_index(w.item, 0, k)
                                                                          for w in works],
                                   image_embeds=embeds, **options, **self.call_settings(s))
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
        made = sum(len(w.missing) for w in works)
        self.bar.update(made)
        self.pictures_done += made
        if self.progress_lines:
            done, total = self.pictures_done, self.bar.total
            self.note(f"{done}/{total} pictures ({100 * done // max(total, 1)}%) after "
                      f"{time.monotonic() - self.started:.0f} s")
        # By position r*k + j among this call's pictures: this process's own (all of them in a single process).
        positions = range(len(result.images)) if result.pictures is None else result.pictures
        rows = {p: i for i, p in enumerate(positions)}
        images = {p: result.images[i] for p, i in rows.items()}
        flags = None if result.nsfw_content_detected is None else \
            {p: result.nsfw_content_detected[i] for p, i in rows.items()}
        return images, flags, bad

    def call_settings(self, s: GenerationSettings) -> dict[str, Any]:
        """``generate``'s arguments that every program call of the run shares: each pads to the same picture count,
        so one program serves them all."""
        height, width = s.size
        k = s.num_images_per_prompt
        return dict(num_images_per_prompt=k, devices=self.devices, slots=len(self.devices) * s.batch_size * k,
                    num_inference_steps=s.steps, guidance_scale=s.guidance, height=height, width=width, eta=s.eta,
                    preprocessing=s.preprocessing, mix_method=s.mix_method, strength=s.strength)

    def call_form(self, embedded: bool, s: GenerationSettings) -> tuple[bool, bool, str | None]:
        """How a call of embedding inputs (``embedded``) or picture inputs passes them to ``generate``: as
        embeddings or not, with starting pictures or not, and the negative's argument (None without one)."""
        negative = self.negative
        # A negative embedding goes only with embeddings: picture inputs then become theirs.
        as_embeds = embedded or (negative is not None and negative.embedding is not None)
        negative_arg = None if negative is None else "negative_image_embeds" if as_embeds else "negative_image"
        return as_embeds, not embedded and s.strength < 1, negative_arg

    def first_call(self, items: list[InputFile], pipe: ImageVariationPipeline,
                   s: GenerationSettings) -> dict[str, Any] | None:
        """The run's program call as ``from_pretrained(warm_up=...)`` takes it, zeros standing for the inputs: those
        of the kind most inputs are (pictures or embeddings; the other kind's program is made at its first
        call), in ``call_form``. None when no input of that kind can be sampled."""
        embedded = 2 * sum(is_embedding(item.path) for item in items) > len(items)
        if embedded and s.strength < 1:
            return None  # an embedding has no picture to start from: every such input fails
        as_embeds, with_init, negative_arg = self.call_form(embedded, s)
        dim, side = pipe.image_encoder.config.projection_dim, pipe.image_encoder.config.image_size
        call = self.call_settings(s)
        if as_embeds:
            call["image_embeds"] = np.zeros((1, dim), np.float32)
        else:
            call["images"] = np.zeros((1, 3, side, side), np.float32)
        if with_init:
            call["init_image"] = [_ELSEWHERE]
        if negative_arg is not None:
            call[negative_arg] = (self.negative.picture if negative_arg == "negative_image"
                                  else np.zeros((1, dim), np.float32))
        return call

    def embeddings(self, works: list[_Work], pipe: ImageVariationPipeline, params: dict[str, Any],
                   resolved: GenerationSettings, pixel_values: np.ndarray | None = None) -> np.ndarray:
        """The works' embeddings ``[len(works), D]``: embedding inputs' own, or those of ``pixel_values`` (rows of
        picture inputs); zeros for the rows prepared elsewhere."""
        embeds = np.zeros((len(works), pipe.image_encoder.config.projection_dim), np.float32)
        if pixel_values is None:
            for r, work in enumerate(works):
                if work.embedding is not None:
                    embeds[r] = work.embedding[0]
            return embeds
        rows = [r for r, work in enumerate(works) if work.pixel_values is not None]
        if rows:
            embeds[rows] = pipe.image_embeddings(pixel_values[rows], _local_encoder(params), resolved.preprocessing)
        return embeds

    def negative_embedding(self, pipe: ImageVariationPipeline, params: dict[str, Any],
                           resolved: GenerationSettings) -> np.ndarray:
        """The negative's embedding ``[1, D]`` (a picture's is computed once)."""
        if self.negative.embedding is not None:
            return self.negative.embedding
        if self.negative_embeds is None:
            self.negative_embeds = pipe.image_embeddings([self.negative.picture], _local_encoder(params),
                                                         resolved.preprocessing)
        return self.negative_embeds

    # -- writer thread ---------------------------------------------------

    def write(self, batch: _Batch, images: dict[int, np.ndarray], flags: dict[int, bool] | None,
              bad: dict[int, str], resolved: GenerationSettings) -> None:
        """Each missing variation as a PNG, then its manifest line; then the input's grid from the same pictures.
        In a job, each process writes the inputs its devices varied, and the grids of those it planned.

        An input whose pictures went non-finite, or whose folder cannot be written, fails alone.
        """
        k = resolved.num_images_per_prompt
        r = 0  # the work's place among the sampled ones
        for work in batch.works:
            item = work.item
            fresh: dict[int, Image.Image] = {}
            try:
                if work.failed or not (self.is_local(r) if work.missing else work.prepared):
                    continue  # failed here already, or another process's to write
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
                                                          nsfw, negative=self.negative_sha))
                    self.add_record(outputs.record(item, work.sha256, j, resolved, nsfw, self.negative))
                    self.summary.done += 1
                    fresh[j] = picture
                if work.grid:
                    self.write_grid(work, folder, fresh, resolved)
            except (InputError, OutputError) as e:
                self.fail(item.display, str(e))
            finally:
                r += 1 if work.missing else 0
                work.release()

    def write_grid(self, work: _Work, folder: Path, fresh: dict[int, Image.Image], resolved: GenerationSettings,
                   ) -> None:
        k = resolved.num_images_per_prompt
        tiles = [work.thumbnail] + [fresh[j] if j in fresh else _read_rgb(folder / f"{j}.png") for j in range(k)]
        outputs.write_png(folder / GRID, outputs.contact_sheet(tiles, resolved.size[::-1]),
                          outputs.output_text(resolved, work.sha256, outputs.grid_index(work.item, k), grid=True,
                                              negative=self.negative_sha))

    def add_record(self, entry: dict[str, Any]) -> None:
        """Note a variation's manifest line, on disk at once (a job's processes each in their own part file)."""
        if self.job.is_multiprocess:
            outputs.append_record(self.folder.path, entry, manifest_part(self.job.process_id))
        else:
            outputs.append_record(self.folder.path, entry)
        self.records[entry["path"]] = entry

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
        if self.job.is_multiprocess:
            distributed.barrier("written")  # so that process 0 merges complete part files

    def run(self, items: list[InputFile], start_over: bool) -> RunSummary:
        s = self.settings
        made: list[GenerationSettings] = []

        def warm_up(pipe: ImageVariationPipeline) -> dict[str, Any] | None:
            # From the configs alone: settings that do not fit the model fail before any weight is read, and the
            # sampling program is made ready while the weights load.
            made.append(pipe.resolve(s, hub.recorded_revision(s.model, s.revision)))
            if self.negative is not None:
                self.negative = self.negative.checked(pipe.image_encoder.config.projection_dim, "--negative")
            return self.first_call(items, pipe, made[0])

        # Loaded straight onto every device: one copy of the weights per device, none left behind on the first.
        pipe, params = ImageVariationPipeline.from_pretrained(
            s.model, revision=s.revision, scheduler=s.scheduler, dtype=s.dtype, vae_dtype=s.vae_dtype,
            attention=s.attention, safety_checker=s.safety_checker, devices=self.devices,
            on_compile=self.note if self.job.is_main else None, warm_up=warm_up)
        (resolved,) = made

        def ready() -> None:
            if self.folder is None:
                self.open_folder()
            if not self.job.is_main:
                return
            if start_over:
                removed = self.folder.start_over()
                if removed:
                    self.note(f"--start-over: removed {removed} earlier output(s) from {printable(str(self.out))}")
            elif (conflict := self.folder.conflicts(resolved, resolved=True, negative=self.negative_sha)) is not None:
                raise OutputError(conflict)

        self.main_first("out-ready", ready)
        start = time.perf_counter()
        try:
            self.generate(items, pipe, params, resolved)
        finally:
            # Even when the run stops early, the manifest ends up describing exactly the files present: in a
            # job, process 0 merges every process's lines once all have written (or it stopped waiting).
            if not self.job.is_multiprocess:
                earlier = {rel: text for rel, text in self.folder.outputs.items() if Path(rel).name != GRID}
                outputs.rewrite_manifest(self.folder.path, self.records, earlier)
            elif self.job.is_main:
                present = {rel: text for rel, text in self.folder.present().items() if Path(rel).name != GRID}
                outputs.rewrite_manifest(self.folder.path, self.records, present)
        self.summary.seconds = time.perf_counter() - start
        if self.job.is_multiprocess:
            self.summary = _job_summary(self.summary)
        return self.summary


def _job_summary(mine: RunSummary) -> RunSummary:
    """The whole job's summary, the same on every process (each process reported its own failures)."""
    parts = distributed.gather("summary", [mine.done, mine.skipped, mine.failures, mine.seconds])
    return RunSummary(done=sum(p[0] for p in parts), skipped=sum(p[1] for p in parts),
                      failures=[tuple(f) for p in parts for f in p[2]], seconds=max(p[3] for p in parts))


def _local_encoder(params: dict[str, Any]) -> dict[str, Any]:
    """The image encoder's params as replicated on one of this process's devices only, for ``image_embeddings``:
    in a job the params span every process's devices, and encoding there would need all of them."""
    return {"image_encoder": jax.tree.map(lambda a: a.addressable_shards[0].data, params["image_encoder"])}


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


def _check_same_inputs(items: list[InputFile]) -> None:
    """Every process of a job must see the same inputs (the same command, the same files, the same working
    folder), or their batches would differ."""
    mine = hashlib.sha256("\0".join(f"{item.relative}" for item in items).encode()).hexdigest()
    seen = distributed.gather("inputs", [mine, len(items)])
    if any(digest != seen[0][0] for digest, _ in seen):
        counts = ", ".join(f"process {p}: {n}" for p, (_, n) in enumerate(seen))
        raise OutputError(f"inputs: the processes of this job found different inputs ({counts} inputs); run the "
                          f"same command from the same folder on every host, over one shared file system")


def _report_stderr(line: str) -> None:
    tqdm.write(line, file=sys.stderr)


def run_generate(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, settings: GenerationSettings, *,
                 report: Callable[[str], None] | None = None, note: Callable[[str], None] | None = None,
                 progress: bool | None = None, devices: Sequence[jax.Device] | None = None,
                 start_over: bool = False, negative: str | os.PathLike | None = None) -> RunSummary:
    """Generate ``settings.num_images_per_prompt`` variations of every input into ``out``; see ``imvar_jax.batch``.

    ``inputs``: files, folders and glob patterns (``collect_inputs``); a file ending ``.npy`` is a CLIP
    image embedding ``[D]`` or ``[1, D]`` (taken only when named: folders and globs give pictures).
    ``negative``: a picture or ``.npy`` embedding whose embedding every input's unconditional half
    uses; its sha256 is recorded in every output and compared like a setting. Inputs that cannot be used
    are reported through ``report`` (default: a line on stderr) as ``"<input>: <reason>"``, listed in
    the summary's ``failures`` and skipped; ``note`` (default stderr) gets what the run cleaned up.
    ``progress``: show a progress bar; None (the default): a bar when stderr is a terminal, else one
    ``note`` line per finished program call. ``devices``: where to
    run (default every local device); each program call takes ``len(devices) * settings.batch_size``
    inputs, padded to the same picture count every time, so the run compiles once.

    ``out`` is locked for the run. If it holds imvar-jax outputs made with other settings, the run
    refuses (OutputError naming the settings) unless ``start_over``, which first deletes every
    earlier imvar-jax output and the manifest there (another program's files are never touched).
    Raises SettingsError for settings that do not fit the loaded model (such as ``size``),
    OutputError when ``out`` cannot be used, SourceError when ``negative`` cannot; the model's own load
    errors propagate.
    """
    if not isinstance(settings, GenerationSettings):
        raise TypeError(f"settings: expected a GenerationSettings, got {type(settings).__name__}")
    out_dir = Path(os.path.abspath(os.path.expanduser(os.fspath(out))))
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        raise OutputError(f"out: {printable(str(out_dir))} exists and is not a folder")
    source = None if negative is None else read_source(negative, "--negative", exclude=out_dir)
    runner = _Runner(out_dir, settings, report or _report_stderr, note or _report_stderr,
                     True if progress is None and sys.stderr.isatty() else progress, devices, source)
    job = runner.job
    items, misses = collect_inputs(inputs, exclude=out_dir)
    if job.is_multiprocess:
        _check_same_inputs(items)
    for spec, reason in misses:
        if job.is_main:
            runner.fail(spec, reason)
        else:  # counted by every process, reported by process 0
            runner.summary.failures.append((spec, reason))
    if not items:
        return runner.summary
    # An existing OUT is locked and checked before the model loads; a new one is made only once the
    # model has loaded, so a run that fails before producing anything leaves nothing behind.
    created = job.is_main and not os.path.lexists(out_dir)

    def check() -> None:
        if out_dir.exists():
            runner.open_folder()
            if not start_over and (conflict := runner.folder.conflicts(
                    settings, resolved=False, negative=runner.negative_sha)) is not None:
                raise OutputError(conflict)
        else:
            outputs.check_creatable(out_dir)

    try:
        # The other processes of a job open OUT once process 0 has made and checked it.
        runner.main_first("out-checked", check if job.is_main else (lambda: None))
        return runner.run(items, start_over)
    finally:
        outputs.release(runner.folder, out_dir, created)

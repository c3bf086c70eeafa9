"""``--mix`` and ``--interpolate``: several sources made into one conditioning, written as one set of outputs.

What a run writes under ``OUT`` (K is ``num_images_per_prompt``, F is ``frames``):

- ``--mix``: ``OUT/mix/<j>.png`` for j < K, the variations of the sources' mixed embedding
  (``ImageVariationPipeline.generate(mix_weights=...)``), and with ``grid`` ``OUT/mix/grid.png``:
  the sources (an embedding's tile is grey), then the variations.
- ``--interpolate``: ``OUT/interpolation/frame-<f>.png`` (``frame-<f>-<j>.png`` when K > 1; f
  zero-padded to the width of F-1), the frames along the path through the sources' embeddings
  (``ImageVariationPipeline.interpolate``); ``OUT/interpolation/grid.png``, every frame in order
  (with K > 1 one row per variation); ``animation.gif`` and ``animation.webp``, variation 0 of
  each frame, looping at ``FPS``.

Sources are pictures or ``.npy`` embeddings; with any embedding among them (or a negative
embedding) the pictures are encoded and the call takes embeddings. Below strength 1 every
picture starts from the first source, which must then be a picture.

Every output carries the settings, the sources (``outputs.SOURCES_KEY``) and the negative
picture, as ``outputs`` writes them; an output's ``input_sha256`` is the digest of its sources,
weights and frame count, and ``index`` its place in the call's output (``f*K + j``), whose noise
is that of picture ``j`` (every frame starts from the same noise). A re-run with the same
settings and sources writes only what is missing; earlier outputs made with other settings or
sources are refused unless ``start_over``, as ``run_generate`` does. These runs take one process:
the grid and animations need every picture.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from PIL import Image

from .. import distributed, hub
from ..conditioning import check_weights
from ..errors import NonFiniteError
from ..parallel import Placement
from ..pipeline import ImageVariationPipeline
from ..preprocessing import to_pil
from ..settings import GenerationSettings, SettingsError
from . import outputs
from .inputs import GRID, INTERPOLATION, MIX, Source, SourceError, printable, read_source
from .outputs import OutFolder, OutputError
from .runner import RunSummary, _report_stderr

FPS = 8


@dataclass(frozen=True)
class _Target:
    """One file the run writes: where (relative to OUT), its index, and which picture of the call it is."""

    rel: str
    index: str
    kind: str  # "picture", "grid" or "animation"
    position: int = 0  # a picture's place in the call's output
    variation: int = 0
    frame: int | None = None


class _Creative:
    def __init__(self, mode: str, sources: list[Source], weights: list[float] | None, out: Path,
                 settings: GenerationSettings, negative: Source | None, report: Callable[[str], None],
                 note: Callable[[str], None], devices: Sequence[jax.Device] | None):
        self.mode = mode
        self.sources = sources
        self.weights = weights
        self.out = out
        self.settings = settings
        self.negative = negative
        self.negative_sha = None if negative is None else negative.sha256
        self.report = report
        self.note = note
        self.devices = list(Placement.of(devices).devices)
        self.folder: OutFolder | None = None
        self.summary = RunSummary()
        self.records: dict[str, dict[str, Any]] = {}
        frames = settings.frames if mode == INTERPOLATION else None
        listed = [{"sha256": s.sha256} if weights is None else {"sha256": s.sha256, "weight": w}
                  for s, w in zip(sources, weights or [None] * len(sources))]
        self.keys = {outputs.SOURCES_KEY: json.dumps(listed)}
        if frames is not None:
            self.keys[outputs.FRAMES_KEY] = str(frames)
        self.digest = hashlib.sha256(json.dumps({"mode": mode, **self.keys}, sort_keys=True).encode()).hexdigest()

    @property
    def option(self) -> str:
        return "--mix" if self.mode == MIX else "--interpolate"

    def open_folder(self, start_over: bool, resolved: GenerationSettings | None) -> None:
        """Open and lock OUT (once); with ``resolved`` settings, clear it (``start_over``) or check it against them."""
        if self.folder is None:
            self.folder = OutFolder.open(self.out)
            if self.folder.removed_temporary:
                self.note(f"removed {self.folder.removed_temporary} temporary file(s) left by an interrupted run "
                          f"in {printable(str(self.out))}")
        if start_over and resolved is not None:
            removed = self.folder.start_over()
            if removed:
                self.note(f"--start-over: removed {removed} earlier output(s) from {printable(str(self.out))}")
        elif not start_over:
            conflict = self.folder.conflicts(resolved or self.settings, resolved=resolved is not None,
                                             negative=self.negative_sha)
            if conflict is not None:
                raise OutputError(conflict)

    def targets(self, resolved: GenerationSettings) -> list[_Target]:
        k = resolved.num_images_per_prompt
        if self.mode == MIX:
            planned = [_Target(f"{MIX}/{j}.png", str(j), "picture", j, j) for j in range(k)]
            if resolved.grid:
                planned.append(_Target(f"{MIX}/{GRID}", f"0-{k - 1}", "grid"))
            return planned
        frames = resolved.frames
        width = len(str(frames - 1))
        planned = [_Target(f"{INTERPOLATION}/frame-{f:0{width}d}{'' if k == 1 else f'-{j}'}.png", str(f * k + j),
                           "picture", f * k + j, j, f) for f in range(frames) for j in range(k)]
        planned.append(_Target(f"{INTERPOLATION}/{GRID}", f"0-{frames * k - 1}", "grid"))
        planned += [_Target(f"{INTERPOLATION}/{name}", f"0-{(frames - 1) * k}", "animation")
                    for name in outputs.ANIMATIONS]
        return planned

    def text(self, resolved: GenerationSettings, target: _Target, nsfw: bool | None = None) -> dict[str, str]:
        keys = dict(self.keys)
        if target.frame is not None:
            keys[outputs.FRAME_KEY] = str(target.frame)
        return outputs.output_text(resolved, self.digest, target.index, nsfw, grid=target.kind != "picture",
                                   negative=self.negative_sha, sources=keys)

    def record(self, resolved: GenerationSettings, target: _Target, nsfw: bool | None) -> dict[str, Any]:
        sources = [{"input": s.relative, "sha256": s.sha256, **({} if self.weights is None else {"weight": w})}
                   for s, w in zip(self.sources, self.weights or [None] * len(self.sources))]
        frame = {} if target.frame is None else {outputs.FRAME_KEY: target.frame,
                                                 outputs.FRAMES_KEY: resolved.frames}
        return {"path": target.rel, "input": None, "input_sha256": self.digest, "index": int(target.index),
                "input_index": None, "variation": target.variation, **frame, outputs.SOURCES_KEY: sources,
                **resolved.to_json(), **outputs.negative_fields(self.negative), "nsfw": nsfw}

    def missing(self, resolved: GenerationSettings, targets: list[_Target]) -> list[_Target]:
        """The targets still to write; the complete ones are recorded. OutputError where an earlier output in the
        folder was made from other sources, or a file at a target's path is not imvar-jax's."""
        height, width = resolved.size
        name = targets[0].rel.split("/")[0]
        differing = [text for rel, text in self.folder.outputs.items()
                     if rel.startswith(f"{name}/") and text.get("input_sha256") != self.digest]
        if differing:
            there, what = differing[0], []
            frames = there.get(outputs.FRAMES_KEY), self.keys.get(outputs.FRAMES_KEY)
            if frames[0] != frames[1]:
                what.append(f"frames {frames[0] or 'none'} there, {frames[1] or 'none'} now")
            if there.get(outputs.SOURCES_KEY) != self.keys[outputs.SOURCES_KEY] or not what:
                what.append("other sources or weights")
            raise OutputError(f"out: {printable(str(self.folder.path / name))} holds {len(differing)} earlier "
                              f"output(s) made from other {self.option} sources ({'; '.join(what)}); pass "
                              f"--start-over to delete imvar-jax's earlier outputs there first, or choose another "
                              f"--out")
        left = []
        for target in targets:
            path = self.folder.path / target.rel
            if target.kind == "picture":
                found = outputs.read_png_text(path, (width, height))
            elif target.kind == "grid":
                found = outputs.read_png_text(path, outputs.sheet_size(self.sheet_tiles(resolved), (width, height),
                                                                       self.sheet_columns(resolved)))
            else:
                found = outputs.read_animation_text(path, (width, height))
            if outputs.is_current(found, resolved, self.digest, target.index, self.negative_sha):
                if target.kind == "picture":
                    self.records[target.rel] = self.record(resolved, target, outputs.nsfw_flag(found.get("nsfw")))
                    self.summary.skipped += 1
                continue
            if os.path.lexists(path) and outputs.output_chunks(path) is None:
                raise OutputError(f"{printable(str(path))} exists and was not written by imvar-jax; not overwritten "
                                  f"(move it away, or choose another --out)")
            left.append(target)
        return left

    def sheet_tiles(self, resolved: GenerationSettings) -> int:
        """The tile count of the grid: a mix's sources and variations, or every frame's variations."""
        k = resolved.num_images_per_prompt
        return len(self.sources) + k if self.mode == MIX else resolved.frames * k

    def sheet_columns(self, resolved: GenerationSettings) -> int | None:
        """An interpolation with several variations lays its frames out one row per variation."""
        k = resolved.num_images_per_prompt
        return resolved.frames if self.mode == INTERPOLATION and k > 1 else None

    def sample(self, pipe: ImageVariationPipeline, params: dict[str, Any],
               resolved: GenerationSettings) -> tuple[list[Image.Image], list[bool] | None]:
        s = resolved
        height, width = s.size
        options: dict[str, Any] = dict(
            num_images_per_prompt=s.num_images_per_prompt, preprocessing=s.preprocessing, devices=self.devices,
            num_inference_steps=s.steps, guidance_scale=s.guidance, height=height, width=width, eta=s.eta,
            mix_method=s.mix_method, strength=s.strength)
        if s.strength < 1:
            options["init_image"] = self.sources[0].picture
        negative = self.negative
        embedded = any(src.embedding is not None for src in self.sources) or \
            negative is not None and negative.embedding is not None
        images: list[Image.Image] | None = [src.picture for src in self.sources]
        if embedded:
            # A call takes pictures or embeddings: the pictures become embeddings, as the program would make them.
            pictures = [src.picture for src in self.sources if src.picture is not None]
            encoded = iter(pipe.image_embeddings(pictures, params, s.preprocessing) if pictures else [])
            options["image_embeds"] = np.stack([next(encoded) if src.picture is not None else src.embedding[0]
                                                for src in self.sources])
            images = None
        if negative is not None and negative.embedding is not None:
            options["negative_image_embeds"] = negative.embedding[0]
        elif negative is not None:
            options["negative_image"] = negative.picture
        if self.mode == MIX:
            result = pipe.generate(images, params, s.seed, mix_weights=self.weights, **options)
        else:
            result = pipe.interpolate(images, params, frames=s.frames, seed=s.seed, **options)
        return to_pil(result.images), result.nsfw_content_detected

    def write(self, resolved: GenerationSettings, targets: list[_Target], pictures: list[Image.Image],
              flags: list[bool] | None) -> None:
        folder = self.folder.folder(targets[0].rel.split("/")[0])
        size = resolved.size[::-1]
        for target in targets:
            path = folder / Path(target.rel).name
            if target.kind == "picture":
                nsfw = None if flags is None else flags[target.position]
                outputs.write_png(path, pictures[target.position], self.text(resolved, target, nsfw))
                outputs.append_record(self.folder.path, entry := self.record(resolved, target, nsfw))
                self.records[target.rel] = entry
                self.summary.done += 1
            elif target.kind == "grid":
                if self.mode == MIX:
                    tiles = [Image.new("RGB", size, outputs.NO_PICTURE) if src.picture is None
                             else src.picture.resize(size, Image.Resampling.BICUBIC) for src in self.sources]
                    tiles += pictures
                else:
                    k = resolved.num_images_per_prompt
                    # Row j holds variation j of every frame, in order.
                    tiles = [pictures[f * k + j] for j in range(k) for f in range(resolved.frames)]
                outputs.write_png(path, outputs.contact_sheet(tiles, size, self.sheet_columns(resolved)),
                                  self.text(resolved, target))
            else:
                k = resolved.num_images_per_prompt
                outputs.write_animation(path, pictures[::k], self.text(resolved, target), FPS)

    def run(self, start_over: bool) -> RunSummary:
        s = self.settings
        pipe, params = ImageVariationPipeline.from_pretrained(
            s.model, revision=s.revision, scheduler=s.scheduler, dtype=s.dtype, vae_dtype=s.vae_dtype,
            attention=s.attention, safety_checker=s.safety_checker, devices=self.devices)
        pipe.on_compile = self.note
        resolved = pipe.resolve(s, hub.recorded_revision(s.model, s.revision))
        dim = pipe.image_encoder.config.projection_dim
        self.sources = [src.checked(dim, self.option) for src in self.sources]
        if self.negative is not None:
            self.negative = self.negative.checked(dim, "--negative")
        self.open_folder(start_over, resolved)
        start = time.perf_counter()
        try:
            targets = self.targets(resolved)
            left = self.missing(resolved, targets)
            shown = printable(str(self.out / targets[0].rel.split("/")[0]))
            if not left:
                self.note(f"{shown}: already complete with these settings and sources; nothing to generate")
                return self.summary
            try:
                pictures, flags = self.sample(pipe, params, resolved)
            except NonFiniteError as e:
                self.summary.failures.append((shown, f"{e}; nothing written"))
                self.report(f"{shown}: {e}; nothing written")
                return self.summary
            self.write(resolved, left, pictures, flags)
        finally:
            earlier = {rel: text for rel, text in self.folder.outputs.items() if Path(rel).name != GRID}
            outputs.rewrite_manifest(self.folder.path, self.records, earlier)
            self.summary.seconds = time.perf_counter() - start
        return self.summary


def _run(mode: str, specs: Sequence[str | os.PathLike], weights: list[float] | None, out: str | os.PathLike,
         settings: GenerationSettings, negative: str | os.PathLike | None, start_over: bool,
         report: Callable[[str], None] | None, note: Callable[[str], None] | None,
         devices: Sequence[jax.Device] | None) -> RunSummary:
    if not isinstance(settings, GenerationSettings):
        raise TypeError(f"settings: expected a GenerationSettings, got {type(settings).__name__}")
    option = "--mix" if mode == MIX else "--interpolate"
    if distributed.current().is_multiprocess:
        raise SettingsError(f"{option[2:]}: runs in one process only (its grid is made from all of its pictures "
                            f"in one place); run it without a multi-process job")
    if mode == INTERPOLATION and len(specs) < 2:
        raise SettingsError(f"interpolate: expected at least 2 sources to interpolate between, got {len(specs)}")
    if mode == INTERPOLATION and settings.frames < 2:
        raise SettingsError(f"frames: an interpolation needs at least 2 frames, got {settings.frames}")
    if weights is not None:
        try:
            check_weights(weights, len(specs))  # the weights as given are what outputs record
        except ValueError:
            raise SettingsError(f"mix: expected weights >= 0 with a positive sum, got {weights}") from None
    out_dir = Path(os.path.abspath(os.path.expanduser(os.fspath(out))))
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        raise OutputError(f"out: {printable(str(out_dir))} exists and is not a folder")
    sources = [read_source(spec, option, exclude=out_dir) for spec in specs]
    if settings.strength < 1 and sources[0].picture is None:
        raise SourceError(f"{option} {sources[0].display}: --strength below 1 starts from the first source's "
                          f"picture, and an embedding (.npy) has none; list a picture first")
    source = None if negative is None else read_source(negative, "--negative", exclude=out_dir)
    run = _Creative(mode, sources, weights, out_dir, settings, source, report or _report_stderr,
                    note or _report_stderr, devices)
    # As run_generate: an existing OUT is checked before the model loads, a new one made only once it has.
    created = not os.path.lexists(out_dir)
    try:
        if created:
            outputs.check_creatable(out_dir)
        else:
            run.open_folder(start_over, None)
        return run.run(start_over)
    finally:
        outputs.release(run.folder, out_dir, created)


def run_mix(sources: Sequence[tuple[str | os.PathLike, float]], out: str | os.PathLike,
            settings: GenerationSettings, *, negative: str | os.PathLike | None = None, start_over: bool = False,
            report: Callable[[str], None] | None = None, note: Callable[[str], None] | None = None,
            devices: Sequence[jax.Device] | None = None) -> RunSummary:
    """``settings.num_images_per_prompt`` variations of one mix of ``sources`` (``(path, weight)`` pairs, in
    order; pictures or ``.npy`` embeddings) into ``out/mix/``; see the module's description.

    ``report`` and ``note`` (default: lines on stderr) are ``run_generate``'s: pictures that went
    non-finite are reported, and not written. Raises SourceError when a source or ``negative``
    cannot be used, SettingsError for settings (or weights) that cannot run, OutputError when
    ``out`` cannot be used or holds outputs made otherwise.
    """
    return _run(MIX, [path for path, _ in sources], [weight for _, weight in sources], out, settings, negative,
                start_over, report, note, devices)


def run_interpolate(sources: Sequence[str | os.PathLike], out: str | os.PathLike, settings: GenerationSettings, *,
                    negative: str | os.PathLike | None = None, start_over: bool = False,
                    report: Callable[[str], None] | None = None, note: Callable[[str], None] | None = None,
                    devices: Sequence[jax.Device] | None = None) -> RunSummary:
    """``settings.frames`` frames along the path through ``sources`` (two or more, in order) into
    ``out/interpolation/``, with a grid and animations; see the module's description. Errors as ``run_mix``."""
    return _run(INTERPOLATION, list(sources), None, out, settings, negative, start_over, report, note, devices)

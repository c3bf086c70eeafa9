"""Batch generation: input pictures in, ``k`` variations of each out as PNG files; deterministic and resumable.

What ``run_generate`` writes under ``OUT``:

- ``OUT/<name>/<j>.png``: variation ``j`` of an input, where ``<name>`` is the input's file stem.
  Inputs whose stems collide (compared case-insensitively, so case-insensitive file systems are
  safe too) are named ``<stem>-<8 hex digits>``, the digits starting the sha256 of the input's
  absolute path. Each PNG carries text chunks with the settings, its picture index and the
  input's sha256 (and nothing time-dependent: the same command gives the same bytes).
- ``OUT/<name>/grid.png`` with ``grid=True``: the input squashed to the output size, then its
  variations, in one row (a near-square grid beyond ``_MAX_ROW`` tiles).
- ``OUT/manifest.jsonl``: one JSON object per variation (``path`` relative to OUT, ``input``
  relative to the working directory when inside it, ``input_sha256``, ``index``, ``input_index``,
  ``variation``, the settings, ``nsfw``), appended as each PNG lands; at the end of a run it is
  rewritten sorted, one line per existing file (the newest line for each).

Picture numbering: inputs are sorted by absolute path; input ``i`` owns pictures ``i*k .. i*k+k-1``
and picture ``n`` draws its noise from ``fold_in(key(seed), n)``. Inputs that fail keep their
number, so a bad file never changes anyone else's pictures. Every file is written to a temporary
name in its folder and renamed into place; a re-run skips outputs whose text chunks match the
current settings and input, and regenerates exactly the rest.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import math
import os
import struct
import sys
import time
import uuid
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import jax
import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError
from tqdm import tqdm

from . import hub
from .models.layers import ATTENTION_IMPLS
from .parallel import shard
from .pipeline import ImageVariationPipeline
from .precision import DTYPES, default_dtype
from .preprocessing import PREPROCESSINGS, prepare_inputs, to_pil, to_rgb
from .schedulers import SCHEDULERS

IMAGE_EXTENSIONS = frozenset({
    ".bmp", ".dib", ".gif", ".jfif", ".jpe", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".pnm", ".ppm", ".tga",
    ".tif", ".tiff", ".webp",
})
MANIFEST = "manifest.jsonl"
GRID = "grid.png"
_TMP_PREFIX = ".imvar-tmp-"
_MAX_ROW = 8
_HASH_CHUNK = 1 << 20
# Folder names an input may not take: the manifest lives beside the input folders.
_RESERVED = frozenset({MANIFEST})
# The settings a finished PNG must carry to count as done; "nsfw" and "Software" are informative only.
_COMPARED = ("model", "revision", "dtype", "vae_dtype", "scheduler", "steps", "guidance", "eta", "seed", "size",
             "preprocessing", "safety_checker", "input_sha256", "index")


class SettingsError(ValueError):
    """A generation setting that is invalid, or does not fit the loaded model."""


class InputError(Exception):
    """One input cannot be used; the message is the reason, without the path."""


@dataclass(frozen=True)
class GenerateOptions:
    """Settings of one batch run. ``size`` is ``(height, width)`` or None for the model's default;
    ``dtype`` None means bfloat16 on TPU/GPU and float32 on CPU, ``vae_dtype`` None the same as ``dtype``;
    ``attention`` is ``ImageVariationPipeline.from_pretrained``'s; ``batch_size`` is inputs per device."""

    model: str = hub.DEFAULT_MODEL
    revision: str | None = None
    num_per_image: int = 4
    steps: int = 50
    guidance: float = 3.0
    scheduler: str = "pndm"
    eta: float = 0.0
    seed: int = 0
    size: tuple[int, int] | None = None
    preprocessing: str = "v2"
    dtype: str | None = None
    vae_dtype: str | None = None
    attention: str = "auto"
    batch_size: int = 1
    safety_checker: bool = True
    grid: bool = False

    def validate(self) -> None:
        """Raise SettingsError naming the first setting out of range."""
        for name in ("num_per_image", "steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsError(f"{name}: expected a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise SettingsError(f"seed: expected an integer in 0..{2**32 - 1}, got {self.seed!r}")
        if not math.isfinite(self.guidance):
            raise SettingsError(f"guidance: expected a finite number, got {self.guidance!r}")
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise SettingsError(f"eta: expected a finite number >= 0, got {self.eta!r}")
        if self.scheduler not in SCHEDULERS:
            raise SettingsError(f"scheduler: unknown {self.scheduler!r} (choose one of {', '.join(SCHEDULERS)})")
        if self.preprocessing not in PREPROCESSINGS:
            raise SettingsError(f"preprocessing: unknown {self.preprocessing!r} "
                                f"(choose one of {', '.join(PREPROCESSINGS)})")
        for name in ("dtype", "vae_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES:
                raise SettingsError(f"{name}: unknown {value!r} (choose one of {', '.join(DTYPES)})")
        if self.attention not in ATTENTION_IMPLS:
            raise SettingsError(f"attention: unknown {self.attention!r} (choose one of {', '.join(ATTENTION_IMPLS)})")
        if self.size is not None and (len(self.size) != 2 or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in self.size)):
            raise SettingsError(f"size: expected (height, width) as positive integers, got {self.size!r}")


@dataclass(frozen=True)
class InputFile:
    """One input: its number in the sorted input list, absolute path, how messages show it, output folder name."""

    index: int
    path: Path
    display: str
    name: str


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


# ----------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------

def _display(path: Path) -> str:
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(path)


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _inside(path: str, folder: str | None) -> bool:
    if folder is None:
        return False
    real = os.path.realpath(path)
    return real == folder or real.startswith(folder + os.sep)


def _walk(top: str, exclude: str | None) -> Iterator[str]:
    """Image files under ``top`` in a stable order, skipping hidden entries and ``exclude`` (the output folder)."""
    for root, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not _inside(os.path.join(root, d), exclude))
        for name in sorted(files):
            if not name.startswith(".") and _is_image_name(name):
                yield os.path.join(root, name)


def _output_names(paths: list[Path]) -> list[str]:
    """Folder names under OUT: the stem, or stem + path hash where stems collide; unique ignoring case."""

    def tagged(path: Path, digits: int) -> str:
        return f"{path.stem}-{hashlib.sha256(str(path).encode()).hexdigest()[:digits]}"

    def clashes(names: list[str]) -> set[str]:
        seen: dict[str, int] = {}
        for name in names:
            seen[name.casefold()] = seen.get(name.casefold(), 0) + 1
        return {n for n, count in seen.items() if count > 1 or n in _RESERVED}

    names = [p.stem for p in paths]
    clash = clashes(names)
    names = [tagged(p, 8) if n.casefold() in clash else n for p, n in zip(paths, names)]
    # A tagged name can only meet another if a file is literally called like one; the full hash settles it.
    clash = clashes(names)
    return [tagged(p, 64) if n.casefold() in clash else n for p, n in zip(paths, names)]


def collect_inputs(specs: Sequence[str | os.PathLike], exclude: str | os.PathLike | None = None,
                   ) -> tuple[list[InputFile], list[tuple[str, str]]]:
    """Expand files, folders and glob patterns into the numbered input list, plus ``(spec, reason)`` for misses.

    Named files are taken whatever their extension; folders (recursively) and globs (``**``
    recurses) contribute files with an image extension (``IMAGE_EXTENSIONS``, any case), skipping
    hidden names and anything inside ``exclude``. Duplicates count once. The list is sorted by
    absolute path, so the numbering does not depend on the order of ``specs``.
    """
    skip = os.path.realpath(exclude) if exclude is not None else None
    found: set[str] = set()
    misses: list[tuple[str, str]] = []
    for spec in specs:
        text = os.path.expanduser(os.fspath(spec))
        before = len(found)
        if os.path.isdir(text):
            found.update(os.path.abspath(p) for p in _walk(text, skip))
            if len(found) == before:
                misses.append((str(spec), "folder holds no image files"))
        elif os.path.exists(text):
            found.add(os.path.abspath(text))
        elif glob.has_magic(text):
            for match in sorted(glob.glob(text, recursive=True)):
                if _inside(match, skip):
                    continue
                if os.path.isdir(match):
                    found.update(os.path.abspath(p) for p in _walk(match, skip))
                elif _is_image_name(match):
                    found.add(os.path.abspath(match))
            if len(found) == before:
                misses.append((str(spec), "matches no image files"))
        else:
            misses.append((str(spec), "no such file or folder"))
    paths = [Path(p) for p in sorted(found)]
    names = _output_names(paths)
    return [InputFile(i, p, _display(p), n) for i, (p, n) in enumerate(zip(paths, names))], misses


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def decode_image(data: bytes) -> Image.Image:
    """Fully decode an image file's bytes, or raise InputError saying why it cannot be used.

    Decoding everything up front (``load``) catches truncated files before they join a batch;
    Pillow's decompression-bomb warning counts as an error, since such a file would be
    decoded into gigabytes of pixels.
    """
    if not data:
        raise InputError("empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise InputError(f"too many pixels, refused as a possible decompression bomb ({e})") from None
        except UnidentifiedImageError:
            raise InputError("not an image (Pillow cannot identify the format)") from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
            raise InputError(f"truncated or corrupt image ({e})") from None
    if image.width == 0 or image.height == 0:
        raise InputError(f"zero-size image ({image.width}x{image.height})")
    return image


# ----------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------

def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{_TMP_PREFIX}{uuid.uuid4().hex}-{path.name}")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_png(path: Path, image: Image.Image, text: dict[str, str]) -> None:
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    _atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info))


def _read_png_text(path: Path, size: tuple[int, int]) -> dict[str, str] | None:
    """The text chunks of a complete PNG of ``size`` (width, height); None if missing, unreadable or otherwise."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG" or image.size != size:
                return None
            return {k: str(v) for k, v in image.text.items()}
    except (OSError, SyntaxError, ValueError, EOFError, struct.error):
        return None


def _matches(text: dict[str, str] | None, expected: dict[str, str]) -> bool:
    return text is not None and all(text.get(k) == expected[k] for k in _COMPARED)


def _append_line(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_manifest(path: Path) -> list[dict[str, Any]]:
    """Manifest records, skipping lines that are not JSON objects with a path (a line cut off by a crash)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("path"), str):
            records.append(record)
    return records


def _rewrite_manifest(out: Path, current: dict[str, dict[str, Any]]) -> None:
    """One line per existing output: this run's record, else the last one written for that path; sorted."""
    path = out / MANIFEST
    records = {r["path"]: r for r in _read_manifest(path)}
    records.update(current)
    kept = [r for p, r in records.items() if (out / p).is_file()]
    if not kept and not path.exists():
        return

    def order(record: dict[str, Any]) -> tuple[str, int, str]:
        variation = record.get("variation")
        return (str(Path(record["path"]).parent), variation if isinstance(variation, int) else -1, record["path"])

    body = "".join(json.dumps(r) + "\n" for r in sorted(kept, key=order)).encode()
    if not (path.is_file() and path.read_bytes() == body):
        _atomic_write(path, lambda f: f.write(body))


def _columns(count: int) -> int:
    return count if count <= _MAX_ROW else math.ceil(math.sqrt(count))


def _sheet_size(count: int, size: tuple[int, int]) -> tuple[int, int]:
    columns = _columns(count)
    return columns * size[0], math.ceil(count / columns) * size[1]


def contact_sheet(tiles: Sequence[Image.Image], size: tuple[int, int]) -> Image.Image:
    """Tiles of ``size`` (width, height) in one row, or a near-square grid when there are more than ``_MAX_ROW``."""
    columns = _columns(len(tiles))
    width, height = size
    sheet = Image.new("RGB", _sheet_size(len(tiles), size))
    for n, tile in enumerate(tiles):
        sheet.paste(tile.convert("RGB").resize(size, Image.Resampling.BICUBIC) if tile.size != size
                    else tile.convert("RGB"), ((n % columns) * width, (n // columns) * height))
    return sheet


# ----------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------

@dataclass
class _Work:
    """One input that still needs something: its hash, expected text per variation, and which are missing."""

    item: InputFile
    sha256: str
    texts: list[dict[str, str]]
    missing: list[int]
    grid_text: dict[str, str] | None
    pixel_values: np.ndarray | None = None
    thumbnail: Image.Image | None = None


def _settings_text(options: GenerateOptions, dtype: str, vae_dtype: str, size: tuple[int, int]) -> dict[str, str]:
    model = options.model
    remote = model != hub.TINY_MODEL and not Path(model).expanduser().exists() and hub.is_hub_id(model)
    return {
        "Software": "imvar-jax",
        "model": model,
        "revision": hub.pinned_revision(model, options.revision) if remote else "",
        "dtype": dtype,
        "vae_dtype": vae_dtype,
        "scheduler": options.scheduler,
        "steps": str(options.steps),
        "guidance": repr(float(options.guidance)),
        "eta": repr(float(options.eta)),
        "seed": str(options.seed),
        "size": f"{size[0]}x{size[1]}",
        "preprocessing": options.preprocessing,
        "safety_checker": "on" if options.safety_checker else "off",
    }


def _record(work: _Work, j: int, k: int, settings: dict[str, str], nsfw: bool | None,
            ) -> dict[str, Any]:
    item = work.item
    size = [int(v) for v in settings["size"].split("x")]
    return {
        "path": f"{item.name}/{j}.png", "input": item.display, "input_sha256": work.sha256,
        "index": item.index * k + j, "input_index": item.index, "variation": j,
        "model": settings["model"], "revision": settings["revision"] or None, "dtype": settings["dtype"],
        "vae_dtype": settings["vae_dtype"], "scheduler": settings["scheduler"], "steps": int(settings["steps"]),
        "guidance": float(settings["guidance"]), "eta": float(settings["eta"]), "seed": int(settings["seed"]),
        "size": size,
        "preprocessing": settings["preprocessing"], "safety_checker": settings["safety_checker"] == "on",
        "nsfw": nsfw,
    }


def _nsfw_text(flag: bool | None) -> str:
    return "unchecked" if flag is None else ("true" if flag else "false")


def _nsfw_flag(text: str | None) -> bool | None:
    return {"true": True, "false": False}.get(text or "")


class _Runner:
    def __init__(self, out: Path, options: GenerateOptions, report: Callable[[str], None], progress: bool,
                 devices: Sequence[jax.Device] | None):
        self.out = out
        self.options = options
        self.report = report
        self.progress = progress
        self.devices = sorted(devices or jax.local_devices(), key=lambda d: d.id)
        self.summary = RunSummary()
        self.records: dict[str, dict[str, Any]] = {}
        self.bar: tqdm | None = None  # set while generating

    def fail(self, display: str, reason: str) -> None:
        self.summary.failures.append((display, reason))
        self.report(f"{display}: {reason}")

    def plan(self, items: list[InputFile], settings: dict[str, str], size: tuple[int, int]) -> list[_Work]:
        """Hash every input and check its outputs; return the inputs with something left to write."""
        k = self.options.num_per_image
        height, width = size
        todo = []
        for item in items:
            try:
                sha = _sha256_file(item.path)
            except OSError as e:
                self.fail(item.display, f"cannot read ({e.strerror or e})")
                continue
            folder = self.out / item.name
            texts = [{**settings, "input_sha256": sha, "index": str(item.index * k + j)} for j in range(k)]
            missing = []
            work = _Work(item, sha, texts, missing, None)
            for j, expected in enumerate(texts):
                found = _read_png_text(folder / f"{j}.png", (width, height))
                if _matches(found, expected):
                    self.summary.skipped += 1
                    self.records[f"{item.name}/{j}.png"] = _record(work, j, k, settings, _nsfw_flag(found.get("nsfw")))
                else:
                    missing.append(j)
            if self.options.grid:
                grid_text = {**settings, "input_sha256": sha, "index": f"{item.index * k}-{item.index * k + k - 1}"}
                found = _read_png_text(folder / GRID, _sheet_size(k + 1, (width, height)))
                if not _matches(found, grid_text):
                    work.grid_text = grid_text
            if missing or work.grid_text is not None:
                todo.append(work)
        return todo

    def load(self, work: _Work, pipe: ImageVariationPipeline, size: tuple[int, int]) -> bool:
        """Decode and preprocess one input into ``work``; report and return False if it cannot be used."""
        item = work.item
        try:
            data = item.path.read_bytes()
        except OSError as e:
            self.fail(item.display, f"cannot read ({e.strerror or e})")
            return False
        if hashlib.sha256(data).hexdigest() != work.sha256:
            self.fail(item.display, "changed while this run was going on; run again")
            return False
        try:
            picture = decode_image(data)
            try:
                rgb = to_rgb(picture, name=item.display)
                pixel_values = prepare_inputs([rgb], self.options.preprocessing,
                                              size=pipe.image_encoder.config.image_size,
                                              feature_extractor_config=pipe.feature_extractor_config)
            except (ValueError, OSError) as e:
                raise InputError(str(e).removeprefix(f"{item.display}: ")) from None
        except InputError as e:
            self.fail(item.display, str(e))
            return False
        work.pixel_values = pixel_values
        if work.grid_text is not None:
            height, width = size
            work.thumbnail = rgb.resize((width, height), Image.Resampling.BICUBIC)
        return True

    def write_grid(self, work: _Work, size: tuple[int, int]) -> None:
        height, width = size
        folder = self.out / work.item.name
        tiles = [work.thumbnail]
        for j in range(self.options.num_per_image):
            with Image.open(folder / f"{j}.png") as variation:
                tiles.append(variation.convert("RGB"))
        _write_png(folder / GRID, contact_sheet(tiles, (width, height)), work.grid_text)

    def batches(self, works: list[_Work], pipe: ImageVariationPipeline, size: tuple[int, int],
                ) -> Iterator[list[_Work]]:
        """Loaded inputs in groups of ``len(devices) * batch_size`` (the last may be short); failures drop out."""
        per_call = len(self.devices) * self.options.batch_size
        batch: list[_Work] = []
        for work in works:
            if not self.load(work, pipe, size):
                self.bar.total -= len(work.missing)
                self.bar.refresh()
                continue
            batch.append(work)
            if len(batch) == per_call:
                yield batch
                batch = []
        if batch:
            yield batch

    def sample(self, batch: list[_Work], pipe: ImageVariationPipeline, params: dict[str, Any],
               size: tuple[int, int]) -> tuple[np.ndarray, list[bool] | None]:
        """One program call on ``len(devices) * batch_size`` inputs, the tail padded with copies of the last
        (same shapes every call, so one compile); returns the real inputs' pictures and nsfw flags."""
        o = self.options
        k = o.num_per_image
        d = len(self.devices)
        padded = batch + [batch[-1]] * (d * o.batch_size - len(batch))
        pixel_values = np.concatenate([w.pixel_values for w in padded])  # [D*B, 3, S, S]
        starts = np.array([w.item.index * k for w in padded], np.int64)
        height, width = size
        result = pipe(shard(pixel_values, d), params, o.seed, num_inference_steps=o.steps,
                      guidance_scale=o.guidance, num_images_per_prompt=k, height=height, width=width,
                      eta=o.eta, jit=True, first_index=starts)
        keep = len(batch) * k
        flags = result.nsfw_content_detected
        return result.images[:keep], None if flags is None else flags[:keep]

    def write_batch(self, batch: list[_Work], images: np.ndarray, flags: list[bool] | None,
                    settings: dict[str, str], size: tuple[int, int]) -> None:
        """Each missing variation as a PNG, then its manifest line; then the grids."""
        k = self.options.num_per_image
        for r, work in enumerate(batch):
            folder = self.out / work.item.name
            for j in work.missing:
                n = r * k + j
                nsfw = None if flags is None else flags[n]
                (picture,) = to_pil(images[n])
                _write_png(folder / f"{j}.png", picture, {**work.texts[j], "nsfw": _nsfw_text(nsfw)})
                record = _record(work, j, k, settings, nsfw)
                _append_line(self.out / MANIFEST, record)
                self.records[record["path"]] = record
                self.summary.done += 1
                self.bar.update(1)
            if work.grid_text is not None:
                self.write_grid(work, size)
            work.pixel_values = work.thumbnail = None

    def generate(self, works: list[_Work], pipe: ImageVariationPipeline, params: dict[str, Any],
                 settings: dict[str, str], size: tuple[int, int]) -> None:
        self.bar = tqdm(total=sum(len(w.missing) for w in works), unit="img", desc="generating",
                        disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        # One writer thread: encoding a batch's PNGs overlaps the devices' work on the next batch.
        # At most one batch waits to be written, and leaving the block lets its write finish.
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="imvar-jax-writer") as writer:
                pending: Future[None] | None = None
                for batch in self.batches(works, pipe, size):
                    images, flags = self.sample(batch, pipe, params, size)
                    if pending is not None:
                        pending.result()
                    pending = writer.submit(self.write_batch, batch, images, flags, settings, size)
                if pending is not None:
                    pending.result()
        finally:
            self.bar.close()

    def run(self, items: list[InputFile]) -> RunSummary:
        o = self.options
        dtype = o.dtype or default_dtype()
        vae_dtype = o.vae_dtype or dtype
        # Loaded straight onto every device: one copy of the weights per device, none left behind on the first.
        pipe, params = ImageVariationPipeline.from_pretrained(
            o.model, revision=o.revision, scheduler=o.scheduler, dtype=dtype, vae_dtype=vae_dtype,
            attention=o.attention, safety_checker=o.safety_checker, devices=self.devices)
        try:
            # ``_size`` is the pipeline's own check (positive multiples of the VAE factor) and default.
            size = pipe._size(*(o.size or (None, None)))
        except ValueError as e:
            raise SettingsError(f"size: {e}") from None
        settings = _settings_text(o, dtype, vae_dtype, size)
        todo = self.plan(items, settings, size)
        start = time.perf_counter()
        needs_sampling = [w for w in todo if w.missing]
        if needs_sampling:
            self.generate(needs_sampling, pipe, params, settings, size)
        for work in todo:
            if not work.missing and self.load(work, pipe, size):
                self.write_grid(work, size)
        self.summary.seconds = time.perf_counter() - start
        _rewrite_manifest(self.out, self.records)
        return self.summary


def _report_stderr(line: str) -> None:
    tqdm.write(line, file=sys.stderr)


def run_generate(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, options: GenerateOptions, *,
                 report: Callable[[str], None] | None = None, progress: bool | None = None,
                 devices: Sequence[jax.Device] | None = None) -> RunSummary:
    """Generate ``options.num_per_image`` variations of every input into ``out``; see the module docstring.

    ``inputs``: files, folders and glob patterns (``collect_inputs``). Inputs that cannot be used
    are reported through ``report`` (default: a line on stderr) as ``"<input>: <reason>"``, listed in
    the summary's ``failures`` and skipped. ``progress``: show a progress bar (default: when stderr is
    a terminal). ``devices``: where to run (default every local device); each program call takes
    ``len(devices) * batch_size`` inputs, the same shapes every time, so the run compiles once.
    Raises SettingsError for invalid settings; the model's own load errors propagate.
    """
    options.validate()
    out_dir = Path(os.path.abspath(os.path.expanduser(os.fspath(out))))
    if out_dir.exists() and not out_dir.is_dir():
        raise SettingsError(f"out: {out_dir} exists and is not a folder")
    runner = _Runner(out_dir, options, report or _report_stderr,
                     sys.stderr.isatty() if progress is None else progress, devices)
    items, misses = collect_inputs(inputs, exclude=out_dir)
    for spec, reason in misses:
        runner.fail(spec, reason)
    if not items:
        return runner.summary
    return runner.run(items)

"""Output files: atomic writes, PNG text chunks, manifest records, contact sheets and animations.

Every piece of metadata is derived from the run's resolved ``GenerationSettings``: its
``to_text()`` chunks plus the per-picture keys (``PICTURE_KEYS``) in each PNG, its ``to_json()``
fields plus the per-picture ones in each manifest record, and ``recorded_from_text`` to read a
PNG's settings back when deciding whether it is already done. A run with a ``--negative`` picture
adds its sha256 (``NEGATIVE_KEY``) to every output, and it is compared like a setting; the
outputs of ``--mix`` and ``--interpolate`` also carry their sources (``SOURCES_KEY``). Animations
(GIF, WebP) carry the same keys as JSON: in a GIF comment, in a WebP's EXIF image description.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Sequence

from PIL import Image, PngImagePlugin

from ..settings import FIELDS, GenerationSettings, SettingsError
from .inputs import GRID, MANIFEST, InputFile, Source, printable

SOFTWARE = "imvar-jax"
# The chunks each output carries besides the settings; "nsfw" and "Software" are informative only.
PICTURE_KEYS = ("input_sha256", "index", "nsfw", "Software")
NEGATIVE_KEY = "negative_sha256"  # only in the outputs of a run with a negative picture
# In --mix and --interpolate outputs: the sources as JSON (each one's sha256, and with --mix its weight),
# and for an interpolation the frame count and the picture's frame. Their input_sha256 is the digest of
# all of that, so it alone says whether an output was made from the same sources.
SOURCES_KEY = "sources"
FRAMES_KEY = "frames"
FRAME_KEY = "frame"
ANIMATIONS = ("animation.gif", "animation.webp")
NO_PICTURE = (128, 128, 128)  # an embedding's tile in a grid, where a picture's own would be
_TMP_PREFIX = ".imvar-tmp-"
_MAX_ROW = 8
_VARIATION = re.compile(r"^(0|[1-9][0-9]*)\.png$")
_FRAME = re.compile(r"^frame-([0-9]+)(?:-(0|[1-9][0-9]*))?\.png$")
_EXIF_DESCRIPTION = 0x010E  # ImageDescription: where a WebP animation keeps its keys
# Settings a run only knows once the model is loaded: before that, an unset one cannot conflict.
_RESOLVED_LATER = ("revision", "dtype", "vae_dtype", "size")


class OutputError(ValueError):
    """The output folder cannot be used as asked; the message names the folder or file."""


# ----------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------

def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
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


def write_png(path: Path, image: Image.Image, text: Mapping[str, str]) -> None:
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info))


def png_chunks(path: Path) -> dict[str, str] | None:
    """The text chunks of ``path`` if imvar-jax wrote it (its Software chunk says so), read without decoding
    the pixels; None for anything else: another program's file, not a PNG, unreadable, a link."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        with Image.open(path) as image:
            if image.format != "PNG":
                return None
            text = {k: str(v) for k, v in image.info.items() if isinstance(v, str)}
    except Exception:  # anything Pillow raises on a damaged file means it is not a usable output
        return None
    return text if text.get("Software") == SOFTWARE else None


def output_chunks(path: Path) -> dict[str, str] | None:
    """``png_chunks``, also for animations (their keys are JSON in a GIF comment or a WebP's EXIF)."""
    if path.suffix.lower() == ".png":
        return png_chunks(path)
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        with Image.open(path) as image:
            if image.format == "GIF":
                raw = image.info.get("comment")
            elif image.format == "WEBP":
                raw = image.getexif().get(_EXIF_DESCRIPTION)
            else:
                return None
        text = json.loads(raw)
    except Exception:  # anything Pillow or json raise on a damaged file means it is not a usable output
        return None
    if not isinstance(text, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in text.items()):
        return None
    return text if text.get("Software") == SOFTWARE else None


def write_animation(path: Path, frames: Sequence[Image.Image], text: Mapping[str, str], fps: float) -> None:
    """An animation (GIF or WebP, by ``path``'s suffix) of ``frames`` that loops forever, carrying ``text``."""
    keys = json.dumps(dict(text))
    options: dict[str, Any] = {"save_all": True, "append_images": list(frames[1:]),
                               "duration": round(1000 / fps), "loop": 0}
    if path.suffix.lower() == ".gif":
        options.update(format="GIF", comment=keys)
    else:
        exif = Image.Exif()
        exif[_EXIF_DESCRIPTION] = keys
        options.update(format="WEBP", lossless=True, exif=exif.tobytes())
    atomic_write(path, lambda f: frames[0].save(f, **options))


def read_animation_text(path: Path, size: tuple[int, int]) -> dict[str, str] | None:
    """The keys of a complete imvar-jax animation of frames of ``size`` (width, height); None as ``read_png_text``."""
    text = output_chunks(path)
    if text is None:
        return None
    try:
        with Image.open(path) as image:
            if image.size != size:
                return None
            for n in range(getattr(image, "n_frames", 1)):  # every frame decodes: a cut file fails here
                image.seek(n)
                image.load()
    except Exception:
        return None
    return text


def read_png_text(path: Path, size: tuple[int, int]) -> dict[str, str] | None:
    """The text chunks of a complete imvar-jax PNG of ``size`` (width, height); None if missing, damaged,
    incomplete (every chunk's CRC is checked, up to the final IEND), of another size, or not ours."""
    text = png_chunks(path)
    if text is None:
        return None
    try:
        with Image.open(path) as image:
            image.verify()  # every chunk's CRC, through IEND: a file cut anywhere fails here
        with Image.open(path) as image:
            if image.size != size:
                return None
            image.load()  # and the pixels decompress completely
    except Exception:
        return None
    return text


# ----------------------------------------------------------------------
# PNG text
# ----------------------------------------------------------------------

def nsfw_text(flag: bool | None) -> str:
    return "unchecked" if flag is None else ("true" if flag else "false")


def nsfw_flag(text: str | None) -> bool | None:
    return {"true": True, "false": False}.get(text or "")


def picture_index(item: InputFile, j: int, k: int) -> int:
    """The global number of variation ``j`` of ``item``: it alone decides the picture's noise."""
    return item.index * k + j


def grid_index(item: InputFile, k: int) -> str:
    return f"{picture_index(item, 0, k)}-{picture_index(item, k - 1, k)}"


def output_text(resolved: GenerationSettings, sha256: str, index: int | str, nsfw: bool | None = None,
                *, grid: bool = False, negative: str | None = None,
                sources: Mapping[str, str] | None = None) -> dict[str, str]:
    """The chunks of one output: the settings, then the per-picture keys (no ``nsfw`` on a grid), the
    ``negative`` picture's sha256 if the run has one, and a mix's or interpolation's ``sources`` keys."""
    text = {"Software": SOFTWARE, **resolved.to_text(), "input_sha256": sha256, "index": str(index)}
    if negative is not None:
        text[NEGATIVE_KEY] = negative
    text.update(sources or {})
    if not grid:
        text["nsfw"] = nsfw_text(nsfw)
    return text


def is_current(found: Mapping[str, str] | None, resolved: GenerationSettings, sha256: str, index: int | str,
               negative: str | None = None) -> bool:
    """Whether an existing output's chunks say it was made from this input, at this index, with these settings
    and this ``negative`` picture (a sha256, or None for none)."""
    return (found is not None and found.get("input_sha256") == sha256 and found.get("index") == str(index)
            and found.get(NEGATIVE_KEY) == negative
            and GenerationSettings.recorded_from_text(found) == resolved.recorded())


# ----------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------

def record(item: InputFile, sha256: str, j: int, resolved: GenerationSettings, nsfw: bool | None,
           negative: Source | None = None) -> dict[str, Any]:
    """Variation ``j`` of ``item``'s manifest line."""
    k = resolved.num_images_per_prompt
    return {"path": f"{item.name}/{j}.png", "input": item.relative, "input_sha256": sha256,
            "index": picture_index(item, j, k), "input_index": item.index, "variation": j,
            **resolved.to_json(), **negative_fields(negative), "nsfw": nsfw}


def negative_fields(negative: Source | None) -> dict[str, Any]:
    """A manifest line's record of the run's negative picture: its path and sha256 (nothing without one)."""
    return {} if negative is None else {"negative": negative.relative, NEGATIVE_KEY: negative.sha256}


def manifest_part(process_id: int) -> str:
    """The file one process of a multi-process job appends its manifest lines to (hidden: not an output)."""
    return f".{Path(MANIFEST).stem}-process-{process_id}.jsonl"


def _manifest_parts(out: Path) -> list[Path]:
    prefix, _ = manifest_part(0).split("0", 1)
    return sorted(p for p in out.glob(f"{prefix}*.jsonl") if p.is_file() and not p.is_symlink())


def append_record(out: Path, entry: Mapping[str, Any], name: str = MANIFEST) -> None:
    """Append ``entry`` to OUT's manifest, or to the part file ``name`` of one process of a job."""
    # O_NOFOLLOW: a link planted at the manifest's name must not send the line elsewhere.
    fd = os.open(out / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """Manifest records, skipping lines that are not JSON objects with a path (a line cut off by a crash)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            records.append(entry)
    return records


def record_from_chunks(rel: str, text: Mapping[str, str]) -> dict[str, Any] | None:
    """The manifest line of an existing variation or frame known only from its chunks (its input was not in this
    run)."""
    values = GenerationSettings.recorded_from_text(text)
    name = Path(rel).name
    variation, frame = _VARIATION.match(name), _FRAME.match(name)
    if values is None or not (variation or frame) or not text.get("index", "").isdigit():
        return None
    fields = {f.name: f.to_json(values[f.name]) for f in FIELDS if f.recorded}
    entry = {"path": rel, "input": None, "input_sha256": text.get("input_sha256"), "index": int(text["index"]),
             "input_index": None, "variation": int(variation.group(1)) if variation else int(frame.group(2) or 0),
             **fields}
    if frame:
        entry[FRAME_KEY] = int(frame.group(1))
    if SOURCES_KEY in text:
        try:
            entry[SOURCES_KEY] = json.loads(text[SOURCES_KEY])
        except ValueError:
            entry[SOURCES_KEY] = None
    if NEGATIVE_KEY in text:
        entry[NEGATIVE_KEY] = text[NEGATIVE_KEY]
    return {**entry, "nsfw": nsfw_flag(text.get("nsfw"))}


def rewrite_manifest(out: Path, current: Mapping[str, Mapping[str, Any]],
                     others: Mapping[str, Mapping[str, str]]) -> None:
    """One line per variation PNG present: this run's record, else (for ``others``, the earlier outputs of
    inputs not in this run, with their chunks) the old line if it still describes the file, else one built
    from the file's chunks; sorted. So the manifest lists exactly the variation files in OUT.

    Old lines are the manifest's and those of the processes' part files (``manifest_part``), which are
    merged in and removed: the part files of a job that has finished writing, or of a killed one.
    """
    path = out / MANIFEST
    parts = _manifest_parts(out)
    old = {r["path"]: r for f in [path, *parts] for r in read_manifest(f)}
    records = dict(current)
    for rel, text in others.items():
        if rel in records:
            continue
        entry = old.get(rel)
        if entry is None or entry.get("input_sha256") != text.get("input_sha256") \
                or str(entry.get("index")) != text.get("index"):
            entry = record_from_chunks(rel, text)
        if entry is not None:
            records[rel] = entry
    kept = [r for p, r in records.items() if (out / p).is_file()]
    if not kept and not path.exists():
        _remove(parts)
        return

    def order(entry: Mapping[str, Any]) -> tuple[str, int, str]:
        # An interpolation's pictures go frame by frame, as their index counts them.
        place = entry.get("index") if FRAME_KEY in entry else entry.get("variation")
        return (str(Path(entry["path"]).parent), place if isinstance(place, int) else -1, entry["path"])

    body = "".join(json.dumps(r) + "\n" for r in sorted(kept, key=order)).encode()
    if not (path.is_file() and path.read_bytes() == body):
        atomic_write(path, lambda f: f.write(body))
    _remove(parts)


def _remove(paths: Sequence[Path]) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


# ----------------------------------------------------------------------
# The output folder
# ----------------------------------------------------------------------

def is_output_name(name: str) -> bool:
    """Whether a file in a folder of OUT is named as imvar-jax names its outputs (whose keys then say whose)."""
    return name == GRID or name in ANIMATIONS or bool(_VARIATION.match(name) or _FRAME.match(name))


def _short_sha(sha256: str | None) -> str:
    """A negative picture as a message names it: its sha256's first digits, or none."""
    return "none" if sha256 is None else f"sha256 {sha256[:12]}"


def release(folder: OutFolder | None, path: Path, created: bool) -> None:
    """The end of a run that writes into ``path``: its folder closed, and ``path`` removed again if this run
    created it and wrote nothing into it."""
    if folder is not None:
        folder.close()
    if created:
        with contextlib.suppress(OSError):
            path.rmdir()  # only an empty folder goes


def check_creatable(path: Path) -> None:
    """OutputError unless ``path`` could be created: its nearest existing ancestor is a folder this process
    can write into. Checked before a long model load, so an impossible ``--out`` fails at once."""
    parent = path.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"out: cannot create {printable(str(path))} ({printable(str(parent))} is not a folder)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"out: cannot write into {printable(str(parent))} to create {printable(str(path))} "
                          f"(permission denied)")


@dataclass
class OutFolder:
    """An output folder held by one run: locked, cleared of an interrupted run's temporary files, surveyed.

    ``outputs`` maps each earlier imvar-jax PNG (``<name>/<j>.png`` or ``<name>/grid.png``,
    relative to OUT) to its text chunks.
    """

    path: Path
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    removed_temporary: int = 0
    _lock: int | None = None

    @classmethod
    def open(cls, path: Path, *, lock: bool = True) -> "OutFolder":
        """Create and lock ``path``; raise OutputError (naming it) when it cannot be written or is in use.

        ``lock`` False: use a folder that a process of the same job has opened (and locked) already:
        no lock, no clearing, no survey.
        """
        shown = printable(str(path))
        if not lock:
            if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
                raise OutputError(f"out: cannot write into {shown} (missing, or permission denied)")
            return cls(Path(os.path.realpath(path)))
        try:
            path.mkdir(parents=True, exist_ok=True)
            # The lock is on the folder itself, so a run leaves no lock file behind.
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise OutputError(f"out: cannot write into {shown} ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise OutputError(f"out: another imvar-jax generate is writing into {shown}") from None
            raise OutputError(f"out: cannot lock {shown} ({e.strerror or e})") from None
        folder = cls(Path(os.path.realpath(path)), _lock=fd)
        try:
            if not os.access(folder.path, os.W_OK):
                raise OutputError(f"out: cannot write into {shown} (permission denied)")
            manifest = folder.path / MANIFEST
            if os.path.lexists(manifest) and not stat.S_ISREG(os.lstat(manifest).st_mode):
                raise OutputError(f"out: {printable(str(manifest))} is not a regular file; move it away")
            folder._survey()
        except BaseException:
            folder.close()
            raise
        return folder

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # releases the lock
            self._lock = None

    def _survey(self, clear: bool = True) -> None:
        """Remove a killed run's temporary files (``clear``); note every earlier output's chunks."""
        for entry in sorted(os.scandir(self.path), key=lambda e: e.name):
            if clear and entry.name.startswith(_TMP_PREFIX) and entry.is_file(follow_symlinks=False):
                self._remove_temporary(entry.path)
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                files = sorted(os.scandir(entry.path), key=lambda e: e.name)
            except OSError:
                continue  # reported when an input needs this folder
            for f in files:
                if f.name.startswith(_TMP_PREFIX) and f.is_file(follow_symlinks=False):
                    if clear:
                        self._remove_temporary(f.path)
                elif is_output_name(f.name) and (text := output_chunks(Path(f.path))):
                    self.outputs[f"{entry.name}/{f.name}"] = text

    def present(self) -> dict[str, dict[str, str]]:
        """The imvar-jax outputs in OUT now, with their chunks (other processes of a job wrote some of them)."""
        now = OutFolder(self.path)
        now._survey(clear=False)
        return now.outputs

    def _remove_temporary(self, path: str) -> None:
        try:
            os.unlink(path)
            self.removed_temporary += 1
        except OSError:
            pass

    def conflicts(self, settings: GenerationSettings, *, resolved: bool, negative: str | None = None) -> str | None:
        """What differs between ``settings`` (and the ``negative`` picture's sha256, None for none) and what the
        earlier outputs recorded, as message text, or None.

        Before the model is loaded (``resolved`` False) an unset dtype, size or revision matches anything.
        """
        found: dict[str, set[str]] = {}
        count = 0
        for text in self.outputs.values():
            differing = text.get(NEGATIVE_KEY) != negative
            if differing:
                found.setdefault(NEGATIVE_KEY, set()).add(_short_sha(text.get(NEGATIVE_KEY)))
            for f in FIELDS:
                if not f.recorded:
                    continue
                value = getattr(settings, f.name)
                if not resolved and f.name in _RESOLVED_LATER and value is None:
                    continue
                if f.name not in text:
                    there = "not recorded"
                else:
                    try:
                        if f.check(f.name, f.from_text(text[f.name])) == value:
                            continue
                    except (SettingsError, KeyError):
                        pass
                    there = text[f.name]
                found.setdefault(f.name, set()).add(there)
                differing = True
            count += differing
        if not found:
            return None
        spec = {f.name: f for f in FIELDS}
        parts = [f"negative {printable(', '.join(sorted(v)))} there, {_short_sha(negative)} now" if n == NEGATIVE_KEY
                 else f"{spec[n].option.lstrip('-')} {printable(', '.join(sorted(v)))} there, "
                      f"{spec[n].to_text(getattr(settings, n)) or 'unset'} now" for n, v in found.items()]
        return (f"out: {printable(str(self.path))} holds {count} earlier output(s) made with other settings "
                f"({'; '.join(parts)}); pass --start-over to delete imvar-jax's earlier outputs there first, "
                f"or choose another --out")

    def start_over(self) -> int:
        """Delete every earlier imvar-jax output and the manifest (never another program's files); the count."""
        removed = 0
        for rel in sorted(self.outputs):
            (self.path / rel).unlink(missing_ok=True)
            removed += 1
            try:
                (self.path / rel).parent.rmdir()  # only once empty
            except OSError:
                pass
        self.outputs.clear()
        _remove([self.path / MANIFEST, *_manifest_parts(self.path)])
        return removed

    def folder(self, name: str) -> Path:
        """``OUT/name``, created: a real folder directly inside OUT; OutputError if something else is there."""
        path = self.path / name
        if os.path.lexists(path) and (os.path.islink(path) or not path.is_dir()):
            raise OutputError(f"{printable(str(path))} exists and is not a folder imvar-jax can write into "
                              f"(a file or a link); move it away")
        path.mkdir(exist_ok=True)
        if os.path.realpath(path) != os.path.join(str(self.path), name):
            raise OutputError(f"{printable(str(path))} resolves outside the output folder")
        return path


# ----------------------------------------------------------------------
# Contact sheets
# ----------------------------------------------------------------------

def _columns(count: int) -> int:
    return count if count <= _MAX_ROW else math.ceil(math.sqrt(count))


def sheet_size(count: int, size: tuple[int, int], columns: int | None = None) -> tuple[int, int]:
    """(width, height) of a contact sheet of ``count`` tiles of ``size`` (width, height)."""
    columns = columns or _columns(count)
    return columns * size[0], math.ceil(count / columns) * size[1]


def contact_sheet(tiles: Sequence[Image.Image], size: tuple[int, int], columns: int | None = None) -> Image.Image:
    """Tiles of ``size`` (width, height) in rows of ``columns``; by default one row, or a near-square grid when
    there are more than ``_MAX_ROW``."""
    columns = columns or _columns(len(tiles))
    width, height = size
    sheet = Image.new("RGB", sheet_size(len(tiles), size, columns))
    for n, tile in enumerate(tiles):
        tile = tile if tile.mode == "RGB" else tile.convert("RGB")
        if tile.size != size:
            tile = tile.resize(size, Image.Resampling.BICUBIC)
        sheet.paste(tile, ((n % columns) * width, (n // columns) * height))
    return sheet

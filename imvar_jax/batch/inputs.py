"""Input discovery and decoding: which files a run takes, how they are numbered and named, and reading them."""

from __future__ import annotations

import glob
import hashlib
import io
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({
    ".bmp", ".dib", ".gif", ".jfif", ".jpe", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".pnm", ".ppm", ".tga",
    ".tif", ".tiff", ".webp",
})
MANIFEST = "manifest.jsonl"
GRID = "grid.png"
# Folder names an input may not take: the manifest lives beside the input folders.
_RESERVED = frozenset({MANIFEST})


class InputError(Exception):
    """One input cannot be used; the message is the reason, without the path."""


@dataclass(frozen=True)
class InputFile:
    """One input: its number in the sorted input list, absolute path, how messages show it, output folder name."""

    index: int
    path: Path
    display: str
    name: str


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


def output_names(paths: Sequence[Path]) -> list[str]:
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
    names = output_names(paths)
    return [InputFile(i, p, _display(p), n) for i, (p, n) in enumerate(zip(paths, names))], misses


def read_input(path: Path) -> tuple[bytes, str]:
    """The file's bytes and their sha256, from one read; InputError if it cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"cannot read ({e.strerror or e})") from None
    return data, hashlib.sha256(data).hexdigest()


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

"""Input discovery and decoding: which files a run takes, how they are numbered and named, and reading them.

An input is a picture, or a CLIP image embedding saved with ``numpy.save`` in a file ending ``.npy``
(``is_embedding``). Files that condition a whole run (``--negative``, the ``--mix`` and
``--interpolate`` sources) are read into a ``Source``.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import io
import os
import re
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..preprocessing import to_rgb

IMAGE_EXTENSIONS = frozenset({
    ".bmp", ".dib", ".gif", ".jfif", ".jpe", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".pnm", ".ppm", ".tga",
    ".tif", ".tiff", ".webp",
})
EMBEDDING_EXTENSION = ".npy"
MANIFEST = "manifest.jsonl"
GRID = "grid.png"
MIX = "mix"  # OUT/mix/: the pictures of --mix
INTERPOLATION = "interpolation"  # OUT/interpolation/: the frames of --interpolate
# Folder names an input may not take: the manifest, and the folders of --mix and --interpolate, live beside
# the input folders.
_RESERVED = frozenset({MANIFEST, MIX, INTERPOLATION})
# The longest embedding an .npy input may hold (SD's is 768 wide): its header is checked before the data is read.
_MAX_EMBEDDING = 1 << 16
# A picture file larger than this is refused before it is read into memory.
MAX_INPUT_BYTES = 1 << 30
# Output folder names stay well inside the 255-byte limit of common file systems, hash tag included.
_MAX_NAME_BYTES = 160


class InputError(Exception):
    """One input cannot be used; the message is the reason, without the path."""


class SourceError(ValueError):
    """A file that conditions the whole run (``--negative``, ``--mix``, ``--interpolate``) cannot be used; the
    message names it."""


@dataclass(frozen=True)
class InputFile:
    """One input: its number in the sorted input list, absolute path, how messages show it, output folder name.

    ``display`` is ``relative`` made printable (``printable``); ``relative`` is the path as the
    manifest records it: relative to the working directory when inside it.
    """

    index: int
    path: Path
    display: str
    name: str
    relative: str


def _relative(path: Path) -> str:
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(path)


def printable(text: str) -> str:
    """``text`` with every unprintable character (newline, escape, undecodable byte) written as its escape.

    File names come from the user's disk and can hold anything; printed raw, a newline would
    forge a message line and an escape sequence would drive the terminal.
    """
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)


def safe_name(stem: str) -> str:
    """An output folder name from an input's stem: one plain path component, never hidden, never ``.``/``..``.

    Separators, unprintable characters (``str.isprintable``) and undecodable bytes become ``_``; a leading dot
    becomes ``_`` (names such as ``..`` from ``...png``, or hidden folders that would meet the run's
    own temporary files); an empty stem is ``_``; a long one is cut at a character boundary.
    """
    # isprintable is false for control, format, private, unassigned and surrogate characters and for
    # every space but " ": all of them become "_", like the separators.
    name = "".join("_" if c in "/\\" or not c.isprintable() else c for c in stem).strip()
    if name.startswith("."):
        name = "_" + name[1:]
    name = name or "_"
    while len(name.encode("utf-8")) > _MAX_NAME_BYTES:
        name = name[:-1]
    return name


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def inside(path: str | os.PathLike, folder: str | None) -> bool:
    """Whether ``path``, resolved, is ``folder`` (a resolved path) or lies under it."""
    if folder is None:
        return False
    real = os.path.realpath(path)
    return real == folder or real.startswith(folder.rstrip(os.sep) + os.sep)


def _walk(top: str, exclude: str | None, fail: Callable[[str, str], None]) -> Iterator[tuple[str, tuple[str, ...]]]:
    """``(path, parts relative to top)`` of the files under ``top``, in a stable order.

    Links to folders are followed, but each real folder is entered once, so a symlink loop ends
    and a folder reached twice gives its files once. Hidden entries and ``exclude`` (the output
    folder) are left out; a folder that cannot be listed is reported through ``fail``.
    """
    seen: set[str] = set()

    def visit(folder: str, parts: tuple[str, ...]) -> Iterator[tuple[str, tuple[str, ...]]]:
        real = os.path.realpath(folder)
        if real in seen or inside(real, exclude):
            return
        seen.add(real)
        try:
            with os.scandir(folder) as entries:
                listed = sorted((e.name, e) for e in entries if not e.name.startswith("."))
        except OSError as e:
            fail(printable(_relative(Path(os.path.abspath(folder)))), f"cannot read folder ({e.strerror or e})")
            return
        for name, entry in listed:
            path = os.path.join(folder, name)
            try:
                is_dir = entry.is_dir()  # follows links: a link to a folder is walked (once)
            except OSError:
                is_dir = False
            if is_dir:
                yield from visit(path, parts + (name,))
            else:
                yield path, parts + (name,)

    yield from visit(top, ())


def _matcher(parts: Sequence[str]) -> Callable[[tuple[str, ...]], bool]:
    """Whether relative path parts match glob components ``parts``, where ``**`` spans any number of folders."""
    regexes = [None if p == "**" else re.compile(fnmatch.translate(p)) for p in parts]

    def match(path: tuple[str, ...], i: int = 0, j: int = 0) -> bool:
        if i == len(regexes):
            return j == len(path)
        if regexes[i] is None:
            return any(match(path, i + 1, m) for m in range(j, len(path) + 1))
        return j < len(path) and bool(regexes[i].match(path[j])) and match(path, i + 1, j + 1)

    return match


def _expand_glob(pattern: str, exclude: str | None, fail: Callable[[str, str], None]) -> Iterator[str]:
    """Files matched by ``pattern``, or lying in folders it matches; image files only.

    ``**`` is matched here rather than by ``glob``, whose recursion follows symlink loops without
    end: the part before the first ``**`` is globbed, and below it the loop-safe ``_walk`` runs.
    """
    parts = pattern.split(os.sep)
    if "**" not in parts:
        for match in sorted(glob.glob(pattern)):
            if inside(match, exclude):
                continue
            if os.path.isdir(match):
                yield from (p for p, rel in _walk(match, exclude, fail) if _is_image_name(rel[-1]))
            elif _is_image_name(match):
                yield match
        return
    cut = parts.index("**")
    base = os.sep.join(parts[:cut]) or ("/" if pattern.startswith(os.sep) else os.curdir)
    match = _matcher(parts[cut:])
    for top in sorted(glob.glob(base)) if glob.has_magic(base) else [base]:
        if not os.path.isdir(top):
            continue
        for path, rel in _walk(top, exclude, fail):
            # A file counts when it, or a folder above it, matches what follows the base.
            if _is_image_name(rel[-1]) and any(match(rel[:n]) for n in range(1, len(rel) + 1)):
                yield path


def output_names(paths: Sequence[Path]) -> list[str]:
    """Folder names under OUT: the stem made safe (``safe_name``), or that + path hash where names collide;
    unique ignoring case."""

    def tagged(path: Path, digits: int) -> str:
        return f"{safe_name(path.stem)}-{hashlib.sha256(os.fsencode(path)).hexdigest()[:digits]}"

    def clashes(names: list[str]) -> set[str]:
        seen: dict[str, int] = {}
        for name in names:
            seen[name.casefold()] = seen.get(name.casefold(), 0) + 1
        return {n for n, count in seen.items() if count > 1 or n in _RESERVED}

    names = [safe_name(p.stem) for p in paths]
    clash = clashes(names)
    names = [tagged(p, 8) if n.casefold() in clash else n for p, n in zip(paths, names)]
    # A tagged name can only meet another if a file is literally called like one; the full hash settles it.
    clash = clashes(names)
    return [tagged(p, 64) if n.casefold() in clash else n for p, n in zip(paths, names)]


def collect_inputs(specs: Sequence[str | os.PathLike], exclude: str | os.PathLike | None = None,
                   ) -> tuple[list[InputFile], list[tuple[str, str]]]:
    """Expand files, folders and glob patterns into the numbered input list, plus ``(what, reason)`` for misses.

    Named files are taken whatever their extension; folders (recursively, links followed, each
    real folder once) and globs (``**`` recurses) contribute files with an image extension
    (``IMAGE_EXTENSIONS``, any case), skipping hidden names and anything inside ``exclude`` (the
    output folder). A file named explicitly inside ``exclude`` is a miss: its variations would
    land beside it, or over it. Files count once by resolved path (the first absolute path in
    sorted order stands for them). Folders that cannot be read are misses too. The list is
    sorted by absolute path, so the numbering does not depend on the order of ``specs``.
    """
    skip = os.path.realpath(exclude) if exclude is not None else None
    found: dict[str, str] = {}  # resolved path -> the absolute path that stands for it
    misses: list[tuple[str, str]] = []

    def fail(what: str, reason: str) -> None:
        misses.append((what, reason))

    def add(path: str) -> None:
        path = os.path.abspath(path)
        real = os.path.realpath(path)
        if real not in found or path < found[real]:
            found[real] = path

    for spec in specs:
        text = os.path.expanduser(os.fspath(spec))
        shown = printable(str(spec))
        before = dict(found)
        if os.path.isdir(text):
            for path, rel in _walk(text, skip, fail):
                if _is_image_name(rel[-1]):
                    add(path)
            if found == before and not inside(text, skip):
                misses.append((shown, "folder holds no image files"))
            elif found == before:
                misses.append((shown, "is the output folder (--out) or inside it"))
        elif os.path.lexists(text) and not glob.has_magic(text) or os.path.isfile(text):
            if inside(text, skip):
                misses.append((shown, "lies inside the output folder (--out); copy it elsewhere to use it as input"))
            else:
                add(text)
        elif glob.has_magic(text):
            for path in _expand_glob(text, skip, fail):
                add(path)
            if found == before:
                misses.append((shown, "matches no image files"))
        else:
            misses.append((shown, "no such file or folder"))
    paths = [Path(p) for p in sorted(found.values())]
    names = output_names(paths)
    return [InputFile(i, p, printable(_relative(p)), n, _relative(p))
            for i, (p, n) in enumerate(zip(paths, names))], misses


def read_input(path: Path) -> tuple[bytes, str]:
    """The file's bytes and their sha256, from one read; InputError if it cannot be read.

    Only regular files are read: a named pipe or a device would block or never end. The file
    is opened non-blocking for that check, so opening a pipe does not wait for a writer.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise InputError(f"cannot read ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError("not a regular file")
        if st.st_size > MAX_INPUT_BYTES:
            raise InputError(f"{st.st_size} bytes, more than the {MAX_INPUT_BYTES >> 20} MiB a picture file may have")
        try:
            data = f.read(MAX_INPUT_BYTES + 1)
        except OSError as e:
            raise InputError(f"cannot read ({e.strerror or e})") from None
    if len(data) > MAX_INPUT_BYTES:
        raise InputError(f"more than the {MAX_INPUT_BYTES >> 20} MiB a picture file may have")
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
        except Exception as e:  # a format plugin may raise anything on hostile bytes; it is this file's failure
            raise InputError(f"cannot decode ({type(e).__name__}: {e})") from None
    if image.width == 0 or image.height == 0:
        raise InputError(f"zero-size image ({image.width}x{image.height})")
    return image


def is_embedding(path: str | os.PathLike) -> bool:
    """Whether the file is taken as a CLIP image embedding (``.npy``, any case) rather than a picture."""
    return os.fspath(path).lower().endswith(EMBEDDING_EXTENSION)


def decode_embedding(data: bytes) -> np.ndarray:
    """A ``numpy.save`` file's bytes holding a float array ``[D]`` or ``[1, D]`` -> float32 ``[1, D]``, finite;
    InputError saying why not. The header is checked before the data is read, so a file that claims a huge
    shape allocates nothing; pickled objects are never loaded."""
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buffer)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buffer)
        else:
            raise InputError(f"unsupported .npy format version {version[0]}.{version[1]}")
    except InputError:
        raise
    except Exception as e:  # numpy raises ValueError, SyntaxError and others on damaged headers
        raise InputError(f"not a numpy .npy file ({printable(str(e)) or type(e).__name__})") from None
    if not np.issubdtype(dtype, np.floating):
        raise InputError(f"expected a float array (a CLIP image embedding), got dtype {dtype}")
    if len(shape) not in (1, 2) or len(shape) == 2 and shape[0] != 1 or not 0 < shape[-1] <= _MAX_EMBEDDING:
        raise InputError(f"expected an embedding of shape [D] or [1, D], got shape {list(shape)}")
    buffer.seek(0)
    try:
        array = np.load(buffer, allow_pickle=False)
    except Exception as e:
        raise InputError(f"truncated or corrupt .npy file ({printable(str(e)) or type(e).__name__})") from None
    with np.errstate(over="ignore"):  # a float64 value beyond float32's range becomes inf, refused below
        embedding = np.asarray(array, np.float32).reshape(1, -1)
    if not np.isfinite(embedding).all():
        raise InputError("the embedding holds NaN or infinity")
    return embedding


def check_embedding_size(embedding: np.ndarray, dim: int) -> None:
    """InputError unless ``embedding`` ``[1, D]`` has the model's width ``dim``."""
    if embedding.shape[1] != dim:
        raise InputError(f"expected an embedding of {dim} values (the image encoder's projection size), "
                         f"got shape {list(embedding.shape[1:])}")


@dataclass(frozen=True)
class Source:
    """A file that conditions a whole run: its picture (RGB) or embedding ``[1, D]``, and its sha256.

    ``display`` and ``relative`` are as ``InputFile``'s.
    """

    display: str
    relative: str
    sha256: str
    picture: Image.Image | None = None
    embedding: np.ndarray | None = None

    def checked(self, dim: int, what: str) -> "Source":
        """``self``, once an embedding's width is known to fit the loaded model; SourceError naming ``what``."""
        if self.embedding is not None:
            try:
                check_embedding_size(self.embedding, dim)
            except InputError as e:
                raise SourceError(f"{what} {self.display}: {e}") from None
        return self


def read_source(spec: str | os.PathLike, what: str, exclude: str | os.PathLike | None = None) -> Source:
    """Read and decode the picture or ``.npy`` embedding ``spec`` names; SourceError naming ``what`` (the
    option) and the file when it cannot be used, or when it lies inside ``exclude`` (the output folder)."""
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(spec))))
    display = printable(_relative(path))
    try:
        if exclude is not None and inside(path, os.path.realpath(exclude)):
            raise InputError("lies inside the output folder (--out); copy it elsewhere to use it")
        if os.path.isdir(path):
            raise InputError("is a folder; name a picture or .npy file")
        if not os.path.lexists(path):
            raise InputError("no such file")
        data, sha = read_input(path)
        if is_embedding(path):
            return Source(display, _relative(path), sha, embedding=decode_embedding(data))
        try:
            picture = to_rgb(decode_image(data), name=display)
        except InputError:
            raise
        except Exception as e:  # EXIF, ICC and plugin code can raise anything on hostile bytes
            raise InputError(f"cannot use this picture ({printable(str(e).removeprefix(f'{display}: '))})") from None
        return Source(display, _relative(path), sha, picture=picture)
    except InputError as e:
        raise SourceError(f"{what} {display}: {e}") from None

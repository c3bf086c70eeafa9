"""Output files: atomic writes, PNG text chunks, manifest records and contact sheets.

Every piece of metadata is derived from the run's resolved ``GenerationSettings``: its
``to_text()`` chunks plus the per-picture keys (``PICTURE_KEYS``) in each PNG, its ``to_json()``
fields plus the per-picture ones in each manifest record, and ``recorded_from_text`` to read a
PNG's settings back when deciding whether it is already done.
"""

from __future__ import annotations

import json
import math
import os
import struct
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Sequence

from PIL import Image, PngImagePlugin

from ..settings import GenerationSettings
from .inputs import MANIFEST, InputFile

SOFTWARE = "imvar-jax"
# The chunks each output carries besides the settings; "nsfw" and "Software" are informative only.
PICTURE_KEYS = ("input_sha256", "index", "nsfw", "Software")
_TMP_PREFIX = ".imvar-tmp-"
_MAX_ROW = 8


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


def read_png_text(path: Path, size: tuple[int, int]) -> dict[str, str] | None:
    """The text chunks of a complete PNG of ``size`` (width, height); None if missing, unreadable or otherwise."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG" or image.size != size:
                return None
            return {k: str(v) for k, v in image.text.items()}
    except (OSError, SyntaxError, ValueError, EOFError, struct.error):
        return None


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
                *, grid: bool = False) -> dict[str, str]:
    """The chunks of one output: the settings, then the per-picture keys (no ``nsfw`` on a grid)."""
    text = {"Software": SOFTWARE, **resolved.to_text(), "input_sha256": sha256, "index": str(index)}
    if not grid:
        text["nsfw"] = nsfw_text(nsfw)
    return text


def is_current(found: Mapping[str, str] | None, resolved: GenerationSettings, sha256: str, index: int | str,
               ) -> bool:
    """Whether an existing output's chunks say it was made from this input, at this index, with these settings."""
    return (found is not None and found.get("input_sha256") == sha256 and found.get("index") == str(index)
            and GenerationSettings.recorded_from_text(found) == resolved.recorded())


# ----------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------

def record(item: InputFile, sha256: str, j: int, resolved: GenerationSettings, nsfw: bool | None,
           ) -> dict[str, Any]:
    """Variation ``j`` of ``item``'s manifest line."""
    k = resolved.num_images_per_prompt
    return {"path": f"{item.name}/{j}.png", "input": item.display, "input_sha256": sha256,
            "index": picture_index(item, j, k), "input_index": item.index, "variation": j,
            **resolved.to_json(), "nsfw": nsfw}


def append_record(out: Path, entry: Mapping[str, Any]) -> None:
    with open(out / MANIFEST, "a", encoding="utf-8") as f:
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


def rewrite_manifest(out: Path, current: Mapping[str, Mapping[str, Any]]) -> None:
    """One line per existing output: this run's record, else the last one written for that path; sorted."""
    path = out / MANIFEST
    records = {r["path"]: r for r in read_manifest(path)}
    records.update(current)
    kept = [r for p, r in records.items() if (out / p).is_file()]
    if not kept and not path.exists():
        return

    def order(entry: Mapping[str, Any]) -> tuple[str, int, str]:
        variation = entry.get("variation")
        return (str(Path(entry["path"]).parent), variation if isinstance(variation, int) else -1, entry["path"])

    body = "".join(json.dumps(r) + "\n" for r in sorted(kept, key=order)).encode()
    if not (path.is_file() and path.read_bytes() == body):
        atomic_write(path, lambda f: f.write(body))


# ----------------------------------------------------------------------
# Contact sheets
# ----------------------------------------------------------------------

def _columns(count: int) -> int:
    return count if count <= _MAX_ROW else math.ceil(math.sqrt(count))


def sheet_size(count: int, size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of a contact sheet of ``count`` tiles of ``size`` (width, height)."""
    columns = _columns(count)
    return columns * size[0], math.ceil(count / columns) * size[1]


def contact_sheet(tiles: Sequence[Image.Image], size: tuple[int, int]) -> Image.Image:
    """Tiles of ``size`` (width, height) in one row, or a near-square grid when there are more than ``_MAX_ROW``."""
    columns = _columns(len(tiles))
    width, height = size
    sheet = Image.new("RGB", sheet_size(len(tiles), size))
    for n, tile in enumerate(tiles):
        tile = tile if tile.mode == "RGB" else tile.convert("RGB")
        if tile.size != size:
            tile = tile.resize(size, Image.Resampling.BICUBIC)
        sheet.paste(tile, ((n % columns) * width, (n // columns) * height))
    return sheet

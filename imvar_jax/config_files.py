"""The two side configs of a checkpoint, ``scheduler_config.json`` and ``preprocessor_config.json``, read and checked.

Both are checked when a checkpoint is converted or loaded, so a bad value fails there naming the
file and key, not later while sampling or while preparing an input picture (which it would blame).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .models.config import read_json
from .preprocessing import clip_settings
from .schedulers import check_scheduler_config


def _read(path: Path, check: Callable[[dict[str, Any], str], Any]) -> dict[str, Any]:
    """``path`` as a dict after ``check(raw, where)``; ``ConfigError`` starting with ``path`` and naming the key
    (a missing file, invalid JSON or a non-object is one too)."""
    raw = read_json(path)
    check(raw, str(path))
    return raw


def read_scheduler_config(path: Path) -> dict[str, Any]:
    """``scheduler_config.json`` as a dict, its values checked for every supported scheduler."""
    return _read(path, lambda raw, where: check_scheduler_config(raw, where=where))


def read_preprocessor_config(path: Path) -> dict[str, Any]:
    """``preprocessor_config.json`` as a dict, checked as ``"clip"`` preprocessing will read it."""
    return _read(path, lambda raw, where: clip_settings(raw, where=where))

"""The two side configs of a checkpoint, ``scheduler_config.json`` and ``preprocessor_config.json``, read and checked.

Both are checked when a checkpoint is converted or loaded, so a bad value fails there naming the
file and key, not later while sampling or while preparing an input picture (which it would blame).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .models.config import read_json
from .preprocessing import clip_settings
from .schedulers import check_scheduler_config


def read_scheduler_config(path: Path) -> dict[str, Any]:
    """``scheduler_config.json`` as a dict, its values checked for every supported scheduler.

    Raises ``ConfigError`` starting with ``path`` and naming the key (a missing file, invalid
    JSON or a non-object is one too).
    """
    raw = read_json(path)
    check_scheduler_config(raw, where=str(path))
    return raw


def read_preprocessor_config(path: Path) -> dict[str, Any]:
    """``preprocessor_config.json`` as a dict, checked as ``"clip"`` preprocessing will read it.

    Raises ``ConfigError`` starting with ``path`` and naming the key (a missing file, invalid
    JSON or a non-object is one too).
    """
    raw = read_json(path)
    clip_settings(raw, where=str(path))
    return raw

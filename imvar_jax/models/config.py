"""Frozen model configs read from a checkpoint's ``config.json``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, TypeVar

C = TypeVar("C")


class ConfigError(ValueError):
    """A config value this implementation does not support, named by field."""


def check_supported(name: str, raw: Mapping[str, Any], supported: Mapping[str, tuple]) -> None:
    """Raise on any architecture-changing field whose value we do not implement.

    ``supported`` maps a field to the values we accept; a field absent from
    ``raw`` takes the reference's default, which is always the first entry.
    """
    for field, allowed in supported.items():
        if field in raw and _normalise(raw[field]) not in [_normalise(a) for a in allowed]:
            raise ConfigError(
                f"{name}: unsupported config value {field}={raw[field]!r} (supported: {list(allowed)!r})"
            )


def _normalise(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_normalise(v) for v in value)
    return value


def from_dict(cls: type[C], raw: Mapping[str, Any], **overrides: Any) -> C:
    """Build ``cls`` from the known keys of ``raw``; lists become tuples so the config is hashable."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: _normalise(v) for k, v in raw.items() if k in names}
    kwargs.update(overrides)
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


class JsonConfig:
    """Base of the model configs: ``from_json`` reads a ``config.json`` through the class's ``from_dict``."""

    @classmethod
    def from_json(cls, path: str | Path) -> Any:
        return cls.from_dict(read_json(path))


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"missing config file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data

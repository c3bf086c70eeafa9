"""Frozen model configs read from a checkpoint's ``config.json``, through an accept-list of its keys."""

from __future__ import annotations

import dataclasses
import json
import math
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar

from imvar_jax.errors import ConfigError  # noqa: F401  (re-exported: models and converters raise it from here)

C = TypeVar("C")

KeyKind = Literal["read", "pinned", "ignored"]

# Values in messages stay short and on one line, whatever a config holds.
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_repr = short_repr = _short.repr


@dataclass(frozen=True)
class ConfigKeys:
    """Every key one kind of ``config.json`` may hold, by what this port does with it.

    ``read`` keys are parsed into the config. ``pinned`` keys change the model in ways this
    port does not implement, so each must hold one of its listed values (the reference
    library's default first) or be absent. ``ignored`` keys cannot change the output:
    metadata, dropout (off at inference), init scales, output flags. Keys starting with
    ``_`` are metadata. Any other key is refused: a newer library may have added an option
    that would otherwise be dropped silently, giving a different model with no error.
    """

    name: str
    read: frozenset[str]
    pinned: Mapping[str, tuple[Any, ...]]
    ignored: frozenset[str]

    def kind(self, key: str) -> KeyKind | None:
        """How ``key`` is classified; None for a key this port does not know."""
        if key in self.read:
            return "read"
        if key in self.pinned:
            return "pinned"
        if key in self.ignored or key.startswith("_"):
            return "ignored"
        return None

    def check(self, raw: Mapping[str, Any], where: str | None = None) -> None:
        """Raise ``ConfigError`` on the first unknown key, or pinned key with an unsupported value.

        ``where`` names the config in messages (default ``name``), e.g. a nested sub-config.
        """
        where = where or self.name
        for key, value in raw.items():
            kind = self.kind(key)
            if kind is None:
                raise ConfigError(
                    f"unknown config key {key!r} in {where} config (value {_repr(value)}): imvar-jax does not "
                    f"know whether it changes the model; delete the key if you know it has no effect, else "
                    f"this checkpoint is not supported")
            if kind == "pinned":
                check_value(where, key, value, self.pinned[key])


def check_value(name: str, key: str, value: Any, allowed: tuple[Any, ...]) -> None:
    """Raise ``ConfigError`` unless ``value`` is one of ``allowed`` (a bool matches only a bool)."""
    if not any(_same(value, a) for a in allowed):
        raise ConfigError(f"{name}: unsupported config value {key}={_repr(value)} (supported: {_repr(list(allowed))})")


def _same(a: Any, b: Any) -> bool:
    # JSON's true equals 1 in Python, which would let a bool stand in for a number.
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return type(a) is type(b) and a == b
    a, b = _normalise(a), _normalise(b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _normalise(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_normalise(v) for v in value)
    return value


def check_int(name: str, key: str, value: Any, minimum: int = 1) -> int:
    """``value`` if it is an int (a bool is not) of at least ``minimum``, else ``ConfigError`` naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}: {key} must be an integer >= {minimum}, got {_repr(value)}")
    return value


def check_ints(name: str, key: str, value: Any, minimum: int = 1) -> tuple[int, ...]:
    """``value`` if it is a non-empty list (a tuple, once read) of ints of at least ``minimum``."""
    if (not isinstance(value, tuple) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value)):
        raise ConfigError(f"{name}: {key} must be a non-empty list of integers >= {minimum}, "
                          f"got {_repr(_plain(value))}")
    return value


def check_per_block(name: str, key: str, value: Any, blocks: int, minimum: int = 1) -> tuple[int, ...]:
    """An int for every block, or a list of one int per block (each at least ``minimum``), as one per block."""
    if isinstance(value, tuple):
        if len(value) != blocks or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum
                                           for v in value):
            raise ConfigError(f"{name}: unsupported config value {key}={_repr(_plain(value))} (an integer >= "
                              f"{minimum}, or one per block: {blocks} blocks)")
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}: unsupported config value {key}={_repr(_plain(value))} (an integer >= {minimum}, "
                          f"or one per block)")
    return (value,) * blocks


def check_number(name: str, key: str, value: Any, *, positive: bool = False) -> float:
    """``value`` if it is a finite number (a bool is not), and > 0 where ``positive``."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or (positive and value <= 0)):
        what = "a finite number > 0" if positive else "a finite number"
        raise ConfigError(f"{name}: {key} must be {what}, got {_repr(_plain(value))}")
    return value


def check_bool(name: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: {key} must be true or false, got {_repr(_plain(value))}")
    return value


def check_names(name: str, key: str, value: Any, allowed: tuple[str, ...], blocks: int) -> tuple[str, ...]:
    """``value`` if it is a list of ``blocks`` names, each one of ``allowed``."""
    if not isinstance(value, tuple) or not all(isinstance(v, str) and v in allowed for v in value):
        raise ConfigError(f"{name}: unsupported config value {key}={_repr(_plain(value))} "
                          f"(supported blocks: {list(allowed)!r})")
    if len(value) != blocks:
        raise ConfigError(f"{name}: {key} has {len(value)} entries but block_out_channels has {blocks}")
    return value


def _plain(value: Any) -> Any:
    """A read value as the JSON held it (lists, not the tuples they became), for messages."""
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


def field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls))


def from_dict(cls: type[C], raw: Mapping[str, Any], keys: ConfigKeys, **overrides: Any) -> C:
    """Check ``raw`` against ``keys``, then build ``cls`` from its read keys; lists become tuples (hashable)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{keys.name}: expected a JSON object, got {type(raw).__name__}")
    keys.check(raw)
    kwargs = {k: _normalise(v) for k, v in raw.items() if k in keys.read}
    kwargs.update(overrides)
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


class JsonConfig:
    """Base of the model configs: ``from_json`` reads a ``config.json`` through the class's ``from_dict``."""

    @classmethod
    def from_json(cls, path: str | Path) -> Any:
        """Read ``path`` through ``from_dict``; every ``ConfigError`` starts with the file's path."""
        raw = read_json(path)
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"missing config file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid JSON (nested too deeply)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data

"""Errors shared by every layer; the bottom of the import graph (it imports nothing of imvar_jax)."""

from __future__ import annotations

from typing import Any


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: a message stays one readable line whatever was passed."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class ConfigError(ValueError):
    """A config key or value this implementation does not support, named by key."""


class NonFiniteError(ValueError):
    """Sampling produced NaN or inf: a numerical failure of the run, not a fault of the input pictures.

    ``pictures`` maps each bad picture's global index to where it first went non-finite
    (``"step 3 (timestep 741)"`` or ``"decoding"``); ``output`` is the call's whole output, so a
    caller can keep the pictures that stayed finite.
    """

    def __init__(self, message: str, pictures: dict[int, str], output: Any) -> None:
        super().__init__(message)
        self.pictures = dict(pictures)
        self.output = output

"""Model names to component configs and params: converted folders, diffusers folders, hub ids, ``"tiny"``.

A source is opened in two steps (``open_model``): every component's config is read and checked
first, so a pipeline (and its compiled programs) can be made before a single weight is read; then
the weights are read a component at a time, each put on its devices before the next is read, so
loading never holds the whole model twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from .config_files import read_preprocessor_config, read_scheduler_config
from .convert.checkpoint import is_converted, open_converted, open_torch
from .hub import TINY_MODEL, resolve_model
from .schedulers import SD_V1_SCHEDULER_CONFIG
from .tiny import open_tiny, tiny_feature_extractor_config


@dataclass
class LoadedModel:
    """What a pipeline is built from: per-component configs and params, plus the two side configs."""

    configs: dict[str, Any]
    params: dict[str, Any]
    scheduler_config: dict[str, Any] | None
    feature_extractor_config: dict[str, Any] | None


def _read_optional(path: Path, read: Callable[[Path], dict[str, Any]]) -> dict[str, Any] | None:
    """``read(path)`` (which checks the file's values), or None where the checkpoint has no such file.

    A link to nowhere or a folder in the file's place is read, so it fails naming the file
    instead of being taken for a missing config.
    """
    return read(path) if os.path.lexists(path) else None


def move_to_devices(tree: dict[str, Any], put: Callable[[Any], jax.Array]) -> dict[str, Any]:
    """Put a nested dict of host arrays on devices leaf by leaf, emptying ``tree`` as it goes.

    Each host array is dropped as soon as its device copy exists, so loading never holds a
    whole second copy of a component (on a CPU backend the "device" copy is host memory too).
    """
    out = {}
    for key in list(tree):
        value = tree.pop(key)
        out[key] = move_to_devices(value, put) if isinstance(value, dict) else jax.block_until_ready(put(value))
        del value
    return out


@dataclass
class ModelSource:
    """A model whose configs have been read and checked, its weights not yet."""

    configs: dict[str, Any]
    scheduler_config: dict[str, Any] | None
    feature_extractor_config: dict[str, Any] | None
    dtypes: dict[str, np.dtype]  # per component
    _read: Callable[[str, np.dtype], dict[str, Any]]  # (component name, dtype) -> its host params

    def load_params(self, put: Callable[[Any], jax.Array]) -> dict[str, Any]:
        """Every component's params placed by ``put``, one component in host memory at a time."""
        return {name: move_to_devices(self._read(name, self.dtypes[name]), put) for name in self.configs}


def open_model(path: str | os.PathLike, *, revision: str | None, dtype: np.dtype, vae_dtype: np.dtype,
               safety_checker: bool) -> ModelSource:
    """``path`` (see ``ImageVariationPipeline.from_pretrained``) with its configs read; a hub id is fetched and
    converted here."""
    if str(path) == TINY_MODEL:
        if revision is not None:
            raise ValueError(f"revision: the built-in {TINY_MODEL!r} model has no revisions, got {revision!r}")
        configs, read = open_tiny(include_safety_checker=safety_checker)
        scheduler_config = dict(SD_V1_SCHEDULER_CONFIG)
        feature_extractor_config = tiny_feature_extractor_config(configs["image_encoder"].image_size)
    else:
        root = resolve_model(path, revision, dtype)
        configs, read = (open_converted if is_converted(root) else open_torch)(root, safety_checker)
        # Read before the weights, so a bad side config fails in seconds, naming its file.
        scheduler_config = _read_optional(root / "scheduler" / "scheduler_config.json", read_scheduler_config)
        feature_extractor_config = _read_optional(root / "feature_extractor" / "preprocessor_config.json",
                                                  read_preprocessor_config)
    dtypes = {name: np.dtype(vae_dtype if name == "vae" else dtype) for name in configs}
    return ModelSource(configs, scheduler_config, feature_extractor_config, dtypes, read)


def load_model(path: str | os.PathLike, *, revision: str | None, dtype: np.dtype, vae_dtype: np.dtype,
               safety_checker: bool, put: Callable[[Any], jax.Array]) -> LoadedModel:
    """Read ``path`` (see ``ImageVariationPipeline.from_pretrained``) with params placed by ``put``."""
    source = open_model(path, revision=revision, dtype=dtype, vae_dtype=vae_dtype, safety_checker=safety_checker)
    return LoadedModel(source.configs, source.load_params(put), source.scheduler_config,
                       source.feature_extractor_config)

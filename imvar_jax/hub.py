"""Model names to local folders, and the caches that make the second run fast.

- A hub id is downloaded once through ``huggingface_hub`` (configs and weights only) and
  converted once into imvar-jax's own cache, per (repo, revision, dtype); later loads read
  the converted Flax folder and never look at the PyTorch files again.
- ``enable_compile_cache`` turns on JAX's persistent compilation cache, so a new process
  reuses compiled sampling programs instead of compiling them again.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Callable

import jax
from jax.experimental.compilation_cache import compilation_cache

from .convert.checkpoint import OPTIONAL, REQUIRED, convert_checkpoint, is_converted
from .convert.common import _WEIGHT_NAMES, ConversionError
from .models.config import ConfigError
from .precision import parse_dtype

log = logging.getLogger(__name__)

DEFAULT_MODEL = "lambdalabs/sd-image-variations-diffusers"
# The model card's recommended revision; loading DEFAULT_MODEL without a revision pins it, so the
# Python API, the CLI and the converted cache all mean the same weights.
DEFAULT_REVISION = "v2.0"
# The built-in random-weight model of imvar_jax.tiny: no folder, no download.
TINY_MODEL = "tiny"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_CONFIG_PATTERNS = ["model_index.json", "scheduler/*.json", "feature_extractor/*.json",
                    *(f"{c}/config.json" for c in REQUIRED + OPTIONAL)]


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether ``name`` has the form ``owner/name`` of a Hugging Face Hub repo."""
    return bool(_HUB_ID.match(str(name)))


def cache_dir() -> Path:
    """imvar-jax's cache root: ``$IMVAR_JAX_CACHE``, else ``$XDG_CACHE_HOME/imvar-jax``, else ``~/.cache/imvar-jax``."""
    own = os.environ.get("IMVAR_JAX_CACHE")
    if own:
        return Path(own).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "imvar-jax"


def compile_cache_dir() -> Path:
    """Where ``enable_compile_cache`` keeps compiled programs by default."""
    return cache_dir() / "jax-compile"


def pinned_revision(model: str, revision: str | None) -> str:
    """The revision a load of ``model`` uses: the one given, ``DEFAULT_REVISION`` for ``DEFAULT_MODEL``, else main."""
    if revision:
        return revision
    return DEFAULT_REVISION if model == DEFAULT_MODEL else "main"


def converted_dir(model: str, revision: str | None = None, dtype: Any = "float32") -> Path:
    """The cache folder for hub id ``model`` converted at ``revision`` to ``dtype``.

    A branch (such as main) is cached under its name: if it moves upstream, delete the folder
    or load a tag or commit hash to get the new weights.
    """
    owner, name = model.split("/")
    revision = pinned_revision(model, revision).replace("/", "--")
    return cache_dir() / "converted" / f"{owner}--{name}" / revision / parse_dtype(dtype).name


def local_folder(model: str | os.PathLike) -> Path | None:
    """``model`` as an existing local folder, or None when it is a hub id (and no such folder exists)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"{path}: not a folder")
        return path
    if not is_hub_id(model):
        raise ConversionError(f"{model}: no such folder, and not a hub id of the form owner/name")
    return None


def _weight_files(ext: str) -> list[str]:
    """The names ``find_weights`` reads for ``ext``: single files, sharded indexes and their shards, nothing else
    (no fp16 or EMA variants)."""
    return [name for stem in _WEIGHT_NAMES
            for name in (f"{stem}{ext}", f"{stem}{ext}.index.json", f"{stem}-*-of-*{ext}")]


def _weight_patterns(components: list[str], ext: str) -> list[str]:
    return [f"{c}/{name}" for c in components for name in _weight_files(ext)]


def download(model: str, revision: str | None = None) -> Path:
    """Fetch the configs and weights of hub repo ``model`` into huggingface_hub's cache; return the snapshot.

    Safetensors are taken for every component that has them; ``.bin`` only for a component
    without. huggingface_hub honours ``HF_HUB_OFFLINE``, ``HF_HOME``/``HF_HUB_CACHE`` and a
    complete cached snapshot needs no network. Raises a one-line ConversionError naming the
    repo and revision when the files cannot be had.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    revision = pinned_revision(model, revision)
    components = list(REQUIRED + OPTIONAL)
    try:
        local = Path(snapshot_download(model, revision=revision,
                                       allow_patterns=_CONFIG_PATTERNS + _weight_patterns(components, ".safetensors")))
        # A component folder exists once its config is fetched; one without safetensors needs its .bin.
        without = [c for c in components if (local / c).is_dir()
                   and not any(any((local / c).glob(name)) for name in _weight_files(".safetensors"))]
        if without:
            local = Path(snapshot_download(model, revision=revision,
                                           allow_patterns=_CONFIG_PATTERNS + _weight_patterns(without, ".bin")))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{model}: cannot fetch from the hub (revision {revision}): {first}") from None
    return local


def resolve_model(model: str | os.PathLike, revision: str | None = None, dtype: Any = "float32",
                  progress: Callable[[str], None] | None = None) -> Path:
    """A local folder (converted or diffusers) as is; a hub id as its converted Flax folder in ``cache_dir()``.

    A hub id already converted for (repo, revision, dtype) is used without touching the hub
    or its PyTorch files. Otherwise its files are downloaded (see ``download``) and converted
    into ``converted_dir(model, revision, dtype)``; the folder appears only once complete.
    ``progress(component)`` is called as each component is converted. A download or conversion
    that fails raises a one-line ConversionError naming the repo and revision, and leaves nothing.
    """
    path = local_folder(model)
    if path is not None:
        return path
    model = str(model)
    revision = pinned_revision(model, revision)
    dst = converted_dir(model, revision, dtype)
    if is_converted(dst):
        return dst
    src = download(model, revision)
    log.info("converting %s (revision %s) to %s in %s", model, revision, parse_dtype(dtype).name, dst)
    try:
        convert_checkpoint(src, dst, dtype, source_name=model, revision=revision, progress=progress)
    except (ConversionError, ConfigError) as e:
        raise ConversionError(f"{model} (revision {revision}): {e}") from None
    except OSError:
        # Another process may have finished the same conversion first; its folder is as good.
        if is_converted(dst):
            return dst
        if dst.exists():
            raise ConversionError(f"{dst}: exists but is not a finished conversion of {model} "
                                  f"(revision {revision}); delete it and load again") from None
        raise
    return dst


def resolve_source(src: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder as is; a hub id (``owner/name``) as its snapshot in huggingface_hub's cache.

    Downloads only configs and weights, safetensors when the repo has them (see ``download``),
    and honours ``HF_HUB_OFFLINE`` and the usual cache variables.
    """
    path = local_folder(src)
    return path if path is not None else download(str(src), revision)


def recorded_revision(model: str, revision: str | None) -> str | None:
    """The revision that outputs of ``model`` record: the pinned one for a hub id, None for local folders."""
    if model == TINY_MODEL or Path(model).expanduser().exists() or not is_hub_id(model):
        return None
    return pinned_revision(model, revision)


def is_cached(model: str | os.PathLike, revision: str | None = None, dtype: Any = "float32") -> bool:
    """Whether loading ``model`` needs neither a download nor a conversion.

    True for the built-in ``"tiny"``, a converted local folder, and a hub id whose converted
    folder for (revision, dtype) exists; False otherwise (also for names that do not resolve).
    """
    if str(model) == TINY_MODEL:
        return True
    path = Path(model).expanduser()
    if path.exists():
        return is_converted(path)
    return is_hub_id(model) and is_converted(converted_dir(str(model), revision, dtype))


def executable_cache_dir() -> Path:
    """Where ``enable_executable_cache`` keeps compiled sampling programs."""
    return cache_dir() / "executables"


def enable_executable_cache() -> Path:
    """Turn on imvar-jax's cache of compiled sampling programs (``imvar_jax.executables``) in
    ``executable_cache_dir()``, so a later process skips tracing and lowering too; return the folder."""
    from . import executables

    return executables.enable(executable_cache_dir()).folder


def enable_compile_cache(path: str | os.PathLike | None = None) -> Path:
    """Turn on JAX's persistent compilation cache in ``path`` (default ``compile_cache_dir()``); return it.

    Every compiled program is stored, however small or quick to compile: JAX's defaults skip
    programs that compile in under a second, which on a CPU would be most of them.
    """
    path = Path(path).expanduser() if path is not None else compile_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    # JAX decides at its first compile whether the cache is in use and never looks again;
    # resetting makes a cache enabled after something was compiled take effect.
    compilation_cache.reset_cache()
    return path

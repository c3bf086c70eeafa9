"""Whole-checkpoint conversion: a diffusers-layout folder -> a Flax checkpoint folder.

Converted layout (what ``load_converted`` reads)::

    DST/imvar_jax.json                 format marker, written last, names dtype and source
    DST/model_index.json               copied
    DST/<component>/config.json        copied, for unet, vae, image_encoder, safety_checker
    DST/<component>/params/            orbax-checkpoint of the params (nested dict)
    DST/scheduler/, DST/feature_extractor/   copied as they are

DST appears only through one rename of a finished temporary folder, so an interrupted
conversion never leaves a folder that looks complete.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np

from ..precision import parse_dtype
from .clip import IMAGE_ENCODER_SPEC, SAFETY_CHECKER_SPEC
from .common import ComponentSpec, ConversionError, convert_component
from .unet import SPEC as UNET_SPEC
from .vae import SPEC as VAE_SPEC

FORMAT_FILE = "imvar_jax.json"
FORMAT_VERSION = 1

SPECS: dict[str, ComponentSpec] = {s.name: s for s in (UNET_SPEC, VAE_SPEC, IMAGE_ENCODER_SPEC, SAFETY_CHECKER_SPEC)}
REQUIRED = ("unet", "vae", "image_encoder")
OPTIONAL = ("safety_checker",)
COPIED = ("scheduler", "feature_extractor")

def _read_model_index(src: Path) -> dict[str, Any]:
    index = src / "model_index.json"
    if not index.is_file():
        raise ConversionError(f"{src}: not a diffusers checkpoint folder (no model_index.json)")
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"{index}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{index}: expected a JSON object")
    return data


def components_of(src: Path, model_index: Mapping[str, Any]) -> list[str]:
    """The model components present: required ones must be there; the safety checker may be absent or null."""
    present = []
    for name in REQUIRED + OPTIONAL:
        entry = model_index.get(name)
        disabled = entry is None or (isinstance(entry, list) and entry[0] is None)
        if name in REQUIRED and (disabled or not (src / name).is_dir()):
            raise ConversionError(f"{src}: missing component '{name}' (model_index.json and a {name}/ folder)")
        if not disabled and (src / name).is_dir():
            present.append(name)
    return present


def iter_torch_components(src: str | os.PathLike, dtype: Any = np.float32,
                          include_safety_checker: bool = True, component_dtypes: Mapping[str, Any] | None = None):
    """Yield ``(name, config, params)`` per component of a PyTorch diffusers folder, one at a time.

    ``component_dtypes`` overrides ``dtype`` for the components it names.
    """
    src = Path(src)
    for name in components_of(src, _read_model_index(src)):
        if name == "safety_checker" and not include_safety_checker:
            continue
        want = parse_dtype((component_dtypes or {}).get(name, dtype))
        config, params = convert_component(SPECS[name], src / name, want)
        yield name, config, params


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype: Any = "float32",
                       source_name: str | None = None, revision: str | None = None,
                       progress: Callable[[str], None] | None = None) -> Path:
    """Convert a PyTorch diffusers folder into a Flax checkpoint folder at ``dst``.

    Components are converted and saved one by one so peak memory stays near the
    largest component. Raises ConversionError (naming the file or key) on a bad
    checkpoint, FileExistsError if ``dst`` exists; nothing is left at ``dst`` on failure.
    """
    import orbax.checkpoint as ocp

    src, dst = Path(src), Path(dst)
    dtype = parse_dtype(dtype)
    if dst.exists():
        raise FileExistsError(f"{dst}: already exists (choose a new destination)")
    model_index = _read_model_index(src)
    names = components_of(src, model_index)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        checkpointer = _checkpointer()
        for name in names:
            if progress:
                progress(name)
            config_path = src / name / "config.json"
            _, params = convert_component(SPECS[name], src / name, dtype)
            (tmp / name).mkdir()
            shutil.copy2(config_path, tmp / name / "config.json")
            checkpointer.save((tmp / name / "params").absolute(), args=ocp.args.StandardSave(params))
            del params
            gc.collect()
        for name in COPIED:
            if (src / name).is_dir():
                shutil.copytree(src / name, tmp / name)
        shutil.copy2(src / "model_index.json", tmp / "model_index.json")
        marker = {"format": "imvar-jax", "version": FORMAT_VERSION, "dtype": dtype.name, "components": names,
                  "source": source_name or str(src.resolve()), "revision": revision}
        (tmp / FORMAT_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _checkpointer():
    """A synchronous orbax checkpointer without OCDBT.

    OCDBT stages the whole tree a second time while writing (6.5 GiB peak for the 3.2 GiB
    UNet, measured); one zarr array per param keeps saving near the params' own size.
    """
    import orbax.checkpoint as ocp

    return ocp.Checkpointer(ocp.StandardCheckpointHandler(use_ocdbt=False))


def is_converted(path: str | os.PathLike) -> bool:
    return (Path(path) / FORMAT_FILE).is_file()


def read_format(path: str | os.PathLike) -> dict[str, Any]:
    marker = Path(path) / FORMAT_FILE
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"{marker}: unreadable ({e})") from None
    if data.get("format") != "imvar-jax" or data.get("version") != FORMAT_VERSION:
        raise ConversionError(f"{marker}: not an imvar-jax checkpoint of format version {FORMAT_VERSION}")
    return data


def load_converted_component(path: str | os.PathLike, name: str, dtype: Any) -> tuple[Any, dict[str, Any]]:
    """Restore one component of a converted folder as numpy params of ``dtype``, checking every shape."""
    import orbax.checkpoint as ocp

    spec = SPECS[name]
    d = Path(path) / name
    config = spec.read_config(d)
    want = parse_dtype(dtype)
    expected = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, want), spec.abstract_params(config))
    try:
        params = _checkpointer().restore((d / "params").absolute(), args=ocp.args.StandardRestore(expected))
    except (ValueError, KeyError, FileNotFoundError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{d / 'params'}: cannot restore {name} params ({first})") from None
    return config, params


def load_converted(path: str | os.PathLike, dtype: Any = np.float32, include_safety_checker: bool = True,
                   component_dtypes: Mapping[str, Any] | None = None):
    """Yield ``(name, config, params)`` for each component of a converted folder, cast to ``dtype``.

    ``component_dtypes`` overrides ``dtype`` for the components it names.
    """
    fmt = read_format(path)
    for name in fmt["components"]:
        if name == "safety_checker" and not include_safety_checker:
            continue
        if name not in SPECS:
            raise ConversionError(f"{path}: unknown component '{name}' in {FORMAT_FILE}")
        config, params = load_converted_component(path, name, (component_dtypes or {}).get(name, dtype))
        yield name, config, params

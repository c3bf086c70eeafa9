"""Whole-checkpoint conversion: a diffusers-layout folder -> a Flax checkpoint folder.

Converted layout (what ``load_converted`` reads)::

    DST/imvar_jax.json                 format marker, written last, names dtype and source
    DST/model_index.json               copied
    DST/<component>/config.json        copied, for unet, vae, image_encoder, safety_checker
    DST/<component>/params/            orbax-checkpoint of the params (nested dict)
    DST/scheduler/scheduler_config.json, DST/feature_extractor/preprocessor_config.json
                                       checked and copied, where the source has them

DST appears only through one rename of a finished temporary folder, so an interrupted
conversion never leaves a folder that looks complete. Every config (each component's
``config.json``, ``scheduler_config.json``, ``preprocessor_config.json``) is read and checked
before any weights are, and nothing is written before all of them pass.

The temporary folder is ``.<DST name>.partial-<pid>-<host tag>-<random>`` beside DST. A
conversion that is killed leaves it behind; the next conversion into the same parent folder
removes every such folder whose process has ended on this machine, and reports each removal
(``note``, else a logged warning). One whose process still runs, or that another machine made
(a shared folder: its process cannot be checked from here), is left alone and reported. The
pid may have been reused by an unrelated process since; then the folder is only kept too long,
never removed while its conversion runs.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np

from ..config_files import read_preprocessor_config, read_scheduler_config
from ..errors import shown
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
# The side configs, each checked, then copied on its own: nothing else of those folders is read,
# so a link or device file planted beside them is never followed.
SIDE_CONFIGS = (("scheduler", "scheduler_config.json", read_scheduler_config),
                ("feature_extractor", "preprocessor_config.json", read_preprocessor_config))

log = logging.getLogger(__name__)

_PARTIAL = re.compile(r"\.(?P<name>.+)\.partial-(?P<pid>[0-9]{1,7})-(?P<host>[0-9a-f]{8})-[0-9a-f]{8}")

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


def open_torch(src: str | os.PathLike, include_safety_checker: bool = True
               ) -> tuple[dict[str, Any], Callable[[str, Any], dict[str, Any]]]:
    """A PyTorch diffusers folder's component configs, every one checked before any weights are read, and a
    function ``(name, dtype) -> params`` that converts one component's weights."""
    src = Path(src)
    names = [n for n in components_of(src, _read_model_index(src))
             if n != "safety_checker" or include_safety_checker]
    configs = read_configs(src, names)

    def read(name: str, dtype: Any) -> dict[str, Any]:
        return convert_component(SPECS[name], src / name, parse_dtype(dtype), config=configs[name])[1]

    return configs, read


def iter_torch_components(src: str | os.PathLike, dtype: Any = np.float32,
                          include_safety_checker: bool = True, component_dtypes: Mapping[str, Any] | None = None):
    """Yield ``(name, config, params)`` per component of a PyTorch diffusers folder, one at a time.

    ``component_dtypes`` overrides ``dtype`` for the components it names.
    """
    configs, read = open_torch(src, include_safety_checker)
    for name, config in configs.items():
        yield name, config, read(name, (component_dtypes or {}).get(name, dtype))


def read_configs(src: Path, names: list[str]) -> dict[str, Any]:
    """Every component's config of ``names``, and the side configs checked, before any weights are read.

    A bad value anywhere fails in seconds naming its file, not after the large components
    have been converted. Raises ConversionError or ConfigError.
    """
    configs = {}
    for name in names:
        if not (src / name).is_dir():
            raise ConversionError(f"missing component folder {src / name}")
        configs[name] = SPECS[name].read_config(src / name)
    for folder, file, read in SIDE_CONFIGS:
        # A link to nowhere or a folder in the file's place is read, so it fails naming the file.
        if os.path.lexists(src / folder / file):
            read(src / folder / file)
    return configs


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype: Any = "float32",
                       source_name: str | None = None, revision: str | None = None,
                       progress: Callable[[str], None] | None = None,
                       note: Callable[[str], None] | None = None) -> Path:
    """Convert a PyTorch diffusers folder into a Flax checkpoint folder at ``dst``.

    Every config is checked first; then components are converted and saved one by one so
    peak memory stays near the largest component. ``progress(component)`` is called as each
    starts; ``note(line)`` reports stale temporary folders removed or kept (see the module
    docstring; default: logged). Raises ConversionError (naming the file or key) on a bad
    checkpoint or a destination that cannot be written, FileExistsError if ``dst`` exists;
    nothing is left at ``dst``, nor any parent folder it created, on failure.
    """
    import orbax.checkpoint as ocp

    src, dst = Path(src), Path(dst)
    dtype = parse_dtype(dtype)
    if os.path.lexists(dst):
        raise FileExistsError(f"{dst}: already exists (choose a new destination)")
    model_index = _read_model_index(src)
    names = components_of(src, model_index)
    configs = read_configs(src, names)
    created = _make_parents(dst)
    tmp = None
    try:
        _remove_stale_partials(dst.parent, note or log.warning)
        tmp = _make_partial(dst)
        checkpointer = _checkpointer()
        for name in names:
            if progress:
                progress(name)
            _, params = convert_component(SPECS[name], src / name, dtype, config=configs[name])
            (tmp / name).mkdir()
            shutil.copy2(src / name / "config.json", tmp / name / "config.json")
            # Host arrays (views of the CPU buffers): orbax refuses a process's own device arrays in a
            # multi-process job, and a converted folder is written by one process alone.
            host = jax.tree.map(np.asarray, params)
            checkpointer.save((tmp / name / "params").absolute(), args=ocp.args.StandardSave(host))
            del host
            del params
            gc.collect()
        for folder, file, _ in SIDE_CONFIGS:
            if (src / folder / file).is_file():
                (tmp / folder).mkdir()
                shutil.copyfile(src / folder / file, tmp / folder / file)
        shutil.copy2(src / "model_index.json", tmp / "model_index.json")
        marker = {"format": "imvar-jax", "version": FORMAT_VERSION, "dtype": dtype.name, "components": names,
                  "source": source_name or str(src.resolve()), "revision": revision}
        (tmp / FORMAT_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        os.rename(tmp, dst)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_folders(created)
        raise
    return dst


def _make_parents(dst: Path) -> list[Path]:
    """Create the missing folders above ``dst``; return them, outermost first. ConversionError if that fails."""
    missing = []
    parent = dst.parent
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise ConversionError(f"{dst}: cannot write there, {parent} is not a folder")
    created: list[Path] = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
    except OSError as e:
        _remove_folders(created)
        raise ConversionError(f"{dst}: cannot create folder {folder} ({e.strerror})") from None
    return created


def _remove_folders(created: list[Path]) -> None:
    """Remove the folders ``_make_parents`` created, innermost first, while they are empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            return  # no longer empty: something else writes there now


def _host_tag() -> str:
    # A pid means something only on the machine that gave it out; a shared folder can hold others'.
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _make_partial(dst: Path) -> Path:
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}-{_host_tag()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise ConversionError(f"{dst}: cannot write in {dst.parent} ({e.strerror})") from None
    return tmp


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, run by another user
    return True


def _remove_stale_partials(parent: Path, note: Callable[[str], None]) -> None:
    """Remove the temporary folders of conversions into ``parent`` whose process has ended; report each."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return  # an unlistable parent: making the temporary folder will fail and say why
    for entry in sorted(entries, key=lambda e: e.name):
        m = _PARTIAL.fullmatch(entry.name)
        if m is None or not entry.is_dir(follow_symlinks=False):
            continue
        path, pid = Path(entry.path), int(m["pid"])
        if m["host"] != _host_tag():
            note(f"kept {shown(str(path), 200)}: temporary folder of a conversion on another machine "
                 f"(delete it once no conversion runs there)")
        elif pid > 0 and _process_runs(pid):
            note(f"kept {shown(str(path), 200)}: temporary folder of a conversion still running (process {pid})")
        else:
            try:
                shutil.rmtree(path)
            except OSError as e:
                note(f"could not remove {shown(str(path), 200)}, a stale temporary folder of process {pid} "
                     f"({e.strerror})")
            else:
                note(f"removed {shown(str(path), 200)}: temporary folder of an interrupted conversion "
                     f"(process {pid} has ended)")


def _checkpointer():
    """A synchronous orbax checkpointer without OCDBT.

    OCDBT stages the whole tree a second time while writing (6.5 GiB peak for the 3.2 GiB
    UNet, measured); one zarr array per param keeps saving near the params' own size. A
    converted folder holds host arrays that one process writes or reads on its own, so in a
    multi-process job orbax is told this process is the only one: otherwise it waits at
    barriers for processes that are not converting (process 0 exporting a training run's result).
    """
    import orbax.checkpoint as ocp

    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.Checkpointer(ocp.StandardCheckpointHandler(use_ocdbt=False, multiprocessing_options=alone),
                            multiprocessing_options=alone)


def is_converted(path: str | os.PathLike) -> bool:
    return (Path(path) / FORMAT_FILE).is_file()


def read_format(path: str | os.PathLike) -> dict[str, Any]:
    """The format marker of a converted folder, checked: a JSON object of this format version whose
    ``components`` list the required ones and only known ones, each once."""
    marker = Path(path) / FORMAT_FILE
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConversionError(f"{marker}: unreadable ({e.strerror or e})") from None
    except (ValueError, RecursionError):
        raise ConversionError(f"{marker}: unreadable (not UTF-8 JSON)") from None
    if not isinstance(data, dict) or data.get("format") != "imvar-jax" or data.get("version") != FORMAT_VERSION:
        raise ConversionError(f"{marker}: not an imvar-jax checkpoint of format version {FORMAT_VERSION}")
    components = data.get("components")
    if not isinstance(components, list) or not all(isinstance(c, str) for c in components):
        raise ConversionError(f"{marker}: 'components' is not a list of component names")
    for name in components:
        if name not in SPECS:
            raise ConversionError(f"{marker}: unknown component {shown(name)} (known: {', '.join(SPECS)})")
        if components.count(name) > 1:
            raise ConversionError(f"{marker}: component '{name}' is listed twice")
    for name in REQUIRED:
        if name not in components:
            raise ConversionError(f"{marker}: the required component '{name}' is not listed")
    return data


def converted_config(path: str | os.PathLike, name: str) -> Any:
    """Component ``name``'s config in a converted folder, checked; a missing folder, config or params raises a
    one-line ConversionError naming the component and the folder."""
    d = Path(path) / name
    missing = (d if not d.is_dir() else d / "config.json" if not (d / "config.json").is_file()
               else d / "params" if not (d / "params").is_dir() else None)
    if missing is not None:
        raise ConversionError(f"{path}: converted component '{name}' is damaged ({missing} is missing)")
    return SPECS[name].read_config(d)


def load_converted_component(path: str | os.PathLike, name: str, dtype: Any,
                             config: Any = None) -> tuple[Any, dict[str, Any]]:
    """Restore one component of a converted folder as numpy params of ``dtype``, checking every shape
    (``config``: its config, if ``converted_config`` already read it).

    A damaged component (missing folder, config or params, a truncated or garbled array
    file) raises a one-line ConversionError naming the component and the folder.
    """
    import orbax.checkpoint as ocp

    if config is None:
        config = converted_config(path, name)
    d = Path(path) / name
    want = parse_dtype(dtype)
    expected = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, want), SPECS[name].abstract_params(config))
    try:
        params = _checkpointer().restore((d / "params").absolute(), args=ocp.args.StandardRestore(expected))
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        # Orbax reads its own metadata with plain json and dict lookups: a garbled file shows as any of these.
        raise _damaged(path, name, e) from None
    except Exception as e:
        # Orbax wraps each failed TensorStore read (a truncated, garbled or missing array chunk)
        # in a bare Exception, the TensorStore error, which names the chunk file, as its cause.
        if type(e) is not Exception or not isinstance(e.__cause__, (ValueError, OSError)):
            raise
        raise _damaged(path, name, e.__cause__) from None
    return config, params


def _damaged(path: str | os.PathLike, name: str, e: BaseException) -> ConversionError:
    text = str(e).strip()
    # TensorStore appends its whole JSON spec: long, and no help in finding the damaged file.
    reason = text.splitlines()[0].split(" [tensorstore_spec=")[0] if text else type(e).__name__
    return ConversionError(f"{path}: converted component '{name}' is damaged, cannot restore {name}/params "
                           f"({reason})")


def open_converted(path: str | os.PathLike, include_safety_checker: bool = True
                   ) -> tuple[dict[str, Any], Callable[[str, Any], dict[str, Any]]]:
    """A converted folder's component configs, every one checked before any weights are read, and a function
    ``(name, dtype) -> params`` that restores one component's weights."""
    names = [n for n in read_format(path)["components"] if n != "safety_checker" or include_safety_checker]
    configs = {name: converted_config(path, name) for name in names}

    def read(name: str, dtype: Any) -> dict[str, Any]:
        return load_converted_component(path, name, dtype, config=configs[name])[1]

    return configs, read


def load_converted(path: str | os.PathLike, dtype: Any = np.float32, include_safety_checker: bool = True,
                   component_dtypes: Mapping[str, Any] | None = None):
    """Yield ``(name, config, params)`` for each component of a converted folder, cast to ``dtype``.

    ``component_dtypes`` overrides ``dtype`` for the components it names.
    """
    configs, read = open_converted(path, include_safety_checker)
    for name, config in configs.items():
        yield name, config, read(name, (component_dtypes or {}).get(name, dtype))

"""Reading PyTorch checkpoints and filling Flax params through explicit key tables.

A component's table lists every tensor by its PyTorch name, the Flax param path
it fills and how it is laid out. Nothing is inferred from names: a tensor the
table does not list, a listed tensor the checkpoint lacks, a Flax param no rule
fills and a shape that disagrees are all errors that name the key.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import ml_dtypes
import numpy as np

from ..errors import shown


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the file or key."""


# ---------------------------------------------------------------------------
# Tensor layouts
# ---------------------------------------------------------------------------

# kind -> (shape map, array map). Torch convs are (O, I, H, W), Flax's (H, W, I, O);
# torch linears are (O, I), Flax's Dense kernels (I, O).
_LAYOUTS: dict[str, tuple[Callable[[tuple], tuple], Callable[[np.ndarray], np.ndarray]]] = {
    "copy": (lambda s: tuple(s), lambda a: a),
    "conv": (lambda s: (s[2], s[3], s[1], s[0]) if len(s) == 4 else None, lambda a: a.transpose(2, 3, 1, 0)),
    "linear": (lambda s: (s[1], s[0]) if len(s) == 2 else None, lambda a: a.T),
}


@dataclass(frozen=True)
class Rule:
    """One PyTorch tensor -> one Flax param. ``aliases`` are older names of the same tensor."""

    torch_key: str
    flax_path: tuple[str, ...]
    layout: str = "copy"
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.layout not in _LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r} for {self.torch_key}")


def _path(flax_prefix: str) -> tuple[str, ...]:
    return tuple(flax_prefix.split("/"))


def conv_rules(torch_prefix: str, flax_prefix: str, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{torch_prefix}.weight", _path(flax_prefix) + ("kernel",), "conv")]
    if bias:
        rules.append(Rule(f"{torch_prefix}.bias", _path(flax_prefix) + ("bias",)))
    return rules


def linear_rules(torch_prefix: str, flax_prefix: str, bias: bool = True,
                 aliases: tuple[str, ...] = ()) -> list[Rule]:
    rules = [Rule(f"{torch_prefix}.weight", _path(flax_prefix) + ("kernel",), "linear",
                  tuple(f"{a}.weight" for a in aliases))]
    if bias:
        rules.append(Rule(f"{torch_prefix}.bias", _path(flax_prefix) + ("bias",),
                          aliases=tuple(f"{a}.bias" for a in aliases)))
    return rules


def norm_rules(torch_prefix: str, flax_prefix: str) -> list[Rule]:
    """GroupNorm / LayerNorm: torch ``weight`` is Flax's ``scale``."""
    return [Rule(f"{torch_prefix}.weight", _path(flax_prefix) + ("scale",)),
            Rule(f"{torch_prefix}.bias", _path(flax_prefix) + ("bias",))]


def resnet_rules(torch_prefix: str, flax_prefix: str, has_shortcut: bool, time_emb: bool) -> list[Rule]:
    """diffusers' ``ResnetBlock2D`` (layers.ResnetBlock2D); the VAE's have no time embedding."""
    t, f = torch_prefix, flax_prefix
    rules = norm_rules(f"{t}.norm1", f"{f}/norm1") + conv_rules(f"{t}.conv1", f"{f}/conv1")
    if time_emb:
        rules += linear_rules(f"{t}.time_emb_proj", f"{f}/time_emb_proj")
    rules += norm_rules(f"{t}.norm2", f"{f}/norm2") + conv_rules(f"{t}.conv2", f"{f}/conv2")
    if has_shortcut:
        rules += conv_rules(f"{t}.conv_shortcut", f"{f}/conv_shortcut")
    return rules


def param_rule(torch_key: str, flax_path: str) -> Rule:
    return Rule(torch_key, _path(flax_path))


# ---------------------------------------------------------------------------
# Reading checkpoint files
# ---------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}

# The reference implementation's limit: a longer header is refused before it is read.
MAX_HEADER_BYTES = 100_000_000
# The most dimensions every supported numpy (1.26 on) gives an array.
_MAX_NDIM = 32


class SafetensorsEntry(NamedTuple):
    """One tensor of a safetensors header; offsets count from the start of the data section."""

    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


class _DuplicateKey(Exception):
    pass


class _NotJson(Exception):
    pass


def _refuse_constant(name: str) -> None:
    # Python's json reads NaN and Infinity, which JSON (and every other reader of the file) refuses.
    raise _NotJson(name)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of two equal keys silently; two readers could then disagree on a tensor.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if not _is_text(key) or (isinstance(value, str) and not _is_text(value)):
            raise _NotJson(key)
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _is_text(s: str) -> bool:
    # Python's json reads a lone UTF-16 surrogate escape ("\ud800") into a str no file can hold.
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _strict_json(text: str, path: str | os.PathLike, what: str) -> Any:
    """``text`` parsed as JSON with every object's keys unique; ConversionError naming ``path`` otherwise."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_refuse_constant)
    except _DuplicateKey as e:
        raise ConversionError(f"{path}: {what} names {_name(e.args[0])} twice") from None
    except (ValueError, RecursionError, _NotJson):
        raise ConversionError(f"{path}: {what} is not valid JSON") from None


def _name(key: Any) -> str:
    return shown(key, 120)


def _json_kind(value: Any) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def safetensors_header_length(head: bytes, file_size: int, path: str | os.PathLike) -> int:
    """The header length a safetensors file's first 8 bytes give (little-endian), checked against the file size."""
    if len(head) < 8 or file_size < 8:
        raise ConversionError(f"{path}: not a safetensors file (shorter than its header)")
    n = int.from_bytes(head[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise ConversionError(f"{path}: not a safetensors file (header length {n} over the limit of "
                              f"{MAX_HEADER_BYTES})")
    if n > file_size - 8:
        raise ConversionError(f"{path}: not a safetensors file or truncated (header length {n}, "
                              f"file size {file_size})")
    return n


def check_safetensors_header(header: bytes, data_size: int, path: str | os.PathLike) -> dict[str, SafetensorsEntry]:
    """The tensors a safetensors header describes, each checked against the format.

    ``header`` is the JSON between the length prefix and the data section of ``data_size``
    bytes. It must be a UTF-8 JSON object without repeated keys; ``__metadata__``, if there,
    an object of strings; every other entry an object with a known ``dtype``, a ``shape`` of
    non-negative ints and ``data_offsets`` ``[begin, end]`` spanning exactly the tensor's
    bytes, and the entries together cover the data section with no overlap, gap or rest.
    Raises ConversionError naming ``path`` and the tensor.
    """
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError:
        raise ConversionError(f"{path}: not a safetensors file (header is not UTF-8 text)") from None
    parsed = _strict_json(text, path, "safetensors header")
    if not isinstance(parsed, dict):
        raise ConversionError(f"{path}: not a safetensors file (header is {_json_kind(parsed)}, not an object)")
    entries: dict[str, SafetensorsEntry] = {}
    for key, info in parsed.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise ConversionError(f"{path}: header field __metadata__ is not an object of strings")
        else:
            entries[key] = _header_entry(key, info, data_size, path)
    cursor, previous = 0, None
    for key, e in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if e.begin < cursor:
            raise ConversionError(f"{path}: tensor {_name(key)} (data bytes {e.begin}-{e.end}) overlaps tensor "
                                  f"{_name(previous)} (ending at {cursor})")
        if e.begin > cursor:
            raise ConversionError(f"{path}: tensor {_name(key)} starts at data byte {e.begin}, leaving "
                                  f"{e.begin - cursor} bytes that no tensor holds")
        cursor, previous = e.end, key
    if cursor != data_size:
        raise ConversionError(f"{path}: the last {data_size - cursor} bytes of the data section belong to no tensor")
    return entries


def _header_entry(key: str, info: Any, data_size: int, path: str | os.PathLike) -> SafetensorsEntry:
    where = f"{path}: tensor {_name(key)}"
    if not isinstance(info, dict):
        raise ConversionError(f"{where}: header entry is {_json_kind(info)}, not an object")
    for field_name in ("dtype", "shape", "data_offsets"):
        if field_name not in info:
            raise ConversionError(f"{where}: header entry has no '{field_name}'")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
        raise ConversionError(f"{where}: unknown dtype {_name(dtype)} (known: {', '.join(_ST_DTYPES)})")
    # type() rather than isinstance: JSON's true and false are ints to Python.
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ConversionError(f"{where}: shape {shown(shape)} is not a list of non-negative integers")
    itemsize = _ST_DTYPES[dtype].itemsize
    if len(shape) > _MAX_NDIM or math.prod(max(d, 1) for d in shape) * itemsize > np.iinfo(np.intp).max:
        raise ConversionError(f"{where}: shape {shown(shape)} is larger than an array can be")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise ConversionError(f"{where}: data_offsets {shown(offsets)} is not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    if end > data_size:
        raise ConversionError(f"{path}: truncated or corrupt (tensor {_name(key)} ends at data byte {end}, "
                              f"past the end of the file's {data_size} data bytes)")
    want = math.prod(shape) * itemsize
    if end - begin != want:
        raise ConversionError(f"{where}: data_offsets span {end - begin} bytes, but shape {tuple(shape)} of "
                              f"{dtype} needs {want}")
    return SafetensorsEntry(_ST_DTYPES[dtype], tuple(shape), begin, end)


class _SafetensorsFile:
    """A ``.safetensors`` file read tensor by tensor with numpy (bfloat16 included, no torch).

    The whole header is checked on opening (``check_safetensors_header``). Reads use ``pread``
    rather than a memory map: mapped pages would stay resident and count against the process,
    so converting would hold the file and the result at once.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                n = safetensors_header_length(f.read(8), size, path)
                header = f.read(n)
        except OSError as e:
            raise ConversionError(f"{path}: cannot read ({e.strerror})") from None
        if len(header) != n:
            raise ConversionError(f"{path}: truncated while reading its header")
        data_start = 8 + n
        self._entries = {key: e._replace(begin=data_start + e.begin, end=data_start + e.end)
                         for key, e in check_safetensors_header(header, size - data_start, path).items()}

    def keys(self) -> Iterable[str]:
        return self._entries.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].shape

    def load(self, key: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[key]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = os.pread(fd, end - begin, begin)
        finally:
            os.close(fd)
        if len(data) != end - begin:
            raise ConversionError(f"{self.path}: truncated while reading tensor {_name(key)}")
        return np.frombuffer(data, dtype=dtype).reshape(shape)


class _TorchFile:
    """A PyTorch pickle (``.bin``), loaded with ``weights_only=True`` and memory-mapped."""

    def __init__(self, path: Path):
        self.path = path
        try:
            import torch
        except ImportError:
            raise ConversionError(
                f"{path}: reading .bin checkpoints needs PyTorch (pip install 'imvar-jax[torch]')") from None
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                # Pickles from before torch 1.6 are not zip archives and cannot be memory-mapped.
                if "mmap" not in str(e):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for damaged pickles/zips
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConversionError(f"{path}: cannot load PyTorch checkpoint ({first})") from None
        if not isinstance(state, Mapping):
            raise ConversionError(f"{path}: not a PyTorch state dict")
        self._tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        self._torch = torch

    def keys(self) -> Iterable[str]:
        return self._tensors.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def load(self, key: str) -> np.ndarray:
        t = self._tensors[key]
        if t.dtype == self._torch.bfloat16:
            return t.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


@dataclass
class TensorSource:
    """All tensors of one component, possibly spread over shards."""

    files: list[Any]
    where: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in self.files:
            for k in f.keys():
                if k in self.where:
                    raise ConversionError(f"{f.path}: tensor '{k}' also stored in {self.where[k].path}")
                self.where[k] = f

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.where[key].shape(key)

    def load(self, key: str) -> np.ndarray:
        return self.where[key].load(key)

    def describe(self) -> str:
        return ", ".join(str(f.path) for f in self.files)


_WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")


def find_weights(component_dir: str | os.PathLike) -> TensorSource:
    """Open a component's weights: safetensors preferred over ``.bin``, single file or sharded index."""
    d = Path(component_dir)
    if not d.is_dir():
        raise ConversionError(f"missing component folder {d}")
    for ext, opener in ((".safetensors", _SafetensorsFile), (".bin", _TorchFile)):
        for stem in _WEIGHT_NAMES:
            single = d / f"{stem}{ext}"
            if single.is_file():
                return TensorSource([opener(single)])
            index = d / f"{stem}{ext}.index.json"
            if index.is_file():
                assigned = _shards(index)
                files = [opener(p) for p in assigned]
                for f in files:
                    _check_shard(index, f, assigned[f.path])
                return TensorSource(files)
    raise ConversionError(f"{d}: no weights found (looked for {', '.join(s + '.safetensors' for s in _WEIGHT_NAMES)}, "
                          f".bin and sharded .index.json variants)")


def _shards(index: Path) -> dict[Path, set[str]]:
    """The shard files a sharded-checkpoint index names, each with the tensors it assigns to that shard.

    A shard must be a plain file name inside the index's own folder, and must stay there once
    links are followed, so an index can never make the converter read any other file.
    """
    try:
        text = index.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"{index}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    data = _strict_json(text, index, "sharded-checkpoint index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index}: not a valid sharded-checkpoint index (needs a non-empty object 'weight_map')")
    assigned: dict[Path, set[str]] = {}
    for tensor, name in weight_map.items():
        if not isinstance(name, str):
            raise ConversionError(f"{index}: weight_map gives tensor {_name(tensor)} the shard {shown(name)}, "
                                  f"not a file name")
        assigned.setdefault(_shard_path(index, name), set()).add(tensor)
    return dict(sorted(assigned.items()))


def _shard_path(index: Path, name: str) -> Path:
    folder = index.parent
    if name in ("", ".", "..") or any(c in name for c in ("/", "\\", "\0")) or os.path.isabs(name):
        raise ConversionError(f"{index}: shard {_name(name)} is not a file name inside {folder} "
                              f"(no folders, '..' or absolute paths)")
    path = folder / name
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(os.path.realpath(folder)) and real.parent != _hub_blobs(folder):
        raise ConversionError(f"{index}: shard {_name(name)} leads outside {folder} (to {real})")
    try:
        is_file = path.is_file()
    except OSError:
        is_file = False
    if not is_file:
        raise ConversionError(f"{index}: shard {name if name.isprintable() else _name(name)} is missing")
    return path


def _hub_blobs(folder: Path) -> Path | None:
    """The ``blobs/`` folder of the huggingface_hub cache repo whose snapshot holds ``folder``, if it is one.

    The hub cache keeps a snapshot's files as links into its repo's ``blobs/``, so there a
    shard that leads to that folder has not left the checkpoint.
    """
    real = Path(os.path.realpath(folder))
    for snapshot in (real, *real.parents):
        if snapshot.parent.name == "snapshots" and snapshot.parent.parent.name.startswith("models--"):
            blobs = snapshot.parent.parent / "blobs"
            return blobs if blobs.is_dir() else None
    return None


def _check_shard(index: Path, shard: Any, listed: set[str]) -> None:
    """A shard holds exactly the tensors the index assigns to it."""
    held = set(shard.keys())
    missing, unlisted = sorted(listed - held), sorted(held - listed)
    if missing:
        raise ConversionError(f"{index}: tensor {_name(missing[0])} is assigned to shard {shard.path.name}, "
                              f"which does not hold it")
    if unlisted:
        raise ConversionError(f"{shard.path}: tensor {_name(unlisted[0])} is not assigned to this shard in "
                              f"{index.name}")


# ---------------------------------------------------------------------------
# Applying a table
# ---------------------------------------------------------------------------

def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def plan(component: str, table: list[Rule], torch_shapes: Mapping[str, tuple[int, ...]],
         expected: Mapping[str, Any], ignored: Iterable[str] = (), where: str = "") -> list[tuple[Rule, str]]:
    """Check a table against a checkpoint's tensor shapes and the model's param shapes.

    Returns ``(rule, key found in the checkpoint)`` pairs. Raises ConversionError naming
    the first unmapped, missing, unexpected or mis-shaped key. Needs shapes only, so the
    full-size architecture can be checked without allocating weights.
    """
    at = f" in {where}" if where else ""
    flat_expected = {p: tuple(v.shape) for p, v in _flatten(expected).items()}
    by_path: dict[tuple[str, ...], Rule] = {}
    for r in table:
        if r.flax_path in by_path:
            raise ConversionError(f"{component}: two rules fill Flax param {'/'.join(r.flax_path)}")
        by_path[r.flax_path] = r
    for p in flat_expected:
        if p not in by_path:
            raise ConversionError(f"{component}: unmapped Flax param {'/'.join(p)} (no table rule fills it)")
    for p in by_path:
        if p not in flat_expected:
            raise ConversionError(f"{component}: table rule for {by_path[p].torch_key} targets "
                                  f"{'/'.join(p)}, which the model does not have")
    used: set[str] = set()
    out = []
    for r in table:
        key = next((k for k in (r.torch_key,) + r.aliases if k in torch_shapes), None)
        if key is None:
            raise ConversionError(f"{component}: missing tensor '{r.torch_key}'{at}")
        shape_map, _ = _LAYOUTS[r.layout]
        got, want = shape_map(tuple(torch_shapes[key])), flat_expected[r.flax_path]
        if got != want:
            raise ConversionError(f"{component}: tensor '{key}' has shape {tuple(torch_shapes[key])}, "
                                  f"expected one giving {want} for {'/'.join(r.flax_path)}{at}")
        used.add(key)
        out.append((r, key))
    ignored = set(ignored)
    for k in torch_shapes:
        if k not in used and k not in ignored:
            raise ConversionError(f"{component}: unexpected tensor '{k}'{at} (not in the key table)")
    return out


def apply_table(component: str, table: list[Rule], source: TensorSource, expected: Mapping[str, Any],
                dtype: Any = np.float32, ignored: Iterable[str] = ()) -> dict[str, Any]:
    """Convert one component's tensors into a nested dict of host (CPU) JAX arrays of ``dtype``.

    Tensors are read and converted one at a time, so peak memory is about the converted
    component plus one tensor. JAX arrays rather than numpy ones because orbax saves
    them without staging a second host copy of the whole tree.
    """
    steps = plan(component, table, {k: source.shape(k) for k in source.keys()}, expected, ignored,
                 source.describe())
    dtype = np.dtype(dtype)
    cpu = jax.devices("cpu")[0]
    flat = {}
    for rule, key in steps:
        _, array_map = _LAYOUTS[rule.layout]
        a = source.load(key)
        if not np.issubdtype(a.dtype, np.floating) and a.dtype != ml_dtypes.bfloat16:
            raise ConversionError(f"{component}: tensor '{key}' has dtype {a.dtype}, expected floating point")
        flat[rule.flax_path] = jax.device_put(np.ascontiguousarray(array_map(a).astype(np.float32).astype(dtype)), cpu)
    return _unflatten(flat)


@dataclass(frozen=True)
class ComponentSpec:
    """How to convert one component folder (``unet/``, ``vae/``, ...)."""

    name: str
    read_config: Callable[[Path], Any]          # component folder -> frozen config dataclass
    table: Callable[[Any], list[Rule]]          # config -> explicit key table
    abstract_params: Callable[[Any], Mapping[str, Any]]  # config -> jax.ShapeDtypeStruct tree
    ignored: tuple[str, ...] = ()               # buffers that are not parameters


def convert_component(spec: ComponentSpec, component_dir: str | os.PathLike, dtype: Any = np.float32,
                      config: Any = None) -> tuple[Any, dict[str, Any]]:
    """Read a component folder's config (unless ``config``, already read from it, is given) and weights;
    return ``(config, params)``."""
    d = Path(component_dir)
    if not d.is_dir():
        raise ConversionError(f"missing component folder {d}")
    if config is None:
        config = spec.read_config(d)
    params = apply_table(spec.name, spec.table(config), find_weights(d), spec.abstract_params(config),
                         dtype, spec.ignored)
    return config, params

"""Reading PyTorch checkpoints and filling Flax params through explicit key tables.

A component's table lists every tensor by its PyTorch name, the Flax param path
it fills and how it is laid out. Nothing is inferred from names: a tensor the
table does not list, a listed tensor the checkpoint lacks, a Flax param no rule
fills and a shape that disagrees are all errors that name the key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import jax
import ml_dtypes
import numpy as np


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
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}


class _SafetensorsFile:
    """A ``.safetensors`` file read tensor by tensor with numpy (bfloat16 included, no torch).

    Reads use ``pread`` rather than a memory map: mapped pages would stay resident and
    count against the process, so converting would hold the file and the result at once.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ConversionError(f"{path}: not a safetensors file (shorter than its header)")
                n = int.from_bytes(head, "little")
                if n > size - 8 or n > 100_000_000:
                    raise ConversionError(f"{path}: not a safetensors file or truncated (header length {n})")
                header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConversionError(f"{path}: not a safetensors file (unreadable header)") from None
        except OSError as e:
            raise ConversionError(f"{path}: cannot read ({e.strerror})") from None
        header.pop("__metadata__", None)
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        data_start = 8 + n
        for key, info in header.items():
            try:
                dtype = _ST_DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ConversionError(f"{path}: malformed header entry for tensor '{key}'") from None
            if end - begin != dtype.itemsize * int(np.prod(shape)):
                raise ConversionError(f"{path}: tensor '{key}' has inconsistent size in the header")
            if data_start + end > size:
                raise ConversionError(f"{path}: truncated (tensor '{key}' ends past the end of the file)")
            self._entries[key] = (dtype, shape, data_start + begin, data_start + end)

    def keys(self) -> Iterable[str]:
        return self._entries.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def load(self, key: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[key]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = os.pread(fd, end - begin, begin)
        finally:
            os.close(fd)
        if len(data) != end - begin:
            raise ConversionError(f"{self.path}: truncated while reading tensor '{key}'")
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
                return TensorSource([opener(p) for p in _shards(index)])
    raise ConversionError(f"{d}: no weights found (looked for {', '.join(s + '.safetensors' for s in _WEIGHT_NAMES)}, "
                          f".bin and sharded .index.json variants)")


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ConversionError(f"{index}: not a valid sharded-checkpoint index") from None
    paths = [index.parent / n for n in names]
    for p in paths:
        if not p.is_file():
            raise ConversionError(f"{index}: shard {p.name} is missing")
    return paths


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


def convert_component(spec: ComponentSpec, component_dir: str | os.PathLike,
                      dtype: Any = np.float32) -> tuple[Any, dict[str, Any]]:
    """Read a component folder's config and weights; return ``(config, params)``."""
    d = Path(component_dir)
    if not d.is_dir():
        raise ConversionError(f"missing component folder {d}")
    config = spec.read_config(d)
    params = apply_table(spec.name, spec.table(config), find_weights(d), spec.abstract_params(config),
                         dtype, spec.ignored)
    return config, params

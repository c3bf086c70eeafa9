"""Hostile checkpoints and destinations for ``imvar-jax convert`` and loading a converted folder.

Each case builds its corpus here, then asserts the exit code, one error line naming the file
and tensor (no traceback), and that nothing outside DST (or ``--out``) changed. The
safetensors header check is also tested property-based, against the ``safetensors`` library
itself where that library decides the same question.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from hostile import REPO, assert_clean_error, changes, run_cli_unprivileged, snapshot, world_readable_tmp
from imvar_jax import ConversionError, ImageVariationPipeline
from imvar_jax.cli import main
from imvar_jax.convert import checkpoint
from imvar_jax.convert.checkpoint import convert_checkpoint, is_converted, iter_torch_components
from imvar_jax.convert.common import (_SafetensorsFile, check_safetensors_header, find_weights,
                                      safetensors_header_length)
from tiny_checkpoint import build_torch_pipeline, save_pipeline

# Once one array read of a damaged folder fails, orbax abandons its other pending reads; each
# leaves a coroutine that warns when collected (often during a later test), and TensorStore may
# still answer the closed event loop. Only those warnings are ignored.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Exception ignored in. <coroutine object _read_array_index_and_device_put"
                               ":pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:(?s)Exception ignored in. None.*Event loop is closed"
                               ":pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:coroutine '_read_array_index_and_device_put' was never awaited:RuntimeWarning"),
]

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
UNET_FILE = Path("unet") / "diffusion_pytorch_model.safetensors"


# ---------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------

def _open_to_all(root: Path) -> None:
    """Folders 0755, files 0644: the unprivileged cases must read the checkpoint."""
    root.chmod(0o755)
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(folder, d), 0o755)
        for f in files:
            os.chmod(os.path.join(folder, f), 0o644)


@pytest.fixture(scope="module")
def torch_pipe():
    return build_torch_pipeline(seed=0)


@pytest.fixture(scope="module")
def corpus(torch_pipe):
    """A folder an unprivileged user can enter, holding the tiny checkpoint; removed after the module."""
    root = world_readable_tmp()
    try:
        save_pipeline(torch_pipe, root / "tiny")
        _open_to_all(root / "tiny")
        yield root
    finally:
        shutil.rmtree(root)


@pytest.fixture(scope="module")
def tiny_src(corpus) -> Path:
    return corpus / "tiny"


@pytest.fixture(scope="module")
def sharded_src(torch_pipe, tiny_src, tmp_path_factory) -> Path:
    """The tiny checkpoint with its UNet in several safetensors shards and an index."""
    src = tmp_path_factory.mktemp("sharded") / "tiny"
    shutil.copytree(tiny_src, src)
    (src / UNET_FILE).unlink()
    torch_pipe.unet.save_pretrained(str(src / "unet"), max_shard_size="20KB")
    return src


@pytest.fixture(scope="module")
def converted(tiny_src, tmp_path_factory) -> Path:
    return convert_checkpoint(tiny_src, tmp_path_factory.mktemp("converted") / "flax")


@pytest.fixture
def src(tiny_src, tmp_path) -> Path:
    return shutil.copytree(tiny_src, tmp_path / "src")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A folder for the property tests' files (hypothesis examples cannot use function fixtures)."""
    return tmp_path_factory.mktemp("scratch")


def _convert_fails(capsys, root: Path, src: Path, dst: Path, *needles: str) -> None:
    """``imvar-jax convert SRC DST`` exits 1 with one error line naming ``needles``; nothing under ``root`` changed."""
    before = snapshot(root)
    code = main(["convert", str(src), str(dst)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert_clean_error(err, *needles)
    assert len([x for x in err.splitlines() if "error" in x.lower()]) == 1, err
    assert changes(before, snapshot(root), [dst], root) == []
    assert not os.path.lexists(dst)


# ---------------------------------------------------------------------------
# The safetensors header, property-based
# ---------------------------------------------------------------------------

def _blob(header, data: bytes, pad: int = 0) -> bytes:
    """A safetensors file: 8-byte little-endian length, header (JSON text or an object), data."""
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode("utf-8") + b" " * pad
    return struct.pack("<Q", len(raw)) + raw + data


def _check_blob(blob: bytes, path: str = "x.safetensors"):
    n = safetensors_header_length(blob[:8], len(blob), path)
    return check_safetensors_header(blob[8:8 + n], len(blob) - 8 - n, path)


_names = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12).filter(lambda s: s != "__metadata__")
_tensors = st.tuples(st.sampled_from(sorted(ITEMSIZE)), st.lists(st.integers(0, 4), max_size=3))


@st.composite
def valid_files(draw, min_tensors: int = 0):
    """``(specs, header, data, pad)``: tensors laid out in a drawn order, the header's keys in another."""
    specs = draw(st.dictionaries(_names, _tensors, min_size=min_tensors, max_size=6))
    if min_tensors:
        # One tensor with bytes, so every kind of corruption has something to act on.
        anchor = draw(_names.filter(lambda s: s not in specs))
        specs[anchor] = (draw(st.sampled_from(sorted(ITEMSIZE))), draw(st.lists(st.integers(1, 4), min_size=1,
                                                                                max_size=3)))
    header, data = {}, bytearray()
    for name in draw(st.permutations(list(specs))):
        dtype, shape = specs[name]
        size = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + size]}
        data += draw(st.binary(min_size=size, max_size=size))
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(_names, st.text(max_size=8), max_size=3))
    header = dict(draw(st.permutations(list(header.items()))))
    return specs, header, bytes(data), draw(st.integers(0, 7))


@PROPERTY
@given(valid_files())
def test_valid_headers_are_accepted_and_agree_with_safetensors(scratch, case):
    specs, header, data, pad = case
    blob = _blob(header, data, pad)
    entries = _check_blob(blob)
    lib = dict(safetensors.deserialize(blob))
    assert entries.keys() == lib.keys() == specs.keys()
    for name, e in entries.items():
        assert lib[name]["dtype"] == specs[name][0]
        assert list(e.shape) == lib[name]["shape"] == specs[name][1]
        assert e.dtype.itemsize == ITEMSIZE[specs[name][0]]
        assert data[e.begin:e.end] == bytes(lib[name]["data"])
    # The file reader places the same bytes, offset by the header, into arrays of that shape.
    path = scratch / "valid.safetensors"
    path.write_bytes(blob)
    f = _SafetensorsFile(path)
    for name, e in entries.items():
        a = f.load(name)
        assert a.shape == tuple(specs[name][1]) and a.tobytes() == bytes(lib[name]["data"])


# kind -> (whether the safetensors library refuses it too, whether the message names a tensor)
CORRUPTIONS = {
    "overlap": (True, True), "gap": (True, True), "leftover": (True, False), "truncated": (True, False),
    "negative offset": (True, True), "reversed offsets": (True, True), "wrong size": (True, True),
    "three offsets": (True, True), "unknown dtype": (True, True), "non-object top level": (True, False),
    "entry not an object": (True, True), "missing field": (True, True), "shape of strings": (True, True),
    "shape of bools": (True, True), "shape of floats": (True, True), "negative dim": (True, True),
    "dtype not a string": (True, True), "offsets not ints": (True, True), "metadata not strings": (True, False),
    "not utf-8": (True, False), "NaN": (True, False),
    # The library keeps the last of two equal names; refusing is safer than guessing which is meant.
    "duplicate name": (False, True),
}


@st.composite
def corrupted_files(draw):
    """``(kind, blob, tensor)``: a valid file damaged in one way; ``tensor`` is the entry the damage is in."""
    _, header, data, pad = draw(valid_files(min_tensors=1))
    kind = draw(st.sampled_from(sorted(CORRUPTIONS)))
    sized = [n for n, v in header.items() if n != "__metadata__" and v["data_offsets"][1] > v["data_offsets"][0]]
    name = draw(st.sampled_from(sized))
    entry = header[name]
    begin, end = entry["data_offsets"]
    dims = entry["shape"] or [1]  # a scalar has bytes but no dimensions to damage
    k = draw(st.integers(1, 64))
    text = None
    if kind == "overlap":
        alias = draw(_names.filter(lambda s: s not in header))
        header[alias] = dict(entry)
        name = alias
    elif kind == "gap":
        # Everything laid out from this tensor on moves up; empty tensors just before it stay.
        header = {n: dict(v, data_offsets=[o + k for o in v["data_offsets"]])
                  if n != "__metadata__" and v["data_offsets"] >= [begin, end] else v for n, v in header.items()}
        data = data[:begin] + bytes(k) + data[begin:]
    elif kind == "leftover":
        data += bytes(k)
    elif kind == "truncated":
        data = data[:-min(k, len(data))]
    elif kind == "negative offset":
        entry["data_offsets"] = [-k, end - begin - k]
    elif kind == "reversed offsets":
        entry["data_offsets"] = [end, begin]
    elif kind == "wrong size":
        entry["shape"] = [math.prod(entry["shape"]) + 1]
    elif kind == "three offsets":
        entry["data_offsets"] = [begin, end, end]
    elif kind == "unknown dtype":
        entry["dtype"] = "Q" + draw(st.text(max_size=4))
    elif kind == "non-object top level":
        text = json.dumps(draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=5),
                                         st.none(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False))))
    elif kind == "entry not an object":
        header[name] = draw(st.one_of(st.text(max_size=5), st.integers(), st.none()))
    elif kind == "missing field":
        del entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif kind == "shape of strings":
        entry["shape"] = [str(d) for d in dims]
    elif kind == "shape of bools":
        entry["shape"] = [True] * len(dims)
    elif kind == "shape of floats":
        entry["shape"] = [float(d) for d in dims]
    elif kind == "negative dim":
        entry["shape"] = [-d for d in dims]
    elif kind == "dtype not a string":
        entry["dtype"] = draw(st.one_of(st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2)))
    elif kind == "offsets not ints":
        entry["data_offsets"] = draw(st.sampled_from([[str(begin), str(end)], [float(begin), float(end)],
                                                      [False, True], begin]))
    elif kind == "metadata not strings":
        header["__metadata__"] = {"format": draw(st.one_of(st.integers(), st.none(), st.lists(st.integers())))}
    elif kind == "not utf-8":
        text = json.dumps(header)
        cut = draw(st.integers(0, len(text)))
        return kind, _raw_blob(text[:cut].encode() + b"\xff\xfe" + text[cut:].encode(), data), name
    elif kind == "NaN":
        entry["extra"] = float("nan")
    elif kind == "duplicate name":
        body = json.dumps(header)
        text = body[:-1] + ", " + json.dumps(name) + ": " + json.dumps(entry) + "}"
    return kind, _blob(text if text is not None else header, data, pad), name


def _raw_blob(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


@PROPERTY
@given(corrupted_files())
def test_each_kind_of_corruption_is_refused(case):
    kind, blob, tensor = case
    lib_refuses, names_tensor = CORRUPTIONS[kind]
    with pytest.raises(ConversionError) as e:
        _check_blob(blob, "/ckpt/unet/x.safetensors")
    message = str(e.value)
    assert "\n" not in message and message.startswith("/ckpt/unet/x.safetensors: "), message
    if names_tensor:
        assert repr(tensor) in message, (kind, message)
    if lib_refuses:
        with pytest.raises(Exception):
            safetensors.deserialize(blob)


def _agrees_if_accepted(path: Path, blob: bytes) -> None:
    """Opening ``path`` (holding ``blob``) raises nothing but ConversionError; what it accepts the library does too."""
    path.write_bytes(blob)
    try:
        f = _SafetensorsFile(path)
    except ConversionError as e:
        assert "\n" not in str(e) and str(e).startswith(str(path)), str(e)
        return
    lib = dict(safetensors.deserialize(blob))
    assert set(f.keys()) == set(lib)
    for name in f.keys():
        assert list(f.shape(name)) == lib[name]["shape"]
        assert f.load(name).tobytes() == bytes(lib[name]["data"])


@PROPERTY
@given(st.binary(max_size=256))
def test_arbitrary_bytes_give_only_conversion_errors(scratch, blob):
    _agrees_if_accepted(scratch / "arbitrary.safetensors", blob)


@PROPERTY
@given(valid_files(), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4))
def test_damaged_files_give_only_conversion_errors(scratch, case, edits):
    _, header, data, pad = case
    blob = bytearray(_blob(header, data, pad))
    for at, value in edits:
        blob[at % len(blob)] = value
    _agrees_if_accepted(scratch / "damaged.safetensors", bytes(blob))


def test_header_length_limits(tmp_path):
    with pytest.raises(ConversionError, match="over the limit"):
        safetensors_header_length(struct.pack("<Q", 100_000_001), 10**9, "big.safetensors")
    with pytest.raises(ConversionError, match="shorter than its header"):
        safetensors_header_length(b"\x01\x00", 2, "short.safetensors")
    # A length the file cannot hold: refused before anything is read.
    with pytest.raises(ConversionError, match="truncated .header length 1000, file size 64"):
        safetensors_header_length(struct.pack("<Q", 1000), 64, "cut.safetensors")
    # Deep nesting is refused as bad JSON, not a RecursionError.
    deep = '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(ConversionError, match="not valid JSON"):
        _check_blob(_blob(deep, b""))
    # A shape numpy cannot hold, even with no elements, is refused before any array is made.
    huge = {"a": {"dtype": "F32", "shape": [2**62, 0], "data_offsets": [0, 0]}}
    with pytest.raises(ConversionError, match="'a'.*larger than an array can be"):
        _check_blob(_blob(huge, b""))


# ---------------------------------------------------------------------------
# Hostile safetensors through the CLI
# ---------------------------------------------------------------------------

def _layout(header: dict) -> list[tuple[str, dict]]:
    return sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])


def _alias(header, data):
    """A tensor made to read an earlier one's bytes: before these checks that converted, exit 0."""
    layout = _layout(header)
    size = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in layout}
    target = next(k for i, (k, _) in enumerate(layout) if any(size[d] == size[k] for d, _ in layout[:i]))
    donor = next(d for d, _ in layout if size[d] == size[target])
    header[target]["data_offsets"] = list(header[donor]["data_offsets"])
    return header, data, [repr(target), repr(donor), "overlaps"]


def _negative(header, data):
    name = _layout(header)[-1][0]
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [-8, end - begin - 8]
    return header, data, [repr(name), "data_offsets [-8,"]


def _shift_all(header, data):
    for _, v in _layout(header):
        v["data_offsets"] = [o + 16 for o in v["data_offsets"]]
    return header, bytes(16) + data, [repr(_layout(header)[0][0]), "leaving 16 bytes"]


def _set(field: str, value):
    def edit(header, data):
        header["conv_in.bias"][field] = value
        return header, data, ["'conv_in.bias'", field]
    return edit


SAFETENSORS_CASES = {
    "overlapping offsets": _alias,
    "negative offsets": _negative,
    "a gap before the first tensor": _shift_all,
    "bytes after the last tensor": lambda h, d: (h, d + bytes(12), ["last 12 bytes"]),
    "header is a JSON list": lambda h, d: ("[1, 2, 3]", d, ["header is a list, not an object"]),
    "header is a number": lambda h, d: ("42", d, ["header is a number"]),
    "header is null": lambda h, d: ("null", d, ["header is null"]),
    "unknown dtype": _set("dtype", "F8_E4M3"),
    "shape of bools": _set("shape", [True]),
    "offsets of strings": _set("data_offsets", ["0", "128"]),
    "two entries of one name": lambda h, d: (json.dumps(h)[:-1] + ', "conv_in.bias": ' + json.dumps(h["conv_in.bias"])
                                             + "}", d, ["'conv_in.bias' twice"]),
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS_CASES))
def test_hostile_safetensors_header(src, tmp_path, capsys, case):
    f = src / UNET_FILE
    blob = f.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header, data, needles = SAFETENSORS_CASES[case](json.loads(blob[8:8 + n]), blob[8 + n:])
    f.write_bytes(_blob(header, data))
    _convert_fails(capsys, tmp_path, src, tmp_path / "flax", str(f), *needles)


# ---------------------------------------------------------------------------
# Sharded indexes
# ---------------------------------------------------------------------------

def _index(unet: Path) -> Path:
    return unet / "diffusion_pytorch_model.safetensors.index.json"


def _shard_names(unet: Path) -> list[str]:
    return sorted(set(json.loads(_index(unet).read_text())["weight_map"].values()))


def _reassign(shard):
    """An index edit giving the first tensor to ``shard``."""
    def edit(data):
        data["weight_map"][next(iter(data["weight_map"]))] = shard
        return data
    return edit


def _separator(unet: Path, outside: Path):
    (unet / "sub").mkdir()
    shutil.copy(unet / _shard_names(unet)[0], unet / "sub" / "shard.safetensors")
    return _reassign("sub/shard.safetensors")


def _link_out(unet: Path, outside: Path):
    (unet / "extra.safetensors").symlink_to(outside)
    return _reassign("extra.safetensors")


def _ghost_tensor(unet: Path, outside: Path):
    first = _shard_names(unet)[0]
    return lambda data: dict(data, weight_map=dict(data["weight_map"], **{"ghost.weight": first}))


def _unlisted_tensor(unet: Path, outside: Path):
    return lambda data: dict(data, weight_map={k: v for k, v in data["weight_map"].items() if k != "conv_in.bias"})


# case -> (make(unet folder, outside shard) -> edit(index) -> new index, needles)
INDEX_CASES = {
    "absolute shard path": (lambda u, o: _reassign(str(o)), ["not a file name inside"]),
    "shard path with ..": (lambda u, o: _reassign(os.path.relpath(o, u)), ["'../../elsewhere/stolen.safetensors'"]),
    "shard named ..": (lambda u, o: _reassign(".."), ["shard '..' is not a file name inside"]),
    "shard path with a folder": (_separator, ["'sub/shard.safetensors'", "not a file name inside"]),
    "shard linking outside": (_link_out, ["'extra.safetensors'", "leads outside"]),
    "weight_map a list": (lambda u, o: lambda data: dict(data, weight_map=[1, 2]), ["'weight_map'"]),
    "shard not a string": (lambda u, o: _reassign(7), ["the shard 7"]),
    "index a JSON number": (lambda u, o: lambda data: 12, ["not a valid sharded-checkpoint index"]),
    "tensor the shard lacks": (_ghost_tensor, ["'ghost.weight'", "does not hold it"]),
    "tensor the index does not list": (_unlisted_tensor, ["'conv_in.bias'", "not assigned to this shard"]),
}


@pytest.mark.parametrize("case", sorted(INDEX_CASES))
def test_hostile_sharded_index(sharded_src, tmp_path, capsys, case):
    make, needles = INDEX_CASES[case]
    src = shutil.copytree(sharded_src, tmp_path / "src")
    unet = src / "unet"
    # A readable, well-formed shard outside the checkpoint: refused for where it is, not for what it holds.
    outside = tmp_path / "elsewhere" / "stolen.safetensors"
    outside.parent.mkdir()
    shutil.copy(unet / _shard_names(unet)[0], outside)
    edit = make(unet, outside)
    _index(unet).write_text(json.dumps(edit(json.loads(_index(unet).read_text()))))
    _convert_fails(capsys, tmp_path, src, tmp_path / "flax", str(unet), *needles)


def _flat_tensors(folder: Path) -> dict[str, bytes]:
    source = find_weights(folder)
    return {k: source.load(k).tobytes() for k in source.keys()}


def test_hub_cache_shards_linking_into_blobs_are_read(sharded_src, tmp_path):
    """huggingface_hub keeps a snapshot's files as links into the repo's blobs/: those shards stay inside."""
    repo = tmp_path / "hub" / "models--tester--tiny"
    unet = repo / "snapshots" / "0123abcd" / "unet"
    unet.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in (sharded_src / "unet").iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (unet / f.name).symlink_to(os.path.relpath(blob, unet))
    assert _flat_tensors(unet) == _flat_tensors(sharded_src / "unet")
    # A blob that is itself a link leading out of the cache is still refused.
    shard = _shard_names(unet)[0]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(unet / shard, outside)
    target = (unet / shard).resolve()
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(ConversionError, match="leads outside"):
        find_weights(unet)


# ---------------------------------------------------------------------------
# Damaged converted folders
# ---------------------------------------------------------------------------

def _chunk(dst: Path) -> Path:
    return dst / "unet" / "params" / "conv_in.kernel" / "0.0.0.0"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _garble(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] + b"\xa5" * (len(data) - len(data) // 2))


def _marker_edit(edit):
    def apply(dst: Path) -> None:
        marker = json.loads((dst / "imvar_jax.json").read_text())
        (dst / "imvar_jax.json").write_text(json.dumps(edit(marker)))
    return apply


DAMAGE_CASES = {
    "missing component folder": (lambda d: shutil.rmtree(d / "vae"), ["'vae'", "is missing"]),
    "missing params folder": (lambda d: shutil.rmtree(d / "unet" / "params"), ["'unet'", "params is missing"]),
    "missing config.json": (lambda d: (d / "unet" / "config.json").unlink(), ["'unet'", "config.json is missing"]),
    "truncated array chunk": (lambda d: _truncate(_chunk(d)), ["'unet'", "0.0.0.0"]),
    "garbled array chunk": (lambda d: _garble(_chunk(d)), ["'unet'", "0.0.0.0"]),
    "deleted array chunk": (lambda d: _chunk(d).unlink(), ["'unet'", "conv_in.kernel"]),
    "garbled orbax metadata": (lambda d: (d / "unet" / "params" / "_METADATA").write_text("[]"), ["'unet'"]),
    "marker a JSON list": (lambda d: (d / "imvar_jax.json").write_text("[]"), ["imvar_jax.json", "not an imvar-jax"]),
    "marker naming an unknown component": (
        _marker_edit(lambda m: dict(m, components=m["components"] + ["text_encoder"])),
        ["imvar_jax.json", "unknown component 'text_encoder'"]),
    "marker without a required component": (_marker_edit(lambda m: dict(m, components=["unet"])),
                                            ["imvar_jax.json", "'vae'"]),
    "marker components not a list": (_marker_edit(lambda m: dict(m, components="unet")),
                                     ["imvar_jax.json", "components"]),
}


@pytest.mark.parametrize("case", sorted(DAMAGE_CASES))
def test_damaged_converted_folder(converted, tmp_path, capsys, case):
    damage, needles = DAMAGE_CASES[case]
    dst = shutil.copytree(converted, tmp_path / "flax")
    damage(dst)
    picture = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(picture)
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    with pytest.raises(ConversionError) as e:
        ImageVariationPipeline.from_pretrained(str(dst))
    message = str(e.value)
    assert "\n" not in message and str(dst) in message, message
    for needle in needles:
        assert needle in message, message
    code = main(["generate", str(picture), "--model", str(dst), "--out", str(out), "--steps", "1",
                 "--no-compile-cache"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert assert_clean_error(err, str(dst), *needles) == f"imvar-jax generate: error: {message}"
    assert changes(before, snapshot(tmp_path), [out], tmp_path) == []


# ---------------------------------------------------------------------------
# Destinations that cannot be written
# ---------------------------------------------------------------------------

def test_destination_parent_is_a_file(src, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    for dst in (tmp_path / "notes.txt" / "flax", tmp_path / "notes.txt" / "deeper" / "flax"):
        _convert_fails(capsys, tmp_path, src, dst, str(dst), f"{tmp_path / 'notes.txt'} is not a folder")


def test_destination_made_meanwhile_is_left_alone(src, tmp_path, capsys, monkeypatch):
    """Another process creates DST while the conversion runs: the final rename fails, its folder stays as it is."""
    dst = tmp_path / "flax"
    real = checkpoint.convert_component

    def make_dst_first(spec, *args, **kwargs):
        if not dst.exists():
            dst.mkdir()
            (dst / "theirs.txt").write_text("not ours")
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "convert_component", make_dst_first)
    code = main(["convert", str(src), str(dst)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert_clean_error(err, f"imvar-jax convert: error: {dst}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flax", "src"]
    assert [p.name for p in dst.iterdir()] == ["theirs.txt"] and (dst / "theirs.txt").read_text() == "not ours"


@pytest.fixture
def unprivileged_home(corpus):
    """A home folder for a process run as nobody, inside the corpus; removed after the test."""
    home = Path(tempfile.mkdtemp(prefix="home-", dir=corpus))
    home.chmod(0o777)
    yield home
    shutil.rmtree(home)


@pytest.mark.parametrize("case", ["read-only parent", "parent to create under an unwritable folder"])
def test_unwritable_destination(corpus, tiny_src, unprivileged_home, case):
    locked = Path(tempfile.mkdtemp(prefix="locked-", dir=corpus))
    try:
        if case == "read-only parent":
            locked.chmod(0o555)
            dst = locked / "flax"
            needles = [str(dst), f"cannot write in {locked}", "Permission denied"]
        else:
            locked.chmod(0o755)  # root's, so the unprivileged user may create nothing in it
            dst = locked / "a" / "b" / "flax"
            needles = [str(dst), f"cannot create folder {locked / 'a'}", "Permission denied"]
        before = snapshot(corpus)
        result = run_cli_unprivileged(["convert", str(tiny_src), str(dst)], cwd=unprivileged_home)
        assert result.returncode == 1, result.stderr
        assert_clean_error(result.stderr, *needles)
        assert len([x for x in result.stderr.splitlines() if "error" in x.lower()]) == 1, result.stderr
        assert changes(before, snapshot(corpus), [unprivileged_home], corpus) == []
    finally:
        shutil.rmtree(locked)


# ---------------------------------------------------------------------------
# Stale temporary folders of killed conversions
# ---------------------------------------------------------------------------

def _killed_conversion(src: Path, dst: Path) -> tuple[Path, int]:
    """Start ``imvar-jax convert`` in a process of its own, SIGKILL it once its temporary folder appears."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "imvar_jax.cli", "convert", str(src), str(dst)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.partial-")]
            if partial:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return partial[0], proc.pid
            time.sleep(0.02)
        pytest.fail(f"the conversion made no temporary folder (exit {proc.poll()})")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stale_temporary_folders_are_removed_and_reported(src, tmp_path, capsys):
    parent = tmp_path / "models"
    parent.mkdir()
    dst = parent / "flax"
    stale, pid = _killed_conversion(src, dst)
    assert not dst.exists()
    m = re.fullmatch(r"\.flax\.partial-(\d+)-([0-9a-f]{8})-[0-9a-f]{8}", stale.name)
    assert m and int(m[1]) == pid, stale.name
    host = m[2]
    # One of a conversion still running here (this process), one from another machine sharing the folder.
    running = parent / f".other.partial-{os.getpid()}-{host}-0123abcd"
    foreign_host = "00000000" if host != "00000000" else "11111111"
    foreign = parent / f".flax.partial-{m[1]}-{foreign_host}-0123abcd"
    # A user's folder of a similar name, but not hidden: not one of ours.
    users = parent / "my-notes.partial-1-00000000-00000000"
    for folder in (running, foreign, users):
        folder.mkdir()
        (folder / "data").write_text("keep")
    before = snapshot(tmp_path)
    code = main(["convert", str(src), str(dst)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert is_converted(dst) and not stale.exists()
    assert running.is_dir() and foreign.is_dir() and users.is_dir()
    notes = [line for line in err.splitlines() if line.startswith("imvar-jax convert: ")]
    assert len(notes) == 3, err
    assert any(f"removed '{stale}'" in n and f"process {m[1]} has ended" in n for n in notes), notes
    assert any(f"kept '{running}'" in n and "still running" in n for n in notes), notes
    assert any(f"kept '{foreign}'" in n and "another machine" in n for n in notes), notes
    changed = changes(before, snapshot(tmp_path), [dst], tmp_path)
    removed = os.path.relpath(stale, tmp_path)
    assert changed and all(p == removed or p.startswith(removed + os.sep) for p in changed), changed


# ---------------------------------------------------------------------------
# Every config is checked before any conversion work
# ---------------------------------------------------------------------------

def _edit_json(path: Path, **values) -> None:
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **values)))


CONFIG_CASES = {
    "scheduler_config.json": (lambda s: _edit_json(s / "scheduler" / "scheduler_config.json", num_train_timesteps=0),
                              "scheduler/scheduler_config.json", "num_train_timesteps"),
    "preprocessor_config.json": (
        lambda s: _edit_json(s / "feature_extractor" / "preprocessor_config.json", crop_size={"height": 0, "width": 9}),
        "feature_extractor/preprocessor_config.json", "crop_size"),
    "the last component's config.json": (lambda s: (s / "safety_checker" / "config.json").write_text("{oops"),
                                         "safety_checker/config.json", "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_every_config_is_checked_before_converting(src, tmp_path, capsys, monkeypatch, case):
    damage, file, needle = CONFIG_CASES[case]
    damage(src)
    converted_components = []
    real = checkpoint.convert_component
    monkeypatch.setattr(checkpoint, "convert_component",
                        lambda spec, *a, **k: converted_components.append(spec.name) or real(spec, *a, **k))
    _convert_fails(capsys, tmp_path, src, tmp_path / "flax", str(src / file), needle)
    # The in-memory conversion generate uses for a diffusers folder checks them all first too.
    with pytest.raises(ValueError, match=re.escape(str(src / file))):
        next(iter_torch_components(src))
    assert converted_components == []

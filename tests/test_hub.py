"""Hub ids: fetched through huggingface_hub's cache, converted once per (repo, revision, dtype), then
loaded from imvar-jax's own cache; and the persistent compilation cache.

No network: the hub side is a huggingface_hub cache folder written here the way huggingface_hub
leaves one after a download (blobs, snapshot links, the ref, and the cached tree listing that
offline ``snapshot_download`` checks a snapshot against), and ``HF_HUB_OFFLINE`` is on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from huggingface_hub import constants as hf_constants
from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
from huggingface_hub.utils import filter_repo_objects
from jax.experimental.compilation_cache import compilation_cache

import imvar_jax.hub as hub
from imvar_jax import ConversionError, ImageVariationPipeline
from imvar_jax.convert.checkpoint import is_converted, read_format
from imvar_jax.hub import resolve_source
from helpers import save_torch
from tiny_checkpoint import build_torch_pipeline, save_pipeline

REPO = "tester/tiny-imvar"
REVISION = "v1.5"

# Files the repo holds that a correct fetch leaves alone: another format of a component that
# has safetensors, half-precision variants, and files that are not needed at all.
NOT_FETCHED = {
    "unet/diffusion_pytorch_model.bin": b"pickle of the same unet",
    "unet/diffusion_pytorch_model.fp16.safetensors": b"fp16 variant",
    "image_encoder/pytorch_model.bin": b"pickle of the same encoder",
    "vae/diffusion_pytorch_model.fp16.bin": b"fp16 variant",
    "README.md": b"# tiny\n",
}


def write_hf_cache(hub_cache: Path, repo_id: str, revision: str, files: dict[str, bytes],
                   not_fetched: dict[str, bytes] | None = None) -> Path:
    """Lay out ``files`` as huggingface_hub does after downloading them from ``repo_id`` at ``revision``.

    ``blobs/<etag>`` hold the contents, ``snapshots/<commit>/`` links to them, ``refs/<revision>``
    names the commit, and ``trees/<commit>.json`` lists every file of the repo, ``not_fetched``
    included. Returns the snapshot folder.
    """
    listing = {**files, **(not_fetched or {})}
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repr(sorted((p, hashlib.sha256(d).hexdigest()) for p, d in listing.items()))
                          .encode()).hexdigest()
    entries = {}
    for path, data in listing.items():
        lfs = path.endswith((".safetensors", ".bin"))
        sha256 = hashlib.sha256(data).hexdigest()
        entries[path] = TreeCacheEntry(size=len(data),
                                       blob_id=hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
                                       lfs_sha256=sha256 if lfs else None, lfs_size=len(data) if lfs else None)
    snapshot = repo / "snapshots" / commit
    for path, data in files.items():
        blob = repo / "blobs" / (entries[path].lfs_sha256 or entries[path].blob_id)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    write_tree_cache(str(repo), commit, entries)
    return snapshot


@pytest.fixture(scope="module")
def torch_src(tmp_path_factory) -> Path:
    """A tiny diffusers checkpoint whose VAE exists only as a ``.bin`` pickle, the others as safetensors."""
    pipe = build_torch_pipeline(seed=0)
    src = save_pipeline(pipe, tmp_path_factory.mktemp("repo") / "tiny")
    (src / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    save_torch(pipe.vae, src / "vae", fmt="bin")
    return src


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def caches(tmp_path, monkeypatch, torch_src):
    """Empty imvar-jax cache; a huggingface_hub cache holding ``REPO`` at ``REVISION``; no network."""
    hf_cache = tmp_path / "hf"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("IMVAR_JAX_CACHE", str(tmp_path / "imvar"))
    files = _files(torch_src)
    snapshot = write_hf_cache(hf_cache, REPO, REVISION, files, NOT_FETCHED)
    return SimpleNamespace(hf=hf_cache, imvar=tmp_path / "imvar", snapshot=snapshot, files=files,
                           listing=sorted({**files, **NOT_FETCHED}))


def _assert_params_equal(got, want) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_cache_dirs(monkeypatch, tmp_path):
    monkeypatch.setenv("IMVAR_JAX_CACHE", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "own"
    assert hub.compile_cache_dir() == tmp_path / "own" / "jax-compile"
    monkeypatch.delenv("IMVAR_JAX_CACHE")
    assert hub.cache_dir() == tmp_path / "xdg" / "imvar-jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / ".cache" / "imvar-jax"
    assert hub.converted_dir(REPO, "refs/pr/3", jnp.bfloat16) == \
        hub.cache_dir() / "converted" / "tester--tiny-imvar" / "refs--pr--3" / "bfloat16"
    # The default model without a revision means the model card's revision, everywhere.
    assert hub.converted_dir(hub.DEFAULT_MODEL) == hub.converted_dir(hub.DEFAULT_MODEL, hub.DEFAULT_REVISION)
    assert hub.converted_dir(REPO).parent.name == "main"


def test_hub_id_is_converted_once_per_dtype_then_loaded_from_the_cache(caches, torch_src, monkeypatch):
    fetched = []
    real_snapshot_download = huggingface_hub.snapshot_download

    def spy(*args, **kwargs):
        fetched.extend(filter_repo_objects(caches.listing, allow_patterns=kwargs["allow_patterns"]))
        return real_snapshot_download(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    assert not hub.is_cached(REPO, REVISION)
    _, want = ImageVariationPipeline.from_pretrained(torch_src)

    _, params = ImageVariationPipeline.from_pretrained(REPO, revision=REVISION)
    # Configs and one weight format per component (safetensors where the repo has them): exactly
    # the snapshot's files, none of the others the repo lists.
    assert sorted(set(fetched)) == sorted(caches.files)
    f32 = hub.converted_dir(REPO, REVISION, "float32")
    assert is_converted(f32) and hub.is_cached(REPO, REVISION, "float32")
    marker = read_format(f32)
    assert (marker["source"], marker["revision"], marker["dtype"]) == (REPO, REVISION, "float32")
    _assert_params_equal(params, want)
    # The convert CLI's resolve_source gives the same snapshot.
    assert resolve_source(REPO, REVISION) == caches.snapshot

    assert not hub.is_cached(REPO, REVISION, "bfloat16")
    f32_stamp = (f32 / "imvar_jax.json").stat().st_mtime_ns
    _, params16 = ImageVariationPipeline.from_pretrained(REPO, revision=REVISION, dtype=jnp.bfloat16)
    bf16 = hub.converted_dir(REPO, REVISION, "bfloat16")
    assert bf16 != f32 and read_format(bf16)["dtype"] == "bfloat16"
    assert (f32 / "imvar_jax.json").stat().st_mtime_ns == f32_stamp
    _assert_params_equal(params16, jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), want))

    # From now on neither the hub cache nor the PyTorch files nor the converter may be touched.
    def fail(*args, **kwargs):
        raise AssertionError("the converted cache was not used")

    shutil.rmtree(caches.hf)
    monkeypatch.setattr(hub, "convert_checkpoint", fail)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    _, again = ImageVariationPipeline.from_pretrained(REPO, revision=REVISION)
    _assert_params_equal(again, want)
    _, again16 = ImageVariationPipeline.from_pretrained(REPO, revision=REVISION, dtype="bfloat16")
    _assert_params_equal(again16, params16)


def test_unavailable_repo_or_revision_is_a_one_line_error(caches):
    for repo, revision in (("tester/not-cached", "v2.0"), (REPO, "v9"), (REPO, None)):
        with pytest.raises(ConversionError, match="cannot fetch from the hub") as e:
            ImageVariationPipeline.from_pretrained(repo, revision=revision)
        message = str(e.value)
        assert "\n" not in message and repo in message and (revision or "main") in message
    with pytest.raises(ConversionError, match="not a hub id"):
        hub.resolve_model(str(caches.imvar / "no" / "such" / "folder"))
    assert not (caches.imvar / "converted").exists()


def test_bad_download_leaves_no_cache_entry(caches):
    weights = "unet/diffusion_pytorch_model.safetensors"
    truncated = {**caches.files, weights: caches.files[weights][: len(caches.files[weights]) // 2]}
    config = json.loads(caches.files["unet/config.json"])
    unsupported = {**caches.files, "unet/config.json": json.dumps({**config, "center_input_sample": True}).encode()}
    for repo, files in (("tester/truncated", truncated), ("tester/unsupported", unsupported)):
        write_hf_cache(caches.hf, repo, "main", files)
        with pytest.raises(ConversionError) as e:
            hub.resolve_model(repo)
        message = str(e.value)
        assert "\n" not in message and f"{repo} (revision main)" in message and "unet" in message
        assert not hub.is_cached(repo)
        parent = hub.converted_dir(repo).parent
        assert not parent.exists() or not any(parent.iterdir()), "a partial conversion was left behind"


def test_is_cached(caches, torch_src, tmp_path):
    assert hub.is_cached("tiny")
    assert not hub.is_cached(torch_src)  # a PyTorch folder is converted on every load
    converted = hub.resolve_model(REPO, REVISION)
    assert hub.is_cached(converted)
    assert not hub.is_cached("tester/never-seen")
    assert not hub.is_cached(str(tmp_path / "missing"))


@pytest.fixture
def restore_compile_cache():
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def test_compile_cache_stores_and_reuses_small_programs(tmp_path, restore_compile_cache):
    path = hub.enable_compile_cache(tmp_path / "compiled")
    assert path == tmp_path / "compiled"

    def program():
        # A new function object each time, so only the persistent cache can spare a compile.
        return jax.jit(lambda x: jnp.cumsum(jnp.sin(x) * 3.0 + 1.0))

    x = np.linspace(0.0, 1.0, 29, dtype=np.float32)
    events: list[str] = []

    def listener(event: str, **kwargs) -> None:
        events.append(event)

    jax.monitoring.register_event_listener(listener)
    try:
        first = program()(x)
        stored = [p for p in path.rglob("*") if p.is_file()]
        assert stored, "nothing was written to the compilation cache"
        events.clear()
        second = program()(x)
    finally:
        jax.monitoring.unregister_event_listener(listener)
    assert "/jax/compilation_cache/cache_hits" in events
    np.testing.assert_array_equal(second, first)

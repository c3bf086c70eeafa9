"""The executable cache: a second process loads the compiled sampling program instead of tracing and compiling it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imvar_jax.executables import ExecutableCache, _MAGIC


def _generate(picture: Path, out: Path, cache: Path) -> str:
    """One ``imvar-jax generate`` process on the tiny model; returns its stderr (JAX's compile log included)."""
    env = {**os.environ, "IMVAR_JAX_CACHE": str(cache), "JAX_LOG_COMPILES": "1"}
    done = subprocess.run([sys.executable, "-m", "imvar_jax.cli", "generate", str(picture), "--model", "tiny",
                           "--size", "16x16", "--steps", "2", "--num-per-image", "2", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def _sampling_compiles(stderr: str) -> list[str]:
    # JAX names the program by its body, the pipeline's per-device ``generate``.
    return [line for line in stderr.splitlines() if "jit(generate)" in line]


def test_a_second_process_loads_the_program_and_a_corrupt_entry_is_rebuilt(tmp_path):
    picture = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(picture)
    cache = tmp_path / "cache"

    first = _generate(picture, tmp_path / "out1", cache)
    assert _sampling_compiles(first), "JAX's compile log shows no sampling program: the counting is broken"
    assert "compiling for 16x16" in first
    (entry,) = (cache / "executables").glob("*.exe")

    second = _generate(picture, tmp_path / "out2", cache)
    # Not traced, lowered or compiled (JAX's own persistent cache would still trace and lower it).
    assert _sampling_compiles(second) == []
    assert "loaded the compiled program for 16x16" in second
    pictures = sorted(p.relative_to(tmp_path / "out1") for p in (tmp_path / "out1").rglob("*.png"))
    assert pictures
    for rel in pictures:
        assert (tmp_path / "out1" / rel).read_bytes() == (tmp_path / "out2" / rel).read_bytes()

    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the executable
    entry.write_bytes(bytes(data))
    third = _generate(picture, tmp_path / "out3", cache)
    assert "is stale or corrupt (checksum mismatch); rebuilding it" in third
    assert _sampling_compiles(third), "a corrupt entry must be compiled again, not run"
    for rel in pictures:
        assert (tmp_path / "out3" / rel).read_bytes() == (tmp_path / "out1" / rel).read_bytes()
    assert entry.read_bytes().startswith(_MAGIC) and entry.read_bytes() != bytes(data)  # stored anew


@pytest.mark.parametrize("damage", ["empty", "other magic", "truncated", "other key"])
def test_damaged_entries_are_refused_and_removed(tmp_path, damage):
    import jax
    import jax.numpy as jnp

    cache = ExecutableCache(tmp_path)
    devices = jax.local_devices()[:1]
    program = jax.jit(lambda x: (x * 2,))
    args = (jax.ShapeDtypeStruct((3,), jnp.float32),)
    compiled = cache.compile(program.lower(*args))
    cache.store("key", compiled)
    trees = (jax.tree.structure((args, {})), compiled.out_tree)
    loaded = cache.load("key", *trees, devices)
    np.testing.assert_array_equal(loaded(jnp.arange(3.0))[0], [0.0, 2.0, 4.0])
    (path,) = tmp_path.glob("*.exe")
    data = path.read_bytes()
    notes = []
    cache.note = notes.append
    if damage == "other key":
        # An entry renamed to another key's file name, or a hash collision: its own key text decides.
        path.rename(cache._path("other"))
        assert cache.load("other", *trees, devices) is None
        assert "made for another program" in notes[0]
        assert not list(tmp_path.glob("*.exe"))
        return
    path.write_bytes({"empty": b"", "other magic": b"x" + data[1:], "truncated": data[:-100]}[damage])
    assert cache.load("key", *trees, devices) is None
    assert len(notes) == 1 and "rebuilding it" in notes[0]
    assert not path.exists()


def test_a_program_in_jax_compile_cache_is_compiled_afresh_before_it_is_stored(tmp_path):
    """On XLA:CPU an executable JAX's persistent cache hands back serializes without its code; ``compile`` must
    not take it from there, or the stored entry would fail when the next process runs it."""
    import jax
    import jax.numpy as jnp

    from imvar_jax import hub

    hub.enable_compile_cache(tmp_path / "jax")  # stores every program, so the second compile would hit
    cache = ExecutableCache(tmp_path / "exe")
    args = (jax.ShapeDtypeStruct((4,), jnp.float32),)
    for attempt in range(2):
        compiled = cache.compile(jax.jit(lambda x: (jnp.cos(x) * 3,)).lower(*args))
        cache.store(f"key {attempt}", compiled)
        trees = (jax.tree.structure((args, {})), compiled.out_tree)
        loaded = cache.load(f"key {attempt}", *trees, jax.local_devices()[:1])
        np.testing.assert_allclose(loaded(jnp.zeros(4))[0], [3.0] * 4)

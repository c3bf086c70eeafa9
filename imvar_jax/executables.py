"""A disk cache of compiled sampling programs, so a second process skips tracing, lowering and compiling.

JAX's persistent compilation cache still traces and lowers the program in every process (about
half of a cold start on a CPU); this cache stores the compiled executable itself
(``jax.experimental.serialize_executable``), under a key of everything that can change it: this
package's code, jax/jaxlib versions, XLA flags and JAX options, the devices, the model modules'
configs and dtypes, the static options, and the shapes, dtypes and shardings of every argument.

An entry holds the key text it was made for and a checksum of its payload: an entry that does not
match (stale, truncated, corrupt, or written by another version) is deleted and rebuilt, never
run. The checksum guards against damage, not tampering: loading an executable can run code (JAX
says so of ``deserialize_and_load``), so the folder must be as trusted as the installed code, as
the user's own cache folder is. The argument and result structures are rebuilt from the call's own
abstract arguments rather than stored.

Nothing is cached until ``enable`` is called (the command line does, unless ``--no-compile-cache``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jaxlib

log = logging.getLogger(__name__)

_MAGIC = b"imvar-jax executable 1\n"
_ACTIVE: "ExecutableCache | None" = None


def enable(folder: str | os.PathLike) -> "ExecutableCache":
    """Cache every pipeline's compiled sampling programs in ``folder`` from now on (process-wide, like JAX's
    compilation cache); returns the cache."""
    global _ACTIVE
    _ACTIVE = ExecutableCache(folder)
    return _ACTIVE


def disable() -> None:
    """Stop caching (and loading) compiled programs on disk."""
    global _ACTIVE
    _ACTIVE = None


def active() -> "ExecutableCache | None":
    """The cache ``enable`` turned on, if any."""
    return _ACTIVE


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of this package's Python sources: any change to the code may change the programs."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def key_text(parts: Sequence[Any], devices: Sequence[jax.Device]) -> str:
    """The text an entry is keyed by: ``parts`` (the program's static description) and the environment."""
    environment = [
        f"jax {jax.__version__} jaxlib {jaxlib.__version__} code {code_digest()}",
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        f"x64={jax.config.jax_enable_x64} matmul={jax.config.jax_default_matmul_precision}",
        "devices=" + ",".join(f"{d.platform}:{d.device_kind}:{d.id}:{d.process_index}" for d in devices),
        f"processes={jax.process_count()}",
    ]
    return "\n".join(environment + [repr(p) for p in parts])


class ExecutableCache:
    """Compiled executables on disk in ``folder``, one file per key."""

    def __init__(self, folder: str | os.PathLike, note: Callable[[str], None] | None = None) -> None:
        self.folder = Path(folder).expanduser()
        self.note = note

    @staticmethod
    def compile(lowered: Any) -> Any:
        """``lowered.compile()`` bypassing JAX's persistent compilation cache: on XLA:CPU an executable that cache
        hands back serializes without its code (loading it then fails at run time with NOT_FOUND), so one that
        is to be stored is compiled afresh. The switch is process-wide for the moment of this compile."""
        from jax.experimental.compilation_cache import compilation_cache

        before = jax.config.jax_enable_compilation_cache
        jax.config.update("jax_enable_compilation_cache", False)
        # JAX decides once whether its cache is in use: a reset makes it look at the switch again.
        compilation_cache.reset_cache()
        try:
            return lowered.compile()
        finally:
            jax.config.update("jax_enable_compilation_cache", before)
            compilation_cache.reset_cache()

    def _path(self, key: str) -> Path:
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()}.exe"

    def load(self, key: str, in_tree: Any, out_tree: Any, devices: Sequence[jax.Device]) -> Any | None:
        """The executable stored for ``key``, loaded onto ``devices``; None when there is none. A damaged or
        mismatched entry is deleted (and said so), so that it is rebuilt."""
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            self._say(f"executable cache: cannot read {path} ({e.strerror or e}); compiling instead")
            return None
        try:
            payload = _unpack(data, key)
            return _deserialize(payload, in_tree, out_tree, devices)
        except Exception as e:  # a damaged entry may fail anywhere in unpacking or loading
            self._say(f"executable cache: {path.name} is stale or corrupt ({_short(e)}); rebuilding it")
            path.unlink(missing_ok=True)
            return None

    def store(self, key: str, compiled: Any) -> None:
        """Write ``compiled`` (from ``compile``) for ``key`` (atomically: a reader sees the old entry, the new one,
        or none)."""
        from jax.experimental import serialize_executable

        try:
            payload, _, _ = serialize_executable.serialize(compiled)
            self.folder.mkdir(parents=True, exist_ok=True)
            key_bytes = key.encode()
            body = len(key_bytes).to_bytes(8, "little") + key_bytes + payload
            data = _MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n" + body
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".partial-", suffix=".exe")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, self._path(key))
            except BaseException:
                os.unlink(tmp)
                raise
        except Exception as e:  # a full disk or an unserializable program costs the next start, not this run
            self._say(f"executable cache: cannot store the compiled program in {self.folder} ({_short(e)})")

    def _say(self, line: str) -> None:
        (self.note or log.warning)(line)


def _unpack(data: bytes, key: str) -> bytes:
    if not data.startswith(_MAGIC):
        raise ValueError("not an imvar-jax executable")
    checksum, _, body = data[len(_MAGIC):].partition(b"\n")
    if hashlib.sha256(body).hexdigest().encode() != checksum:
        raise ValueError("checksum mismatch")
    length = int.from_bytes(body[:8], "little")
    if body[8:8 + length].decode(errors="replace") != key:
        raise ValueError("made for another program")
    return body[8 + length:]


def _deserialize(payload: bytes, in_tree: Any, out_tree: Any, devices: Sequence[jax.Device]) -> Any:
    from jax.experimental import serialize_executable

    return serialize_executable.deserialize_and_load(payload, in_tree, out_tree, execution_devices=list(devices))


def _short(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text if len(text) <= 120 else text[:117] + "..."

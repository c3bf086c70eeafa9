"""Shared checks of the hostile-input tests: tree snapshots, clean one-line errors, runs without root's override.

A hostile-input test builds its corpus under a folder, snapshots the folder, runs the command
and asserts three things: the exit code, one error line naming the file or argument (no
traceback), and that nothing outside the folder the command may write changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pytest

NOBODY = 65534
REPO = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (itself included), never following links: path -> (kind, mode, content).

    Content is a file's sha256, a link's target, or None for folders; unreadable folders are
    read anyway (the tests run as root), so a change hidden behind a chmod is still seen.
    """
    state: dict[str, tuple] = {}

    def visit(path: Path) -> None:
        st = os.lstat(path)
        rel = os.path.relpath(path, root)
        if stat.S_ISLNK(st.st_mode):
            state[rel] = ("link", None, os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            state[rel] = ("dir", stat.S_IMODE(st.st_mode), None)
            for name in sorted(os.listdir(path)):
                visit(path / name)
        elif stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            state[rel] = ("file", stat.S_IMODE(st.st_mode), digest)
        else:  # a pipe or device: opening it could block
            state[rel] = ("special", stat.S_IMODE(st.st_mode), None)

    visit(Path(root))
    return state


def changes(before: Mapping[str, tuple], after: Mapping[str, tuple], allowed: Iterable[str | os.PathLike] = (),
            root: Path | None = None) -> list[str]:
    """Paths added, removed or changed between two snapshots, outside the ``allowed`` folders (relative or under
    ``root``)."""
    keep = []
    for a in allowed:
        a = Path(a)
        rel = os.path.relpath(a, root) if root is not None and a.is_absolute() else str(a)
        keep.append(rel)

    def permitted(rel: str) -> bool:
        return any(rel == k or rel.startswith(k + os.sep) for k in keep)

    diff = [p for p in set(before) | set(after) if before.get(p) != after.get(p)]
    return sorted(p for p in diff if not permitted(p))


def assert_clean_error(err: str, *needles: str) -> str:
    """``err`` (stderr, progress bars aside) holds error lines naming every needle, and no traceback; the line."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and "error" in line.lower()]
    assert lines, f"no error line in {err!r}"
    for needle in needles:
        assert any(needle in line for line in lines), f"{needle!r} not named in {lines}"
    return lines[0]


def world_readable_tmp() -> Path:
    """A fresh folder that an unprivileged user can enter (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="imvar-hostile-", dir="/tmp"))
    path.chmod(0o777)
    return path


def unprivileged_command(argv: Sequence[str]) -> list[str]:
    """``argv`` run as ``nobody`` without root's permission override, or skip saying why that is not possible."""
    if os.geteuid() != 0:
        return list(argv)  # already unprivileged: permissions apply as they are
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("permission cases need setpriv to drop root's file-permission override; not installed")
    probe = subprocess.run([setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable,
                            "-c", "import imvar_jax"], capture_output=True, text=True, cwd="/")
    if probe.returncode != 0:
        pytest.skip(f"cannot run as uid {NOBODY} with setpriv: {probe.stderr.strip().splitlines()[-1:]}")
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


def run_cli_unprivileged(args: Sequence[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``imvar-jax ARGS`` in a fresh process as ``nobody``, its caches inside ``cwd``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_"))}
    env.update(HOME=str(cwd), IMVAR_JAX_CACHE=str(cwd / ".cache"), XDG_CACHE_HOME=str(cwd / ".cache"),
               PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    command = unprivileged_command([sys.executable, "-m", "imvar_jax.cli", *args])
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)

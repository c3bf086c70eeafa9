"""What a benchmark's printed figures were measured on: the commit of the code, for BENCHMARKS.md."""

from __future__ import annotations

import subprocess
from pathlib import Path


def code_version() -> str:
    """The short commit hash, noting uncommitted changes under imvar_jax/ (they would be measured too)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "imvar_jax"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes in imvar_jax/" if dirty else "")

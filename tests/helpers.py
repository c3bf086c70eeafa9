"""Shared test utilities: random-weight PyTorch references and tolerance checks."""

from __future__ import annotations

import numpy as np
import torch


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Overwrite every parameter with noise.

    Fresh modules have zero biases and unit norm scales, which would let a swapped
    or dropped bias/scale go unnoticed; random values make every tensor matter.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * scale
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "layernorm.weight",
                              "layrnorm.weight", "norm_out.weight", "group_norm.weight", "layer_norm1.weight",
                              "layer_norm2.weight")):
                noise = noise + 1.0
            p.copy_(noise.to(p.dtype))
    return module.eval()


def save_torch(module, path, fmt: str = "safetensors", dtype: torch.dtype = torch.float32,
               max_shard_size: str | None = None) -> None:
    """``save_pretrained``, then rewritten as a PyTorch ``.bin`` pickle when ``fmt == "bin"``.

    Saving in float16 rounds the module's own weights too (it is cast back to float32
    in place), so the reference then computes with exactly the weights on disk.
    """
    from pathlib import Path

    path = Path(path)
    module.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    module.save_pretrained(str(path), **kwargs)
    module.to(torch.float32)
    if fmt == "bin":
        files = sorted(path.glob("*.safetensors"))
        assert len(files) == 1, "sharded .bin checkpoints are not produced by this helper"
        stem = files[0].name.removesuffix(".safetensors")
        stem = {"model": "pytorch_model"}.get(stem, stem)  # transformers' .bin name
        state = {k: v.to(dtype) for k, v in module.state_dict().items()}
        torch.save(state, path / f"{stem}.bin")
        files[0].unlink()


def assert_close(ours, ref, rel: float = 1e-4, what: str = "") -> float:
    """Max abs error <= ``rel`` times the reference's max magnitude. Returns the relative error."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != reference {ref.shape}"
    scale = float(np.max(np.abs(ref)))
    assert scale > 0, f"{what}: reference is all zeros, the comparison would prove nothing"
    err = float(np.max(np.abs(ours - ref))) / scale
    assert err <= rel, f"{what}: max abs error {err:.3e} x max|ref| exceeds {rel:.0e}"
    return err


class CompileLog:
    """The programs XLA compiled while active, by name, read from JAX's own compile log.

    ``jax.log_compiles()`` makes jax._src.dispatch log "Finished XLA compilation of NAME in ..."
    once per real backend compile (a cache hit logs nothing), so counting those records counts
    compiles without touching JAX internals.
    """

    _PREFIX = "Finished XLA compilation of "

    def __init__(self) -> None:
        self.names: list[str] = []

    def __enter__(self) -> "CompileLog":
        import logging

        import jax

        log = self

        class _Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                message = record.getMessage()
                if message.startswith(CompileLog._PREFIX):
                    log.names.append(message[len(CompileLog._PREFIX):].rsplit(" in ", 1)[0])

        self._logger = logging.getLogger("jax._src.dispatch")
        self._handler = _Handler(level=logging.DEBUG)
        self._old_level = self._logger.level
        self._logger.addHandler(self._handler)
        self._logger.setLevel(logging.DEBUG)
        self._context = jax.log_compiles()
        self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._old_level)

    def count(self, fragment: str = "") -> int:
        return sum(fragment in name for name in self.names)

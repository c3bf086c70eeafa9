"""The precision policy: which dtypes params and activations use, per backend.

Params and activations of the UNet, the CLIP encoder and the safety checker share one
``dtype``; the VAE has its own (``vae_dtype``) so its decoder can stay in float32 while the
rest runs in half precision. Whatever the dtypes, these stay float32 (the models and the
sampler do this themselves): softmax and attention scores, normalisation statistics, the
timestep embedding, the UNet's output, classifier-free guidance and the whole scheduler
state, which in half precision is a known cause of black pictures in JAX ports.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    # Meant for GPUs; TPUs and XLA:CPU have no fast float16 path.
    "float16": np.dtype(np.float16),
}


def parse_dtype(dtype: Any, what: str = "dtype") -> np.dtype:
    """``"float32"``/``"bfloat16"``/``"float16"`` or the matching numpy/JAX dtype -> numpy dtype."""
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"{what}: unsupported {dtype!r} (choose one of {', '.join(DTYPES)})")
    return DTYPES[name]


def default_dtype(platform: str) -> str:
    """bfloat16 on accelerators (half the memory, their fast matmul path), float32 on CPU (bf16 is slow there).

    ``platform`` is that of the devices the program will run on (``jax.Device.platform``), never
    the host's default backend: a CPU host may be preparing work for accelerators.
    """
    return "float32" if platform == "cpu" else "bfloat16"


def resolve_dtypes(dtype: Any, vae_dtype: Any, platform: str) -> tuple[np.dtype, np.dtype]:
    """``(dtype, vae_dtype)`` as numpy dtypes; ``dtype`` None is ``platform``'s default, ``vae_dtype`` None follows it."""
    main = parse_dtype(default_dtype(platform) if dtype is None else dtype)
    return main, main if vae_dtype is None else parse_dtype(vae_dtype, "vae_dtype")

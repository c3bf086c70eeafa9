"""Photos of many sizes compile nothing new: preprocessing runs on the host, sampling once per shape."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from helpers import CompileLog
from imvar_jax import ImageVariationPipeline


@pytest.mark.parametrize("preprocessing", ["v2", "clip"])
def test_thirty_sizes_compile_each_program_once(preprocessing):
    pipe, params = ImageVariationPipeline.from_pretrained("tiny")
    rng = np.random.default_rng(0)
    sizes = [(17 + 7 * i, 23 + 5 * i) for i in range(30)]
    assert len(set(sizes)) == 30
    pictures = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    with CompileLog() as log:
        out = pipe.generate(pictures, params, seed=0, num_inference_steps=1, preprocessing=preprocessing)
    assert out.images.shape[0] == 30
    # The compile log sees real compiles: the sampling program and the safety check, once each.
    assert log.count("jit(generate)") == 1 and log.count("jit(check_safety)") == 1, log.names
    assert not [name for name in log.names if "resize" in name or "scale_and_translate" in name], log.names
    # Thirty more sizes compile nothing at all: preprocessing is host code, the programs' shapes are the same.
    others = [Image.fromarray(rng.integers(0, 256, (h + 1, w + 2, 3), dtype=np.uint8)) for h, w in sizes]
    with CompileLog() as again:
        pipe.generate(others, params, seed=1, num_inference_steps=1, preprocessing=preprocessing)
    assert again.names == []

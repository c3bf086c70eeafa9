"""Training data: a folder of pictures, read with generation's discovery and checks, encoded once, served by grain.

Pictures are found with ``batch.inputs.collect_inputs`` and read and decoded with the same
checks as ``imvar-jax generate`` (a file that cannot be used is reported by name and left out,
never a crash). ``precompute`` runs the frozen encoders once per picture: its VAE latents
(the posterior sampled with a key from (seed, picture index), times ``scaling_factor``) and its
CLIP image embedding (v2 preprocessing by default). The result is cached in a ``.npz`` keyed by
the model, the preprocessing, the training size, the seed and every picture's sha256, so a
restarted run reads it back instead of encoding again.

``loader`` serves batches with grain: shuffled with the run's seed, an endless sequence of
epochs, its position a JSON-able state (``get_state``/``set_state``) that checkpoints carry.
Each process of a job iterates the same global batches (the encoded pictures are in memory, so
reading all of a batch costs nothing) and places only its own devices' rows: sharding the
sampler per process would change which pictures share a step with the process count.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import grain
import jax
import numpy as np
from PIL import Image

from ..batch.inputs import InputError, collect_inputs, decode_image, read_input


@dataclass(frozen=True)
class Encoded:
    """Every usable picture encoded: ``latents`` ``[N, h, w, C]`` and ``embeds`` ``[N, D]``, float32."""

    latents: np.ndarray
    embeds: np.ndarray
    names: tuple[str, ...]  # the pictures, as messages show them, in index order


def _square(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Resize the shorter side to fit ``size`` (h, w) and center-crop: ``[h, w, 3]`` float32 in [0, 1]."""
    h, w = size
    image = image.convert("RGB")
    scale = max(h / image.height, w / image.width)
    resized = image.resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))),
                           Image.Resampling.BICUBIC)
    left, top = (resized.width - w) // 2, (resized.height - h) // 2
    return np.asarray(resized.crop((left, top, left + w, top + h)), np.float32) / 255.0


def precompute(pipe: Any, params: dict[str, Any], sources: Sequence[str | os.PathLike], *, size: tuple[int, int],
               seed: int, cache: str | os.PathLike | None = None, model_id: str = "", preprocessing: str = "v2",
               ) -> tuple[Encoded, list[tuple[str, str]]]:
    """Encode the pictures ``sources`` name (files, folders, globs); returns them and ``(picture, reason)`` misses."""
    files, misses = collect_inputs(sources)
    pictures, digests, names = [], [], []
    for f in files:
        try:
            data, digest = read_input(f.path)
            pictures.append(decode_image(data))
        except InputError as e:
            misses.append((f.display, str(e)))
            continue
        digests.append(digest)
        names.append(f.display)
    if not pictures:
        raise InputError("no usable picture to train on" + (f" ({misses[0][0]}: {misses[0][1]})" if misses else ""))
    key = hashlib.sha256(json.dumps({"model": model_id, "preprocessing": preprocessing, "size": list(size),
                                     "seed": seed, "pictures": digests, "dtype": str(pipe.dtype)}).encode()
                         ).hexdigest()
    path = Path(cache) if cache is not None else None
    if path is not None and path.is_file():
        with np.load(path) as found:
            if str(found["key"]) == key:
                return Encoded(found["latents"], found["embeds"], tuple(names)), misses
    embeds = np.asarray(pipe.encode_image(params, pipe.prepare_inputs(pictures, preprocessing)))[:, 0]  # [N, D]
    images = np.stack([_square(p, size) for p in pictures])  # [N, H, W, 3]
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(np.arange(len(images), dtype=np.uint32))
    latents = np.stack([np.asarray(pipe.encode_latents(params, images[i:i + 1], keys[i]))[0]
                        for i in range(len(images))])  # [N, C, h, w]
    latents = np.ascontiguousarray(latents.transpose(0, 2, 3, 1)).astype(np.float32)  # [N, h, w, C]
    encoded = Encoded(latents, embeds.astype(np.float32), tuple(names))
    if path is not None:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")  # the processes of a job each write the same
        np.savez(tmp, key=np.array(key), latents=encoded.latents, embeds=encoded.embeds)
        os.replace(tmp, path)
    return encoded, misses


class _Source:
    """grain's random-access source over the encoded pictures (one record per picture)."""

    def __init__(self, encoded: Encoded) -> None:
        self._encoded = encoded
        # grain checks a restored iterator state against repr(source): the same data, the same repr.
        digest = hashlib.sha256(encoded.latents.tobytes() + encoded.embeds.tobytes()).hexdigest()[:16]
        self._repr = f"EncodedPictures(n={len(encoded.latents)}, sha256={digest})"

    def __repr__(self) -> str:
        return self._repr

    def __len__(self) -> int:
        return len(self._encoded.latents)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"latents": self._encoded.latents[i], "embeds": self._encoded.embeds[i]}


def loader(encoded: Encoded, *, batch_size: int, seed: int) -> grain.DataLoader:
    """Endless shuffled global batches of ``batch_size`` pictures (``{"latents", "embeds"}``), the same in
    every process; iterate it and carry ``iterator.get_state()`` in checkpoints."""
    if len(encoded.latents) < batch_size:
        raise ValueError(f"batch_size: {batch_size} needs at least {batch_size} pictures, "
                         f"found {len(encoded.latents)}")
    sampler = grain.samplers.IndexSampler(len(encoded.latents), shuffle=True, seed=seed, num_epochs=None,
                                          shard_options=grain.sharding.NoSharding())
    return grain.DataLoader(data_source=_Source(encoded), sampler=sampler,
                            operations=[grain.transforms.Batch(batch_size, drop_remainder=True)], worker_count=0)

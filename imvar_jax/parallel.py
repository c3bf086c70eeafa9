"""Devices: replicate params, shard batches, and per-picture PRNG keys that ignore the device count."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def replicate(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """One copy of ``tree`` per device, stacked on a new leading axis ``[D, ...]`` (for ``pmap``).

    Each device gets its copy straight from the host: stacking on a device (as
    ``flax.jax_utils.replicate`` does) compiles an op per distinct shape, 14 s for the tiny
    model's 416 arrays on this CPU, and holds all D copies on the first device at once.
    """
    devices = list(devices or jax.local_devices())
    sharding = NamedSharding(Mesh(np.array(devices), ("devices",)), PartitionSpec("devices"))

    def one(x):
        host = np.asarray(x)[None]  # [1, ...]
        shards = [jax.device_put(host, d) for d in devices]
        return jax.make_array_from_single_device_arrays((len(devices), *host.shape[1:]), sharding, shards)

    return jax.tree.map(one, tree)


def unreplicate(tree: Any) -> Any:
    """The first device's copy of a ``replicate``d tree, as host numpy arrays (no per-shape compiles)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)


def replicated_devices(tree: Any) -> list[jax.Device] | None:
    """The devices ``replicate`` spread ``tree`` over (ordered by id), or None if it was not."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return None
    device_sets = {frozenset(getattr(getattr(x, "sharding", None), "device_set", ())) for x in leaves}
    if len(device_sets) != 1:
        return None
    devices = sorted(device_sets.pop(), key=lambda d: d.id)
    if not devices or any(x.shape[:1] != (len(devices),) for x in leaves):
        return None
    return devices


def on_device(tree: Any, device: jax.Device) -> bool:
    """Whether every leaf of ``tree`` is a plain (unreplicated) array on ``device`` alone."""
    return all(isinstance(x, jax.Array) and x.sharding.device_set == {device} for x in jax.tree.leaves(tree))


def shard(x: Any, num_devices: int | None = None) -> Any:
    """Split the leading axis ``[B, ...]`` into ``[D, B // D, ...]``; B must divide by D."""
    d = num_devices or jax.local_device_count()

    def split(a):
        if a.shape[0] % d:
            raise ValueError(f"shard: batch of {a.shape[0]} does not divide by {d} devices (pad it first)")
        return a.reshape(d, a.shape[0] // d, *a.shape[1:])  # [D, B/D, ...]

    return jax.tree.map(split, x)


def unshard(x: Any) -> Any:
    """Merge ``[D, B/D, ...]`` back into ``[B, ...]``."""
    return jax.tree.map(lambda a: a.reshape(a.shape[0] * a.shape[1], *a.shape[2:]), x)


def pad_batch(x: np.ndarray, multiple: int) -> np.ndarray:
    """Repeat the last item until the leading axis divides by ``multiple`` (results are trimmed later)."""
    extra = -x.shape[0] % multiple
    if extra == 0:
        return x
    return np.concatenate([x, np.repeat(x[-1:], extra, axis=0)])


def as_key(seed: int | jax.Array) -> jax.Array:
    """An int seed or a PRNG key (typed or raw ``uint32[2]``) -> a typed key."""
    if isinstance(seed, (int, np.integer)):
        return jax.random.key(int(seed))
    seed = jax.numpy.asarray(seed)
    if jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
        if seed.shape != ():
            raise ValueError(f"prng_seed: expected one key, got a key array of shape {seed.shape}")
        return seed
    if seed.shape == (2,) and seed.dtype == jax.numpy.uint32:
        return jax.random.wrap_key_data(seed)
    raise TypeError(f"prng_seed: expected an int or one PRNG key, got {seed.dtype}{list(seed.shape)}")


def image_keys(seed: int | jax.Array, count: int, start: int = 0) -> jax.Array:
    """Keys ``fold_in(key, i)`` for global picture indices ``start .. start + count - 1``.

    Picture i's noise depends only on (seed, i), never on how pictures are spread over devices.
    """
    key = as_key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(np.arange(start, start + count, dtype=np.uint32))

"""Placement: where work runs, how pictures are numbered and padded, and per-picture PRNG keys.

One mechanism places every sharded computation (sampling, the safety check, the batch tool):
a 1-D ``Mesh`` over the devices (axis ``AXIS``), batch axes split with ``NamedSharding`` and
per-device bodies run through ``shard_map``. Params are replicated in ``replicate``'s stacked
form ``[D, ...]``, which is what diffusers-Flax users pass to ``pmap``; inside a body each device
sees its own ``[1, ...]`` block.

The same mechanism spans several processes (``imvar_jax.distributed``): the mesh is over every
process's devices, each process builds the global arrays from the rows its own devices hold
(``split`` reads only those) and reads back only its own devices' rows (``local``), and every
process calls the same programs in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .errors import shown


AXIS = "devices"
INDEX_LIMIT = 2**32  # global picture indices are folded into PRNG keys as uint32


@dataclass(frozen=True)
class Placement:
    """An ordered set of devices (by id) and the 1-D mesh over them; hashable, so it keys programs."""

    devices: tuple[jax.Device, ...]

    @classmethod
    def of(cls, devices: Sequence[jax.Device] | None = None) -> "Placement":
        """The placement over ``devices`` (None: every device of the job, this process's and the others');
        each must be a distinct ``jax.Device``."""
        if devices is None:
            devices = jax.devices()
        try:
            devices = tuple(devices)
        except TypeError:
            raise ValueError(f"devices: expected a sequence of jax devices, got {type(devices).__name__}") from None
        if not devices:
            raise ValueError("devices: expected at least one device")
        odd = next((d for d in devices if not isinstance(d, jax.Device)), None)
        if odd is not None:
            raise ValueError(f"devices: expected jax devices, got {type(odd).__name__}")
        if len(set(devices)) != len(devices):
            raise ValueError("devices: a device is listed more than once")
        return cls(tuple(sorted(devices, key=lambda d: d.id)))

    def __len__(self) -> int:
        return len(self.devices)

    @property
    def platform(self) -> str:
        """The devices' platform (``cpu``, ``gpu``, ``tpu``): backend-specific choices are made for it."""
        return self.devices[0].platform

    @property
    def mesh(self) -> Mesh:
        return Mesh(np.array(self.devices), (AXIS,))

    @property
    def batch_sharding(self) -> NamedSharding:
        """A batch split on its leading axis, one block per device in order."""
        return NamedSharding(self.mesh, PartitionSpec(AXIS))

    @property
    def replicated_sharding(self) -> NamedSharding:
        """A whole copy on every device."""
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def local_devices(self) -> tuple[jax.Device, ...]:
        """This process's devices among them, in mesh order."""
        me = jax.process_index()
        return tuple(d for d in self.devices if d.process_index == me)

    @property
    def is_multiprocess(self) -> bool:
        return len(self.local_devices) != len(self)

    def local_slots(self, total: int) -> np.ndarray:
        """The positions (0 .. total-1) of a batch of ``total`` split over the devices that this process holds."""
        per = total // len(self)
        mine = [i for i, d in enumerate(self.devices) if d.process_index == jax.process_index()]
        return (np.asarray(mine, np.int64)[:, None] * per + np.arange(per)).reshape(-1)  # [local devices * per]

    def split(self, x: Any) -> jax.Array:
        """A host batch ``[B, ...]`` (B divisible by the device count) as one array split over the devices.

        Each process reads only the rows of its own devices (``local_slots``): the other rows may hold
        anything, such as zeros where this process did not prepare them.
        """
        x = np.asarray(x)
        if x.shape[0] % len(self):
            raise ValueError(f"batch of {x.shape[0]} does not divide by {len(self)} devices (pad it first)")
        return jax.make_array_from_callback(x.shape, self.batch_sharding, lambda index: x[index])

    def whole(self, tree: Any) -> Any:
        """Host values (the same in every process) as one copy on every device."""
        def put(x):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, self.replicated_sharding, lambda index: x[index])

        return jax.tree.map(put, tree)

    def local(self, x: jax.Array) -> np.ndarray:
        """The rows of a batch split over the devices that this process holds, in ``local_slots`` order (host)."""
        shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
        return np.concatenate([np.asarray(s.data) for s in shards])

    def program(self, body: Callable[..., Any], params_stacked: bool, batch_args: Sequence[bool],
                ) -> Callable[..., Any]:
        """``body(params, *args)`` run on every device over its block of the batch, compiled once per shape.

        ``params_stacked``: params come from ``replicate`` (``[D, ...]``, each device unstacks its
        copy); otherwise they are plain and on every device of a one-device placement.
        ``batch_args[i]``: argument i is split on its leading axis (else every device sees all of it).
        The result is split on its leading axis, in device order.
        """
        if not params_stacked and len(self) != 1:
            raise ValueError("params: plain params run on one device; replicate them for several")

        def per_device(params, *args):
            if params_stacked:
                params = jax.tree.map(lambda a: a[0], params)  # [1, ...] -> this device's copy
            return body(params, *args)

        per_device.__name__ = body.__name__  # compile logs and profiles name the program by its body
        specs = (PartitionSpec(AXIS) if params_stacked else PartitionSpec(),
                 *(PartitionSpec(AXIS) if b else PartitionSpec() for b in batch_args))
        return jax.jit(jax.shard_map(per_device, mesh=self.mesh, in_specs=specs, out_specs=PartitionSpec(AXIS),
                                     check_vma=False))


@dataclass(frozen=True)
class PicturePlan:
    """Which picture each slot of a padded batch holds.

    Picture ``p = i*k + j`` is variation j of input i (input-major) and has the global index
    ``index[p]``, which alone decides its noise. Slots past ``count`` repeat the last picture so
    every device gets the same number; their results are dropped.
    """

    source: np.ndarray  # [P] int: the real picture (0 .. count-1) each slot holds
    index: np.ndarray  # [P] int64: the global index of that picture
    count: int
    k: int

    @property
    def inputs(self) -> np.ndarray:
        """[P] the input each slot's picture varies."""
        return self.source // self.k


def picture_plan(n_inputs: int, k: int, first_index: int | Sequence[int] = 0, multiple: int = 1,
                 slots: int | None = None) -> PicturePlan:
    """The numbering and padding rule for ``n_inputs * k`` pictures spread over ``multiple`` devices.

    ``first_index``: an int numbers the pictures from there on; one int per input gives each
    input's first picture (its variation j is that + j), so a resumed job keeps everyone's noise.
    ``slots``: pad to exactly this many (a multiple of ``multiple``), e.g. to keep one shape every call.
    """
    count = n_inputs * k
    if count < 1:
        raise ValueError(f"images: expected at least one picture, got {n_inputs} inputs x {k}")
    if isinstance(first_index, (int, np.integer)) and not isinstance(first_index, (bool, np.bool_)):
        if not 0 <= first_index < INDEX_LIMIT:
            raise ValueError(f"first_index: expected an int in 0..{INDEX_LIMIT - 1}, got {shown(first_index)}")
        index = np.arange(count, dtype=np.int64) + int(first_index)
    else:
        try:
            starts = np.asarray(first_index)
        except (TypeError, ValueError):
            starts = np.zeros(0, object)
        if (starts.shape != (n_inputs,) or not np.issubdtype(starts.dtype, np.integer)
                or not ((starts >= 0) & (starts < INDEX_LIMIT)).all()):
            raise ValueError(f"first_index: expected an int or {n_inputs} ints in 0..{INDEX_LIMIT - 1} "
                             f"(one per input), got {shown(first_index)}")
        index = (starts.astype(np.int64)[:, None] + np.arange(k)).reshape(-1)  # [N*k]
    if index.max() >= INDEX_LIMIT:
        # Indices are folded into the key as uint32: a larger one would repeat another picture's noise.
        raise ValueError(f"first_index: pictures would be numbered up to {int(index.max())}, past "
                         f"{INDEX_LIMIT - 1}")
    total = -(-count // multiple) * multiple if slots is None else slots
    if total < count or total % multiple:
        raise ValueError(f"slots: {total} cannot hold {count} pictures in equal parts on {multiple} devices")
    source = np.minimum(np.arange(total), count - 1)
    return PicturePlan(source=source, index=index[source], count=count, k=k)


def replicate(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """One copy of ``tree`` per device, stacked on a new leading axis ``[D, ...]`` (for ``pmap``).

    Each device gets its copy straight from the host: stacking on a device (as
    ``flax.jax_utils.replicate`` does) compiles an op per distinct shape, 14 s for the tiny
    model's 416 arrays on this CPU, and holds all D copies on the first device at once.
    """
    devices = list(devices or jax.local_devices())
    sharding = _stacked(devices)
    # Over several processes' devices, each process puts the copies of its own devices only.
    mine = [d for d in devices if d.process_index == jax.process_index()]

    def one(x):
        host = np.asarray(x)[None]  # [1, ...]
        shards = [jax.device_put(host, d) for d in mine]
        return jax.make_array_from_single_device_arrays((len(devices), *host.shape[1:]), sharding, shards)

    return jax.tree.map(one, tree)


def replicated_shapes(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """What ``replicate(tree, devices)`` gives, as ``jax.ShapeDtypeStruct`` leaves: nothing is read or placed."""
    devices = list(devices or jax.local_devices())
    sharding = _stacked(devices)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((len(devices), *x.shape), x.dtype, sharding=sharding), tree)


def _stacked(devices: list[jax.Device]) -> NamedSharding:
    """``replicate``'s layout: the leading axis split over ``devices``, one copy each."""
    return NamedSharding(Mesh(np.array(devices), ("devices",)), PartitionSpec("devices"))


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
    """Whether every leaf of ``tree`` is a plain (unreplicated) array on ``device`` alone (or the shape of one)."""
    return all(isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and getattr(x.sharding, "device_set", None) == {device}
               for x in jax.tree.leaves(tree))


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


def as_key(seed: int | jax.Array, argument: str = "prng_seed") -> jax.Array:
    """An int seed or a PRNG key (typed or raw ``uint32[2]``) -> a typed key; errors name ``argument``."""
    if isinstance(seed, (int, np.integer)):
        return jax.random.key(int(seed))
    seed = jax.numpy.asarray(seed)
    if jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
        if seed.shape != ():
            raise ValueError(f"{argument}: expected one key, got a key array of shape {seed.shape}")
        return seed
    if seed.shape == (2,) and seed.dtype == jax.numpy.uint32:
        return jax.random.wrap_key_data(seed)
    raise TypeError(f"{argument}: expected an int or one PRNG key, got {seed.dtype}{list(seed.shape)}")


def image_keys(seed: int | jax.Array, count: int, start: int = 0) -> jax.Array:
    """Keys ``fold_in(key, i)`` for global picture indices ``start .. start + count - 1``.

    Picture i's noise depends only on (seed, i), never on how pictures are spread over devices.
    """
    return picture_keys(seed, np.arange(start, start + count))


def picture_keys(seed: int | jax.Array, indices: Any) -> jax.Array:
    """Keys ``fold_in(key(seed), i)`` for each global picture index in ``indices``."""
    key = as_key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(np.asarray(indices, dtype=np.uint32))


def seeded_picture_keys(seeds: Any, indices: Any) -> jax.Array:
    """Keys ``fold_in(key(seeds[p]), indices[p])``: each picture from its own int seed, bit for bit the key
    ``picture_keys(seeds[p], [indices[p]])`` gives, so pictures of different seeds can share one call."""
    seeds = np.asarray(seeds, np.int64)
    unique, which = np.unique(seeds, return_inverse=True)
    bases = np.stack([np.asarray(jax.random.key_data(as_key(int(s)))) for s in unique])[which]  # [P, 2]
    return jax.vmap(lambda k, i: jax.random.fold_in(jax.random.wrap_key_data(k), i))(
        bases, np.asarray(indices, dtype=np.uint32))

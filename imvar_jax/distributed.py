"""Several processes, one job: joining JAX's multi-controller runtime and agreeing between processes.

Every process of a job runs the same program (the same command on every host). ``initialize``
joins them with ``jax.distributed.initialize``; afterwards ``jax.devices()`` lists the devices of
every process, and a ``parallel.Placement`` over them runs one program across all of them. The
helpers below (``barrier``, ``agree``, ``gather``) pass small JSON values through the
coordination service's key-value store with a deadline, so a process that failed or died makes
the others stop with a message naming it instead of waiting forever. In a single process they
return at once and nothing here needs calling.

The coordination service's client is not public API in jax 0.10 (``jax._src.distributed``); this
module is the one place that touches it.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import jax

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # read by jax.distributed itself as well
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
DEFAULT_TIMEOUT_S = 300
# JAX declares a process dead after this long without a heartbeat (its own default), or sooner
# when the job's timeout is shorter; the survivors are then stopped by JAX's runtime.
_HEARTBEAT_S = 100
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})$")


class DistributedError(RuntimeError):
    """Joining the job failed, or another process did not reach a point of the job in time."""


@dataclass(frozen=True)
class Job:
    """Where this process stands in its job (one process: ``Job(0, 1, None)``)."""

    process_id: int
    num_processes: int
    coordinator: str | None

    @property
    def is_multiprocess(self) -> bool:
        return self.num_processes > 1

    @property
    def is_main(self) -> bool:
        return self.process_id == 0


_timeout_s = DEFAULT_TIMEOUT_S
_calls: dict[str, itertools.count] = {}


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}: expected an integer, got {value!r}") from None


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None) -> tuple[str | None, int | None, int | None]:
    """The three join settings, each from its argument or else its environment variable, checked together.

    All None: a single process (or, with ``initialize(auto=True)``, a cluster JAX detects itself).
    """
    address = coordinator_address if coordinator_address is not None else os.environ.get(ENV_COORDINATOR) or None
    count = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    index = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    given = {"coordinator address": address, "number of processes": count, "process id": index}
    if all(v is None for v in given.values()):
        return None, None, None
    missing = [name for name, v in given.items() if v is None]
    if missing:
        raise DistributedError(f"a multi-process job needs the coordinator address, the number of processes and "
                               f"this process's id; missing the {' and the '.join(missing)} (--coordinator "
                               f"HOST:PORT --num-processes N --process-id I, or {ENV_COORDINATOR}, "
                               f"{ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})")
    if not _ADDRESS.match(address) or not 0 < int(_ADDRESS.match(address).group(2)) < 65536:
        raise DistributedError(f"coordinator: expected HOST:PORT (e.g. 10.0.0.1:1234), got {address!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise DistributedError(f"num_processes: expected a positive integer, got {count!r}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise DistributedError(f"process_id: expected an integer in 0..{count - 1}, got {index!r}")
    return address, count, index


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False,
               timeout_s: int = DEFAULT_TIMEOUT_S) -> Job:
    """Join a multi-process job before anything runs on JAX; return this process's place in it.

    ``coordinator_address`` (``HOST:PORT`` of process 0), ``num_processes`` and ``process_id`` come
    from the arguments or from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``. ``auto``: let JAX detect the cluster (TPU pod slices, SLURM, Open MPI,
    Kubernetes). With neither, nothing is joined and the job is this one process.
    ``timeout_s``: how long to wait for every process to join, and later for every process to
    reach each point the job's processes wait for one another at (``barrier``, ``agree``,
    ``gather``); a process silent for ``min(timeout_s, 100)`` s is declared dead by JAX.
    A process that cannot register in time is ended by JAX's runtime itself (a fatal
    ``DEADLINE_EXCEEDED ... RegisterTask`` log, exit by SIGABRT), and so are the survivors of a
    process that dies, once it misses its heartbeats; errors JAX raises become DistributedError.
    On CPU devices the processes' collectives go through gloo. Once joined, this process's first
    device is JAX's default device.
    """
    global _timeout_s
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int) or timeout_s < 1:
        raise DistributedError(f"timeout: expected a positive number of seconds, got {timeout_s!r}")
    address, count, index = resolve(coordinator_address, num_processes, process_id)
    if jax.distributed.is_initialized():
        return current()
    if address is None and not auto:
        return Job(0, 1, None)
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        # CPU devices of different processes can only talk through a collectives library.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    _timeout_s = timeout_s
    where = f" at {address}" if address else ""
    try:
        jax.distributed.initialize(address, count, index, initialization_timeout=timeout_s,
                                   heartbeat_timeout_seconds=min(timeout_s, _HEARTBEAT_S))
    except Exception as e:  # XLA's runtime errors carry no stable type
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if count is not None:
            raise DistributedError(f"process {index} of {count}: could not join the job{where} within {timeout_s} s "
                                   f"(every process must start with the same coordinator and process count): "
                                   f"{first}") from None
        raise DistributedError(f"could not join a cluster JAX detects: {first}") from None
    # Eager operations (random weights, PRNG keys) would otherwise run on the job's first device,
    # which only process 0 can reach.
    jax.config.update("jax_default_device", jax.local_devices()[0])
    return current()


def current() -> Job:
    """This process's place in the job it joined (or the one-process job)."""
    if not jax.distributed.is_initialized():
        return Job(0, 1, None)
    from jax._src import distributed as _state

    return Job(jax.process_index(), jax.process_count(), _state.global_state.coordinator_address)


def _client() -> Any | None:
    if not jax.distributed.is_initialized() or jax.process_count() == 1:
        return None
    from jax._src import distributed as _state

    return _state.global_state.client


def _key(name: str) -> str:
    # Every process makes the calls of one name in the same order (threads use names of their own), so
    # the nth call of a name has one key everywhere.
    return f"imvar-jax/{name}/{next(_calls.setdefault(name, itertools.count()))}"


def _get(client: Any, key: str, name: str, process: int) -> Any:
    try:
        return json.loads(client.blocking_key_value_get(key, _timeout_s * 1000))
    except Exception as e:
        if isinstance(e, json.JSONDecodeError):
            raise
        raise DistributedError(f"process {process} did not reach {name!r} within {_timeout_s} s: it failed, "
                               f"died or runs another command (see its own output)") from None


def barrier(name: str) -> None:
    """Wait until every process has reached ``name``."""
    gather(name, None)


def agree(name: str, value: Any = None) -> Any:
    """Process 0's ``value`` (JSON-serialisable), on every process; the others' ``value`` is ignored."""
    client = _client()
    if client is None:
        return value
    key = _key(name)
    if jax.process_index() == 0:
        client.key_value_set(key, json.dumps(value))
        return value
    return _get(client, key, name, 0)


def gather(name: str, value: Any) -> list[Any]:
    """Every process's ``value`` (JSON-serialisable), in process order, on every process."""
    client = _client()
    if client is None:
        return [value]
    key = _key(name)
    client.key_value_set(f"{key}/{jax.process_index()}", json.dumps(value))
    return [value if p == jax.process_index() else _get(client, f"{key}/{p}", name, p)
            for p in range(jax.process_count())]

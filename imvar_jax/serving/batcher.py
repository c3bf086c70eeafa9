"""Dynamic batching: one worker thread owns the devices and runs requests' pictures in shared program calls.

Requests are split into pictures; pictures that share a ``Work`` (size, steps, guidance,
scheduler: what decides the compiled program) go into one call of ``capacity`` slots, padded by
the runner when fewer are waiting. The worker starts a call as soon as ``capacity`` pictures of
the oldest waiting picture's work are queued, or when that picture has waited ``max_wait``
seconds. A picture's result depends only on its request's (seed, its number j in the request)
and work, never on what shared its call: the runner gives picture j the key ``fold_in(seed, j)``.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .settings import Work

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More pictures are waiting than the server takes (429 to the client)."""


class Closed(RuntimeError):
    """The server is shutting down and takes no new requests (503 to the client)."""


@dataclass
class Result:
    """One request's pictures, ``[n, H, W, 3]`` float32 in [0, 1], and their safety flags (None: no checker)."""

    images: np.ndarray
    nsfw: list[bool] | None


@dataclass
class _Request:
    pixel_values: np.ndarray  # [3, S, S]
    n: int
    seed: int
    work: Work
    future: Future
    arrived: float
    images: list[np.ndarray | None] = field(default_factory=list)
    flags: list[bool | None] = field(default_factory=list)
    done: int = 0


@dataclass(frozen=True)
class _Picture:
    request: _Request
    j: int


@dataclass
class Stats:
    """What the worker did since start-up (warm-up calls not counted)."""

    calls: int = 0
    pictures: int = 0
    padded_slots: int = 0
    requests: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"calls": self.calls, "pictures": self.pictures, "padded_slots": self.padded_slots,
                "requests": self.requests}


# runner(work, pixel_values [P, 3, S, S], seeds [P], indices [P]) -> (images [P, H, W, 3], flags [P] or None):
# one program call of exactly ``capacity`` slots (it pads P < capacity itself).
Runner = Callable[[Work, np.ndarray, Sequence[int], Sequence[int]], tuple[np.ndarray, "np.ndarray | None"]]


class Batcher:
    """The queue and its worker thread. ``submit`` is safe from any thread; results arrive on ``Future``s."""

    def __init__(self, runner: Runner, capacity: int, max_wait: float, max_queue: int) -> None:
        self._runner = runner
        self.capacity = capacity
        self.max_wait = max_wait
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._queue: list[_Picture] = []
        self._in_flight = 0  # pictures queued or running
        self._closing = False
        self.stats = Stats()
        self._thread = threading.Thread(target=self._work, name="imvar-jax-batcher", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Pictures queued or running."""
        with self._cond:
            return self._in_flight

    def submit(self, pixel_values: np.ndarray, n: int, seed: int, work: Work) -> Future:
        """Queue ``n`` variations of one prepared picture; QueueFull or Closed when it cannot be taken."""
        future: Future = Future()
        request = _Request(pixel_values, n, seed, work, future, time.monotonic(), [None] * n, [None] * n)
        with self._cond:
            if self._closing:
                raise Closed("the server is shutting down")
            if self._in_flight + n > self.max_queue:
                raise QueueFull(f"{self._in_flight} pictures are waiting, the server takes at most {self.max_queue}; "
                                f"retry later")
            self._in_flight += n
            self._queue.extend(_Picture(request, j) for j in range(n))
            self.stats.requests += 1
            self._cond.notify()
        return future

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish every queued one, stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def _take(self) -> tuple[Work, list[_Picture]] | None:
        """The next call's pictures (blocking), or None once closing and drained."""
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            oldest = self._queue[0]
            work = oldest.request.work
            deadline = oldest.request.arrived + self.max_wait
            while not self._closing:
                ready = sum(1 for p in self._queue if p.request.work == work)
                left = deadline - time.monotonic()
                if ready >= self.capacity or left <= 0:
                    break
                self._cond.wait(left)
            taken: list[_Picture] = []
            kept: list[_Picture] = []
            for p in self._queue:
                (taken if p.request.work == work and len(taken) < self.capacity else kept).append(p)
            self._queue = kept
            return work, taken

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            work, pictures = batch
            try:
                images, flags = self._runner(work, np.stack([p.request.pixel_values for p in pictures]),
                                             [p.request.seed for p in pictures], [p.j for p in pictures])
            except BaseException as e:  # one failed call fails its requests, never the worker
                log.exception("a program call for %d pictures failed", len(pictures))
                self._fail(pictures, e)
                continue
            with self._cond:
                self.stats.calls += 1
                self.stats.pictures += len(pictures)
                self.stats.padded_slots += self.capacity - len(pictures)
            self._deliver(pictures, images, flags)

    def _finish(self, pictures: list[_Picture]) -> None:
        with self._cond:
            self._in_flight -= len(pictures)

    def _fail(self, pictures: list[_Picture], error: BaseException) -> None:
        self._finish(pictures)
        for request in {id(p.request): p.request for p in pictures}.values():
            if not request.future.done():
                request.future.set_exception(error)

    def _deliver(self, pictures: list[_Picture], images: np.ndarray, flags: np.ndarray | None) -> None:
        self._finish(pictures)
        for slot, p in enumerate(pictures):
            r = p.request
            if r.future.done():  # an earlier part of it failed
                continue
            r.images[p.j] = images[slot]
            r.flags[p.j] = None if flags is None else bool(flags[slot])
            r.done += 1
            if r.done == r.n:
                r.future.set_result(Result(np.stack(r.images),
                                           None if flags is None else [bool(f) for f in r.flags]))

"""The server's batcher and request fields, without a model: a runner that records its calls."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from imvar_jax.serving.batcher import Batcher, Closed, QueueFull
from imvar_jax.serving.settings import RequestError, ServeSettings, Work, parse_size, request_work
from imvar_jax.settings import GenerationSettings, SettingsError

A = Work((16, 16), 4, 3.0, "pndm")
B = Work((32, 16), 4, 3.0, "pndm")


class Recorder:
    """Pictures come back as their (seed, index) so each can be traced to its request."""

    def __init__(self, gate: threading.Event | None = None, fail_on: Work | None = None) -> None:
        self.calls: list[tuple[Work, list[int], list[int]]] = []
        self.gate, self.fail_on = gate, fail_on

    def __call__(self, work, pixel_values, seeds, indices):
        if self.gate is not None:
            self.gate.wait(10)
        self.calls.append((work, list(seeds), list(indices)))
        if work == self.fail_on:
            raise RuntimeError("the device fell over")
        images = np.zeros((len(seeds), 1, 1, 3), np.float32)
        images[:, 0, 0, 0], images[:, 0, 0, 1] = seeds, indices
        images[:, 0, 0, 2] = pixel_values[:, 0, 0, 0]
        return images, np.asarray([s % 2 == 1 for s in seeds])


def _pixels(tag: float) -> np.ndarray:
    return np.full((3, 2, 2), tag, np.float32)


def test_calls_fill_up_to_capacity_with_one_work_and_results_go_back_to_their_requests():
    gate = threading.Event()
    runner = Recorder(gate)
    batcher = Batcher(runner, capacity=4, max_wait=0.05, max_queue=100)
    futures = [batcher.submit(_pixels(s), 3, s, A if s < 4 else B) for s in range(6)]
    gate.set()
    results = [f.result(10) for f in futures]
    batcher.close()
    for seed, result in enumerate(results):
        # Each picture is its own request's: its seed, its number j, its input.
        np.testing.assert_array_equal(result.images[:, 0, 0], [[seed, j, seed] for j in range(3)])
        assert result.nsfw == [seed % 2 == 1] * 3
    for work, seeds, _ in runner.calls:
        assert 1 <= len(seeds) <= 4
        assert all((s < 4) == (work == A) for s in seeds)  # no call mixes two works
    assert sum(len(s) for _, s, _ in runner.calls) == 18
    assert batcher.stats.as_dict() == {"calls": len(runner.calls), "pictures": 18,
                                       "padded_slots": 4 * len(runner.calls) - 18, "requests": 6}


def test_a_lone_request_waits_at_most_max_wait():
    runner = Recorder()
    batcher = Batcher(runner, capacity=8, max_wait=0.2, max_queue=100)
    start = time.monotonic()
    batcher.submit(_pixels(0), 1, 5, A).result(10)
    waited = time.monotonic() - start
    batcher.close()
    assert runner.calls == [(A, [5], [0])]
    assert waited >= 0.2


def test_a_full_queue_refuses_and_a_failed_call_fails_only_its_requests():
    gate = threading.Event()
    runner = Recorder(gate, fail_on=B)
    batcher = Batcher(runner, capacity=2, max_wait=0.0, max_queue=5)
    ok = batcher.submit(_pixels(1), 2, 1, A)
    bad = batcher.submit(_pixels(2), 2, 2, B)
    with pytest.raises(QueueFull, match="at most 5"):
        batcher.submit(_pixels(3), 2, 3, A)
    single = batcher.submit(_pixels(4), 1, 4, A)  # 5 pictures: still taken
    gate.set()
    with pytest.raises(RuntimeError, match="fell over"):
        bad.result(10)
    assert ok.result(10).images.shape == (2, 1, 1, 3)
    assert single.result(10).images.shape == (1, 1, 1, 3)
    batcher.close()
    with pytest.raises(Closed):
        batcher.submit(_pixels(5), 1, 5, A)
    assert batcher.pending == 0


def test_close_finishes_what_is_queued():
    gate = threading.Event()
    batcher = Batcher(Recorder(gate), capacity=1, max_wait=1.0, max_queue=10)
    futures = [batcher.submit(_pixels(i), 1, i, A) for i in range(3)]
    closing = threading.Thread(target=batcher.close)
    closing.start()
    gate.set()
    closing.join(10)
    assert all(f.result(0).images[0, 0, 0, 0] == i for i, f in enumerate(futures))


def test_request_fields():
    settings = ServeSettings(generation=GenerationSettings(model="tiny", steps=20), sizes=((16, 16), (32, 64)))
    assert parse_size("64x32") == (32, 64)  # OpenAI writes width x height
    assert request_work({}, settings) == (Work((16, 16), 20, 3.0, "pndm"), 1, None, "url")
    work, n, seed, fmt = request_work({"size": "64x32", "n": "3", "seed": "9", "steps": "7",
                                       "guidance_scale": "1.5", "scheduler": "ddim",
                                       "response_format": "b64_json", "model": "tiny"}, settings)
    assert (work, n, seed, fmt) == (Work((32, 64), 7, 1.5, "ddim"), 3, 9, "b64_json")
    for fields, param in (({"n": "0"}, "n"), ({"n": "1.5"}, "n"), ({"size": "32x64"}, "size"),
                          ({"seed": str(2**32)}, "seed"), ({"steps": "151"}, "steps"),
                          ({"guidance_scale": "nan"}, "guidance_scale"), ({"scheduler": "x"}, "scheduler"),
                          ({"response_format": "png"}, "response_format"), ({"model": "other"}, "model")):
        with pytest.raises(RequestError) as e:
            request_work(fields, settings)
        assert e.value.param == param and str(e.value).startswith(param)
    for bad in ({"port": 70000}, {"sizes": ((16, 16), (16, 16))}, {"batch_per_device": 0}, {"max_wait_ms": -1},
                {"api_key": " "}, {"max_steps": 10}):
        with pytest.raises(SettingsError):
            ServeSettings(generation=GenerationSettings(model="tiny", steps=20), **bad)

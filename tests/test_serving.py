"""``imvar-jax serve`` as users run it: a real server process on 127.0.0.1 with the tiny model, called with the
``openai`` SDK, curl-like raw HTTP, hostile clients and a headless Chromium.

One server (4 virtual CPU devices, 2 pictures per device per call) serves the file's tests in order;
the last one stops it with SIGTERM while requests are in flight.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import openai
import pytest
from PIL import Image

from imvar_jax import GenerationSettings
from imvar_jax.batch import run_generate

# OpenAI marks the variations endpoint deprecated in its SDK (for DALL-E 2); the server keeps it.
pytestmark = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")

KEY = "test-key-0123456789"
STEPS = 4
SIZES = ("16x16", "32x32")
DEVICES = 4
PER_DEVICE = 2
MAX_QUEUE = 64
MAX_BODY_MB = 1
MAX_PIXELS = 1_000_000
# Long enough that 32 clients on a loaded 2-core machine never pause that long mid-body (1 s did, in CI).
BODY_TIMEOUT = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _picture(path: Path, seed: int = 0, size: tuple[int, int] = (40, 30), fmt: str = "PNG") -> Path:
    pixels = (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` pixels but holds almost no data: a bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


class Server:
    def __init__(self, tmp: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, JAX_PLATFORMS="cpu", IMVAR_JAX_CACHE=str(tmp / "cache"),
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
        env.pop("IMVAR_JAX_API_KEY", None)
        args = [sys.executable, "-m", "imvar_jax.cli", "serve", "--model", "tiny", "--port", str(self.port),
                "--api-key", KEY, "--steps", str(STEPS), "--batch-per-device", str(PER_DEVICE),
                "--max-wait-ms", "200", "--max-queue", str(MAX_QUEUE), "--max-body-mb", str(MAX_BODY_MB),
                "--max-pixels", str(MAX_PIXELS), "--body-timeout", str(BODY_TIMEOUT), "--no-compile-cache"]
        for size in SIZES:
            args += ["--size", size]
        self.log = open(tmp / "server.log", "w+")
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
        self.health_seen: list[int] = []

    def health(self) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", "/health")
            reply = conn.getresponse()
            return reply.status, json.loads(reply.read())
        finally:
            conn.close()

    def logged(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    srv = Server(tmp)
    srv.picture = _picture(tmp / "in.png")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert srv.process.poll() is None, f"the server exited: {srv.logged()[-3000:]}"
        try:
            status, body = srv.health()
        except OSError:
            time.sleep(0.1)
            continue
        if status == 503 and not srv.health_seen:
            # While loading, the API refuses with 503, which the SDK raises as InternalServerError.
            with pytest.raises(openai.InternalServerError) as refused:
                srv.client().images.create_variation(image=open(srv.picture, "rb"), n=1)
            srv.starting_refusal = refused.value
        srv.health_seen.append(status)
        if status == 200:
            srv.ready = body
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the server was not ready in 240 s: {srv.logged()[-3000:]}")
    yield srv
    if srv.process.poll() is None:
        srv.process.kill()
        srv.process.wait()
    srv.log.close()


def _decode(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item.b64_json))).convert("RGB"))


def _fetch(url: str) -> np.ndarray:
    host, port_path = url.removeprefix("http://").split(":", 1)
    port, path = port_path.split("/", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", "/" + path)
        reply = conn.getresponse()
        assert reply.status == 200 and reply.getheader("content-type") == "image/png"
        return np.asarray(Image.open(io.BytesIO(reply.read())).convert("RGB"))
    finally:
        conn.close()


def test_health_is_503_until_every_size_is_compiled(server):
    assert server.health_seen[0] == 503 and server.health_seen[-1] == 200
    assert server.starting_refusal.status_code == 503
    assert server.starting_refusal.body["code"] == "not_ready"
    assert server.ready["status"] == "ready"
    assert server.ready["sizes"] == list(SIZES)
    assert server.ready["pictures_per_call"] == DEVICES * PER_DEVICE
    assert server.ready["stats"] == {"calls": 0, "pictures": 0, "padded_slots": 0, "requests": 0}
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_sdk_pictures_equal_imvar_jax_generate(server, tmp_path):
    """b64_json and url answers are the pictures `imvar-jax generate` writes with the same seed and settings."""
    client = server.client()
    for size, seed in (("16x16", 7), ("32x32", 123)):
        width, height = map(int, size.split("x"))
        b64 = client.images.create_variation(image=open(server.picture, "rb"), n=2, size=size,
                                             response_format="b64_json", extra_body={"seed": seed})
        url = client.images.create_variation(image=open(server.picture, "rb"), n=2, size=size,
                                             response_format="url", extra_body={"seed": seed})
        assert b64.model_extra["seed"] == seed and b64.model_extra["nsfw_content_detected"] == [False, False]
        out = tmp_path / f"gen-{size}"
        # generate's own run on the server's layout: 4 devices, 2 pictures each per call. (XLA:CPU's float
        # sums may differ in the last bit between batch shapes, enough to flip a rounded pixel now and then.)
        settings = GenerationSettings(model="tiny", seed=seed, num_images_per_prompt=2, steps=STEPS,
                                      size=(height, width), guidance=3.0, batch_size=1)
        summary = run_generate([server.picture], out, settings, devices=jax.devices()[:DEVICES])
        assert not summary.failures
        for j in range(2):
            expected = np.asarray(Image.open(out / "in" / f"{j}.png").convert("RGB"))
            assert expected.shape == (height, width, 3)
            np.testing.assert_array_equal(_decode(b64.data[j]), expected)
            np.testing.assert_array_equal(_fetch(url.data[j].url), expected)
        assert not np.array_equal(_decode(b64.data[0]), _decode(b64.data[1]))


def test_sdk_exceptions_for_a_wrong_key_and_bad_requests(server):
    with pytest.raises(openai.AuthenticationError) as e:
        server.client("wrong-key").images.create_variation(image=open(server.picture, "rb"), n=1)
    assert e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong-key").models.list()
    client = server.client()
    for fields, param in (({"n": 11}, "n"), ({"n": 0}, "n"), ({"size": "17x17"}, "size"),
                          ({"size": "big"}, "size"), ({"response_format": "xml"}, "response_format"),
                          ({"model": "dall-e-2"}, "model")):
        with pytest.raises(openai.BadRequestError) as e:
            client.images.create_variation(image=open(server.picture, "rb"), **fields)
        assert e.value.body["param"] == param, e.value.body
        assert e.value.body["type"] == "invalid_request_error"
    for extra, param in (({"steps": 1000}, "steps"), ({"seed": -1}, "seed"), ({"guidance_scale": "inf"},
                          "guidance_scale"), ({"scheduler": "heun"}, "scheduler"), ({"prompt": "a cat"}, "prompt")):
        with pytest.raises(openai.BadRequestError) as e:
            client.images.create_variation(image=open(server.picture, "rb"), extra_body=extra)
        assert e.value.body["param"] == param, e.value.body


def _raw(server, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}", **(headers or {})})
        reply = conn.getresponse()
        data = reply.read()
        return reply.status, json.loads(data) if data else {}
    finally:
        conn.close()


def _multipart(fields: dict[str, str], image: bytes | None, filename: str = "in.png") -> tuple[bytes, dict]:
    boundary = "imvar-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    if image is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + image + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_hostile_requests_get_clear_4xx_and_the_server_keeps_serving(server, tmp_path):
    good = server.picture.read_bytes()

    def post(fields: dict[str, str], image: bytes | None, **kw) -> tuple[int, dict]:
        body, headers = _multipart(fields, image, **kw)
        return _raw(server, "POST", "/v1/images/variations", body, headers)

    # Bodies over --max-body-mb: refused by Content-Length before any of it is read (so the client sends
    # none here: a server that answers and closes mid-upload can break the client's pipe), and counted
    # as they arrive when chunked.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/v1/images/variations")
    conn.putheader("Authorization", f"Bearer {KEY}")
    conn.putheader("Content-Type", "multipart/form-data; boundary=x")
    conn.putheader("Content-Length", str((MAX_BODY_MB << 20) + 1))
    conn.endheaders()
    reply = conn.getresponse()
    assert reply.status == 413 and json.loads(reply.read())["error"]["code"] == "request_too_large"
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/v1/images/variations")
    conn.putheader("Authorization", f"Bearer {KEY}")
    conn.putheader("Content-Type", "multipart/form-data; boundary=x")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    head = (b'--x\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")
    conn.send(b"%x\r\n" % len(head) + head + b"\r\n")
    try:
        for _ in range(2 * MAX_BODY_MB * 16):
            piece = b"\0" * 65536
            conn.send(b"%x\r\n" % len(piece) + piece + b"\r\n")
    except OSError:
        pass  # the server may close the connection once it has answered
    reply = conn.getresponse()
    assert reply.status == 413 and json.loads(reply.read())["error"]["code"] == "request_too_large"
    conn.close()

    # Pixel bombs: more pixels than --max-pixels, and more than Pillow's own bomb limit, both from tiny files.
    for width, height in ((5000, 5000), (20000, 20000)):
        status, body = post({}, _png_header_only(width, height))
        assert (status, body["error"]["param"], body["error"]["code"]) == (413, "image", "image_too_large"), body

    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    for image, what in ((gif.getvalue(), "GIF"), (good[: len(good) // 2], "truncated"), (b"hello", "not a picture"),
                        (b"", "empty")):
        status, body = post({}, image)
        assert (status, body["error"]["param"]) == (400, "image"), (what, body)
    status, body = post({"n": "2"}, None)
    assert (status, body["error"]["param"]) == (400, "image")
    status, body = post({"n": "two"}, good)
    assert (status, body["error"]["param"]) == (400, "n")
    status, body = _raw(server, "POST", "/v1/images/variations", json.dumps({"image": "x"}).encode(),
                        {"Content-Type": "application/json"})
    assert (status, body["error"]["param"]) == (400, "image")
    status, body = _raw(server, "POST", "/v1/images/variations", b"--x\r\ngarbage",
                        {"Content-Type": "multipart/form-data; boundary=x"})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert _raw(server, "GET", "/v1/images/generations")[0] == 404
    assert _raw(server, "GET", "/v1/images/variations")[0] == 405
    assert _raw(server, "GET", "/v1/images/files/nothing.png")[0] == 404

    # A client that stops half-way through its body gets 408 after --body-timeout, not a stuck worker.
    with socket.create_connection(("127.0.0.1", server.port), timeout=BODY_TIMEOUT + 30) as s:
        s.sendall(f"POST /v1/images/variations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                  "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 1000\r\n\r\n--x\r\n".encode())
        received = b""
        while chunk := s.recv(65536):  # the server closes the connection after its answer
            received += chunk
        answer = received.decode(errors="replace")
    assert answer.startswith("HTTP/1.1 408"), answer[:200]
    assert "request_timeout" in answer

    for text in server.logged().splitlines():
        assert not text.startswith("Traceback"), server.logged()
    status, health = server.health()
    assert status == 200
    client = server.client()
    served = client.images.create_variation(image=open(server.picture, "rb"), n=1, response_format="b64_json")
    assert _decode(served.data[0]).shape == (16, 16, 3)


def test_concurrent_clients_are_batched_and_each_equals_its_solo_run(server):
    """32 clients x 2 pictures at once: every answer equals a call of its own with its seed."""
    from imvar_jax import ImageVariationPipeline

    pipe, params = ImageVariationPipeline.from_pretrained("tiny", dtype="float32")
    pictures = [server.picture.parent / f"c{i}.png" for i in range(32)]
    for i, p in enumerate(pictures):
        _picture(p, seed=100 + i, size=(24 + i % 5, 20 + i % 7))
    before = server.health()[1]["stats"]

    def one(i: int):
        client = server.client()
        return client.images.create_variation(image=open(pictures[i], "rb"), n=2, response_format="b64_json",
                                              extra_body={"seed": 1000 + i})

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, range(32)))
    after = server.health()[1]["stats"]
    for i, answer in enumerate(answers):
        assert answer.model_extra["seed"] == 1000 + i
        solo = pipe.generate([Image.open(pictures[i])], params, seed=1000 + i, num_images_per_prompt=2,
                             num_inference_steps=STEPS, guidance_scale=3.0, height=16, width=16, output_type="pil",
                             devices=jax.devices()[:DEVICES], slots=DEVICES * PER_DEVICE)
        for j in range(2):
            np.testing.assert_array_equal(_decode(answer.data[j]), np.asarray(solo.images[j]), err_msg=f"{i}/{j}")
    calls = after["calls"] - before["calls"]
    assert after["requests"] - before["requests"] == 32
    assert after["pictures"] - before["pictures"] == 64
    # 64 pictures in calls of 8 slots: batched, far fewer calls than the 32 requests.
    assert 64 // (DEVICES * PER_DEVICE) <= calls < 32, after


def test_a_full_queue_answers_429(server):
    client = server.client()
    # A new step count compiles first: this request holds the worker while the others queue up.
    slow = threading.Thread(target=lambda: client.images.create_variation(
        image=open(server.picture, "rb"), n=10, size="32x32", extra_body={"steps": 150, "seed": 1}))
    slow.start()
    deadline = time.monotonic() + 60
    while server.health()[1]["queued_pictures"] < 10 and time.monotonic() < deadline:
        time.sleep(0.05)

    def one(i: int):
        try:
            client.images.create_variation(image=open(server.picture, "rb"), n=10, extra_body={"seed": i})
            return 200
        except openai.RateLimitError as e:
            assert e.body["code"] == "queue_full"
            return 429

    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(one, range(6)))
    slow.join()
    # 10 + 6 x 10 pictures > the 64 the queue holds: some were refused, the rest served.
    assert 429 in statuses and 200 in statuses, statuses


def test_web_page_in_headless_chromium(server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, "the browser test needs Debian's chromium and chromium-driver (.ci/run installs them)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=ChromeService(driver_path), options=options)
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "go").is_enabled())
        assert [o.text for o in driver.find_elements(By.CSS_SELECTOR, "#size option")] == list(SIZES)
        driver.find_element(By.ID, "image").send_keys(str(server.picture))
        for name, value in (("n", "3"), ("seed", "7"), ("key", KEY)):
            element = driver.find_element(By.ID, name)
            element.clear()
            element.send_keys(value)
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid img")) == 3
                   or "error" in d.find_element(By.ID, "status").get_attribute("class"))
        assert "seed 7" in driver.find_element(By.ID, "status").text, driver.find_element(By.ID, "status").text
        images = driver.find_elements(By.CSS_SELECTOR, "#grid img")
        assert len(images) == 3
        wait.until(lambda d: all(d.execute_script("return arguments[0].naturalWidth", i) == 16 for i in images))
        links = driver.find_elements(By.CSS_SELECTOR, "#grid a[download]")
        assert [a.get_attribute("download") for a in links] == [f"variation-seed7-{j}.png" for j in range(3)]
        # The page's pictures are the API's: the same seed through the SDK gives the same bytes.
        api = server.client().images.create_variation(image=open(server.picture, "rb"), n=3,
                                                      response_format="b64_json", extra_body={"seed": 7})
        page = [a.get_attribute("href").removeprefix("data:image/png;base64,") for a in links]
        assert page == [item.b64_json for item in api.data]
        shot = Path(os.environ.get("IMVAR_JAX_SCREENSHOTS", tmp_path)) / "serve-page.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(shot))
        assert Image.open(shot).size[0] > 0
    finally:
        driver.quit()


def test_a_server_that_cannot_start_says_why_in_one_line(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    base = [sys.executable, "-m", "imvar_jax.cli", "serve", "--model", "tiny", "--port", str(_free_port()),
            "--no-compile-cache"]
    for extra, code, message in ((["--port", "70000"], 2, "port: expected 0..65535"),
                                 (["--size", "big"], 2, "expected WIDTHxHEIGHT"),
                                 (["--size", "15x16"], 1, "sizes: width: 15 is not a positive multiple of 8")):
        done = subprocess.run(base + extra, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == code, done.stderr
        errors = [line for line in done.stderr.splitlines() if "error" in line]
        assert errors and message in errors[-1], done.stderr
        assert "Traceback" not in done.stderr


def test_a_batch_that_does_not_fit_names_batch_per_device(monkeypatch):
    """Warm-up checks a call against free memory; a refusal speaks of the server's own option."""
    from imvar_jax import ImageVariationPipeline, InsufficientMemoryError, memory
    from imvar_jax.serving.service import Service
    from imvar_jax.serving.settings import ServeSettings

    devices = jax.devices()[:1]
    generation = GenerationSettings(model="tiny", steps=STEPS, dtype="float32")

    def service(batch_per_device: int) -> Service:
        started = Service(ServeSettings(generation=generation, sizes=((64, 64),), batch_per_device=batch_per_device),
                          devices=devices)
        started.load()
        return started

    # One CPU device: the host's free memory is all its own.
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 1000)
    small = service(3)
    assert small.state == "failed" and small.error.startswith("size: 64x64 needs "), small.error
    # What 1 and 3 pictures per device need, from the pipeline's own refusals of the server's call.
    pipe, params = ImageVariationPipeline.from_pretrained("tiny", dtype="float32", devices=devices)
    side = pipe.image_encoder.config.image_size
    needs = {}
    for slots in (1, 3):
        with pytest.raises(InsufficientMemoryError) as refused:
            pipe.generate(np.zeros((1, 3, side, side), np.float32), params, seed=[0], num_inference_steps=STEPS,
                          guidance_scale=3.0, height=64, width=64, slots=slots)
        needs[slots] = refused.value.needed
    monkeypatch.setattr(memory, "host_available_bytes", lambda: (needs[1] + needs[3]) // 2)
    big = service(3)
    assert big.state == "failed"
    assert re.match(r"^batch_per_device: 3 pictures per device at 64x64 need \S+ \S+ per device, \S+ \S+ free; "
                    r"about [12] per device fit: lower --batch-per-device$", big.error), big.error
    assert service(1).state == "ready"


def test_sigterm_finishes_requests_in_flight_and_exits_0(server):
    """Last in the file: it stops the module's server."""
    client = server.client()
    results: list = [None] * 4

    def one(i: int) -> None:
        try:
            results[i] = client.images.create_variation(image=open(server.picture, "rb"), n=2,
                                                        response_format="b64_json", extra_body={"seed": i})
        except Exception as e:  # recorded and asserted below
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while server.health()[1]["queued_pictures"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.process.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    assert server.process.wait(60) == 0, server.logged()[-3000:]
    for r in results:
        assert isinstance(r, openai.types.ImagesResponse), r
        assert len(r.data) == 2
    assert "Traceback" not in server.logged()

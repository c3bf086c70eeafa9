"""``imvar-jax generate`` and ``imvar-jax info`` end to end on the built-in tiny model."""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image, ImageOps

from imvar_jax import cli, hub, tiny
from imvar_jax.batch import OutputError, collect_inputs, contact_sheet, outputs, run_generate, runner
from imvar_jax.pipeline import ImageVariationOutput, ImageVariationPipeline
from imvar_jax.preprocessing import to_rgb
from imvar_jax.settings import FIELDS, GenerationSettings

FIELDS_BY_NAME = {f.name: f for f in FIELDS}

K = 2
STEPS = 2
# 16x16: the tiny model's default is 64x64, larger than this file's decompression-bomb limit.
COMMON = ["--model", "tiny", "--steps", str(STEPS), "--num-per-image", str(K), "--size", "16x16", "--no-compile-cache"]
# Pillow refuses more than twice this many pixels; bomb.png has 4096, every other input at most 480.
MAX_PIXELS = 1500
GOOD = ["rgb.jpg", "rgba.png", "gray.png", "cmyk.jpg", "deep.png", "rotated.jpg", "palette.gif", "sub/rgb.png"]
BAD = {"truncated.png": "truncated", "notes.jpg": "not an image", "empty.png": "empty file",
       "bomb.png": "decompression bomb"}


@pytest.fixture(scope="module", autouse=True)
def small_bomb_limit():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image, "MAX_IMAGE_PIXELS", MAX_PIXELS)
        yield


@pytest.fixture(scope="module", autouse=True)
def tiny_weights_once():
    """Every run here loads "tiny"; its weights depend only on the seed, so they are built once."""
    built = {}

    def cached(seed: int = 0):
        if seed not in built:
            built[seed] = real(seed)
        return dict(built[seed])  # tiny_pipeline may drop the safety checker from what it gets

    real = tiny.tiny_params
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiny, "tiny_params", cached)
        yield


def _noise(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


def _make_inputs(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    Image.fromarray(_noise(20, 24)).save(root / "rgb.jpg")
    Image.fromarray(_noise(20, 24, 4, seed=1)).save(root / "rgba.png")
    Image.fromarray(_noise(24, 20, 1, seed=2)[..., 0]).save(root / "gray.png")
    Image.fromarray(_noise(20, 24, seed=3)).convert("CMYK").save(root / "cmyk.jpg")
    deep = np.random.default_rng(4).integers(0, 65536, (20, 24), dtype=np.uint16)
    Image.fromarray(deep).save(root / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers turn it 90 degrees
    Image.fromarray(_noise(16, 24, seed=5)).save(root / "rotated.jpg", exif=exif)
    Image.fromarray(_noise(20, 24, seed=6)).convert("P").save(root / "palette.gif")
    Image.fromarray(_noise(20, 20, seed=7)).save(root / "sub" / "rgb.png")
    buf = io.BytesIO()
    Image.fromarray(_noise(20, 24, seed=8)).save(buf, format="PNG")
    (root / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "notes.jpg").write_text("not a picture\n")
    (root / "empty.png").write_bytes(b"")
    Image.fromarray(_noise(64, 64, seed=9)).save(root / "bomb.png")
    (root / "readme.txt").write_text("ignored: not an image extension\n")
    return root


def _main(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([*map(str, args)])
    return code, out.getvalue(), err.getvalue()


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return _make_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def numbering(inputs) -> dict[str, int]:
    """Each input's number: its place among all image-named files (bad ones too) sorted by absolute path."""
    files = sorted(str(p.absolute()) for p in inputs.rglob("*") if p.is_file() and p.suffix != ".txt")
    return {Path(p).relative_to(inputs.absolute()).as_posix(): i for i, p in enumerate(files)}


def _folder_name(inputs: Path, rel: str) -> str:
    path = (inputs / rel).absolute()
    if path.stem == "rgb":  # rgb.jpg and sub/rgb.png collide
        return f"rgb-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    return path.stem


@pytest.fixture(scope="module")
def first_run(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("run1") / "out"
    code, stdout, stderr = _main("generate", inputs, "--out", out, "--grid", *COMMON)
    return out, code, stdout, stderr


def test_good_inputs_written_bad_ones_reported(first_run, inputs):
    out, code, stdout, stderr = first_run
    assert code == 1
    for rel in GOOD:
        folder = out / _folder_name(inputs, rel)
        for j in range(K):
            with Image.open(folder / f"{j}.png") as im:
                assert (im.format, im.mode, im.size) == ("PNG", "RGB", (16, 16))
        assert (folder / "grid.png").is_file()
    errors = [line for line in stderr.splitlines() if line.startswith("imvar-jax generate: error:")]
    assert len(errors) == len(BAD), stderr
    for name, reason in BAD.items():
        (line,) = [e for e in errors if f" {(inputs / name).absolute()}: " in e]
        assert reason in line, line
        assert not (out / Path(name).stem).exists()
    assert f"done {len(GOOD) * K}, skipped 0 (already complete), failed {len(BAD)}," in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted([_folder_name(inputs, r) for r in GOOD] + ["manifest.jsonl"])
    # Different inputs and different variations draw different noise.
    pictures = [np.asarray(Image.open(out / _folder_name(inputs, r) / f"{j}.png")) for r in GOOD for j in range(K)]
    assert len({p.tobytes() for p in pictures}) == len(pictures)


def test_without_a_terminal_progress_comes_as_lines_and_the_compile_is_announced(first_run):
    *_, stderr = first_run
    lines = stderr.splitlines()
    compiling = [i for i, line in enumerate(lines) if line.startswith("imvar-jax generate: compiling for 16x16 on 8 "
                                                                      "devices (")]
    assert len(compiling) == 1, stderr
    assert re.fullmatch(r"imvar-jax generate: compiled in \d+\.\d s", lines[compiling[0] + 1]), stderr
    progress = [re.fullmatch(r"imvar-jax generate: (\d+)/(\d+) pictures \((\d+)%\) after \d+ s", line)
                for line in lines]
    done = [(int(m[1]), int(m[2])) for m in progress if m]
    # One line per program call, counting up to every picture; the total is what is planned then (an input
    # found bad later, in its batch, still counts in it).
    assert done and done == sorted(done) and done[-1][0] == len(GOOD) * K, stderr
    assert all(made <= total <= len(GOOD + list(BAD)) * K for made, total in done), stderr


def test_png_text_and_manifest(first_run, inputs, numbering):
    out, *_ = first_run
    lines = (out / "manifest.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == len(GOOD) * K
    assert len({r["path"] for r in records}) == len(records)
    by_path = {r["path"]: r for r in records}
    for rel in GOOD:
        i = numbering[rel]
        for j in range(K):
            path = f"{_folder_name(inputs, rel)}/{j}.png"
            with Image.open(out / path) as im:
                text = im.text
            expected = {"model": "tiny", "revision": "", "dtype": "float32", "scheduler": "pndm",
                        "steps": str(STEPS), "guidance": "3.0", "eta": "0.0", "seed": "0", "size": "16x16",
                        "preprocessing": "v2", "safety_checker": "on", "input_sha256": _sha(inputs / rel),
                        "index": str(i * K + j), "nsfw": "false"}
            assert {key: text.get(key) for key in expected} == expected, path
            record = by_path[path]
            assert record["input"] == str((inputs / rel).absolute())
            assert (record["index"], record["input_index"], record["variation"]) == (i * K + j, i, j)
            assert record["input_sha256"] == text["input_sha256"]
            assert (record["steps"], record["guidance"], record["seed"], record["size"]) == (STEPS, 3.0, 0, [16, 16])
            assert (record["model"], record["scheduler"], record["dtype"]) == ("tiny", "pndm", "float32")
            assert record["nsfw"] is False


def test_grid_holds_input_then_variations(first_run, inputs):
    out, *_ = first_run
    folder = out / _folder_name(inputs, "rotated.jpg")
    sheet = np.asarray(Image.open(folder / "grid.png"))
    assert sheet.shape == (16, 16 * (K + 1), 3)
    upright = ImageOps.exif_transpose(Image.open(inputs / "rotated.jpg")).convert("RGB")
    assert upright.size == (16, 24)  # the EXIF turn was applied
    np.testing.assert_array_equal(sheet[:, :16], np.asarray(upright.resize((16, 16), Image.Resampling.BICUBIC)))
    for j in range(K):
        np.testing.assert_array_equal(sheet[:, 16 * (j + 1):16 * (j + 2)], np.asarray(Image.open(folder / f"{j}.png")))


def test_rerun_writes_nothing_and_exits_the_same(first_run, inputs):
    out, code, *_ = first_run
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    code2, stdout, stderr = _main("generate", inputs, "--out", out, "--grid", *COMMON)
    assert code2 == code == 1
    assert f"done 0, skipped {len(GOOD) * K} (already complete), failed {len(BAD)}," in stdout
    assert stderr.count("imvar-jax generate: error:") == len(BAD)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_interrupted_run_resumes_to_the_same_bytes(first_run, inputs, tmp_path, monkeypatch):
    out1, *_ = first_run
    out2 = tmp_path / "out"
    real_write = outputs.write_png
    calls = []

    def write_then_stop(path, image, text):
        calls.append(path)
        if len(calls) == 5:  # input 0: two variations and its grid; input 1: one variation
            raise KeyboardInterrupt
        real_write(path, image, text)

    monkeypatch.setattr(outputs, "write_png", write_then_stop)
    code, _, stderr = _main("generate", inputs, "--out", out2, "--grid", *COMMON)
    assert code == 130 and "interrupted" in stderr
    written = [p for p in out2.rglob("*.png")]
    assert len(written) == 4
    assert not [p for p in out2.rglob("*") if p.name.startswith(".imvar-tmp-")]
    monkeypatch.setattr(outputs, "write_png", real_write)

    code, stdout, _ = _main("generate", inputs, "--out", out2, "--grid", *COMMON)
    assert code == 1
    assert f"done {len(GOOD) * K - 3}, skipped 3 (already complete)" in stdout
    # Also proves two separate runs give the same bytes: run 1 and this one share nothing.
    assert _files(out2) == _files(out1)


def test_batches_keep_one_shape_and_pictures_ignore_device_count(first_run, inputs, tmp_path, monkeypatch):
    out1, *_ = first_run
    shapes, calls = [], []
    real_run, real_generate = ImageVariationPipeline._run, ImageVariationPipeline.generate

    def spy_run(self, placement, params, stacked, k, cond, rows, *args, **kwargs):
        # The program's batch: the rows of sources it runs (one per picture slot, one source each).
        shapes.append((len(placement), k, cond.sources.shape))
        return real_run(self, placement, params, stacked, k, cond, rows, *args, **kwargs)

    def spy_generate(self, images, *args, **kwargs):
        calls.append((len(images), kwargs["slots"], list(kwargs["first_index"]), len(kwargs["devices"])))
        prepared_at_call.append(len(converted))
        return real_generate(self, images, *args, **kwargs)

    converted, prepared_at_call, threads = [], [], set()
    real_to_rgb = runner.to_rgb

    def spy_to_rgb(image, **kwargs):
        threads.add(threading.current_thread().name)
        converted.append(kwargs["name"])
        return real_to_rgb(image, **kwargs)

    monkeypatch.setattr(ImageVariationPipeline, "_run", spy_run)
    monkeypatch.setattr(ImageVariationPipeline, "generate", spy_generate)
    monkeypatch.setattr(runner, "to_rgb", spy_to_rgb)
    settings = GenerationSettings(model="tiny", steps=STEPS, num_images_per_prompt=K, grid=True, size=(16, 16))
    lines = []
    summary = run_generate([inputs], tmp_path / "out", settings, report=lines.append, progress=False,
                           devices=jax.local_devices()[:3])
    # 8 good inputs over 3 devices: two full calls, then 2 inputs; every call pads to 3 * K pictures. The first
    # program batch is the warm-up's, made while the weights load: the same shape, so the calls compile nothing.
    assert shapes == [(3, 1, (3 * K, 1, 3, 32, 32))] * 4
    assert [(n, slots, devices) for n, slots, _, devices in calls] == [(3, 3 * K, 3)] * 2 + [(2, 3 * K, 3)]
    starts = [s for _, _, first, _ in calls for s in first]
    assert starts == sorted(starts) and len(starts) == len(GOOD) and all(s % K == 0 for s in starts)
    assert summary.done == len(GOOD) * K and len(summary.failures) == len(BAD) == len(lines)
    # Inputs are prepared on the reader thread, never more than one batch ahead of the devices.
    assert {t.rsplit("_", 1)[0] for t in threads} == {"imvar-jax-reader"}
    assert all(min((c + 1) * 3, len(GOOD)) <= n <= (c + 2) * 3 for c, n in enumerate(prepared_at_call)), \
        prepared_at_call
    # Pictures and grids do not depend on the device count or the batch layout.
    assert {k: v for k, v in _files(tmp_path / "out").items() if k != "manifest.jsonl"} == \
        {k: v for k, v in _files(out1).items() if k != "manifest.jsonl"}


def test_each_input_is_read_and_decoded_once(first_run, inputs, tmp_path, monkeypatch):
    """One run reads every input file once (hashing the same bytes), decodes it once and converts it once,
    whether it still needs sampling, only its grid, or nothing."""
    out1, *_ = first_run
    root = str(inputs.resolve())
    opened: list[str] = []
    real_open = builtins.open

    real_os_open = os.open

    def note(file) -> None:
        if isinstance(file, (str, os.PathLike)) and os.path.realpath(file).startswith(root + os.sep):
            opened.append(os.path.relpath(os.path.realpath(file), root))

    def counting_open(file, *args, **kwargs):
        note(file)
        return real_open(file, *args, **kwargs)

    def counting_os_open(file, *args, **kwargs):
        note(file)
        return real_os_open(file, *args, **kwargs)

    decoded, converted = [], []
    real_decode, real_to_rgb = runner.decode_image, runner.to_rgb
    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    monkeypatch.setattr(os, "open", counting_os_open)
    monkeypatch.setattr(runner, "decode_image", lambda data: decoded.append(len(data)) or real_decode(data))
    monkeypatch.setattr(runner, "to_rgb", lambda image, **kw: converted.append(kw["name"]) or real_to_rgb(image, **kw))
    image_files = sorted(p.relative_to(inputs).as_posix() for p in inputs.rglob("*")
                         if p.is_file() and p.suffix != ".txt")

    # A resumed run: 0.png of every input but one is gone, and that one's grid.png.
    out = tmp_path / "out"
    shutil.copytree(out1, out)
    grid_only = _folder_name(inputs, "palette.gif")
    for rel in GOOD:
        folder = out / _folder_name(inputs, rel)
        (folder / ("grid.png" if folder.name == grid_only else "0.png")).unlink()
    settings = GenerationSettings(model="tiny", steps=STEPS, num_images_per_prompt=K, grid=True, size=(16, 16))
    summary = run_generate([inputs], out, settings, report=lambda line: None, progress=False)
    assert (summary.done, summary.skipped) == (len(GOOD) - 1, len(GOOD) * K - len(GOOD) + 1)
    assert sorted(opened) == image_files
    assert len(decoded) == len(image_files)
    assert sorted(converted) == sorted(str((inputs / rel).absolute()) for rel in GOOD)
    assert _files(out) == _files(out1)

    # A run with nothing left to write reads every input once to hash it, and decodes only the bad ones
    # (they have no outputs, so they are tried again).
    opened.clear(), decoded.clear(), converted.clear()
    summary = run_generate([inputs], out, settings, report=lambda line: None, progress=False)
    assert (summary.done, summary.skipped) == (0, len(GOOD) * K)
    assert sorted(opened) == image_files
    assert len(decoded) == len(BAD) and converted == []


def test_grid_is_built_from_the_pictures_as_written(first_run, inputs):
    """The grid built in memory equals one built from the written PNGs and the decoded input."""
    out, *_ = first_run
    for rel in GOOD:
        folder = out / _folder_name(inputs, rel)
        with Image.open(inputs / rel) as image:
            thumbnail = to_rgb(image).resize((16, 16), Image.Resampling.BICUBIC)
        tiles = [thumbnail] + [Image.open(folder / f"{j}.png") for j in range(K)]
        np.testing.assert_array_equal(np.asarray(Image.open(folder / "grid.png")),
                                      np.asarray(contact_sheet(tiles, (16, 16))), err_msg=rel)


def _resolved(**changes) -> GenerationSettings:
    """What the test runs record: the tiny model's float32 on CPU, 16x16 pictures, no revision."""
    return GenerationSettings(model="tiny", steps=STEPS, num_images_per_prompt=K, dtype="float32",
                              vae_dtype="float32", size=(16, 16), **changes)


def test_text_chunks_and_records_are_the_settings_fields(first_run, inputs):
    out, *_ = first_run
    resolved = _resolved()
    settings_keys = {f.name for f in FIELDS if f.recorded}
    assert set(GenerationSettings().to_text()) == set(GenerationSettings().to_json()) == settings_keys
    records = {r["path"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    for rel in GOOD:
        folder = out / _folder_name(inputs, rel)
        for j in range(K):
            with Image.open(folder / f"{j}.png") as im:
                text = dict(im.text)
            assert set(text) == settings_keys | set(outputs.PICTURE_KEYS)
            assert GenerationSettings.recorded_from_text(text) == resolved.recorded()
            assert {k: text[k] for k in settings_keys} == resolved.to_text()
            record = records[f"{folder.name}/{j}.png"]
            assert set(record) == settings_keys | {"path", "input", "input_sha256", "index", "input_index",
                                                   "variation", "nsfw"}
            assert {k: record[k] for k in settings_keys} == json.loads(json.dumps(resolved.to_json()))
        with Image.open(folder / "grid.png") as im:
            assert set(im.text) == settings_keys | set(outputs.PICTURE_KEYS) - {"nsfw"}
            assert GenerationSettings.recorded_from_text(im.text) == resolved.recorded()


def _changed(name: str, value):
    """Another valid value of recorded setting ``name`` than ``value``."""
    (spec,) = [f for f in FIELDS if f.name == name]
    if spec.choices is not None:
        return next(c for c in spec.choices if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5  # in range for strength (0, 1] and eta [0, 1]
    if isinstance(value, tuple):
        return (value[0] * 2, value[1])
    return f"{value or 'x'}-changed"


@pytest.fixture
def fake_model(monkeypatch):
    """Any model name loads the tiny model, and sampling returns flat grey at once: runs cost no compute."""
    real_load = ImageVariationPipeline.from_pretrained.__func__

    def load(cls, path, **kwargs):
        return real_load(cls, "tiny", **{**kwargs, "revision": None})

    def fake_generate(self, images, params, seed, num_images_per_prompt=1, height=None, width=None, **kwargs):
        n = len(images) * num_images_per_prompt
        return ImageVariationOutput(np.full((n, height, width, 3), 0.5, np.float32), [False] * n)

    monkeypatch.setattr(ImageVariationPipeline, "from_pretrained", classmethod(load))
    monkeypatch.setattr(ImageVariationPipeline, "generate", fake_generate)


@pytest.mark.parametrize("name", [f.name for f in FIELDS if f.recorded])
def test_a_changed_recorded_setting_is_refused_until_start_over(name, fake_model, inputs, tmp_path):
    base = GenerationSettings(model="owner/some-model", steps=STEPS, num_images_per_prompt=K, dtype="float32",
                              vae_dtype="float32", size=(16, 16))
    files = [inputs / "rgb.jpg", inputs / "gray.png"]
    out = tmp_path / "out"
    summary = run_generate(files, out, base, progress=False)
    assert (summary.done, summary.skipped, summary.failures) == (2 * K, 0, [])
    with Image.open(out / "gray" / "0.png") as im:
        recorded = GenerationSettings.recorded_from_text(im.text)
    assert recorded is not None and recorded["revision"] == "main"
    assert run_generate(files, out, base, progress=False).skipped == 2 * K

    changed = base.replace(**{name: _changed(name, recorded[name])})
    before = _files(out)
    with pytest.raises(OutputError, match=f"{FIELDS_BY_NAME[name].option.lstrip('-')} .* there, .* now"):
        run_generate(files, out, changed, progress=False)
    assert _files(out) == before
    summary = run_generate(files, out, changed, progress=False, start_over=True)
    k = changed.num_images_per_prompt
    assert (summary.done, summary.skipped) == (2 * k, 0)
    with Image.open(out / "gray" / "0.png") as im:
        now = GenerationSettings.recorded_from_text(im.text)
    assert now != recorded and {n for n in now if now[n] != recorded[n]} == {name}
    assert run_generate(files, out, changed, progress=False).skipped == 2 * k


def test_collect_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for rel in ["a/x.JPG", "a/b/y.png", "a/b/notes.txt", "a/.hidden/z.png", "a/out/old.png", "c/w.webp",
                "c/data.bin", "d/Cat.png", "e/cat.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    items, misses = collect_inputs(["a", "c/*", "a/x.JPG", "c/data.bin", "nope.png", "zz/*.png", "d", "e/**/*.jpg"],
                                   exclude="a/out")
    got = [i.display for i in items]
    assert got == ["a/b/y.png", "a/x.JPG", "c/data.bin", "c/w.webp", "d/Cat.png", "e/cat.jpg"]
    assert [i.index for i in items] == list(range(len(items)))
    assert misses == [("nope.png", "no such file or folder"), ("zz/*.png", "matches no image files")]
    names = {i.display: i.name for i in items}
    # Stems differing only in case would share a folder on case-insensitive file systems.
    for display in ("d/Cat.png", "e/cat.jpg"):
        digest = hashlib.sha256(str(Path.cwd() / display).encode()).hexdigest()[:8]
        assert names[display] == f"{Path(display).stem}-{digest}"
    assert names["a/x.JPG"] == "x"


def test_bad_size_for_the_model_is_a_usage_error(inputs, tmp_path, capsys):
    code = cli.main(["generate", str(inputs / "rgb.jpg"), "--out", str(tmp_path / "out"), *COMMON, "--size", "15x16"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("usage: imvar-jax generate") and "size" in err.splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_argument_error_exit_code_and_usage(tmp_path):
    env = {**os.environ, "IMVAR_JAX_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "imvar_jax.cli", "generate", "in.png", "--steps", "0"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: imvar-jax generate")
    assert "argument --steps: expected a positive integer, got 0" in result.stderr
    assert not (tmp_path / "variations").exists()


@pytest.mark.parametrize("flag", [[], ["--no-compile-cache"]])
def test_compile_cache_is_on_unless_turned_off(flag, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(hub, "enable_compile_cache", lambda path=None: calls.append(path) or tmp_path)
    code = cli.main(["generate", str(tmp_path / "missing.png"), "--model", "tiny", "--out", str(tmp_path / "o"), *flag])
    err = capsys.readouterr().err
    assert code == 1
    assert "missing.png: no such file or folder" in err
    assert calls == ([] if flag else [None])


def test_info(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IMVAR_JAX_CACHE", str(tmp_path / "cache"))
    assert cli.main(["info", "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    assert f"cpu: {jax.device_count()} x cpu" in out
    assert str(tmp_path / "cache") in out and str(hub.compile_cache_dir()) in out
    assert f"jax {jax.__version__}" in out and "flax" in out and "Hugging Face hub cache:" in out
    assert "model tiny: built in" in out

    assert cli.main(["info", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert f"model {hub.DEFAULT_MODEL}: revision {hub.DEFAULT_REVISION}, float32: not cached" in out
    marker = hub.converted_dir(hub.DEFAULT_MODEL, None, "float32") / "imvar_jax.json"
    marker.parent.mkdir(parents=True)
    marker.write_text("{}")
    assert cli.main(["info", "--dtype", "float32"]) == 0
    assert f"float32: cached, converted in {marker.parent}" in capsys.readouterr().out

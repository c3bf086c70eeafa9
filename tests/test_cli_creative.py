"""``imvar-jax generate`` with the creative controls: --mix, --interpolate, --negative, --strength, .npy inputs.

Each command's pictures are compared, pixel for pixel, with the Python API's for the same seed and
settings on the same devices (all 8 virtual CPU devices, as the command uses). Every run here is
shared by several checks: a sampling program is the costly part.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from imvar_jax import cli, tiny
from imvar_jax.batch import InputError, collect_inputs
from imvar_jax.batch.inputs import decode_embedding
from imvar_jax.pipeline import ImageVariationPipeline
from imvar_jax.preprocessing import to_pil

K = 2
STEPS = 3
SIZE = 16
COMMON = ["--model", "tiny", "--steps", str(STEPS), "--size", f"{SIZE}x{SIZE}", "--num-per-image", str(K),
          "--no-compile-cache"]
# What the command's defaults mean in API arguments (the API's own guidance default is 7.5).
API = {"num_inference_steps": STEPS, "guidance_scale": 3.0, "height": SIZE, "width": SIZE}
SLOTS = 8 * K  # a batch run pads every call to batch size x K pictures per device


@pytest.fixture(scope="module", autouse=True)
def tiny_weights_once():
    """Every run loads "tiny"; its weights depend only on the seed, so they are built once."""
    built = {}
    real = tiny.tiny_params

    def cached(seed: int = 0):
        if seed not in built:
            built[seed] = real(seed)
        return dict(built[seed])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiny, "tiny_params", cached)
        yield


@pytest.fixture(scope="module")
def api(tiny_weights_once):
    return ImageVariationPipeline.from_pretrained("tiny", devices=jax.local_devices())


@pytest.fixture(scope="module")
def files(tmp_path_factory, api) -> Path:
    pipe, _ = api
    root = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c", "d"):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / f"{name}.png")
    dim = pipe.image_encoder.config.projection_dim
    np.save(root / "e.npy", rng.standard_normal(dim).astype(np.float32))
    np.save(root / "bad.npy", rng.standard_normal((2, dim)).astype(np.float32))
    (root / "notes.npy").write_text("not numpy\n")
    return root


def _main(*args) -> tuple[int, str, str]:
    """The command in this process (argparse's usage errors included); exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([*map(str, args)])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def _errors(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if ": error: " in line]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _text(path: Path) -> dict[str, str]:
    with Image.open(path) as image:
        return dict(image.text)


def _records(out: Path) -> dict[str, dict]:
    return {r["path"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same_pictures(paths: list[Path], images: np.ndarray) -> None:
    assert len(paths) == len(images)
    for path, expected in zip(paths, to_pil(images)):
        np.testing.assert_array_equal(_pixels(path), np.asarray(expected), err_msg=str(path))


def _one_program(stderr: str) -> None:
    """The run made one sampling program, during loading (the warm-up's stand-in inputs gave the run's program)."""
    lines = stderr.splitlines()
    compiling = [i for i, line in enumerate(lines) if line.startswith("imvar-jax generate: compiling for ")]
    ready = [i for i, line in enumerate(lines) if "; the sampling program was ready " in line]
    assert len(compiling) == 1 and len(ready) == 1 and compiling[0] < ready[0], stderr


def _picture(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


# ----------------------------------------------------------------------
# --strength and --negative on a batch run; .npy inputs
# ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def strength_run(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("strength") / "out"
    result = _main("generate", files / "a.png", files / "e.npy", "--negative", files / "c.png", "--strength", "0.5",
                   "--out", out, *COMMON)
    return out, result


def test_strength_and_negative_pictures_equal_the_api(strength_run, files, api):
    out, (code, stdout, stderr) = strength_run
    pipe, params = api
    a, c = _picture(files / "a.png"), _picture(files / "c.png")
    # a.png is input 0 of a.png and e.npy (sorted by path).
    expected = pipe.generate([a], params, 0, num_images_per_prompt=K, first_index=[0], slots=SLOTS,
                             negative_image=c, strength=0.5, init_image=[a], **API)
    _same_pictures([out / "a" / f"{j}.png" for j in range(K)], expected.images)
    assert "done 2, skipped 0 (already complete), failed 1," in stdout
    _one_program(stderr)
    (error,) = _errors(stderr)
    assert code == 1 and f"{files / 'e.npy'}: an embedding (.npy) has no picture to start from" in error
    assert "--strength" in error


def test_strength_and_negative_are_recorded(strength_run, files):
    out, _ = strength_run
    records = _records(out)
    assert sorted(records) == ["a/0.png", "a/1.png"]
    for j in range(K):
        text = _text(out / "a" / f"{j}.png")
        assert (text["strength"], text["negative_sha256"]) == ("0.5", _sha(files / "c.png"))
        record = records[f"a/{j}.png"]
        assert (record["strength"], record["negative_sha256"]) == (0.5, _sha(files / "c.png"))
        assert record["negative"] == str(files / "c.png")


def test_a_changed_strength_or_negative_is_refused(strength_run, files):
    out, _ = strength_run
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    base = ["generate", files / "a.png", "--out", out, *COMMON]
    for changed, what in ((["--negative", files / "c.png", "--strength", "0.7"], "strength 0.5 there, 0.7 now"),
                          (["--negative", files / "d.png", "--strength", "0.5"], "negative sha256 "),
                          (["--strength", "0.5"], "negative sha256 ")):
        code, _, stderr = _main(*base, *changed)
        (error,) = _errors(stderr)
        assert code == 1 and what in error and "--start-over" in error, stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    code, stdout, _ = _main(*base, "--negative", files / "c.png", "--strength", "0.5")
    assert code == 0 and "done 0, skipped 2 (already complete)" in stdout


def test_embedding_inputs_equal_the_api_and_bad_ones_fail_alone(files, api, tmp_path):
    pipe, params = api
    out = tmp_path / "out"
    code, stdout, stderr = _main("generate", files / "bad.npy", files / "e.npy", files / "notes.npy", "--negative",
                                 files / "c.png", "--grid", "--out", out, *COMMON)
    errors = _errors(stderr)
    assert code == 1 and len(errors) == 2 and "done 2, skipped 0 (already complete), failed 2," in stdout, stderr
    _one_program(stderr)
    (bad,) = [e for e in errors if f"{files / 'bad.npy'}: " in e]
    assert "expected an embedding of shape [D] or [1, D], got shape [2," in bad
    (notes,) = [e for e in errors if f"{files / 'notes.npy'}: " in e]
    assert "not a numpy .npy file" in notes
    assert sorted(p.name for p in out.iterdir()) == ["e", "manifest.jsonl"]
    embedding = np.load(files / "e.npy")[None]
    # e.npy is input 1 of bad.npy, e.npy and notes.npy: its pictures are 1*K and on.
    expected = pipe.generate(None, params, 0, num_images_per_prompt=K, first_index=[K], slots=SLOTS,
                             image_embeds=embedding, negative_image=_picture(files / "c.png"), **API)
    _same_pictures([out / "e" / f"{j}.png" for j in range(K)], expected.images)
    assert _text(out / "e" / "0.png")["input_sha256"] == _sha(files / "e.npy")
    grid = _pixels(out / "e" / "grid.png")
    assert grid.shape == (SIZE, SIZE * (K + 1), 3) and (grid[:, :SIZE] == 128).all()  # no picture: grey


def test_a_negative_embedding_with_pictures_equals_the_api(files, api, tmp_path):
    pipe, params = api
    out = tmp_path / "out"
    code, stdout, stderr = _main("generate", files / "a.png", "--negative", files / "e.npy", "--strength", "0.5",
                                 "--out", out, *COMMON)
    assert code == 0 and "done 2, skipped 0 (already complete), failed 0," in stdout, stderr
    _one_program(stderr)
    a = _picture(files / "a.png")
    # The pictures become embeddings, so that the negative one can join them.
    embeds = pipe.image_embeddings([a], params)
    expected = pipe.generate(None, params, 0, num_images_per_prompt=K, first_index=[0], slots=SLOTS,
                             image_embeds=embeds, negative_image_embeds=np.load(files / "e.npy"), strength=0.5,
                             init_image=[a], **API)
    _same_pictures([out / "a" / f"{j}.png" for j in range(K)], expected.images)


# ----------------------------------------------------------------------
# --mix
# ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def mix_run(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("mix") / "out"
    result = _main("generate", "--mix", f"{files / 'a.png'}:0.7", f"{files / 'b.png'}:0.3", "--grid", "--out", out,
                   *COMMON)
    return out, result


def test_mix_equals_the_api(mix_run, files, api):
    out, (code, stdout, stderr) = mix_run
    assert code == 0, stderr
    pipe, params = api
    expected = pipe.generate([_picture(files / "a.png"), _picture(files / "b.png")], params, 0,
                             num_images_per_prompt=K, mix_weights=[0.7, 0.3], **API)
    _same_pictures([out / "mix" / f"{j}.png" for j in range(K)], expected.images)
    assert sorted(p.name for p in (out / "mix").iterdir()) == ["0.png", "1.png", "grid.png"]
    assert _pixels(out / "mix" / "grid.png").shape == (SIZE, SIZE * (2 + K), 3)  # the sources, then the mix


def test_mix_metadata(mix_run, files):
    out, _ = mix_run
    sources = [{"sha256": _sha(files / "a.png"), "weight": 0.7}, {"sha256": _sha(files / "b.png"), "weight": 0.3}]
    records = _records(out)
    assert sorted(records) == [f"mix/{j}.png" for j in range(K)]
    for j in range(K):
        text = _text(out / "mix" / f"{j}.png")
        assert json.loads(text["sources"]) == sources
        assert (text["index"], text["model"], text["steps"], text["mix_method"]) == (str(j), "tiny", "3", "slerp")
        record = records[f"mix/{j}.png"]
        assert record["sources"] == [{"input": str(files / n), **s} for n, s in zip(("a.png", "b.png"), sources)]
        assert (record["index"], record["variation"], record["input_sha256"]) == (j, j, text["input_sha256"])


def test_mix_rerun_skips_other_weights_are_refused_until_start_over(mix_run, files, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(mix_run[0], out)  # the shared run stays as it was
    (out / "mix" / "notes.txt").write_text("not imvar-jax's\n")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, stdout, stderr = _main("generate", "--mix", f"{files / 'a.png'}:0.7", f"{files / 'b.png'}:0.3", "--grid",
                                 "--out", out, *COMMON)
    assert code == 0 and "already complete" in stderr and "done 0, skipped 2" in stdout
    other = ["generate", "--mix", f"{files / 'a.png'}:0.6", f"{files / 'b.png'}:0.3", "--out", out, *COMMON]
    code, _, stderr = _main(*other)
    (error,) = _errors(stderr)
    assert code == 1 and "other --mix sources" in error and "--start-over" in error
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    code, stdout, stderr = _main(*other, "--start-over")
    assert code == 0 and "removed 3 earlier output(s)" in stderr and "done 2, skipped 0" in stdout
    assert sorted(p.name for p in (out / "mix").iterdir()) == ["0.png", "1.png", "notes.txt"]
    assert json.loads(_text(out / "mix" / "0.png")["sources"])[0]["weight"] == 0.6


# ----------------------------------------------------------------------
# --interpolate
# ----------------------------------------------------------------------

def test_interpolate_writes_frames_grid_and_animations(files, api, tmp_path):
    pipe, params = api
    out = tmp_path / "out"
    code, stdout, stderr = _main("generate", "--interpolate", files / "a.png", files / "b.png", "--frames", "3",
                                 "--out", out, *COMMON[:-3], "--num-per-image", "1", "--no-compile-cache")
    assert code == 0, stderr
    folder = out / "interpolation"
    frames = [folder / f"frame-{f}.png" for f in range(3)]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [p.name for p in frames] + ["grid.png", "animation.gif", "animation.webp"])
    expected = pipe.interpolate([_picture(files / "a.png"), _picture(files / "b.png")], params, frames=3, seed=0,
                                **API)
    _same_pictures(frames, expected.images)
    grid = _pixels(folder / "grid.png")
    np.testing.assert_array_equal(grid, np.concatenate([_pixels(p) for p in frames], axis=1))
    for name in ("animation.gif", "animation.webp"):
        with Image.open(folder / name) as animation:
            assert (animation.n_frames, animation.size, animation.info["loop"]) == (3, (SIZE, SIZE), 0)
    assert [r["frame"] for r in _records(out).values()] == [0, 1, 2]
    assert _text(frames[2])["frames"] == "3"


# ----------------------------------------------------------------------
# Argument and source errors
# ----------------------------------------------------------------------

@pytest.mark.parametrize("args, code, message", [
    (["--mix", "{a}:x", "{b}"], 2, "the weight 'x' is not a number"),
    (["--mix", "{a}:-1", "{b}"], 2, "expected a finite weight >= 0, got -1"),
    (["--mix", "{a}:0", "{b}:0"], 2, "mix: expected weights >= 0 with a positive sum"),
    (["{a}", "--mix", "{a}", "{b}"], 2, "INPUT and --mix cannot be combined"),
    (["--mix", "{a}", "--interpolate", "{a}", "{b}"], 2, "not allowed with argument"),
    ([], 2, "nothing to generate from"),
    (["--interpolate", "{a}"], 2, "at least 2 sources"),
    (["--mix", "{a}", "{root}/missing.png"], 1, "--mix {root}/missing.png: no such file"),
    (["--mix", "{e}", "{a}", "--strength", "0.5"], 1, "--mix {e}: --strength below 1 starts from the first source"),
    (["{a}", "--negative", "{root}/missing.png"], 1, "--negative {root}/missing.png: no such file"),
    (["{a}", "--negative", "{bad}"], 1, "--negative {bad}: expected an embedding of shape [D] or [1, D]"),
    (["--interpolate", "{a}", "{notes}"], 1, "--interpolate {notes}: not a numpy .npy file"),
])
def test_bad_arguments_give_one_line(args, code, message, files, tmp_path):
    names = {"a": files / "a.png", "b": files / "b.png", "e": files / "e.npy", "bad": files / "bad.npy",
             "notes": files / "notes.npy", "root": files}
    got, stdout, stderr = _main("generate", *(a.format(**names) for a in args), "--out", tmp_path / "out", *COMMON)
    (error,) = _errors(stderr)
    assert got == code and message.format(**names) in error, stderr
    assert not (tmp_path / "out").exists()


def test_embedding_files_are_checked_before_their_data_is_read():
    def npy(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()

    np.testing.assert_array_equal(decode_embedding(npy(np.arange(4, dtype=np.float16)[None])),
                                  np.arange(4, dtype=np.float32)[None])
    # A header that claims 2**40 values, over a file of a few bytes: refused from the header alone.
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (1 << 40,)})
    for data, reason in ((header.getvalue() + b"\0" * 16, "expected an embedding of shape [D] or [1, D]"),
                         (npy(np.arange(4)), "expected a float array"),
                         (npy(np.array([{"a": 1}], dtype=object)), "expected a float array"),
                         (npy(np.array([1.0, np.nan])), "NaN or infinity"),
                         (npy(np.array([1e300])), "NaN or infinity"),  # inf once float32
                         (npy(np.ones(4, np.float32))[:-4], "truncated or corrupt"),
                         (b"\x93NUMPY", "not a numpy .npy file")):
        with pytest.raises(InputError, match=re.escape(reason)):
            decode_embedding(data)


def test_npy_inputs_only_when_named_and_creative_folder_names_are_reserved(tmp_path):
    for rel in ("mix.png", "Interpolation.jpg", "x.npy", "sub/y.npy", "sub/z.png"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    items, misses = collect_inputs([tmp_path, tmp_path / "x.npy"])
    names = {item.path.name: item.name for item in items}
    assert sorted(names) == ["Interpolation.jpg", "mix.png", "x.npy", "z.png"] and misses == []
    assert (names["x.npy"], names["z.png"]) == ("x", "z")
    for file, stem in (("mix.png", "mix"), ("Interpolation.jpg", "Interpolation")):
        digest = hashlib.sha256(str(tmp_path / file).encode()).hexdigest()[:8]
        assert names[file] == f"{stem}-{digest}"

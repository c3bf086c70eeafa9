"""``imvar-jax generate`` against hostile inputs and output folders: nothing lost, nothing escapes.

Each case builds its corpus here, snapshots the tree around it, runs the command and checks the
exit code, one error line naming the file (no traceback), and that nothing changed outside
``--out``. Sampling is replaced by flat grey pictures (``fake_model``) wherever the case is about
files rather than pictures, so these runs cost no compute; the unprivileged cases run the real
tiny model in a process without root's permission override.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from hostile import assert_clean_error, changes, run_cli_unprivileged, snapshot, world_readable_tmp
from imvar_jax import cli
from imvar_jax.batch import MANIFEST, collect_inputs, printable, runner, safe_name
from imvar_jax.batch.inputs import output_names
from imvar_jax.errors import NonFiniteError
from imvar_jax.memory import InsufficientMemoryError
from imvar_jax.pipeline import ImageVariationOutput, ImageVariationPipeline

K = 2
COMMON = ["--model", "tiny", "--steps", "2", "--num-per-image", str(K), "--size", "16x16", "--no-compile-cache"]


def _picture(path: Path, seed: int = 0, size: tuple[int, int] = (20, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG" if path.suffix.lower() != ".jpg" else "JPEG")
    return path


def _main(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([*map(str, args)])
    return code, out.getvalue(), err.getvalue()


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("imvar-jax generate: error:")]


def _manifest(out: Path) -> dict[str, dict]:
    return {r["path"]: r for r in map(json.loads, (out / MANIFEST).read_text().splitlines())}


def _variation_files(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.glob("*/*.png") if p.name != "grid.png"}


@pytest.fixture
def fake_model(monkeypatch):
    """"tiny" loads as usual, but sampling returns flat grey pictures at once."""

    def fake_generate(self, images, params, seed, num_images_per_prompt=1, height=None, width=None, **kwargs):
        n = len(images) * num_images_per_prompt
        return ImageVariationOutput(np.full((n, height, width, 3), 0.5, np.float32), [False] * n)

    monkeypatch.setattr(ImageVariationPipeline, "generate", fake_generate)


def _run(root: Path, *args, out: Path | None = None) -> tuple[int, str, list[str]]:
    """``generate ARGS --out OUT`` with the tree around ``root`` snapshotted: returns code, stderr, what changed
    outside OUT."""
    out = out or root / "out"
    before = snapshot(root)
    code, _, err = _main("generate", *args, "--out", out, *COMMON)
    return code, err, changes(before, snapshot(root), [out], root)


# ----------------------------------------------------------------------
# Names: sanitised, unique, printed escaped
# ----------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.text(min_size=0, max_size=300))
def test_safe_name_is_one_plain_component(stem):
    name = safe_name(stem)
    assert name and name not in (".", "..") and not name.startswith(".")
    assert "/" not in name and "\\" not in name and "\0" not in name
    assert all(c.isprintable() or c == " " for c in name)
    assert len(name.encode("utf-8")) <= 160
    name.encode("utf-8")  # no lone surrogates: every file system and JSON writer takes it


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(st.characters(blacklist_characters="/\0"), min_size=0, max_size=40), min_size=1,
                max_size=12, unique=True))
def test_output_names_are_safe_and_unique(stems):
    paths = [Path("/in") / f"{stem}.png" for stem in stems]
    names = output_names(paths)
    assert len({n.casefold() for n in names}) == len(names)
    assert all(n == safe_name(n) or n.startswith(safe_name(Path(p).stem)) for n, p in zip(names, paths))
    assert MANIFEST not in names


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_printable_has_no_control_characters(text):
    shown = printable(text)
    assert shown.isprintable()
    assert shown == text or not text.isprintable()


def test_a_dotted_name_stays_inside_out(tmp_path, fake_model):
    """``...png`` has the stem ``..``: taken as a folder name, its outputs would replace files beside OUT."""
    victim = tmp_path / "0.png"
    victim.write_bytes(b"the user's own file")
    for name in ("...png", "..png", ".png"):
        _picture(tmp_path / "in" / name)
    code, err, changed = _run(tmp_path, *(tmp_path / "in" / n for n in ("...png", "..png", ".png")))
    assert code == 0, err
    assert changed == []
    assert victim.read_bytes() == b"the user's own file"
    # Stems "..", "." and ".png" (a hidden name has no suffix).
    assert _variation_files(tmp_path / "out") == {f"{d}/{j}.png" for d in ("_.", "_", "_png") for j in range(K)}
    for rel in _variation_files(tmp_path / "out"):
        assert os.path.realpath(tmp_path / "out" / rel).startswith(str(tmp_path / "out") + os.sep)


def test_names_with_newlines_and_escapes_are_printed_escaped(tmp_path, fake_model):
    bad = tmp_path / "in" / "a\nb\x1b[31m.png"
    bad.parent.mkdir()
    bad.write_bytes(b"not a picture")
    _picture(tmp_path / "in" / "good.png")
    code, err, changed = _run(tmp_path, tmp_path / "in")
    assert code == 1 and changed == []
    assert "\x1b" not in err
    line = assert_clean_error(err, "a\\nb\\x1b[31m.png", "not an image")
    assert len(_errors(err)) == 1 and line in err
    assert _variation_files(tmp_path / "out") == {f"good/{j}.png" for j in range(K)}
    # The manifest keeps the real names: JSON escapes them itself.
    assert all(r["input"].endswith("good.png") for r in _manifest(tmp_path / "out").values())


# ----------------------------------------------------------------------
# Discovery: terminates, complete, nothing silently skipped
# ----------------------------------------------------------------------

def test_symlink_loops_end_and_inputs_count_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tree = tmp_path / "tree"
    _picture(tree / "a.png")
    _picture(tree / "sub" / "b.png", seed=1)
    (tree / "loop").symlink_to(".")
    (tree / "sub" / "up").symlink_to("..")
    (tree / "sub" / "again.png").symlink_to("../a.png")  # the same file under a second name
    (tree / "elsewhere").symlink_to(tree / "sub")
    result: dict[str, object] = {}

    def collect():
        result["value"] = [collect_inputs([spec]) for spec in ("tree", "tree/**/*.png", "tree/**", "tree/*")]

    thread = threading.Thread(target=collect, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "input discovery did not end on a symlink loop"
    for items, misses in result["value"]:
        assert misses == []
        assert sorted(os.path.realpath(i.path) for i in items) == sorted(
            os.path.realpath(p) for p in (tree / "a.png", tree / "sub" / "b.png"))


def test_an_input_inside_out_is_refused(tmp_path, fake_model):
    out = tmp_path / "out"
    assert _main("generate", _picture(tmp_path / "in" / "x.png"), "--out", out, *COMMON)[0] == 0
    earlier = out / "x" / "0.png"
    # Named as an input, 0.png would be variation 0 of itself: written over itself.
    code, err, changed = _run(tmp_path, earlier)
    assert code == 1 and changed == []
    assert_clean_error(err, str(earlier), "inside the output folder")
    # A folder holding the output folder skips it: the earlier outputs are not inputs.
    code, err, changed = _run(tmp_path, tmp_path)
    assert code == 0 and changed == [], err
    assert {i.name for i in collect_inputs([tmp_path], exclude=out)[0]} == {"x"}


def test_pipes_and_devices_fail_without_blocking(tmp_path, fake_model):
    os.mkfifo(tmp_path / "pipe.png")
    _picture(tmp_path / "ok.png")
    code, err, changed = _run(tmp_path, tmp_path / "pipe.png", tmp_path / "ok.png")
    assert code == 1 and changed == []
    assert_clean_error(err, "pipe.png", "not a regular file")


def _jpeg_with_segment(marker: bytes, body: bytes) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, format="JPEG")
    data = buf.getvalue()
    return data[:2] + marker + struct.pack(">H", len(body) + 2) + body + data[2:]


def test_any_error_while_decoding_fails_that_input_only(tmp_path, fake_model, monkeypatch):
    """Garbage metadata blocks are read past; whatever a plugin raises on one file fails that file alone."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "mpf.jpg").write_bytes(_jpeg_with_segment(b"\xff\xe2", b"MPF\x00garbage-not-tiff"))
    (folder / "exif.jpg").write_bytes(_jpeg_with_segment(b"\xff\xe1", b"Exif\x00\x00garbage-not-tiff"))
    _picture(folder / "ok.png")
    _picture(folder / "plugin.png", seed=1)
    real = runner.to_rgb

    def to_rgb(image, *, name):
        if name.endswith("plugin.png"):
            raise SyntaxError("not a TIFF file")  # what Pillow's EXIF reader raised on a garbage block
        return real(image, name=name)

    monkeypatch.setattr(runner, "to_rgb", to_rgb)
    code, err, changed = _run(tmp_path, folder)
    assert code == 1 and changed == []
    assert_clean_error(err, "plugin.png", "not a TIFF file")
    assert len(_errors(err)) == 1, err
    assert _variation_files(tmp_path / "out") == {f"{n}/{j}.png" for n in ("mpf", "exif", "ok") for j in range(K)}


def test_unreadable_entries_are_failures(tmp_path):
    """Root reads everything: the command runs as nobody, so permissions apply."""
    root = world_readable_tmp()
    try:
        folder = root / "in"
        _picture(folder / "ok.png")
        _picture(folder / "secret.png", seed=1).chmod(0o000)
        _picture(folder / "locked" / "inner.png", seed=2)
        (folder / "locked").chmod(0o000)
        for p in (folder, folder / "ok.png"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        before = snapshot(root)
        result = run_cli_unprivileged(["generate", "in", "--out", "out", *COMMON], root)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        errors = _errors(result.stderr)
        assert len(errors) == 2, result.stderr
        assert any("secret.png" in e and "Permission denied" in e for e in errors)
        assert any("locked" in e and "cannot read folder" in e for e in errors)
        assert _variation_files(root / "out") == {f"ok/{j}.png" for j in range(K)}
        assert changes(before, snapshot(root), ["out", ".cache"]) == []
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_read_only_out_is_one_line(tmp_path):
    root = world_readable_tmp()
    try:
        _picture(root / "in.png").chmod(0o644)
        (root / "ro").mkdir(mode=0o555)
        (root / "ro").chmod(0o555)
        before = snapshot(root)
        for out in ("ro", "ro/new"):
            result = run_cli_unprivileged(["generate", "in.png", "--out", out, *COMMON], root)
            assert result.returncode == 1, result.stderr
            assert_clean_error(result.stderr, out, "cannot write")
        assert changes(before, snapshot(root), [".cache"]) == []
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------
# Resume: honest, never mixing, never replacing a stranger's file
# ----------------------------------------------------------------------

@pytest.fixture
def done(tmp_path, fake_model) -> tuple[Path, Path]:
    """Two inputs generated into OUT once."""
    inputs = tmp_path / "in"
    _picture(inputs / "a.png")
    _picture(inputs / "b.png", seed=1)
    code, _, err = _main("generate", inputs, "--out", tmp_path / "out", *COMMON)
    assert code == 0, err
    return inputs, tmp_path / "out"


def test_a_png_missing_its_last_chunk_is_made_again(done, tmp_path):
    inputs, out = done
    whole = (out / "a" / "1.png").read_bytes()
    (out / "a" / "1.png").write_bytes(whole[:-12])  # IEND gone: the pixels may still decode
    code, stdout, err = _main("generate", inputs, "--out", out, *COMMON)
    assert code == 0, err
    assert "done 1, skipped 3" in stdout
    assert (out / "a" / "1.png").read_bytes() == whole


def test_other_settings_are_refused_until_start_over(done, tmp_path):
    inputs, out = done
    before = snapshot(tmp_path)
    code, _, err = _main("generate", inputs, "--out", out, *COMMON, "--steps", "3", "--seed", "5")
    assert code == 1
    line = assert_clean_error(err, "steps 2 there, 3 now", "seed 0 there, 5 now", "--start-over")
    assert len(err.strip().splitlines()) == 1, err
    assert changes(before, snapshot(tmp_path)) == [], line  # OUT included: nothing mixed, nothing replaced

    (out / "a" / "notes.txt").write_text("mine")
    code, _, err = _main("generate", inputs / "a.png", "--out", out, *COMMON, "--steps", "3", "--start-over")
    assert code == 0, err
    assert "removed 4 earlier output(s)" in err
    assert (out / "a" / "notes.txt").read_text() == "mine"  # never another program's file
    assert not (out / "b").exists()
    assert _variation_files(out) == {f"a/{j}.png" for j in range(K)} == set(_manifest(out))
    assert all(r["steps"] == 3 for r in _manifest(out).values())


def test_a_strangers_file_at_an_output_path_is_kept(done, tmp_path):
    inputs, out = done
    (out / "a" / "0.png").unlink()
    Image.new("RGB", (16, 16), "red").save(out / "a" / "0.png")  # the user's own picture, no imvar-jax chunks
    mine = (out / "a" / "0.png").read_bytes()
    code, _, err = _main("generate", inputs, "--out", out, *COMMON)
    assert code == 1
    assert_clean_error(err, "a.png", "0.png exists and was not written by imvar-jax")
    assert (out / "a" / "0.png").read_bytes() == mine


def test_links_in_out_do_not_lead_outside(done, tmp_path):
    inputs, out = done
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.rmtree(out / "a")
    (out / "a").symlink_to(outside)
    _picture(inputs / "c.png", seed=2)
    (out / "c").mkdir()
    (out / "c" / "0.png").symlink_to(outside / "0.png")
    before = snapshot(tmp_path)
    code, _, err = _main("generate", inputs, "--out", out, *COMMON)
    assert code == 1
    errors = _errors(err)
    assert any("a.png" in e and "is a file or a link" in e for e in errors), err
    assert any("c.png" in e and "not written by imvar-jax" in e for e in errors), err
    assert changes(before, snapshot(tmp_path), [out], tmp_path) == []
    assert list(outside.iterdir()) == []

    (out / MANIFEST).unlink()
    (out / MANIFEST).symlink_to(outside / "m.jsonl")
    code, _, err = _main("generate", inputs / "b.png", "--out", out, *COMMON)
    assert code == 1
    assert_clean_error(err, MANIFEST, "not a regular file")
    assert list(outside.iterdir()) == []


def test_the_manifest_lists_exactly_the_files_present(done, tmp_path):
    inputs, out = done
    (out / MANIFEST).unlink()
    (out / "b" / "1.png").unlink()
    code, _, err = _main("generate", inputs / "a.png", "--out", out, *COMMON)  # b is not an input this time
    assert code == 0, err
    records = _manifest(out)
    assert set(records) == _variation_files(out) == {"a/0.png", "a/1.png", "b/0.png"}
    assert records["b/0.png"]["input"] is None and records["b/0.png"]["index"] == K
    assert records["a/0.png"]["input"].endswith("a.png")


def test_a_killed_runs_temporary_files_are_removed(done, tmp_path):
    inputs, out = done
    for stale in (out / ".imvar-tmp-0123-0.png", out / "a" / ".imvar-tmp-4567-1.png"):
        stale.write_bytes(b"half a picture")
    code, _, err = _main("generate", inputs, "--out", out, *COMMON)
    assert code == 0, err
    assert "removed 2 temporary file(s) left by an interrupted run" in err
    assert not list(out.rglob(".imvar-tmp-*"))


def test_two_runs_never_share_an_output_folder(done, tmp_path):
    inputs, out = done
    held = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        before = snapshot(tmp_path)
        code, _, err = _main("generate", inputs, "--out", out, *COMMON, "--steps", "3")
        assert code == 1
        assert_clean_error(err, "another imvar-jax generate is writing into")
        assert changes(before, snapshot(tmp_path)) == []
    finally:
        os.close(held)


def test_non_finite_pictures_fail_their_input_only(tmp_path, monkeypatch):
    """The run goes on; the input is told that sampling went non-finite, at which step, for which picture."""
    inputs = tmp_path / "in"
    _picture(inputs / "a.png")
    _picture(inputs / "b.png", seed=1)

    def nan_generate(self, images, params, seed, num_images_per_prompt=1, height=None, width=None,
                     first_index=0, **kwargs):
        n = len(images) * num_images_per_prompt
        output = ImageVariationOutput(np.full((n, height, width, 3), 0.5, np.float32), [False] * n)
        bad = K + 1  # picture 3: variation 1 of input 1 (b.png)
        raise NonFiniteError(f"picture {bad}: step 1 (timestep 1)", pictures={bad: "step 1 (timestep 1)"},
                             output=output)

    monkeypatch.setattr(ImageVariationPipeline, "generate", nan_generate)
    code, err, changed = _run(tmp_path, inputs, "--batch-size", "2")
    assert code == 1 and changed == []
    line = assert_clean_error(err, "b.png", "non-finite", "picture 3", "step 1")
    assert len(_errors(err)) == 1, line
    assert _variation_files(tmp_path / "out") == {f"a/{j}.png" for j in range(K)} == set(_manifest(tmp_path / "out"))


def test_a_batch_too_large_for_memory_names_the_run_settings(tmp_path, monkeypatch):
    """The pipeline refuses by slots; the run says which of its own options to lower, and leaves no OUT."""

    def refuse(self, *args, **kwargs):
        raise InsufficientMemoryError("slots: too many", needed=12 * 2**30, available=8 * 2**30,
                                      pictures_per_device=4, fits=3)

    monkeypatch.setattr(ImageVariationPipeline, "generate", refuse)
    code, err, changed = _run(tmp_path, _picture(tmp_path / "in" / "a.png"), "--batch-size", "2")
    assert code == 2 and changed == []
    line = assert_clean_error(err, "batch_size: 2 input(s) x 2 picture(s) per device", "12.0 GiB", "8.0 GiB",
                              "at most 3 picture(s) per device", "--batch-size")
    assert err.splitlines()[-1] == line
    assert not (tmp_path / "out").exists()

"""Whole-checkpoint conversion: round trip, file formats, and every kind of bad checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from imvar_jax.cli import main
from imvar_jax.convert import checkpoint
from imvar_jax.convert.checkpoint import iter_torch_components, load_converted
from imvar_jax.hub import resolve_source
from imvar_jax.convert.common import ConversionError
from tiny_checkpoint import build_torch_pipeline, save_pipeline


@pytest.fixture(scope="module")
def torch_pipe():
    return build_torch_pipeline(seed=0)


@pytest.fixture(scope="module")
def tiny_src(torch_pipe, tmp_path_factory) -> Path:
    return save_pipeline(torch_pipe, tmp_path_factory.mktemp("src") / "tiny")


@pytest.fixture
def src_copy(tiny_src, tmp_path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(tiny_src, dst)
    return dst


def _flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _run_cli(capsys, *args) -> tuple[int, str]:
    code = main(["convert", *map(str, args)])
    err = capsys.readouterr().err
    return code, err


def _assert_failed_cleanly(code: int, err: str, dst: Path, *needles: str) -> None:
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("imvar-jax convert: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.partial")]


def test_round_trip_equals_in_memory_conversion(tiny_src, tmp_path, capsys):
    dst = tmp_path / "flax"
    code, _ = _run_cli(capsys, tiny_src, dst)
    assert code == 0
    fmt = json.loads((dst / "imvar_jax.json").read_text())
    assert fmt["components"] == ["unet", "vae", "image_encoder", "safety_checker"]
    assert (dst / "scheduler" / "scheduler_config.json").is_file()
    assert (dst / "feature_extractor" / "preprocessor_config.json").is_file()
    restored = {n: p for n, _, p in load_converted(dst)}
    direct = {n: p for n, _, p in iter_torch_components(tiny_src)}
    assert restored.keys() == direct.keys()
    for name in direct:
        a, b = _flat(restored[name]), _flat(direct[name])
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}{k}")


def test_bfloat16_storage(tiny_src, tmp_path, capsys):
    dst = tmp_path / "flax_bf16"
    code, _ = _run_cli(capsys, tiny_src, dst, "--dtype", "bfloat16")
    assert code == 0
    assert json.loads((dst / "imvar_jax.json").read_text())["dtype"] == "bfloat16"
    stored = dict((n, p) for n, _, p in load_converted(dst, dtype="bfloat16"))["unet"]
    exact = dict((n, p) for n, _, p in iter_torch_components(tiny_src))["unet"]
    for (k, a), b in zip(_flat(stored).items(), _flat(exact).values()):
        assert a.dtype == ml_dtypes.bfloat16, k
        np.testing.assert_array_equal(a, b.astype(ml_dtypes.bfloat16), err_msg=k)


@pytest.mark.parametrize("fmt,dtype", [("bin", torch.float32), ("safetensors", torch.float16), ("bin", torch.float16)])
def test_file_formats_give_the_same_params(torch_pipe, tiny_src, tmp_path, fmt, dtype):
    src = save_pipeline(build_torch_pipeline(seed=0), tmp_path / "src", fmt=fmt, dtype=dtype)
    got = {n: _flat(p) for n, _, p in iter_torch_components(src)}
    ref = {n: _flat(p) for n, _, p in iter_torch_components(tiny_src)}
    for name in ref:
        for k in ref[name]:
            want = ref[name][k].astype(np.float16).astype(np.float32) if dtype == torch.float16 else ref[name][k]
            np.testing.assert_array_equal(got[name][k], want, err_msg=f"{name}{k}")


def test_sharded_safetensors(torch_pipe, tiny_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_src, src)
    for f in (src / "unet").glob("*.safetensors"):
        f.unlink()
    torch_pipe.unet.save_pretrained(str(src / "unet"), max_shard_size="20KB")
    assert (src / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    got = {n: _flat(p) for n, _, p in iter_torch_components(src)}["unet"]
    ref = {n: _flat(p) for n, _, p in iter_torch_components(tiny_src)}["unet"]
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    next((src / "unet").glob("diffusion_pytorch_model-00002-*.safetensors")).unlink()
    with pytest.raises(ConversionError, match="shard diffusion_pytorch_model-00002"):
        list(iter_torch_components(src))


def _edit_unet(src: Path, edit) -> None:
    f = src / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f))


def test_missing_tensor(src_copy, tmp_path, capsys):
    _edit_unet(src_copy, lambda t: t.pop("conv_in.bias"))
    code, err = _run_cli(capsys, src_copy, tmp_path / "out")
    _assert_failed_cleanly(code, err, tmp_path / "out", "unet", "missing tensor 'conv_in.bias'",
                           "diffusion_pytorch_model.safetensors")


def test_misshaped_tensor(src_copy, tmp_path, capsys):
    _edit_unet(src_copy, lambda t: t.update({"conv_out.weight": torch.zeros(4, 32, 1, 1)}))
    code, err = _run_cli(capsys, src_copy, tmp_path / "out")
    _assert_failed_cleanly(code, err, tmp_path / "out", "'conv_out.weight'", "(4, 32, 1, 1)")


def test_unexpected_tensor(src_copy, tmp_path, capsys):
    _edit_unet(src_copy, lambda t: t.update({"extra.weight": torch.zeros(3)}))
    code, err = _run_cli(capsys, src_copy, tmp_path / "out")
    _assert_failed_cleanly(code, err, tmp_path / "out", "unexpected tensor 'extra.weight'")


@pytest.mark.parametrize("component,name", [("vae", "diffusion_pytorch_model.safetensors"),
                                            ("image_encoder", "model.safetensors")])
def test_truncated_safetensors(src_copy, tmp_path, capsys, component, name):
    f = src_copy / component / name
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    code, err = _run_cli(capsys, src_copy, tmp_path / "out")
    _assert_failed_cleanly(code, err, tmp_path / "out", str(f), "truncated")


def test_truncated_bin(torch_pipe, tmp_path, capsys):
    src = save_pipeline(torch_pipe, tmp_path / "src", fmt="bin")
    f = src / "vae" / "diffusion_pytorch_model.bin"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    code, err = _run_cli(capsys, src, tmp_path / "out")
    _assert_failed_cleanly(code, err, tmp_path / "out", str(f), "cannot load PyTorch checkpoint")


def test_text_file_posing_as_weights(src_copy, tmp_path, capsys):
    f = src_copy / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_text("this is not a tensor file\n")
    code, err = _run_cli(capsys, src_copy, tmp_path / "out")
    _assert_failed_cleanly(code, err, tmp_path / "out", str(f), "not a safetensors file")


def test_missing_component_and_not_a_checkpoint(src_copy, tmp_path, capsys):
    shutil.rmtree(src_copy / "vae")
    code, err = _run_cli(capsys, src_copy, tmp_path / "out")
    _assert_failed_cleanly(code, err, tmp_path / "out", "missing component 'vae'")

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    code, err = _run_cli(capsys, plain, tmp_path / "out")
    _assert_failed_cleanly(code, err, tmp_path / "out", str(plain), "no model_index.json")

    code, err = _run_cli(capsys, tmp_path / "does-not-exist", tmp_path / "out")
    _assert_failed_cleanly(code, err, tmp_path / "out", "does-not-exist", "no such folder")


def test_unsupported_config_value(src_copy, tmp_path, capsys):
    cfg_path = src_copy / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["class_embed_type"] = "timestep"
    cfg_path.write_text(json.dumps(cfg))
    code, err = _run_cli(capsys, src_copy, tmp_path / "out")
    _assert_failed_cleanly(code, err, tmp_path / "out", "class_embed_type")


def test_existing_destination_is_left_alone(tiny_src, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    code, err = _run_cli(capsys, tiny_src, dst)
    assert code == 1 and "already exists" in err
    assert (dst / "keep.txt").read_text() == "mine"


def test_interrupted_conversion_leaves_nothing(tiny_src, tmp_path, monkeypatch):
    real = checkpoint.convert_component
    calls = []

    def interrupt_second(spec, *args, **kwargs):
        calls.append(spec.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "convert_component", interrupt_second)
    dst = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        checkpoint.convert_checkpoint(tiny_src, dst)
    assert calls == ["unet", "vae"]
    assert list(tmp_path.iterdir()) == []


def test_safety_checker_absent_or_disabled(src_copy):
    index = json.loads((src_copy / "model_index.json").read_text())
    index["safety_checker"] = [None, None]
    (src_copy / "model_index.json").write_text(json.dumps(index))
    assert [n for n, _, _ in iter_torch_components(src_copy)] == ["unet", "vae", "image_encoder"]


def test_resolve_source_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert resolve_source(tmp_path) == tmp_path
    with pytest.raises(ConversionError, match="not a hub id"):
        resolve_source(str(tmp_path / "missing" / "deep" / "folder"))
    # HF_HUB_OFFLINE=1 (conftest) and an empty cache: a clear one-line error, no network.
    with pytest.raises(ConversionError, match="cannot fetch from the hub") as e:
        resolve_source("someone/not-cached", revision="v2.0")
    assert "\n" not in str(e.value)


def test_legacy_non_zip_bin(torch_pipe, tiny_src, tmp_path):
    """Pickles written before torch 1.6 are not zip archives and cannot be memory-mapped."""
    src = tmp_path / "src"
    shutil.copytree(tiny_src, src)
    (src / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(torch_pipe.vae.state_dict(), src / "vae" / "diffusion_pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    got = {n: _flat(p) for n, _, p in iter_torch_components(src)}["vae"]
    ref = {n: _flat(p) for n, _, p in iter_torch_components(tiny_src)}["vae"]
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)

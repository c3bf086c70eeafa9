"""Every config file is checked where it is read: a wrong type or an out-of-range value of any key is one
``ConfigError`` line naming the file and the key, at convert or load time, never a later failure elsewhere."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from hostile import assert_clean_error, changes, snapshot
from imvar_jax import ImageVariationPipeline
from imvar_jax.cli import main
from imvar_jax.config_files import read_preprocessor_config, read_scheduler_config
from imvar_jax.errors import ConfigError
from imvar_jax.models.clip_vision import CLIPVisionConfig
from imvar_jax.models.safety_checker import SafetyCheckerConfig
from imvar_jax.models.unet import UNetConfig
from imvar_jax.models.vae import VAEConfig
from imvar_jax.preprocessing import clip_settings
from imvar_jax.schedulers import SCHEDULERS, make_scheduler
from imvar_jax.schedulers.common import alphas_cumprod
from tiny_checkpoint import build_torch_pipeline, save_pipeline

# kind -> (file inside a diffusers folder, the reader convert/load use for it)
FILES: dict[str, tuple[str, Callable[[Path], Any]]] = {
    "unet": ("unet/config.json", UNetConfig.from_json),
    "vae": ("vae/config.json", VAEConfig.from_json),
    "image_encoder": ("image_encoder/config.json", CLIPVisionConfig.from_json),
    "safety_checker": ("safety_checker/config.json", SafetyCheckerConfig.from_json),
    "scheduler": ("scheduler/scheduler_config.json", read_scheduler_config),
    "preprocessor": ("feature_extractor/preprocessor_config.json", read_preprocessor_config),
}


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory) -> Path:
    return save_pipeline(build_torch_pipeline(seed=0), tmp_path_factory.mktemp("src") / "tiny")


@pytest.fixture(scope="module")
def base(tiny_src) -> dict[str, dict[str, Any]]:
    """Each kind's config as the tiny builder saved it."""
    return {kind: json.loads((tiny_src / name).read_text()) for kind, (name, _) in FILES.items()}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mutated")


def _mutated(raw: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def _write(folder: Path, kind: str, raw: Any) -> Path:
    path = folder / FILES[kind][0]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(raw))  # NaN and Infinity are written as Python's json reads them back
    return path


def _refusal(kind: str, path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        FILES[kind][1](path)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: "), message
    return message


# ----------------------------------------------------------------------
# Values that are wrong whatever the other keys hold
# ----------------------------------------------------------------------

JUNK = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=6)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v: Any) -> bool:
    return v >= 1


def bad_int(ok: Callable[[int], bool] = _positive) -> st.SearchStrategy:
    """Anything but an int that ``ok`` accepts: other types, and ints it refuses."""
    return JUNK.filter(lambda v: not (_is_int(v) and ok(v))) | st.integers(-2**40, 2**40).filter(lambda v: not ok(v))


def bad_number(ok: Callable[[float], bool] = lambda v: v > 0) -> st.SearchStrategy:
    return (JUNK.filter(lambda v: not (_is_number(v) and ok(v)))
            | st.floats().filter(lambda v: not (math.isfinite(v) and ok(v))))


BAD_BOOL = JUNK.filter(lambda v: not isinstance(v, bool))


def bad_choice(choices: tuple[str, ...]) -> st.SearchStrategy:
    return JUNK.filter(lambda v: v not in choices) | st.text(max_size=20).filter(lambda v: v not in choices)


def bad_int_list(blocks: int, ok: Callable[[int], bool] = _positive) -> st.SearchStrategy:
    """Not a list of ``blocks`` ints that ``ok`` accepts: other types, other lengths, bad entries."""
    valid = lambda v: isinstance(v, list) and len(v) == blocks and all(_is_int(x) and ok(x) for x in v)  # noqa: E731
    return (JUNK.filter(lambda v: not valid(v))
            | st.lists(st.integers(1, 64), max_size=5).filter(lambda v: len(v) != blocks)
            | st.lists(bad_int(ok), min_size=1, max_size=blocks))


def bad_per_block(blocks: int, ok: Callable[[int], bool] = _positive) -> st.SearchStrategy:
    """Neither an int ``ok`` accepts nor a list of one positive int per block."""
    valid = lambda v: ((_is_int(v) and ok(v))  # noqa: E731
                       or isinstance(v, list) and len(v) == blocks and all(_is_int(x) and x >= 1 for x in v))
    return (JUNK.filter(lambda v: not valid(v)) | st.integers(-2**40, 2**40).filter(lambda v: not ok(v))
            | st.lists(st.integers(1, 8), max_size=5).filter(lambda v: len(v) != blocks)
            | st.lists(bad_int(), min_size=blocks, max_size=blocks))


def bad_names(allowed: tuple[str, ...], blocks: int) -> st.SearchStrategy:
    valid = lambda v: isinstance(v, list) and len(v) == blocks and all(x in allowed for x in v)  # noqa: E731
    return (JUNK.filter(lambda v: not valid(v))
            | st.lists(st.sampled_from(allowed), max_size=5).filter(lambda v: len(v) != blocks)
            | st.lists(st.text(max_size=20), min_size=blocks, max_size=blocks).filter(lambda v: not valid(v)))


def _divides(*channels: int) -> Callable[[int], bool]:
    return lambda g: g >= 1 and all(c % g == 0 for c in channels)


def _optional_positive_int(v: Any) -> bool:
    return v is None or _is_int(v) and v >= 1


# The tiny builder's values these ranges are relative to: UNet channels (32, 64) in groups of 8 with
# 4 heads; VAE channels (16, 32) in groups of 8; CLIP width 32 with 4 heads, 32-pixel pictures in
# 8-pixel patches; scheduler T = 1000, betas 0.00085..0.012.
CLIP_BAD = {
    "hidden_size": bad_int(lambda v: v >= 1 and v % 4 == 0),
    "intermediate_size": bad_int(),
    "num_hidden_layers": bad_int(),
    "num_attention_heads": bad_int(_divides(32)),
    "num_channels": bad_int(),
    "image_size": bad_int(lambda v: v >= 8),
    "patch_size": bad_int(lambda v: 1 <= v <= 32),
    "layer_norm_eps": bad_number(),
    "hidden_act": bad_choice(("quick_gelu", "gelu")),
}
SIDE = lambda v: _is_int(v) and 1 <= v <= 8192  # noqa: E731
THREE = lambda v: _is_number(v) or isinstance(v, list) and len(v) == 3 and all(_is_number(x) for x in v)  # noqa: E731
BAD: dict[str, dict[tuple[str, ...], st.SearchStrategy]] = {
    "unet": {
        ("sample_size",): (JUNK.filter(lambda v: not (_optional_positive_int(v) or isinstance(v, list) and len(v) == 2
                                                      and all(_is_int(x) and x >= 1 for x in v)))
                           | st.integers(max_value=0)),
        ("in_channels",): bad_int(),
        ("out_channels",): bad_int(),
        ("flip_sin_to_cos",): BAD_BOOL,
        ("use_linear_projection",): BAD_BOOL,
        ("upcast_attention",): BAD_BOOL,
        ("freq_shift",): bad_number(lambda v: v < 16),
        ("block_out_channels",): bad_int_list(2),
        ("down_block_types",): bad_names(("CrossAttnDownBlock2D", "DownBlock2D"), 2),
        ("up_block_types",): bad_names(("CrossAttnUpBlock2D", "UpBlock2D"), 2),
        ("layers_per_block",): bad_per_block(2),
        ("transformer_layers_per_block",): bad_per_block(2),
        ("attention_head_dim",): bad_per_block(2, _divides(32, 64)),
        ("cross_attention_dim",): (bad_per_block(2) | st.lists(st.integers(1, 64), min_size=2, max_size=2)
                                   .filter(lambda v: v[0] != v[1])),
        ("norm_num_groups",): bad_int(_divides(32, 64)),
        ("norm_eps",): bad_number(),
        ("time_embedding_dim",): JUNK.filter(lambda v: not _optional_positive_int(v)) | st.integers(max_value=0),
    },
    "vae": {
        ("in_channels",): bad_int(),
        ("out_channels",): bad_int(),
        ("layers_per_block",): bad_int(),
        ("latent_channels",): bad_int(),
        ("use_quant_conv",): BAD_BOOL,
        ("use_post_quant_conv",): BAD_BOOL,
        ("mid_block_add_attention",): BAD_BOOL,
        ("block_out_channels",): bad_int_list(2),
        ("down_block_types",): bad_names(("DownEncoderBlock2D",), 2),
        ("up_block_types",): bad_names(("UpDecoderBlock2D",), 2),
        ("norm_num_groups",): bad_int(_divides(16, 32)),
        ("scaling_factor",): bad_number(),
    },
    "image_encoder": {**{(k,): s for k, s in CLIP_BAD.items()}, ("projection_dim",): bad_int()},
    "safety_checker": {
        **{("vision_config", k): s for k, s in CLIP_BAD.items()},
        ("vision_config",): JUNK.filter(lambda v: v is not None and not isinstance(v, dict)),
        ("projection_dim",): bad_int(),
    },
    "scheduler": {
        ("num_train_timesteps",): bad_int(lambda v: 1 <= v <= 1_000_000),
        ("beta_start",): bad_number(lambda v: 0 < v <= 0.012),
        ("beta_end",): bad_number(lambda v: 0.00085 <= v < 1),
        ("beta_schedule",): bad_choice(("linear", "scaled_linear", "squaredcos_cap_v2")),
        ("trained_betas",): (JUNK.filter(lambda v: v is not None)  # at most 3 entries, never 1000
                             | st.lists(st.floats(0.001, 0.5), max_size=20)
                             | st.builds(lambda i, b: [0.01] * i + [b] + [0.01] * (999 - i), st.integers(0, 999),
                                         bad_number(lambda v: 0 < v < 1))),
        ("steps_offset",): bad_int(lambda v: 0 <= v <= 999),
        ("prediction_type",): bad_choice(("epsilon", "v_prediction")),
        ("timestep_spacing",): bad_choice(("leading", "trailing", "linspace")),
        ("clip_sample_range",): bad_number(),
        ("_use_default_values",): JUNK.filter(lambda v: not (v is None or isinstance(v, list)
                                                             and all(isinstance(x, str) for x in v))),
        **{(k,): BAD_BOOL for k in ("skip_prk_steps", "set_alpha_to_one", "clip_sample", "thresholding",
                                    "rescale_betas_zero_snr", "use_karras_sigmas", "use_exponential_sigmas",
                                    "use_beta_sigmas")},
    },
    "preprocessor": {
        ("size",): (JUNK.filter(lambda v: not (SIDE(v) or isinstance(v, list) and len(v) == 2 and all(map(SIDE, v))))
                    | bad_int(SIDE) | st.fixed_dictionaries({"shortest_edge": bad_int(SIDE)})
                    | st.fixed_dictionaries({"height": bad_int(SIDE), "width": st.just(32)})),
        ("crop_size",): (JUNK.filter(lambda v: not (SIDE(v) or isinstance(v, list) and len(v) == 2
                                                    and SIDE(v[0]) and v[0] == v[1]))
                         | bad_int(SIDE)
                         | st.fixed_dictionaries({"height": st.integers(1, 64), "width": st.integers(1, 64)})
                         .filter(lambda d: d["height"] != d["width"])
                         | st.fixed_dictionaries({"height": st.just(32), "width": bad_int(SIDE)})),
        ("resample",): bad_int(lambda v: 0 <= v <= 5),
        ("rescale_factor",): bad_number(),
        ("image_mean",): (JUNK.filter(lambda v: not THREE(v))
                          | st.lists(st.floats(-2, 2), max_size=6).filter(lambda v: len(v) != 3)
                          | st.lists(st.sampled_from([math.nan, math.inf, -math.inf]), min_size=3, max_size=3)),
        ("image_std",): (JUNK.filter(lambda v: not THREE(v) or v == 0 or isinstance(v, list) and 0 in v)
                         | st.just(0) | st.permutations([0.0, 0.5, 0.25])),
        **{(k,): BAD_BOOL for k in ("do_convert_rgb", "do_resize", "do_center_crop", "do_rescale", "do_normalize")},
    },
}


@pytest.mark.parametrize("kind", list(FILES))
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_a_bad_value_of_any_checked_key_is_refused_naming_file_and_key(kind, data, base, scratch):
    path = data.draw(st.sampled_from(sorted(BAD[kind])), label="key")
    value = data.draw(BAD[kind][path], label="value")
    message = _refusal(kind, _write(scratch, kind, _mutated(base[kind], path, value)))
    assert path[-1] in message, message
    if len(path) > 1:
        assert ".".join(path[:-1]) in message, message


# Each kind's keys as its reader reads them: any JSON there is refused by name or works downstream.
READ_KEYS = {kind: sorted({p[0] for p in paths}) for kind, paths in BAD.items()}
READ_KEYS["safety_checker"] = sorted({p[-1] for p in BAD["safety_checker"] if len(p) > 1})


def _use(kind: str, raw: dict[str, Any], config: Any) -> None:
    """What the pipeline later does with an accepted config; it must not fail."""
    if kind == "scheduler":
        for name in SCHEDULERS:
            try:
                scheduler = make_scheduler(name, raw)
            except ConfigError as e:  # an option that scheduler does not implement, refused by name
                assert "not supported" in str(e), e
                continue
            assert np.all(np.isfinite(alphas_cumprod(scheduler.config)))
            try:
                state = scheduler.set_timesteps(min(10, scheduler.config.num_train_timesteps), (1, 4, 2, 2))
            except ValueError as e:  # a step count this schedule cannot take, named as the argument
                assert "num_inference_steps" in str(e), e
                continue
            assert np.all(np.isfinite(np.asarray(state.timesteps)))
    elif kind == "preprocessor":
        side = clip_settings(raw, 32).output_size[0]
        assert side >= 1
    else:
        hash(config)
        if kind == "unet":
            assert len(config.heads) == len(config.block_out_channels) and config.context_dim >= 1


@pytest.mark.parametrize("kind", list(FILES))
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_any_json_at_a_read_key_is_refused_by_name_or_usable(kind, data, base, scratch):
    key = data.draw(st.sampled_from(READ_KEYS[kind]), label="key")
    path = ("vision_config", key) if kind == "safety_checker" else (key,)
    value = data.draw(JUNK, label="value")
    raw = _mutated(base[kind], path, value)
    file = _write(scratch, kind, raw)
    try:
        config = FILES[kind][1](file)
    except ConfigError as e:
        message = str(e)
        assert message.startswith(f"{file}: ") and "\n" not in message, message
        return
    _use(kind, raw, config)


def test_the_tiny_builders_configs_are_accepted(tiny_src, base):
    assert UNetConfig.from_json(tiny_src / "unet" / "config.json") == UNetConfig.tiny()
    vae = VAEConfig.from_json(tiny_src / "vae" / "config.json")
    assert (vae.block_out_channels, vae.norm_num_groups, vae.latent_channels) == ((16, 32), 8, 4)
    vision = CLIPVisionConfig.from_json(tiny_src / "image_encoder" / "config.json")
    assert (vision.hidden_size, vision.patch_size, vision.projection_dim) == (32, 8, 32)
    assert SafetyCheckerConfig.from_json(tiny_src / "safety_checker" / "config.json").vision_config == vision
    assert read_scheduler_config(tiny_src / FILES["scheduler"][0]) == base["scheduler"]
    assert read_preprocessor_config(tiny_src / FILES["preprocessor"][0]) == base["preprocessor"]
    assert clip_settings(base["preprocessor"]).output_size == (32, 32)


@pytest.mark.parametrize("kind, path, value, needles", [
    ("unet", ("norm_num_groups",), 0, ["norm_num_groups"]),
    ("unet", ("norm_num_groups",), 12, ["norm_num_groups", "block_out_channels=[32, 64]"]),
    ("unet", ("block_out_channels",), "abc", ["block_out_channels"]),
    ("unet", ("block_out_channels",), [], ["block_out_channels", "non-empty"]),
    ("unet", ("block_out_channels",), [32, 64, 64], ["down_block_types has 2 entries", "block_out_channels has 3"]),
    ("unet", ("layers_per_block",), 0, ["layers_per_block"]),
    ("unet", ("attention_head_dim",), 0, ["attention_head_dim"]),
    ("unet", ("attention_head_dim",), 3, ["attention_head_dim", "must divide block 0"]),
    ("unet", ("cross_attention_dim",), 0.5, ["cross_attention_dim"]),
    ("unet", ("in_channels",), True, ["in_channels", "True"]),
    ("unet", ("norm_eps",), -1e-5, ["norm_eps", "> 0"]),
    ("unet", ("freq_shift",), 16, ["freq_shift", "(16)"]),
    ("unet", ("sample_size",), "8", ["sample_size"]),
    ("vae", ("block_out_channels",), "abc", ["block_out_channels", "'abc'"]),
    ("vae", ("norm_num_groups",), None, ["norm_num_groups"]),
    ("vae", ("scaling_factor",), 0, ["scaling_factor"]),
    ("vae", ("latent_channels",), "4", ["latent_channels"]),
    ("image_encoder", ("hidden_size",), 30, ["num_attention_heads=4", "hidden_size=30"]),
    ("image_encoder", ("layer_norm_eps",), 0, ["layer_norm_eps"]),
    ("image_encoder", ("projection_dim",), 0, ["projection_dim"]),
    ("image_encoder", ("patch_size",), 0, ["patch_size"]),
    ("safety_checker", ("vision_config", "num_attention_heads"), 0,
     ["safety_checker.vision_config: num_attention_heads"]),
    ("safety_checker", ("vision_config",), "abc", ["vision_config must be a JSON object"]),
    ("safety_checker", ("projection_dim",), "32", ["safety_checker: projection_dim"]),
    ("scheduler", ("num_train_timesteps",), 0, ["num_train_timesteps"]),
    ("scheduler", ("beta_schedule",), "cubic", ["beta_schedule='cubic'"]),
    ("scheduler", ("beta_start",), 0, ["beta_start"]),
    ("scheduler", ("beta_end",), 1.0, ["beta_end=1.0"]),
    ("scheduler", ("beta_start",), 0.5, ["beta_start=0.5", "beta_end=0.012"]),
    ("scheduler", ("steps_offset",), 1000, ["steps_offset", "[0, 999]"]),
    ("scheduler", ("trained_betas",), [0.01] * 10, ["trained_betas has 10 values"]),
    ("scheduler", ("trained_betas",), [0.0] * 1000, ["trained_betas", "(0, 1)"]),
    ("scheduler", ("clip_sample",), "yes", ["clip_sample"]),
    ("scheduler", ("num_train_timesteps",), 10**9, ["num_train_timesteps"]),
    ("preprocessor", ("crop_size",), 0, ["crop_size"]),
    ("preprocessor", ("crop_size",), {"height": 32, "width": 0}, ["crop_size.width"]),
    ("preprocessor", ("size",), {"shortest_edge": -1}, ["size.shortest_edge"]),
    ("preprocessor", ("image_std",), [0, 1, 1], ["image_std"]),
    ("preprocessor", ("image_mean",), [0.5, 0.5], ["image_mean"]),
    ("preprocessor", ("rescale_factor",), -1, ["rescale_factor"]),
    ("preprocessor", ("resample",), 3.0, ["resample"]),
    ("preprocessor", ("do_resize",), "yes", ["do_resize"]),
])
def test_named_bad_values(kind, path, value, needles, base, tmp_path):
    message = _refusal(kind, _write(tmp_path, kind, _mutated(base[kind], path, value)))
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize("kind", list(FILES))
@pytest.mark.parametrize("text, needle", [("{", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
                                          ("\xff\xfe", "not valid JSON"), ("[" * 100_000, "not valid JSON")])
def test_a_file_that_is_not_a_json_object_is_named(kind, text, needle, tmp_path):
    path = tmp_path / FILES[kind][0]
    path.parent.mkdir(parents=True)
    path.write_bytes(text.encode("latin-1"))
    assert needle in _refusal(kind, path)


def test_a_folder_in_place_of_a_config_file_is_named(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.mkdir()
    assert "cannot read the config file" in _refusal("scheduler", path)


def test_an_option_one_scheduler_lacks_is_left_to_that_scheduler(base, tmp_path):
    """Reading checks values for every scheduler, but refuses no option that only some implement."""
    raw = {**base["scheduler"], "thresholding": True, "use_karras_sigmas": True}
    assert read_scheduler_config(_write(tmp_path, "scheduler", raw)) == raw
    make_scheduler("pndm", raw)
    for name, key in (("ddim", "thresholding"), ("lms", "use_karras_sigmas")):
        with pytest.raises(ConfigError, match=f"{key}=true.*not supported"):
            make_scheduler(name, raw)


# ----------------------------------------------------------------------
# End to end: convert and load refuse the folder, naming the file; nothing outside DST changes
# ----------------------------------------------------------------------

@pytest.fixture
def workspace(tiny_src, tmp_path) -> tuple[Path, Path]:
    src = tmp_path / "src"
    shutil.copytree(tiny_src, src)
    return tmp_path, src


def _edit(src: Path, kind: str, path: tuple[str, ...] | None, value: Any) -> Path:
    """Set one key of ``kind``'s file in ``src`` (or, with ``path`` None, replace the file's text by ``value``)."""
    file = src / FILES[kind][0]
    if path is None:
        file.write_text(value)
    else:
        file.write_text(json.dumps(_mutated(json.loads(file.read_text()), path, value)))
    return file


MODEL_CASES = [
    ("unet", ("norm_num_groups",), 0, "norm_num_groups"),
    ("unet", None, '{"block_out_channels": [32, 64],', "not valid JSON"),
    ("vae", ("block_out_channels",), "abc", "block_out_channels"),
    ("image_encoder", ("num_attention_heads",), 5, "num_attention_heads"),
    ("safety_checker", ("vision_config", "layer_norm_eps"), -1.0, "layer_norm_eps"),
]
SIDE_CASES = [
    ("scheduler", ("beta_schedule",), "cubic", "beta_schedule"),
    ("scheduler", ("num_train_timesteps",), 0, "num_train_timesteps"),
    ("scheduler", None, "{", "not valid JSON"),
    ("preprocessor", ("crop_size",), 0, "crop_size"),
    ("preprocessor", ("image_std",), [0.0, 0.0, 0.0], "image_std"),
    ("preprocessor", None, "[]", "expected a JSON object"),
]


@pytest.mark.parametrize("kind, path, value, needle", MODEL_CASES + SIDE_CASES)
def test_convert_refuses_a_bad_config(kind, path, value, needle, workspace, capsys):
    root, src = workspace
    file = _edit(src, kind, path, value)
    dst = root / "dst"
    before = snapshot(root)
    code = main(["convert", str(src), str(dst)])
    err = capsys.readouterr().err
    assert code == 1, err
    line = assert_clean_error(err, str(file), needle)
    assert line.startswith(f"imvar-jax convert: error: {file}: "), line
    assert not dst.exists()
    assert changes(before, snapshot(root)) == []


@pytest.mark.parametrize("kind, path, value, needle", SIDE_CASES)
def test_loading_a_diffusers_folder_refuses_a_bad_side_config(kind, path, value, needle, workspace):
    root, src = workspace
    file = _edit(src, kind, path, value)
    before = snapshot(root)
    with pytest.raises(ConfigError) as info:
        ImageVariationPipeline.from_pretrained(str(src))
    assert str(info.value).startswith(f"{file}: ") and needle in str(info.value), info.value
    assert changes(before, snapshot(root)) == []


@pytest.fixture(scope="module")
def converted(tiny_src, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("converted") / "flax"
    assert main(["convert", str(tiny_src), str(dst)]) == 0
    return dst


@pytest.mark.parametrize("kind, path, value, needle", [SIDE_CASES[0], SIDE_CASES[3]])
def test_loading_a_converted_folder_refuses_a_bad_side_config(kind, path, value, needle, converted, tmp_path):
    folder = tmp_path / "flax"
    shutil.copytree(converted, folder)
    file = _edit(folder, kind, path, value)
    with pytest.raises(ConfigError) as info:
        ImageVariationPipeline.from_pretrained(str(folder))
    assert str(info.value).startswith(f"{file}: ") and needle in str(info.value), info.value


def test_generate_blames_the_config_file_not_the_picture(workspace, capsys):
    root, src = workspace
    file = _edit(src, "preprocessor", ("crop_size",), {"height": 32, "width": -3})
    picture = root / "in.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(picture)
    out = root / "out"
    before = snapshot(root)
    code = main(["generate", str(picture), "--model", str(src), "--out", str(out), "--no-compile-cache",
                 "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 1, err
    line = assert_clean_error(err, str(file), "crop_size.width")
    assert "in.png" not in line, line
    assert changes(before, snapshot(root), allowed=["out"]) == []

"""The config accept-lists: every key diffusers and transformers write is classified, and nothing else gets in."""

from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Any, Callable

import pytest
import torch
import transformers
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from imvar_jax.models.clip_vision import CLIP_CONFIG_KEYS, CLIP_VISION_KEYS, CLIPVisionConfig
from imvar_jax.models.config import ConfigError, ConfigKeys, to_dict
from imvar_jax.models.safety_checker import SafetyCheckerConfig
from imvar_jax.models.unet import UNET_KEYS, UNetConfig
from imvar_jax.models.vae import VAE_KEYS, VAEConfig

VISION = to_dict(CLIPVisionConfig.tiny())
CHECKER = {"model_type": "clip", "projection_dim": VISION["projection_dim"], "vision_config": VISION}


def _in_checker(vision: dict[str, Any]) -> SafetyCheckerConfig:
    return SafetyCheckerConfig.from_dict({**CHECKER, "vision_config": vision})


# name -> (accept-list, parser, a valid raw dict): each config dict this port reads, nested ones included.
PARSERS: dict[str, tuple[ConfigKeys, Callable[[dict], Any], dict[str, Any]]] = {
    "unet": (UNET_KEYS, UNetConfig.from_dict, to_dict(UNetConfig.tiny())),
    "vae": (VAE_KEYS, VAEConfig.from_dict, to_dict(VAEConfig.tiny())),
    "image_encoder": (CLIP_VISION_KEYS, CLIPVisionConfig.from_dict, VISION),
    "safety_checker": (CLIP_CONFIG_KEYS, SafetyCheckerConfig.from_dict, CHECKER),
    "safety_checker.vision_config": (CLIP_VISION_KEYS, _in_checker, VISION),
}
ALL_KEYS = {"unet": UNET_KEYS, "vae": VAE_KEYS, "clip_vision": CLIP_VISION_KEYS, "clip": CLIP_CONFIG_KEYS}

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=6)


# Keys no accept-list knows: a key of another list could change which parser reads the dict.
UNKNOWN = st.text(min_size=1, max_size=30).filter(lambda k: all(keys.kind(k) is None for keys in ALL_KEYS.values()))


def _accepts(value: Any, allowed: tuple[Any, ...]) -> bool:
    """Whether JSON ``value`` is one of ``allowed``: numbers by value, but a bool is never a number."""
    def same(v: Any, a: Any) -> bool:
        if isinstance(v, bool) or isinstance(a, bool) or v is None or a is None:
            return type(v) is type(a) and v == a
        return (isinstance(v, (int, float)) and isinstance(a, (int, float)) or type(v) is type(a)) and v == a
    return any(same(value, a) for a in allowed)


def _refusal(parse: Callable[[dict], Any], raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse(raw)
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("name", list(ALL_KEYS))
def test_keys_are_classified_once(name):
    keys = ALL_KEYS[name]
    assert not keys.read & keys.pinned.keys()
    assert not keys.read & keys.ignored
    assert not keys.pinned.keys() & keys.ignored


@pytest.mark.parametrize("torch_class,keys", [(TorchUNet, UNET_KEYS), (TorchAutoencoderKL, VAE_KEYS)])
def test_every_diffusers_option_is_classified(torch_class, keys, tmp_path):
    """Every constructor argument and every key ``save_pretrained`` writes, at diffusers' defaults."""
    signature = inspect.signature(torch_class.__init__).parameters
    assert [k for k in signature if k != "self" and keys.kind(k) is None] == []
    # Pinned keys list diffusers' default first, so a config holding the default is accepted.
    for key, allowed in keys.pinned.items():
        assert signature[key].default == allowed[0], key
    with torch.device("meta"):
        model = torch_class()
    # save_config writes the config.json save_pretrained writes, without the weights a meta model lacks.
    model.save_config(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert [k for k in raw if keys.kind(k) is None] == []
    assert {k for k in signature if k != "self"} <= raw.keys()


def test_diffusers_default_configs_load(tmp_path):
    with torch.device("meta"):
        TorchUNet().save_config(tmp_path / "unet")
        TorchAutoencoderKL().save_config(tmp_path / "vae")
    assert UNetConfig.from_json(tmp_path / "unet" / "config.json") == UNetConfig()
    assert VAEConfig.from_json(tmp_path / "vae" / "config.json") == VAEConfig()


def test_every_transformers_key_is_classified(tmp_path):
    """The fields of transformers' configs, their full ``to_dict`` (transformers 4 wrote that into nested
    sub-configs) and what ``save_pretrained`` writes, for the vision config and the checker's CLIPConfig."""
    fields = {f.name for f in dataclasses.fields(transformers.CLIPVisionConfig)} | {"model_type"}
    assert sorted(k for k in fields if CLIP_VISION_KEYS.kind(k) is None) == []
    fields = {f.name for f in dataclasses.fields(transformers.CLIPConfig)} | {"model_type"}
    assert sorted(k for k in fields if CLIP_CONFIG_KEYS.kind(k) is None) == []
    assert CLIP_VISION_KEYS.pinned["model_type"][0] == transformers.CLIPVisionConfig.model_type
    assert CLIP_CONFIG_KEYS.pinned["model_type"][0] == transformers.CLIPConfig.model_type

    vision = transformers.CLIPVisionConfig()
    clip = transformers.CLIPConfig()
    vision.save_pretrained(tmp_path / "vision")
    clip.save_pretrained(tmp_path / "clip")
    for raw in (vision.to_dict(), json.loads((tmp_path / "vision" / "config.json").read_text())):
        assert sorted(k for k in raw if CLIP_VISION_KEYS.kind(k) is None) == []
        assert CLIPVisionConfig.from_dict(raw) == CLIPVisionConfig()
    for raw in (clip.to_dict(), json.loads((tmp_path / "clip" / "config.json").read_text())):
        assert sorted(k for k in raw if CLIP_CONFIG_KEYS.kind(k) is None) == []
        assert sorted(k for k in raw["vision_config"] if CLIP_VISION_KEYS.kind(k) is None) == []
        assert SafetyCheckerConfig.from_dict(raw) == SafetyCheckerConfig()


def test_saved_models_configs_load(tmp_path):
    """The config.json of an image encoder and a safety checker as transformers/diffusers save them."""
    vision = {k: VISION[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                     "image_size", "patch_size", "projection_dim")}
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
    transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**vision)).save_pretrained(
        tmp_path / "image_encoder")
    StableDiffusionSafetyChecker(transformers.CLIPConfig(vision_config=vision, text_config=text,
                                                         projection_dim=16)).save_pretrained(tmp_path / "checker")
    assert CLIPVisionConfig.from_json(tmp_path / "image_encoder" / "config.json") == CLIPVisionConfig.tiny()
    assert SafetyCheckerConfig.from_json(tmp_path / "checker" / "config.json") == SafetyCheckerConfig.tiny()


# Realistic non-default values of the options the issue names, each of which diffusers accepts and
# which changes the model's output; resnet_out_scale_factor and resnet_skip_time_act add no tensor.
NAMED = [("resnet_out_scale_factor", 2.0), ("resnet_skip_time_act", True), ("time_embedding_type", "fourier"),
         ("class_embed_type", "timestep"), ("addition_embed_type", "text")]


@pytest.mark.parametrize("key,value", NAMED)
def test_named_math_changing_unet_options(key, value):
    base = to_dict(UNetConfig.tiny())
    assert UNetConfig.from_dict({**base, key: UNET_KEYS.pinned[key][0]}) == UNetConfig.tiny()
    message = _refusal(UNetConfig.from_dict, {**base, key: value})
    assert f"unsupported config value {key}={value!r}" in message


PINNED = [(name, key) for name, (keys, _, _) in PARSERS.items() for key in keys.pinned]


@pytest.mark.parametrize("name,key", PINNED)
def test_pinned_key_accepts_its_default_and_refuses_others_by_name(name, key):
    keys, parse, base = PARSERS[name]
    expected = parse(base)
    for value in keys.pinned[key]:
        assert parse({**base, key: value}) == expected
    # A string is a wrong value for every pinned key, including the string-valued ones.
    assert key in _refusal(parse, {**base, key: "not-supported"})


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_pinned_values_accepted_exactly_when_listed(data):
    name = data.draw(st.sampled_from(list(PARSERS)))
    keys, parse, base = PARSERS[name]
    key = data.draw(st.sampled_from(sorted(keys.pinned)))
    value = data.draw(JSON | st.sampled_from(keys.pinned[key]))
    # A "clip" model type makes the image encoder's dict a CLIPConfig, read as one.
    assume(not (name == "image_encoder" and key == "model_type" and value == "clip"))
    if _accepts(value, keys.pinned[key]):
        assert parse({**base, key: value}) == parse(base)
    else:
        assert f"unsupported config value {key}=" in _refusal(parse, {**base, key: value})


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_unknown_keys_are_refused_by_name(data):
    name = data.draw(st.sampled_from(list(PARSERS)))
    keys, parse, base = PARSERS[name]
    key = data.draw(UNKNOWN)
    message = _refusal(parse, {**base, key: data.draw(JSON)})
    assert message.startswith(f"unknown config key {key!r} in ")
    assert "delete the key" in message


def test_unknown_key_message():
    message = _refusal(UNetConfig.from_dict, {**to_dict(UNetConfig.tiny()), "resnet_fancy_scale": 3})
    assert message.startswith("unknown config key 'resnet_fancy_scale' in unet config (value 3)")
    message = _refusal(_in_checker, {**VISION, "rope_theta": 10000.0})
    assert message.startswith("unknown config key 'rope_theta' in safety_checker.vision_config config")


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_ignored_and_metadata_keys_do_not_change_the_config(data):
    name = data.draw(st.sampled_from(list(PARSERS)))
    keys, parse, base = PARSERS[name]
    key = data.draw(st.sampled_from(sorted(keys.ignored)) | st.text(max_size=10).map(lambda k: "_" + k))
    assert parse({**base, key: data.draw(JSON)}) == parse(base)


def test_vision_config_dict_overrides_vision_config_but_both_are_checked():
    overridden = {**VISION, "hidden_size": 64, "num_attention_heads": 8}
    assert SafetyCheckerConfig.from_dict({**CHECKER, "vision_config": overridden,
                                          "vision_config_dict": VISION}) == SafetyCheckerConfig.tiny()
    message = _refusal(SafetyCheckerConfig.from_dict, {**CHECKER, "vision_config": {**VISION, "mystery": 1},
                                                       "vision_config_dict": VISION})
    assert "'mystery' in safety_checker.vision_config config" in message

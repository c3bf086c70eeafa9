"""Settings and API arguments are checked where they enter: bad values get a one-line error naming them.

The settings validator is tested with hypothesis; the pipeline cases use the built-in tiny model and
share a handful of compiled programs (one per shape), so the file stays fast.
"""

from __future__ import annotations

import json
import re
import resource

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

import imvar_jax
from imvar_jax import (GenerationSettings, ImageVariationPipeline, InsufficientMemoryError, NonFiniteError,
                       SettingsError, replicate, shard)
from imvar_jax import memory
from imvar_jax.cli import main
from imvar_jax.schedulers import SCHEDULERS
from imvar_jax.settings import FIELDS, MAX_PICTURES_PER_DEVICE, MAX_SIDE, MAX_STEPS, SEED_LIMIT, check_value

STEPS = 2
PROPERTY = hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------
# Settings: property tests of the field checks
# ----------------------------------------------------------------------

anything = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.binary(max_size=8),
    st.lists(st.integers(-5, 10**5), max_size=3), st.tuples(st.integers(-5, 10**5), st.integers(-5, 10**5)),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.complex_numbers(),
    st.sampled_from([np.int64(3), np.float32(0.5), np.bool_(True), np.uint64(2**63), np.array([1, 2]),
                     float("1e39"), 2**32, -1, 0, 1, MAX_SIDE + 1, "pndm", "float32", "auto", "v2"]),
)

# Values each field must refuse whatever else is set.
not_an_int = st.one_of(st.floats(), st.text(max_size=5), st.none(), st.booleans(), st.lists(st.integers(), max_size=2))
not_a_number = st.one_of(st.text(max_size=5), st.none(), st.booleans(), st.lists(st.floats(), max_size=2),
                         st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e39, -1e300, 10**400]))
not_a_text = st.one_of(st.just(""), st.integers(), st.floats(), st.booleans(), st.lists(st.text(), max_size=2))
INVALID = {
    "model": not_a_text,
    "revision": not_a_text,
    "num_images_per_prompt": st.one_of(not_an_int, st.integers(max_value=0),
                                       st.integers(min_value=MAX_PICTURES_PER_DEVICE + 1)),
    "steps": st.one_of(not_an_int, st.integers(max_value=0), st.integers(min_value=MAX_STEPS + 1)),
    "guidance": not_a_number,
    "scheduler": st.one_of(st.text(max_size=16).filter(lambda t: t not in SCHEDULERS), st.integers()),
    "eta": st.one_of(not_a_number, st.floats(max_value=-1e-9), st.floats(min_value=1.000001, exclude_min=True)),
    "seed": st.one_of(not_an_int, st.integers(max_value=-1), st.integers(min_value=SEED_LIMIT)),
    "strength": st.one_of(not_a_number, st.floats(max_value=0.0), st.floats(min_value=1.000001, exclude_min=True)),
    "mix_method": st.one_of(st.text(max_size=8).filter(lambda t: t not in ("linear", "slerp")), st.none()),
    "frames": st.one_of(not_an_int, st.integers(max_value=0), st.integers(min_value=MAX_PICTURES_PER_DEVICE + 1)),
    "size": st.one_of(st.integers(), st.text(max_size=4), st.tuples(st.integers(max_value=0), st.integers(1, 64)),
                      st.tuples(st.integers(1, 64), st.integers(min_value=MAX_SIDE + 1)),
                      st.tuples(st.floats(1, 64), st.floats(1, 64)), st.lists(st.integers(1, 64), min_size=3,
                                                                              max_size=4)),
    "preprocessing": st.one_of(st.text(max_size=4).filter(lambda t: t not in ("v2", "clip")), st.none()),
    "dtype": st.one_of(st.text(max_size=8).filter(lambda t: t not in ("float32", "bfloat16", "float16")),
                       st.integers()),
    "vae_dtype": st.sampled_from(["float64", "int8", "", 32, True]),
    "attention": st.one_of(st.text(max_size=6).filter(lambda t: t not in ("auto", "xla", "cudnn", "chunked",
                                                                          "splash")), st.none()),
    "safety_checker": st.one_of(st.integers(), st.none(), st.text(max_size=3), st.sampled_from([np.bool_(True)])),
    "batch_size": st.one_of(not_an_int, st.integers(max_value=0), st.integers(min_value=MAX_PICTURES_PER_DEVICE + 1)),
    "grid": st.one_of(st.integers(), st.none(), st.text(max_size=3)),
}


def test_every_field_has_an_invalid_strategy():
    assert set(INVALID) == {f.name for f in FIELDS}


def _assert_names(error: SettingsError, name: str) -> None:
    message = str(error)
    assert message.startswith(f"{name}: "), message
    assert "\n" not in message and len(message) < 300, message


@PROPERTY
@given(st.sampled_from([f.name for f in FIELDS]), anything)
def test_any_value_is_accepted_or_refused_by_name(name, value):
    for check in (lambda: GenerationSettings(**{name: value}), lambda: check_value(name, value)):
        try:
            check()
        except SettingsError as e:
            _assert_names(e, name)


@PROPERTY
@given(st.data())
def test_invalid_values_are_refused_by_name(data):
    name = data.draw(st.sampled_from(sorted(INVALID)))
    value = data.draw(INVALID[name])
    with pytest.raises(SettingsError) as built:
        GenerationSettings(**{name: value})
    _assert_names(built.value, name)
    with pytest.raises(SettingsError) as checked:
        check_value(name, value, "the_argument")
    _assert_names(checked.value, "the_argument")


finite_float32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
valid_settings = st.builds(
    GenerationSettings,
    model=st.text(min_size=1, max_size=30), revision=st.none() | st.text(min_size=1, max_size=10),
    num_images_per_prompt=st.integers(1, 64), steps=st.integers(1, MAX_STEPS), guidance=finite_float32,
    scheduler=st.sampled_from(list(SCHEDULERS)), eta=st.floats(0, 1), seed=st.integers(0, SEED_LIMIT - 1),
    size=st.none() | st.tuples(st.integers(1, MAX_SIDE), st.integers(1, MAX_SIDE)),
    preprocessing=st.sampled_from(["v2", "clip"]), dtype=st.none() | st.sampled_from(["float32", "bfloat16"]),
    vae_dtype=st.none() | st.sampled_from(["float32", "float16"]), safety_checker=st.booleans(),
    batch_size=st.integers(1, 64), grid=st.booleans(),
)


@PROPERTY
@given(valid_settings)
def test_valid_settings_round_trip_through_text_and_json(settings):
    assert GenerationSettings.recorded_from_text(settings.to_text()) == settings.recorded()
    record = json.loads(json.dumps(settings.to_json()))
    assert record == settings.to_json()
    expected = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.recorded().items()}
    assert record == expected


@PROPERTY
@given(st.dictionaries(st.sampled_from([f.name for f in FIELDS]), st.text(max_size=12)))
def test_hostile_recorded_text_reads_as_a_mismatch_not_an_error(text):
    recorded = GenerationSettings.recorded_from_text({**GenerationSettings().to_text(), **text})
    assert recorded is None or GenerationSettings(**recorded).recorded() == recorded


def test_caps_are_documented_where_users_read_them():
    helps = {f.name: f.help for f in FIELDS}
    assert str(MAX_SIDE) in helps["size"] and str(MAX_PICTURES_PER_DEVICE) in helps["num_images_per_prompt"]
    assert "[0, 1]" in helps["eta"] and str(SEED_LIMIT - 1) in helps["seed"]
    with pytest.raises(SettingsError, match=r"^batch_size: 2048 inputs x 4 variations"):
        GenerationSettings(batch_size=2048, num_images_per_prompt=4)


# ----------------------------------------------------------------------
# The pipeline: shared tiny model and one set of inputs
# ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    pipe, params = ImageVariationPipeline.from_pretrained("tiny")
    return pipe, params


@pytest.fixture(scope="module")
def pictures():
    return np.random.default_rng(0).random((2, 20, 24, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def clean(tiny, pictures):
    """The reference run: 2 inputs x 2 variations, one picture per device (the shared program)."""
    pipe, params = tiny
    return pipe.generate(pictures, params, seed=5, num_images_per_prompt=2, num_inference_steps=STEPS,
                         guidance_scale=3.0)


def _with_leaf(tree, target: str, change):
    """A copy of ``tree`` (as host arrays) with ``change`` applied to the leaf at path string ``target``."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: change(np.array(x)) if jax.tree_util.keystr(path) == target else np.asarray(x), tree)


def _first_path(tree) -> str:
    return jax.tree_util.keystr(jax.tree_util.tree_leaves_with_path(tree)[0][0])


def test_seeds_are_checked_as_the_cli_checks_them_and_keys_still_work(tiny, pictures, clean):
    pipe, params = tiny
    for seed in (-1, SEED_LIMIT, 1.5, True, "3", None):
        with pytest.raises(SettingsError, match=r"^seed: expected an integer in 0\.\.4294967295 or a PRNG key"):
            pipe.generate(pictures, params, seed=seed, num_images_per_prompt=2, num_inference_steps=STEPS)
        with pytest.raises(SettingsError, match=r"^prng_seed: expected an integer in 0\.\.4294967295"):
            pipe(pipe.prepare_inputs(pictures), params, seed, num_inference_steps=STEPS)
    same = pipe.generate(pictures, params, seed=jax.random.key(5), num_images_per_prompt=2,
                         num_inference_steps=STEPS, guidance_scale=3.0)
    np.testing.assert_array_equal(same.images, clean.images)
    # The CLI's check is the same one, with the same range.
    with pytest.raises(SystemExit) as exited:
        main(["generate", "x.png", "--seed", str(SEED_LIMIT)])
    assert exited.value.code == 2


def test_one_seed_per_input_gives_each_input_its_own_call_s_pictures(tiny, pictures, clean):
    """The server's way of sharing one call between requests: input i's pictures are a call with seed[i]'s."""
    pipe, params = tiny
    kwargs = dict(num_images_per_prompt=2, num_inference_steps=STEPS, guidance_scale=3.0)
    mixed = pipe.generate(pictures, params, seed=[5, 9], first_index=[0, 2], **kwargs)
    np.testing.assert_array_equal(mixed.images[:2], clean.images[:2])  # input 0 of the clean run, seed 5
    other = pipe.generate(pictures[1:], params, seed=9, first_index=2, **kwargs)
    np.testing.assert_array_equal(mixed.images[2:], other.images)
    assert not np.array_equal(mixed.images[2:], clean.images[2:])
    for seed, pattern in (([5], r"^seed: 1 seeds for 2 inputs"), ([5, -1], r"^seed\[1\]: expected an integer"),
                          ([5, jax.random.key(1)], r"^seed\[1\]: expected an integer"), ((5, 2.0), r"^seed\[1\]")):
        with pytest.raises(SettingsError, match=pattern):
            pipe.generate(pictures, params, seed=seed, **kwargs)


@pytest.mark.parametrize("argument, value, message", [
    ("eta", 1.5, "eta: expected a number in [0, 1]"),
    ("eta", -0.1, "eta: expected a number in [0, 1]"),
    ("guidance_scale", float("nan"), "guidance_scale: expected a finite number"),
    ("guidance_scale", 1e39, "guidance_scale: expected a finite number"),  # inf once in float32
    ("num_inference_steps", MAX_STEPS + 1, f"num_inference_steps: expected at most {MAX_STEPS}"),
    ("num_images_per_prompt", 10**8, f"num_images_per_prompt: expected at most {MAX_PICTURES_PER_DEVICE}"),
    ("height", MAX_SIDE + 8, f"height: expected at most {MAX_SIDE} pixels"),
    ("width", 15, "width: 15 is not a positive multiple of 8"),
    ("callback_steps", 0, "callback_steps: expected a positive integer"),
    ("callback", "print", "callback: expected a callable"),
    ("output_type", "jpeg", "output_type: expected 'np' or 'pil'"),
])
def test_call_arguments_are_named(tiny, pictures, argument, value, message):
    pipe, params = tiny
    pixel_values = pipe.prepare_inputs(pictures)
    with pytest.raises(ValueError) as generated:
        pipe.generate(pictures, params, **{"num_inference_steps": STEPS, argument: value})
    with pytest.raises(ValueError) as called:
        pipe(pixel_values, params, 0, **{"num_inference_steps": STEPS, argument: value})
    for error in (generated.value, called.value):
        assert str(error).startswith(message), str(error)


def test_params_must_hold_every_component_in_the_modules_shapes(tiny, pictures):
    pipe, params = tiny
    pixel_values = pipe.prepare_inputs(pictures)
    for name in ("unet", "vae", "image_encoder", "safety_checker"):
        partial = {k: v for k, v in params.items() if k != name}
        for run in (lambda p: pipe.generate(pictures, p, num_inference_steps=STEPS),
                    lambda p: pipe(pixel_values, p, 0, num_inference_steps=STEPS)):
            with pytest.raises(ValueError, match=rf"^params: missing '{name}'"):
                run(partial)
    with pytest.raises(ValueError, match="^params: expected a dict"):
        pipe.generate(pictures, [params], num_inference_steps=STEPS)

    where = _first_path(params["vae"])
    wrong_shape = {**params, "vae": _with_leaf(params["vae"], where, lambda x: x[..., :1])}
    with pytest.raises(ValueError, match=rf"^params\['vae'\]{re.escape(where)}: expected shape"):
        pipe.generate(pictures, wrong_shape, num_inference_steps=STEPS)
    not_float = {**params, "unet": _with_leaf(params["unet"], _first_path(params["unet"]),
                                              lambda x: x.astype(np.int32))}
    with pytest.raises(ValueError, match=r"^params\['unet'\].*: expected a float array"):
        pipe(pixel_values, not_float, 0, num_inference_steps=STEPS)
    swapped = {**params, "unet": params["image_encoder"]}
    with pytest.raises(ValueError, match=r"^params\['unet'\]: missing .* \(not params of this pipeline's unet\)"):
        pipe.generate(pictures, swapped, num_inference_steps=STEPS)
    extra = {**params, "vae": {**params["vae"], "extra": {"kernel": np.zeros(3, np.float32)}}}
    with pytest.raises(ValueError, match=r"^params\['vae'\]: unexpected \['extra'\]\['kernel'\]"):
        pipe.generate(pictures, extra, num_inference_steps=STEPS)
    # Replicated params carry the device axis in front of every shape.
    with pytest.raises(ValueError, match=r"^params: jit=True expects params from imvar_jax.replicate"):
        pipe(shard(pixel_values, 2), params, 0, jit=True, num_inference_steps=STEPS)


def test_latents_and_pixel_values_of_the_wrong_shape_are_named(tiny, pictures):
    pipe, params = tiny
    pixel_values = pipe.prepare_inputs(pictures)  # [2, 3, 32, 32]
    good = np.zeros((4, 4, 8, 8), np.float32)  # 2 inputs x 2 variations, 16x16 pictures
    call = dict(num_inference_steps=STEPS, num_images_per_prompt=2)
    for latents in (good[0], good[:3], good[..., :4], good[None], "noise", np.where(good == 0, np.nan, good)):
        with pytest.raises(ValueError, match="^latents: "):
            pipe.generate(pictures, params, latents=latents, **call)
        with pytest.raises(ValueError, match="^latents: "):
            pipe(pixel_values, params, 0, latents=latents, **call)
    for bad in (pixel_values[0], pixel_values[:, :, :16], pixel_values[None], pixel_values[:0]):
        with pytest.raises(ValueError, match="^pixel_values: "):
            pipe(bad, params, 0, **call)
    with pytest.raises(ValueError, match="^pixel_values: contain NaN or infinity"):
        pipe(np.where(pixel_values > 0, np.inf, pixel_values), params, 0, **call)
    with pytest.raises(ValueError, match="^images: "):
        pipe.generate([], params, **call)
    with pytest.raises(ValueError, match="^images: "):
        pipe.generate(np.full((1, 3, 32, 32), np.nan, np.float32), params, **call)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"first_index": -1}, "^first_index: expected an int in 0..4294967295"),
    ({"first_index": True}, "^first_index: expected an int or 2 ints"),
    ({"first_index": [0]}, "^first_index: expected an int or 2 ints"),
    ({"first_index": [0, -3]}, "^first_index: expected an int or 2 ints"),
    ({"first_index": [0.0, 2.0]}, "^first_index: expected an int or 2 ints"),
    ({"first_index": 2**32 - 2}, "^first_index: pictures would be numbered up to 4294967297"),
    ({"slots": 3}, "^slots: 3 cannot hold 4 pictures in equal parts on 8 devices"),
    ({"slots": 0}, "^slots: expected a positive integer"),
    ({"slots": 12}, "^slots: 12 cannot hold"),
    ({"slots": 8 * MAX_PICTURES_PER_DEVICE + 8}, f"^slots: {8 * MAX_PICTURES_PER_DEVICE + 8} is more than"),
    ({"devices": []}, "^devices: expected at least one device"),
    ({"devices": ["cpu:0"]}, "^devices: expected jax devices, got str"),
    ({"devices": jax.local_devices()[:1] * 2}, "^devices: a device is listed more than once"),
])
def test_layout_arguments_are_named(tiny, pictures, kwargs, pattern):
    pipe, params = tiny
    with pytest.raises(ValueError, match=pattern):
        pipe.generate(pictures, params, num_images_per_prompt=2, num_inference_steps=STEPS, **kwargs)


# ----------------------------------------------------------------------
# NaN and inf during sampling
# ----------------------------------------------------------------------

def test_a_picture_that_overflows_is_named_and_the_others_are_kept(tiny, pictures, clean):
    pipe, params = tiny
    pixel_values = pipe.prepare_inputs(pictures)
    pixel_values[1] = 3e38  # finite, but the image encoder overflows on it: input 1's pictures go NaN
    with pytest.raises(NonFiniteError) as caught:
        pipe.generate(pixel_values, params, seed=5, num_images_per_prompt=2, num_inference_steps=STEPS,
                      guidance_scale=3.0)
    error = caught.value
    assert isinstance(error, ValueError) and isinstance(error, imvar_jax.NonFiniteError)
    timestep = int(pipe.scheduler.set_timesteps(STEPS, (1, 8, 8, 4)).timesteps[0])
    assert error.pictures == {2: f"step 0 (timestep {timestep})", 3: f"step 0 (timestep {timestep})"}
    message = str(error)
    assert "\n" not in message
    assert f"pictures 2, 3 at step 0 (timestep {timestep})" in message and "not a fault of the input" in message
    # The finite pictures are the clean run's (picture i's noise depends on (seed, i) only); the bad ones are black.
    images = error.output.images
    np.testing.assert_array_equal(images[:2], clean.images[:2])
    assert not images[2:].any() and np.isfinite(images).all()
    assert len(error.output.nsfw_content_detected) == 4


def test_nan_weights_are_reported_at_the_step_or_in_decoding(tiny, pictures):
    pipe, params = tiny
    nan = lambda x: np.full_like(x, np.nan)  # noqa: E731
    unet_nan = {**params, "unet": _with_leaf(params["unet"], "['conv_in']['kernel']", nan)}
    with pytest.raises(NonFiniteError) as in_loop:
        pipe.generate(pictures, unet_nan, seed=5, num_images_per_prompt=2, num_inference_steps=STEPS,
                      guidance_scale=3.0, first_index=[10, 20])
    assert set(in_loop.value.pictures) == {10, 11, 20, 21}
    assert all(w.startswith("step 0 (timestep ") for w in in_loop.value.pictures.values())
    assert "pictures 10, 11, 20, 21 at step 0" in str(in_loop.value)

    decoder_nan = {**params, "vae": _with_leaf(params["vae"], "['decoder']['conv_out']['kernel']", nan)}
    with pytest.raises(NonFiniteError) as decoding:
        pipe.generate(pictures, decoder_nan, seed=5, num_images_per_prompt=2, num_inference_steps=STEPS,
                      guidance_scale=3.0)
    assert decoding.value.pictures == {0: "decoding", 1: "decoding", 2: "decoding", 3: "decoding"}
    assert "pictures 0, 1, 2, 3 at decoding" in str(decoding.value)


def test_the_sharded_call_reports_global_picture_indices(tiny):
    """``__call__`` with ``jit=True`` runs the same one-picture-per-device program as ``generate`` above."""
    pipe, params = tiny
    pixel_values = pipe.prepare_inputs(np.random.default_rng(1).random((8, 20, 20, 3)))
    pixel_values[5] = -3e38
    with pytest.raises(NonFiniteError) as caught:
        pipe(shard(pixel_values, 8), replicate(params), 0, num_inference_steps=STEPS, guidance_scale=3.0, jit=True,
             first_index=100)
    assert list(caught.value.pictures) == [105]
    assert caught.value.pictures[105].startswith("step 0 (timestep ")
    images = caught.value.output.images
    assert images.shape == (8, 64, 64, 3) and not images[5].any() and images[4].any()  # the tiny model's default


# ----------------------------------------------------------------------
# Memory: refused before anything big runs, with what fits
# ----------------------------------------------------------------------

def _free_per_device(monkeypatch, per_device: int) -> None:
    """Pretend the host has ``per_device`` bytes free for each of the 8 CPU devices."""
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 8 * per_device)


def test_a_call_that_does_not_fit_is_refused_with_what_fits(tiny, pictures, clean, monkeypatch):
    pipe, params = tiny
    run = dict(seed=5, num_images_per_prompt=2, num_inference_steps=STEPS, guidance_scale=3.0)
    _free_per_device(monkeypatch, 1000)
    with pytest.raises(InsufficientMemoryError) as one:
        pipe.generate(pictures, params, **run)  # one picture per device
    assert isinstance(one.value, SettingsError)
    assert re.match(r"^size: 64x64 needs \S+ MiB per device even for one picture per device, but 1000 bytes are "
                    r"free on each CPU device \(host memory shared by 8 CPU devices\); choose a smaller size$",
                    str(one.value)), str(one.value)
    assert one.value.fits == 0 and one.value.available == 1000 and one.value.needed > 1000
    with pytest.raises(InsufficientMemoryError) as two:
        pipe.generate(pictures, params, slots=16, **run)  # two per device
    assert two.value.pictures_per_device == 2 and two.value.needed > one.value.needed

    _free_per_device(monkeypatch, (one.value.needed + two.value.needed) // 2)
    with pytest.raises(InsufficientMemoryError) as between:
        pipe.generate(pictures, params, slots=16, **run)
    assert between.value.fits == 1
    assert re.match(r"^slots: 2 pictures per device at 64x64 need .* per device, but .* is free on each CPU device "
                    r".*; about 1 per device fit at this size", str(between.value)), str(between.value)

    _free_per_device(monkeypatch, two.value.needed)
    padded = pipe.generate(pictures, params, slots=16, **run)
    np.testing.assert_allclose(padded.images, clean.images, atol=1e-4)


def test_cli_refuses_a_size_that_cannot_fit_in_one_line(tmp_path, capsys, monkeypatch):
    from PIL import Image

    picture = tmp_path / "in.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(picture)
    out = tmp_path / "out"
    # A fixed, generous figure makes the outcome the same on any machine: the program needs ~80 GiB per device.
    _free_per_device(monkeypatch, 8 * 2**30)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code = main(["generate", str(picture), "--model", "tiny", "--size", f"{MAX_SIDE}x{MAX_SIDE}", "--out", str(out),
                 "--no-compile-cache", "--steps", "1", "--num-per-image", "1"])
    grown_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / 2**30
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"imvar-jax generate: error: size: {MAX_SIDE}x{MAX_SIDE} needs")
    assert "GiB per device" in errors[0] and "choose a smaller size" in errors[0]
    assert not list(out.rglob("*")), "nothing may be written into --out"
    assert grown_gib < 4, f"the refusal allocated {grown_gib:.1f} GiB"


@pytest.mark.parametrize("option, value, message", [
    ("--size", "1000000x1000000", f"expected at most {MAX_SIDE} pixels a side"),
    ("--num-per-image", "100000000", f"expected at most {MAX_PICTURES_PER_DEVICE}"),
    ("--eta", "1.5", "expected a number in [0, 1]"),
    ("--guidance", "inf", "expected a finite number"),
    ("--seed", "-1", "expected an integer in 0..4294967295"),
])
def test_cli_refuses_absurd_values_up_front(tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as exited:
        main(["generate", str(tmp_path / "x.png"), "--model", "tiny", "--out", str(tmp_path / "out"), option, value])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"imvar-jax generate: error: argument {option}: {message}, got "), err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_too_many_pictures_per_call(tmp_path, capsys):
    code = main(["generate", str(tmp_path / "x.png"), "--model", "tiny", "--out", str(tmp_path / "out"),
                 "--batch-size", "2048", "--num-per-image", "4", "--no-compile-cache"])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines()[-1].startswith("imvar-jax generate: error: batch_size: 2048 inputs x 4")
    assert not (tmp_path / "out").exists()


def test_memory_figures_come_from_the_devices(monkeypatch):
    host = memory.host_available_bytes()
    assert host is not None and host > 0  # Linux: MemAvailable from /proc/meminfo
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 8 * 2**30)
    free = memory.free_per_device(jax.local_devices())
    assert free.bytes == 2**30 and "8 CPU devices" in free.where

    class Accelerator:
        platform, id = "gpu", 3

        def memory_stats(self):
            return {"bytes_limit": 16 * 2**30, "bytes_in_use": 10 * 2**30}

    assert memory.free_per_device([Accelerator()]) == memory.Free(6 * 2**30, "gpu:3")

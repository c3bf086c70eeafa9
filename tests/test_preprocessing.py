"""Input preprocessing against its references: transformers' CLIPImageProcessorPil ("clip"), PyTorch's
bicubic ``interpolate`` as the v2.0 model card uses it ("v2"), and diffusers' ``numpy_to_pil``."""

from __future__ import annotations

import io

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from transformers import CLIPImageProcessorPil

from helpers import assert_close
from imvar_jax.preprocessing import (CLIP_MEAN, CLIP_STD, clip_settings, prepare_inputs, resize_bicubic_torch, to_pil,
                                    to_rgb)

# As the checkpoint's feature_extractor/preprocessor_config.json stores it (old int sizes) ...
OLD_CONFIG = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
              "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN),
              "image_std": list(CLIP_STD), "resample": 3, "size": 224}
# ... and as transformers 5 saves it.
NEW_CONFIG = {**OLD_CONFIG, "crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 224},
              "do_convert_rgb": True, "do_rescale": True, "rescale_factor": 1 / 255,
              "image_processor_type": "CLIPImageProcessor"}

# Portrait, landscape, square, odd, tiny, and a sliver whose long side truncates (int(224 * 97 / 3)).
SIZES = [(30, 20), (20, 31), (224, 224), (97, 251), (7, 5), (3, 97)]


def _rgb(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


def _transformers(images, config=None) -> np.ndarray:
    processor = CLIPImageProcessorPil(**(config or {}))
    return processor(images=images, return_tensors="np")["pixel_values"]


def _torch_v2(pictures: np.ndarray, side: int) -> np.ndarray:
    """The model card's ToTensor -> Resize(bicubic, antialias=False) -> Normalize, on float NHWC in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(pictures.transpose(0, 3, 1, 2)))
    t = F.interpolate(t, size=(side, side), mode="bicubic", align_corners=False, antialias=False)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return ((t - mean) / std).numpy()


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("config", [OLD_CONFIG, NEW_CONFIG, None], ids=["int-sizes", "dict-sizes", "defaults"])
def test_clip_matches_transformers(config):
    pictures = [Image.fromarray(_rgb(h, w, seed=i)) for i, (h, w) in enumerate(SIZES)]
    ours = prepare_inputs(pictures, "clip", feature_extractor_config=config)
    assert ours.dtype == np.float32
    assert_close(ours, _transformers(pictures, config), rel=1e-6, what="clip pixel values")


@pytest.mark.parametrize("config", [
    {"size": {"height": 32, "width": 32}, "do_center_crop": False},
    {"size": 32, "crop_size": 32, "do_normalize": False},
    {"size": 40, "crop_size": 32, "do_rescale": False, "resample": 2},
    {"size": 20, "crop_size": 32},  # crop larger than the resized picture: zero padding
    {"size": 36, "crop_size": 32, "image_mean": 0.5, "image_std": 0.25, "rescale_factor": 0.5 / 255},
], ids=["exact-resize-no-crop", "no-normalize", "no-rescale-bilinear", "pad", "scalar-mean-std"])
def test_clip_config_flags_match_transformers(config):
    pictures = [Image.fromarray(_rgb(h, w, seed=i)) for i, (h, w) in enumerate([(30, 20), (17, 45)])]
    ours = prepare_inputs(pictures, "clip", feature_extractor_config=config)
    assert ours.shape == (2, 3, 32, 32)
    assert_close(ours, _transformers(pictures, config).astype(np.float32), rel=1e-6, what=str(config))


def test_clip_without_resize_matches_transformers():
    crop_only = {"do_resize": False, "crop_size": 16}
    pictures = [Image.fromarray(_rgb(h, w, seed=i)) for i, (h, w) in enumerate([(30, 20), (17, 45), (9, 12)])]
    assert_close(prepare_inputs(pictures, "clip", feature_extractor_config=crop_only),
                 _transformers(pictures, crop_only), rel=1e-6, what="crop only")
    neither = {"do_resize": False, "do_center_crop": False}
    picture = Image.fromarray(_rgb(24, 24))
    assert_close(prepare_inputs(picture, "clip", size=24, feature_extractor_config=neither),
                 _transformers(picture, neither), rel=1e-6, what="neither resize nor crop")
    with pytest.raises(ValueError, match=r"^images\[0\]: came out 24x24 after preprocessing, expected 32x32"):
        prepare_inputs(picture, "clip", size=32, feature_extractor_config=neither)


def test_clip_without_convert_rgb_needs_rgb():
    config = {**NEW_CONFIG, "do_convert_rgb": False}
    picture = Image.fromarray(_rgb(30, 20))
    assert_close(prepare_inputs(picture, "clip", feature_extractor_config=config),
                 _transformers(picture, config), rel=1e-6, what="do_convert_rgb false")
    with pytest.raises(ValueError, match=r"^images\[0\]: mode L .*do_convert_rgb"):
        prepare_inputs(picture.convert("L"), "clip", feature_extractor_config=config)


@pytest.mark.parametrize("hw,side", [((384, 512), 224), ((100, 150), 224), ((30, 300), 64), ((7, 5), 16),
                                     ((1, 1), 8), ((64, 64), 64)],
                         ids=["down", "up", "mixed", "tiny", "one-pixel", "same-size"])
def test_v2_matches_torch_interpolate(hw, side):
    pixels = _rgb(*hw, seed=3)
    floats = pixels.astype(np.float32) / 255  # torchvision's ToTensor
    ref = _torch_v2(floats[None], side)
    # Tolerance: float32 rounding of the weighted sums, magnified by 1/std (about 4).
    assert _max_abs(prepare_inputs(pixels, "v2", size=side), ref) <= 1e-5
    assert _max_abs(prepare_inputs(Image.fromarray(pixels), "v2", size=side), ref) <= 1e-5
    # Bicubic overshoots: values outside [0, 1] are kept, as torch keeps them.
    assert _max_abs(prepare_inputs(floats, "v2", size=side), ref) <= 1e-5


def _torch_resize(x: np.ndarray, out: tuple[int, int]) -> np.ndarray:
    return F.interpolate(torch.from_numpy(x)[None], size=out, mode="bicubic", align_corners=False,
                         antialias=False)[0].numpy()


# Measured (torch 2.13 CPU): at most 9.5e-7 over the shapes below and 1.2e-6 over 160 random ones, i.e.
# float32 rounding of PyTorch's 16-tap sums (ours are float64, rounded once). 3e-6 leaves 2.5x. For scale,
# on 8-bit pictures: the source coordinate in float64 instead of PyTorch's float32 is off by 3e-4 at
# 4000x3000, and float32 without the fused multiply-add by 1.3e-5 at 513x771 / 8e-6 at 97x251.
RESIZE_TOLERANCE = 3e-6


@pytest.mark.parametrize("hw,out", [((40, 30), (224, 224)), ((500, 375), (224, 224)), ((1, 7), (224, 224)),
                                    ((3, 1000), (224, 224)), ((300, 200), (16, 24)), ((17, 13), (5, 3)),
                                    ((1512, 2016), (224, 224)), ((224, 224), (224, 224)),
                                    ((4000, 3000), (224, 224)), ((1008, 756), (224, 224)), ((513, 771), (224, 224)),
                                    ((97, 251), (224, 224)), ((7, 1), (5, 9)), ((1, 1), (8, 8)), ((2, 2), (1, 1))],
                         ids=lambda v: "x".join(map(str, v)))
def test_host_resize_is_torch_bicubic(hw, out):
    x = np.random.default_rng(1).random((3, *hw)).astype(np.float32)
    got = resize_bicubic_torch(x, *out)
    assert got.dtype == np.float32
    assert _max_abs(got, _torch_resize(x, out)) <= RESIZE_TOLERANCE


def test_host_resize_matches_torch_on_random_shapes():
    rng = np.random.default_rng(2)
    for _ in range(30):
        h, w, out_h, out_w = (int(v) for v in rng.integers(1, 300, 4))
        x = rng.random((3, h, w), dtype=np.float32)
        assert _max_abs(resize_bicubic_torch(x, out_h, out_w), _torch_resize(x, (out_h, out_w))) <= RESIZE_TOLERANCE, \
            (h, w, out_h, out_w)


def test_each_picture_is_converted_to_rgb_once(monkeypatch):
    import imvar_jax.preprocessing as preprocessing

    rgb = Image.fromarray(_rgb(20, 30, seed=5))
    assert to_rgb(rgb) is rgb  # plain RGB, no orientation, no transparency: nothing to do
    calls = []
    real = Image.Image.convert
    monkeypatch.setattr(Image.Image, "convert", lambda self, *a, **k: calls.append(a) or real(self, *a, **k))
    converted = to_rgb(Image.fromarray(_rgb(20, 30, seed=6)).convert("P"))
    calls.clear()
    for preprocessing_name in ("v2", "clip"):
        preprocessing.prepare_inputs([converted], preprocessing_name)
    assert calls == [], "prepare_inputs converted an RGB picture again"
    # Pictures that do need converting are converted once each, by one to_rgb call each.
    to_rgb_calls = []
    real_to_rgb = preprocessing.to_rgb
    monkeypatch.setattr(preprocessing, "to_rgb",
                        lambda image, **k: to_rgb_calls.append(image) or real_to_rgb(image, **k))
    pictures = [Image.fromarray(_rgb(20 + i, 30, seed=i)).convert(mode) for i, mode in enumerate(["P", "L", "CMYK"])]
    for preprocessing_name in ("v2", "clip"):
        calls.clear()
        to_rgb_calls.clear()
        preprocessing.prepare_inputs(pictures, preprocessing_name)
        assert calls == [("RGB",)] * 3, preprocessing_name
        assert [id(p) for p in to_rgb_calls] == [id(p) for p in pictures], preprocessing_name
    # A uint8 RGB array goes to floats directly for "v2": no PIL picture, no conversion.
    calls.clear()
    to_rgb_calls.clear()
    preprocessing.prepare_inputs(_rgb(20, 30), "v2", size=32)
    assert calls == [] and to_rgb_calls == []


@pytest.mark.parametrize("preprocessing", ["clip", "v2"])
def test_every_input_form_gives_the_same_pixels(preprocessing):
    side = 32
    config = {**NEW_CONFIG, "size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}}
    a, b = _rgb(20, 30, seed=1), _rgb(20, 30, seed=2)
    fa, fb = a.astype(np.float32) / 255, b.astype(np.float32) / 255

    def run(images):
        return prepare_inputs(images, preprocessing, size=side, feature_extractor_config=config)

    expected = np.concatenate([run(Image.fromarray(a)), run(Image.fromarray(b))])
    forms = {
        "PIL list": [Image.fromarray(a), Image.fromarray(b)],
        "PIL tuple": (Image.fromarray(a), Image.fromarray(b)),
        "uint8 NHWC": np.stack([a, b]),
        "uint8 HWC list": [a, b],
        "float NHWC": np.stack([fa, fb]),
        "float64 HWC list": [fa.astype(np.float64), fb.astype(np.float64)],
        "mixed list": [Image.fromarray(a), fb[None]],
        "jax array": jnp.asarray(np.stack([fa, fb])),
    }
    for name, images in forms.items():
        assert _max_abs(run(images), expected) <= 1e-6, name
    # Already-prepared pixel values pass through untouched, with a batch axis added when missing.
    assert np.array_equal(run(expected), expected)
    assert np.array_equal(run(expected[0].astype(np.float64)), expected[:1])
    # Gray and RGBA arrays read like the PIL pictures of the same modes.
    gray = a[..., :1]
    assert _max_abs(run(gray), run(Image.fromarray(gray[..., 0]))) <= 1e-6
    rgba = _rgb(20, 30, seed=4, channels=4)
    assert _max_abs(run(rgba), run(Image.fromarray(rgba))) <= 1e-6


def _mode_pictures() -> dict[str, Image.Image]:
    rgb = Image.fromarray(_rgb(14, 10, seed=5))
    rgba = Image.fromarray(_rgb(14, 10, seed=6, channels=4))
    transparent_p = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent_p.info["transparency"] = 3
    return {"RGBA": rgba, "LA": rgba.convert("LA"), "P": rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
            "P-transparency": transparent_p, "CMYK": rgb.convert("CMYK"), "L": rgb.convert("L"),
            "1": rgb.convert("1"), "F": rgb.convert("F")}


@pytest.mark.parametrize("mode", list(_mode_pictures()))
def test_modes_match_transformers(mode):
    picture = _mode_pictures()[mode]
    config = {**NEW_CONFIG, "size": {"shortest_edge": 16}, "crop_size": {"height": 16, "width": 16}}
    assert_close(prepare_inputs(picture, "clip", feature_extractor_config=config),
                 _transformers(picture, config), rel=1e-6, what=mode)
    # "v2" reads the same RGB picture.
    rgb = np.asarray(to_rgb(picture)).astype(np.float32) / 255
    assert _max_abs(prepare_inputs(picture, "v2", size=16), _torch_v2(rgb[None], 16)) <= 1e-5


def test_alpha_is_composited_onto_white():
    rgba = _rgb(6, 5, seed=7, channels=4)
    alpha = rgba[..., 3:].astype(np.float64) / 255
    expected = alpha * rgba[..., :3] + (1 - alpha) * 255
    got = np.asarray(to_rgb(Image.fromarray(rgba))).astype(np.float64)
    assert np.max(np.abs(got - expected)) <= 1.0


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_is_scaled_not_clipped(mode):
    values16 = np.linspace(0, 65535, 20 * 13).reshape(20, 13)
    values8 = values16 * 255 / 65535
    stored = {"I;16": "<u2", "I;16B": ">u2", "I": "<i4"}[mode]
    picture = Image.frombytes(mode, (13, 20), np.round(values16).astype(stored).tobytes())
    got = np.asarray(to_rgb(picture)).astype(np.float64)
    assert np.max(np.abs(got - values8[..., None])) <= 1.0
    # The whole pipeline sees the 8-bit picture of the same gradient.
    exact8 = Image.fromarray(np.round(values8).astype(np.uint8))
    assert _max_abs(prepare_inputs(picture, "clip"), prepare_inputs(exact8, "clip")) <= 1e-6


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    Image.fromarray(_rgb(12, 20, seed=8)).save(buffer, format="JPEG", exif=exif.tobytes())
    stored = Image.open(io.BytesIO(buffer.getvalue()))
    decoded = np.asarray(stored)  # [12, 20, 3], as stored, before orientation
    upright = Image.fromarray(decoded).transpose(Image.Transpose.ROTATE_270)
    assert upright.size == (12, 20)
    for preprocessing in ("clip", "v2"):
        ours = prepare_inputs(Image.open(io.BytesIO(buffer.getvalue())), preprocessing, size=16)
        assert np.array_equal(ours, prepare_inputs(upright, preprocessing, size=16)), preprocessing
        assert not np.allclose(ours, prepare_inputs(Image.fromarray(decoded), preprocessing, size=16))


def test_to_pil_matches_diffusers():
    # Values on the .5 rounding boundaries as well as random ones.
    images = np.random.default_rng(9).random((2, 5, 7, 3)).astype(np.float32)
    images[0, 0, :, 0] = (np.arange(7) + 0.5) / 255
    ours = to_pil(images)
    ref = VaeImageProcessor.numpy_to_pil(images)
    assert len(ours) == 2
    for a, b in zip(ours, ref):
        assert a.mode == b.mode == "RGB"
        assert np.array_equal(np.asarray(a), np.asarray(b))
    gray = to_pil(images[0, ..., :1])
    assert gray[0].mode == "L"
    assert np.array_equal(np.asarray(gray[0]), np.asarray(VaeImageProcessor.numpy_to_pil(images[0, ..., :1])[0]))


def test_clip_settings_read_both_config_styles():
    assert clip_settings(OLD_CONFIG) == clip_settings(NEW_CONFIG) == clip_settings(None)
    assert clip_settings(None, size=336).output_size == (336, 336)
    assert clip_settings({"size": 64, "crop_size": 48}, size=224).output_size == (48, 48)


def _bad_cases():
    f32 = np.float32
    nan_picture = np.full((8, 8, 3), 0.5, f32)
    nan_picture[0, 0, 0] = np.nan
    nan_pixels = np.zeros((1, 3, 224, 224), f32)
    nan_pixels[0, 0, 0, 0] = np.nan
    return [
        # (images, kwargs, error, message start)
        (np.zeros((8, 8, 3), np.uint8), {"preprocessing": "resize"}, ValueError, r"preprocessing: unknown"),
        (np.zeros((8, 8, 3), np.uint8), {"size": 0}, ValueError, r"size: expected a positive integer"),
        ([], {}, ValueError, r"images: empty list"),
        (np.zeros((0, 8, 8, 3), np.uint8), {}, ValueError, r"images: empty batch"),
        (np.zeros((0, 8, 3), np.uint8), {}, ValueError, r"images: zero-size"),
        (Image.new("RGB", (0, 5)), {}, ValueError, r"images\[0\]: zero-size"),
        (np.zeros((8, 8), np.uint8), {}, ValueError, r"images: expected an HWC/NHWC"),
        (np.zeros((1, 1, 8, 8, 3), np.uint8), {}, ValueError, r"images: expected an HWC/NHWC"),
        (np.zeros((8, 8, 2), np.uint8), {}, ValueError, r"images: cannot read shape"),
        (np.zeros((8, 8, 3), np.int64), {}, TypeError, r"images: expected uint8"),
        (np.zeros((8, 8, 3), bool), {}, TypeError, r"images: expected uint8"),
        (nan_picture, {}, ValueError, r"images: float pictures contain NaN"),
        (np.full((8, 8, 3), 1.5, f32), {}, ValueError, r"images: float pictures must lie in \[0, 1\]"),
        ([np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), -1.0, f32)], {}, ValueError, r"images\[1\]: float"),
        (np.zeros((2, 3, 32, 32), f32), {}, ValueError,
         r"images: pixel values of shape \(2, 3, 32, 32\) do not match the expected \[N, 3, 224, 224\]"),
        (np.zeros((1, 3, 224, 224), f32), {"preprocessing": "v2", "size": 64}, ValueError,
         r"images: pixel values of shape"),
        (np.zeros((1, 3, 224, 224), np.uint8), {}, TypeError, r"images: pixel values .* must be float"),
        (nan_pixels, {}, ValueError, r"images: pixel values contain NaN"),
        ([np.zeros((3, 224, 224), f32)], {}, ValueError, r"images\[0\]: pixel values cannot be mixed"),
        (np.zeros((3, 4, 4), f32), {"preprocessing": "v2", "size": 4}, ValueError, r"images: shape .* could be"),
        ("picture.png", {}, TypeError, r"images: expected a PIL image"),
        ([Image.new("RGB", (8, 8)), "x"], {}, TypeError, r"images\[1\]: expected a PIL image"),
        (Image.new("RGB", (8, 8)), {"feature_extractor_config": {"size": "big"}}, ValueError,
         r"feature_extractor_config: size must be"),
        (Image.new("RGB", (8, 8)), {"feature_extractor_config": {"size": {"shortest_edge": 8, "longest_edge": 9}}},
         ValueError, r"feature_extractor_config: size must be"),
        (Image.new("RGB", (8, 8)), {"feature_extractor_config": {"crop_size": {"height": 10, "width": 12}}},
         ValueError, r"feature_extractor_config: pictures would come out 10x12"),
        (Image.new("RGB", (8, 8)), {"feature_extractor_config": {"do_resize": "yes"}}, ValueError,
         r"feature_extractor_config: do_resize must be true or false"),
        (Image.new("RGB", (8, 8)), {"feature_extractor_config": {"image_std": [0.0, 1.0, 1.0]}}, ValueError,
         r"feature_extractor_config: image_std must not contain 0"),
        (Image.new("RGB", (8, 8)), {"feature_extractor_config": {"image_mean": [0.5, 0.5]}}, ValueError,
         r"feature_extractor_config: image_mean must be"),
        (Image.new("RGB", (8, 8)), {"feature_extractor_config": {"resample": 9}}, ValueError,
         r"feature_extractor_config: resample must be"),
        (Image.new("RGB", (8, 8)), {"feature_extractor_config": [("size", 8)]}, TypeError,
         r"feature_extractor_config: expected a mapping"),
        (Image.new("RGB", (12, 8)), {"feature_extractor_config": {"size": 8, "do_center_crop": False}}, ValueError,
         r"images\[0\]: came out 8x12 after preprocessing, expected 8x8"),
        (Image.fromarray(np.full((4, 4), 70000, np.int32)), {}, ValueError,
         r"images\[0\]: a mode I picture holds values"),
    ]


@pytest.mark.parametrize("images,kwargs,error,message", _bad_cases())
def test_bad_inputs_raise_naming_the_argument(images, kwargs, error, message):
    kwargs = dict(kwargs)
    preprocessing = kwargs.pop("preprocessing", "clip")
    with pytest.raises(error, match="^" + message):
        prepare_inputs(images, preprocessing, **kwargs)


@pytest.mark.parametrize("images,error,message", [
    (np.zeros((2, 4, 4, 3), np.uint8), TypeError, r"images: expected float pictures"),
    (np.zeros((2, 4, 4, 2), np.float32), ValueError, r"images: expected \[N, H, W, 3\]"),
    (np.zeros((0, 4, 4, 3), np.float32), ValueError, r"images: expected \[N, H, W, 3\]"),
    (np.full((1, 4, 4, 3), 1.01, np.float32), ValueError, r"images: pictures must lie in \[0, 1\]"),
    (np.full((1, 4, 4, 3), np.nan, np.float32), ValueError, r"images: pictures must lie in \[0, 1\] without NaN"),
])
def test_to_pil_bad_inputs(images, error, message):
    with pytest.raises(error, match="^" + message):
        to_pil(images)

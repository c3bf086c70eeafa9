"""Pictures in, CLIP pixel values out (and generated pictures back to PIL).

Two recipes, both ending in float32 ``[N, 3, S, S]``:

- ``"clip"``: what the checkpoint's ``feature_extractor/preprocessor_config.json`` asks for, i.e.
  transformers' ``CLIPImageProcessor`` (PIL backend): RGB, shortest edge to ``size`` with PIL's
  resampling, center crop, ``* rescale_factor``, ``(x - mean) / std``. Same PIL operations, so the
  same numbers as transformers.
- ``"v2"``: the v2.0 model card's recommendation, which the model was fine-tuned with: ``x / 255``,
  the whole picture squashed to ``S x S`` with PyTorch's bicubic (a = -0.75, no antialiasing, no
  crop), then CLIP's mean/std.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from PIL import ExifTags, Image, ImageOps

from .errors import ConfigError
from .models.config import short_repr as _short

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSINGS = ("clip", "v2")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_PIL_RESAMPLES = range(6)  # NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING
_TURNING_ORIENTATIONS = range(2, 9)  # the EXIF orientations ImageOps.exif_transpose acts on
# CLIP encoders take 224..336-pixel sides; the bound keeps a hostile config from sizing a resize
# or crop of every picture beyond memory.
MAX_CONFIG_SIDE = 8192


@dataclass(frozen=True)
class ClipSettings:
    """A ``preprocessor_config.json`` read into what ``"clip"`` preprocessing does.

    ``shortest_edge`` and ``resize_to`` (``(height, width)``) are exclusive ways to resize;
    ``default_size`` is the side pictures must already have when neither resizing nor cropping fixes it.
    """

    do_convert_rgb: bool
    do_resize: bool
    shortest_edge: int | None
    resize_to: tuple[int, int] | None
    resample: int
    do_center_crop: bool
    crop_size: tuple[int, int]
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    default_size: int

    @property
    def output_size(self) -> tuple[int, int]:
        """``(height, width)`` every picture must come out as (the last step that fixes it decides)."""
        if self.do_center_crop:
            return self.crop_size
        if self.do_resize:
            return self.resize_to or (self.shortest_edge, self.shortest_edge)
        return (self.default_size, self.default_size)


def _config_flag(config: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {_short(value)}")
    return value


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{what}: expected a positive integer, got {value!r}")
    return int(value)


def _config_side(value: Any, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 < value <= MAX_CONFIG_SIDE:
        raise ConfigError(f"{where}: {key} must be an integer in [1, {MAX_CONFIG_SIDE}], got {_short(value)}")
    return int(value)


def _height_width(value: Any, where: str, key: str) -> tuple[int, int] | None:
    """``{"height": h, "width": w}`` or ``[h, w]`` -> ``(h, w)``; None if ``value`` is neither."""
    if isinstance(value, Mapping) and {k for k, v in value.items() if v is not None} == {"height", "width"}:
        return (_config_side(value["height"], where, f"{key}.height"),
                _config_side(value["width"], where, f"{key}.width"))
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return _config_side(value[0], where, f"{key}[0]"), _config_side(value[1], where, f"{key}[1]")
    return None


def _is_number(value: Any) -> bool:
    # JSON's true is an int in Python; a flag must not pass for a number.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _per_channel(config: Mapping[str, Any], key: str, default: tuple[float, ...],
                 where: str) -> tuple[float, float, float]:
    value = config.get(key, default)
    values = [value] * 3 if _is_number(value) else value
    if not isinstance(values, (list, tuple)) or len(values) != 3 or not all(_is_number(v) for v in values):
        raise ConfigError(f"{where}: {key} must be a finite number or 3 finite numbers, got {_short(value)}")
    return float(values[0]), float(values[1]), float(values[2])


def clip_settings(feature_extractor_config: Mapping[str, Any] | None = None, size: int = 224, *,
                  where: str = "feature_extractor_config") -> ClipSettings:
    """Read a ``preprocessor_config.json`` dict; keys it lacks take CLIP's defaults at ``size``.

    ``size``/``crop_size`` may be ints (old ``CLIPFeatureExtractor`` saves: an int ``size`` is the
    shortest edge) or dicts (``{"shortest_edge": n}`` or ``{"height": h, "width": w}``). A bad value
    raises ``ConfigError`` naming ``where`` (the config, or the file it was read from) and the key.
    """
    size = _positive_int(size, "size")
    config = feature_extractor_config or {}
    if not isinstance(config, Mapping):
        raise TypeError(f"{where}: expected a mapping, got {type(config).__name__}")

    raw_size = config.get("size", size)
    shortest_edge, resize_to = None, None
    if isinstance(raw_size, Mapping) and {k for k, v in raw_size.items() if v is not None} == {"shortest_edge"}:
        shortest_edge = _config_side(raw_size["shortest_edge"], where, "size.shortest_edge")
    elif isinstance(raw_size, (int, np.integer)) and not isinstance(raw_size, bool):
        shortest_edge = _config_side(raw_size, where, "size")
    else:
        resize_to = _height_width(raw_size, where, "size")
        if resize_to is None:
            raise ConfigError(f"{where}: size must be an int, {{'shortest_edge': n}} or {{'height': h, 'width': w}}, "
                              f"got {_short(raw_size)}")

    raw_crop = config.get("crop_size", size)
    if isinstance(raw_crop, (int, np.integer)) and not isinstance(raw_crop, bool):
        crop = _config_side(raw_crop, where, "crop_size")
        crop_size = (crop, crop)
    else:
        crop_size = _height_width(raw_crop, where, "crop_size")
        if crop_size is None:
            raise ConfigError(f"{where}: crop_size must be an int or {{'height': h, 'width': w}}, "
                              f"got {_short(raw_crop)}")

    resample = config.get("resample", Image.Resampling.BICUBIC)
    if isinstance(resample, bool) or not isinstance(resample, (int, np.integer)) or resample not in _PIL_RESAMPLES:
        raise ConfigError(f"{where}: resample must be a PIL filter number 0..5, got {_short(resample)}")
    rescale_factor = config.get("rescale_factor", 1 / 255)
    if not _is_number(rescale_factor) or rescale_factor <= 0:
        raise ConfigError(f"{where}: rescale_factor must be a finite number > 0, got {_short(rescale_factor)}")
    image_std = _per_channel(config, "image_std", CLIP_STD, where)
    if 0.0 in image_std:
        raise ConfigError(f"{where}: image_std must not contain 0, got {list(image_std)}")

    settings = ClipSettings(
        do_convert_rgb=_config_flag(config, "do_convert_rgb", True, where),
        do_resize=_config_flag(config, "do_resize", True, where),
        shortest_edge=shortest_edge,
        resize_to=resize_to,
        resample=int(resample),
        do_center_crop=_config_flag(config, "do_center_crop", True, where),
        crop_size=crop_size,
        do_rescale=_config_flag(config, "do_rescale", True, where),
        rescale_factor=float(rescale_factor),
        do_normalize=_config_flag(config, "do_normalize", True, where),
        image_mean=_per_channel(config, "image_mean", CLIP_MEAN, where),
        image_std=image_std,
        default_size=size,
    )
    if settings.output_size[0] != settings.output_size[1]:
        raise ConfigError(f"{where}: pictures would come out {settings.output_size[0]}x{settings.output_size[1]} "
                          "(crop_size/size); the CLIP encoder takes square ones")
    return settings


def to_rgb(image: Image.Image, *, name: str = "image") -> Image.Image:
    """EXIF orientation applied, then an 8-bit RGB picture, transparency composited onto white.

    White compositing is what transformers 5's ``convert_to_rgb`` does (older releases dropped the
    alpha channel), so ``"clip"`` stays equal to the PyTorch pipeline. Where this differs from
    transformers, on purpose: EXIF orientation (diffusers' ``load_image`` applies it, the processor
    does not); 16-bit grayscale (``I;16*``, and ``I``, which is taken to hold 0..65535) is scaled by
    1/257 instead of clipped at 255; an RGBA palette counts as transparency, ``LAB`` does not.
    ``F`` is read on Pillow's 0..255 scale. ``name`` is how errors refer to the picture.
    """
    image = _upright(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _sixteen_to_eight_bit(image, name)
    has_alpha = (image.mode in _ALPHA_MODES or image.info.get("transparency") is not None
                 or (image.mode == "P" and image.palette is not None and image.palette.mode.endswith("A")))
    if image.mode == "RGB" and not has_alpha:
        # convert("RGB") would only copy it; returning it as it is lets a caller convert once and
        # pass the result on (prepare_inputs runs to_rgb again) without decoding or copying twice.
        return image
    try:
        if has_alpha:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")
    except ValueError as err:
        raise ValueError(f"{name}: cannot convert a picture of mode {image.mode} to RGB ({err})") from None


def _upright(image: Image.Image) -> Image.Image:
    """``ImageOps.exif_transpose``, except that a picture needing no turn is returned as it is, not copied."""
    image.load()  # as exif_transpose does first: some formats (PNG's eXIf chunk) only read EXIF on load
    if image.getexif().get(ExifTags.Base.Orientation, 1) in _TURNING_ORIENTATIONS:
        return ImageOps.exif_transpose(image)
    return image


def _sixteen_to_eight_bit(image: Image.Image, name: str) -> Image.Image:
    # Pillow's own convert("L"/"RGB") clips 16-bit values at 255, which turns a 16-bit photo white;
    # v * 255 / 65535 = v / 257 maps the full range instead.
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(f"{name}: a mode {image.mode} picture holds values outside 0..65535 "
                         f"([{values.min()}, {values.max()}]); only 16-bit grayscale is supported")
    gray = np.round(values / 257.0).astype(np.uint8)
    key = image.info.get("transparency")
    if isinstance(key, int):
        gray[values == key] = 255  # fully transparent pixels composited onto white
    return Image.fromarray(gray)


def _array_pictures(arr: np.ndarray, where: str) -> list[np.ndarray]:
    """Checked HWC pictures from an HWC or NHWC array (uint8 0..255 or float 0..1)."""
    pictures = [arr] if arr.ndim == 3 else list(arr)
    if arr.ndim == 4 and not pictures:
        raise ValueError(f"{where}: empty batch of shape {arr.shape}")
    if arr.shape[-3] == 0 or arr.shape[-2] == 0:
        raise ValueError(f"{where}: zero-size picture(s) of shape {arr.shape}")
    if arr.dtype != np.uint8:
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{where}: float pictures contain NaN or infinity")
        low, high = float(arr.min()), float(arr.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(f"{where}: float pictures must lie in [0, 1], got [{low:.4g}, {high:.4g}] "
                             "(pass uint8 for 0..255)")
    return pictures


def _split_array(arr: np.ndarray, where: str, side: int) -> np.ndarray | list[np.ndarray]:
    """Pixel values ``[N, 3, S, S]`` (returned float32) or a list of HWC pictures, by the layout rule."""
    if arr.dtype == np.bool_ or not (arr.dtype == np.uint8 or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"{where}: expected uint8 (0..255) or float (0..1) values, got dtype {arr.dtype}")
    if arr.ndim not in (3, 4):
        raise ValueError(f"{where}: expected an HWC/NHWC picture array or [N, 3, {side}, {side}] pixel values, "
                         f"got shape {arr.shape}")
    channels_last = arr.shape[-1] in (1, 3, 4)
    pixel_values = arr.shape[-3:] == (3, side, side)
    if channels_last and pixel_values:
        raise ValueError(f"{where}: shape {arr.shape} could be HWC pictures or pixel values; pass a PIL image "
                         "or a list of pictures instead")
    if channels_last:
        return _array_pictures(arr, where)
    if arr.shape[-3] != 3:
        raise ValueError(f"{where}: cannot read shape {arr.shape}: pictures need a trailing channel axis of 1, "
                         f"3 or 4 (HWC/NHWC), pixel values the shape [N, 3, {side}, {side}]")
    if not pixel_values:
        raise ValueError(f"{where}: pixel values of shape {arr.shape} do not match the expected "
                         f"[N, 3, {side}, {side}]")
    if arr.dtype == np.uint8:
        raise TypeError(f"{where}: pixel values [N, 3, {side}, {side}] must be float, got uint8")
    if arr.ndim == 4 and arr.shape[0] == 0:
        raise ValueError(f"{where}: empty batch of shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{where}: pixel values contain NaN or infinity")
    return arr.astype(np.float32).reshape(-1, 3, side, side)  # [N, 3, S, S]


def _as_array(value: Any, where: str) -> np.ndarray:
    if isinstance(value, np.ndarray) or hasattr(value, "__array__"):
        return np.asarray(value)
    raise TypeError(f"{where}: expected a PIL image, a numpy array or a list of them, got {type(value).__name__}")


def _collect(images: Any, side: int) -> np.ndarray | list[Image.Image | np.ndarray]:
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images: empty list")
        pictures: list[Image.Image | np.ndarray] = []
        for i, item in enumerate(images):
            if isinstance(item, Image.Image):
                pictures.append(item)
                continue
            split = _split_array(_as_array(item, f"images[{i}]"), f"images[{i}]", side)
            if isinstance(split, np.ndarray):
                raise ValueError(f"images[{i}]: pixel values cannot be mixed into a list; pass them as one array")
            pictures.extend(split)
        return pictures
    return _split_array(_as_array(images, "images"), "images", side)


def _float_to_uint8(picture: np.ndarray) -> np.ndarray:
    return np.round(picture.astype(np.float32) * 255).astype(np.uint8)


def _array_to_pil(picture: np.ndarray) -> Image.Image:
    """HWC uint8 with 1, 3 or 4 channels -> an ``L``/``RGB``/``RGBA`` PIL image."""
    return Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture)


def _center_crop(picture: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crop ``[H, W, C]`` around its centre, zero-padding first where it is smaller (as transformers does)."""
    h, w = picture.shape[:2]
    if h < height or w < width:
        padded = np.zeros((max(h, height), max(w, width), picture.shape[2]), picture.dtype)
        top, left = (padded.shape[0] - h + 1) // 2, (padded.shape[1] - w + 1) // 2
        padded[top:top + h, left:left + w] = picture
        picture, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = (h - height) // 2, (w - width) // 2
    return picture[top:top + height, left:left + width]


def _clip_one(picture: Image.Image | np.ndarray, s: ClipSettings, where: str) -> np.ndarray:
    """One picture -> float32 ``[3, H, W]`` through the CLIP image processor's steps."""
    if isinstance(picture, np.ndarray):
        # PIL resamples 8-bit pictures; rounding keeps a float picture equal to its uint8 twin.
        picture = _array_to_pil(picture if picture.dtype == np.uint8 else _float_to_uint8(picture))
    if picture.width == 0 or picture.height == 0:
        raise ValueError(f"{where}: zero-size picture ({picture.width}x{picture.height})")
    if s.do_convert_rgb:
        picture = to_rgb(picture, name=where)
    else:
        picture = _upright(picture)
        if picture.mode != "RGB":
            raise ValueError(f"{where}: mode {picture.mode} picture, but feature_extractor_config has "
                             "do_convert_rgb false; pass RGB pictures")
    if s.do_resize:
        if s.resize_to is not None:
            height, width = s.resize_to
        else:
            # int() truncation and the product before the division, as transformers computes it.
            w, h = picture.size
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(s.shortest_edge * long / short)
            height, width = (new_long, s.shortest_edge) if w <= h else (s.shortest_edge, new_long)
        picture = picture.resize((width, height), resample=s.resample)
    pixels = np.asarray(picture)  # [H, W, 3] uint8
    if s.do_center_crop:
        pixels = _center_crop(pixels, *s.crop_size)
    # Rescaling in float64 then rounding to float32 reproduces transformers bit for bit.
    x = (pixels.astype(np.float64) * s.rescale_factor).astype(np.float32) if s.do_rescale \
        else pixels.astype(np.float32)
    if s.do_normalize:
        x = (x - np.asarray(s.image_mean, np.float32)) / np.asarray(s.image_std, np.float32)
    return x.transpose(2, 0, 1)  # [3, H, W]


def _float_rgb(picture: Image.Image | np.ndarray, where: str) -> np.ndarray:
    """float32 ``[H, W, 3]`` in [0, 1], as torchvision's ``ToTensor`` sees the picture."""
    if isinstance(picture, np.ndarray) and picture.dtype == np.uint8:
        if picture.shape[-1] in (1, 3):
            # The values PIL's L/RGB -> RGB conversion would give, without building a PIL picture. RGBA
            # goes through PIL: its white compositing rounds to 8 bits, as for an RGBA PIL picture.
            return np.broadcast_to(picture, picture.shape[:2] + (3,)).astype(np.float32) / 255
        picture = _array_to_pil(picture)
    if isinstance(picture, Image.Image):
        if picture.width == 0 or picture.height == 0:
            raise ValueError(f"{where}: zero-size picture ({picture.width}x{picture.height})")
        return np.asarray(to_rgb(picture, name=where)).astype(np.float32) / 255
    x = picture.astype(np.float32)
    if x.shape[-1] == 1:
        return np.repeat(x, 3, axis=-1)
    if x.shape[-1] == 4:
        alpha = x[..., 3:]
        return x[..., :3] * alpha + (1 - alpha)  # onto white, like to_rgb
    return x


def _bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """float64 ``[size_out, size_in]``: row ``i`` holds the weight output pixel ``i`` gives each input pixel,
    along one axis, by the conventions of ATen's ``upsample_bicubic2d`` (align_corners=False, no scale)."""
    # ATen computes the source coordinate in the tensor's opmath type, float32 for float32 pictures:
    # scale = float(in) / out, real = scale * (dst + 0.5) - 0.5, which its CPU (AVX2/AVX-512) and CUDA
    # builds contract into one fused multiply-add. Far from the origin float32 moves the coordinate by
    # up to ~2e-4 pixel (4000-pixel sides), so an exact float64 coordinate would be off PyTorch by
    # ~3e-4; and rounding the product before subtracting 0.5 is off by ~1e-5 on some sizes. The float64
    # product of two float32 values is exact, so rounding ``product - 0.5`` once to float32 is the FMA.
    scale = np.float64(np.float32(size_in) / np.float32(size_out))
    real = (scale * (np.arange(size_out, dtype=np.float64) + 0.5) - 0.5).astype(np.float32).astype(np.float64)
    # Not clamped at 0 as the linear modes are (area_pixel_compute_source_index(..., cubic=true)): the
    # first pixels of an upscale sit at a negative coordinate, taps reaching down to -2.
    base = np.floor(real)
    t = real - base  # exact: the fraction of a float32
    # Keys' cubic convolution with A = -0.75 (get_cubic_upsample_coefficients), at distances 1 + t, t,
    # 1 - t and 2 - t from the taps floor(real) - 1 .. floor(real) + 2.
    a = -0.75
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731  (|x| <= 1)
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731  (1 < |x| < 2)
    weights = np.stack([far(1 + t), near(t), near(1 - t), far(2 - t)], axis=1)  # [out, 4]
    # Taps outside the picture read its edge pixel (upsample_get_value_bounded), so their weights add up there.
    taps = np.clip(base.astype(np.int64)[:, None] + np.arange(-1, 3), 0, size_in - 1)  # [out, 4]
    matrix = np.zeros((size_out, size_in))
    np.add.at(matrix, (np.repeat(np.arange(size_out), 4), taps.reshape(-1)), weights.reshape(-1))
    return matrix


def resize_bicubic_torch(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[C, H, W]`` float32 -> ``[C, height, width]`` float32, equal to PyTorch's
    ``interpolate(mode="bicubic", align_corners=False, antialias=False)`` (given a ``size``) to float rounding.

    Numpy on the host: a device resize compiles once per picture size. Border pixels repeat and the
    output is not clamped (bicubic overshoots [0, 1]), as in PyTorch.
    """
    rows = _bicubic_matrix(x.shape[1], height)  # [height, H]
    cols = _bicubic_matrix(x.shape[2], width)  # [width, W]
    # A downscale reads at most 4 input lines per output line; the rest have all-zero weight columns.
    # Leaving them out changes no sum and keeps a 12-megapixel photo's matmuls small.
    used_rows, used_cols = np.flatnonzero(rows.any(axis=0)), np.flatnonzero(cols.any(axis=0))
    x = np.asarray(x, np.float32)[:, used_rows][:, :, used_cols].astype(np.float64)
    # In float64, so the float32 result is the weighted sum rounded once (PyTorch sums in float32).
    return (rows[:, used_rows] @ x @ cols[:, used_cols].T).astype(np.float32)  # [C, height, width]


def _v2_one(picture: Image.Image | np.ndarray, side: int, where: str) -> np.ndarray:
    x = _float_rgb(picture, where).transpose(2, 0, 1)  # [3, H, W]
    x = resize_bicubic_torch(x, side, side)
    mean = np.asarray(CLIP_MEAN, np.float32)[:, None, None]
    std = np.asarray(CLIP_STD, np.float32)[:, None, None]
    return (x - mean) / std


def prepare_inputs(images: Any, preprocessing: str = "clip", *, size: int = 224,
                   feature_extractor_config: Mapping[str, Any] | None = None,
                   only: Callable[[int], Iterable[int]] | None = None) -> np.ndarray:
    """Pictures -> float32 pixel values ``[N, 3, S, S]`` for the CLIP image encoder.

    ``preprocessing``: ``"clip"`` (the checkpoint's ``feature_extractor_config``, i.e. transformers'
    ``CLIPImageProcessor``; ``S`` is its crop size, keys it lacks default to CLIP's at ``size``) or
    ``"v2"`` (v2.0 model card: whole picture to ``size x size`` with PyTorch's bicubic, no
    antialiasing, no crop, CLIP mean/std; ``S = size``; the config is not used).

    ``images`` may be:

    - a PIL image or a list/tuple of them, any mode (EXIF orientation applied first; see ``to_rgb``);
    - a uint8 array (0..255) or float array (0..1), HWC or NHWC, 1 (gray), 3 (RGB) or 4 (RGBA, composited
      onto white) channels, or a list of such arrays;
    - pixel values already prepared: a float array ``[N, 3, S, S]`` or ``[3, S, S]``, returned as
      float32 ``[N, 3, S, S]``.

    Layout rule for arrays: a trailing axis of 1, 3 or 4 means channels-last pictures; otherwise an
    axis of 3 third from the end means pixel values, whose last two axes must then be ``(S, S)``.
    A shape both could read (only possible when S is 1, 3 or 4) is refused. For ``"clip"``, float
    pictures are rounded to 8 bits first, since PIL resamples 8-bit pictures.

    ``only(N)``, called once with the number of pictures: which of them to prepare; the other rows
    are left zero (a process of a multi-process job prepares just the inputs its own devices use).
    """
    if preprocessing not in PREPROCESSINGS:
        raise ValueError(f"preprocessing: unknown {preprocessing!r} (choose one of {', '.join(PREPROCESSINGS)})")
    side = _positive_int(size, "size")
    settings = None
    if preprocessing == "clip":
        settings = clip_settings(feature_extractor_config, side)
        side = settings.output_size[0]
    collected = _collect(images, side)
    count = collected.shape[0] if isinstance(collected, np.ndarray) else len(collected)
    wanted = range(count) if only is None else sorted(set(int(i) for i in only(count)))
    if isinstance(collected, np.ndarray):
        return collected  # already pixel values: nothing left to prepare
    out = np.zeros((len(collected), 3, side, side), np.float32)  # [N, 3, S, S]
    for i in wanted:
        where = f"images[{i}]"
        picture = collected[i]
        row = _clip_one(picture, settings, where) if settings is not None else _v2_one(picture, side, where)
        if row.shape[1:] != (side, side):
            raise ValueError(f"{where}: came out {row.shape[1]}x{row.shape[2]} after preprocessing, expected "
                             f"{side}x{side}: feature_extractor_config does not bring it to that size")
        out[i] = row
    return out


def prepare_init_images(images: Any, height: int, width: int, *, clip_side: int = 224,
                        only: Callable[[int], Iterable[int]] | None = None, name: str = "images") -> np.ndarray:
    """Pictures -> float32 ``[N, 3, height, width]`` in [-1, 1] for the VAE encoder (img2img's starting picture).

    As diffusers' ``VaeImageProcessor``: RGB (here through ``to_rgb``), resized to exactly
    ``width x height`` with Pillow's Lanczos filter, then ``2 x / 255 - 1``. ``images`` are what
    ``prepare_inputs`` takes except CLIP pixel values (``clip_side`` tells them apart), which no
    longer hold the whole picture. ``only`` is ``prepare_inputs``' too.
    """
    collected = _collect(images, clip_side)
    if isinstance(collected, np.ndarray):
        raise ValueError(f"{name}: CLIP pixel values cannot start an img2img run (strength < 1); pass the "
                         "pictures themselves")
    wanted = range(len(collected)) if only is None else sorted(set(int(i) for i in only(len(collected))))
    out = np.zeros((len(collected), 3, height, width), np.float32)  # [N, 3, H, W]
    for i in wanted:
        picture = collected[i]
        where = f"{name}[{i}]" if len(collected) > 1 or isinstance(images, (list, tuple)) else name
        if not isinstance(picture, Image.Image):
            picture = _array_to_pil(picture if picture.dtype == np.uint8 else _float_to_uint8(picture))
        rgb = to_rgb(picture, name=where).resize((width, height), Image.Resampling.LANCZOS)
        out[i] = (np.asarray(rgb, np.float32) / 255.0 * 2.0 - 1.0).transpose(2, 0, 1)
    return out


def to_pil(images: Any) -> list[Image.Image]:
    """Float pictures ``[N, H, W, 3]`` (or ``[H, W, 3]``; 1 channel gives mode ``L``) in [0, 1] -> 8-bit
    PIL images, rounding ``x * 255`` as diffusers' ``numpy_to_pil`` does."""
    arr = np.asarray(images)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"images: expected float pictures in [0, 1], got dtype {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3) or 0 in arr.shape:
        raise ValueError(f"images: expected [N, H, W, 3] or [N, H, W, 1] pictures, got shape {np.shape(images)}")
    if not np.all(np.isfinite(arr)) or arr.min() < 0.0 or arr.max() > 1.0:
        raise ValueError(f"images: pictures must lie in [0, 1] without NaN, got [{arr.min():.4g}, {arr.max():.4g}]")
    pixels = (arr * 255).round().astype(np.uint8)
    return [_array_to_pil(p) for p in pixels]

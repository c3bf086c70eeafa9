"""The settings of a generation run: one frozen, typed object, validated once where it enters.

Each field is described once in ``FIELDS``: its check (type and range), how it is written to
and read from PNG text chunks and manifest records, and its command-line option. The CLI's
options and defaults, the files' metadata and the resume comparison are all derived from that
table, and the pipeline checks its own keyword arguments with the same per-field checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from .conditioning import MIX_METHODS
from .errors import shown
from .hub import DEFAULT_MODEL, DEFAULT_REVISION, TINY_MODEL
from .models.layers import ATTENTION_IMPLS
from .precision import DTYPES
from .preprocessing import PREPROCESSINGS
from .schedulers import SCHEDULERS

SEED_LIMIT = 2**32  # seeds are folded into uint32 PRNG keys

# Caps that refuse absurd values before anything is planned or allocated. Each is well past what
# a device of today runs in one call (48 pictures of 512x512 fit a 16 GiB device; 8192 pixels a
# side is 16 times SD's native area), so they only stop typos and hostile input: what a given
# machine can really run is checked against its memory when the program is compiled.
MAX_SIDE = 8192  # pixels, height and width each
MAX_PICTURES_PER_DEVICE = 4096  # per call: batch_size x num_images_per_prompt
MAX_STEPS = 1000  # SD's scheduler has 1000 training timesteps; more steps than that repeat them


class SettingsError(ValueError):
    """A setting that is out of range, or does not fit the loaded model; the message names it."""


# ----------------------------------------------------------------------
# Checks: value -> normalised value, or SettingsError naming ``name``
# ----------------------------------------------------------------------

def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not _is_np_int(value) or value < 1:
        raise SettingsError(f"{name}: expected a positive integer, got {shown(value)}")
    return int(value)


def _int_up_to(limit: int) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        value = positive_int(name, value)
        if value > limit:
            raise SettingsError(f"{name}: expected at most {limit}, got {shown(value)}")
        return value

    return check


def _is_np_int(value: Any) -> bool:
    return isinstance(value, np.integer)


def _seed(name: str, value: Any) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or _is_np_int(value)) or not 0 <= value < SEED_LIMIT:
        raise SettingsError(f"{name}: expected an integer in 0..{SEED_LIMIT - 1}, got {shown(value)}")
    return int(value)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _number(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_, str, bytes)) or not hasattr(value, "__float__"):
        raise SettingsError(f"{name}: expected a number, got {shown(value)}")
    try:
        value = float(value)
    except OverflowError:  # an int too large for a float
        raise SettingsError(f"{name}: expected a finite number, got {shown(value)}") from None
    except (TypeError, ValueError):  # an array of several values, a complex number
        raise SettingsError(f"{name}: expected a number, got {shown(value)}") from None
    # The programs compute in float32: a float64 value beyond its range would enter them as inf.
    if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
        raise SettingsError(f"{name}: expected a finite number, got {shown(value)}")
    return value


def _unit_interval(name: str, value: Any) -> float:
    value = _number(name, value)
    if not 0.0 <= value <= 1.0:
        raise SettingsError(f"{name}: expected a number in [0, 1], got {shown(value)}")
    return value


def _strength(name: str, value: Any) -> float:
    value = _number(name, value)
    if not 0.0 < value <= 1.0:
        raise SettingsError(f"{name}: expected a number in (0, 1], got {shown(value)}")
    return value


def _choice(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise SettingsError(f"{name}: unknown {shown(value)} (choose one of {', '.join(choices)})")
        return value

    return check


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda name, value: None if value is None else check(name, value)


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise SettingsError(f"{name}: expected a non-empty string, got {shown(value)}")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SettingsError(f"{name}: expected true or false, got {shown(value)}")
    return value


def _size(name: str, value: Any) -> tuple[int, int]:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(v, bool) or not (isinstance(v, int) or _is_np_int(v)) or v < 1 for v in value)):
        raise SettingsError(f"{name}: expected (height, width) as positive integers, got {shown(value)}")
    height, width = int(value[0]), int(value[1])
    if max(height, width) > MAX_SIDE:
        raise SettingsError(f"{name}: expected at most {MAX_SIDE} pixels a side, got {shown(height)}x{shown(width)}")
    return height, width


# ----------------------------------------------------------------------
# Text forms (PNG chunks and command lines) and JSON forms (manifest)
# ----------------------------------------------------------------------

def _size_from_text(text: str) -> tuple[int, int]:
    """``HxW`` (or ``N`` for a square) -> ``(height, width)``."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise SettingsError(f"expected HEIGHTxWIDTH in pixels (e.g. 512x512), got {shown(text)}") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2:
        raise SettingsError(f"expected HEIGHTxWIDTH in pixels (e.g. 512x512), got {shown(text)}")
    return values[0], values[1]


def _int_from_text(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SettingsError(f"expected an integer, got {shown(text)}") from None


def _float_from_text(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SettingsError(f"expected a number, got {shown(text)}") from None


@dataclass(frozen=True)
class Field:
    """How one setting is checked, recorded and offered on the command line."""

    name: str
    check: Callable[[str, Any], Any]
    help: str
    to_text: Callable[[Any], str] = str
    from_text: Callable[[str], Any] = str
    to_json: Callable[[Any], Any] = lambda v: v
    recorded: bool = True  # written into every output and compared on resume
    flag: str | None = None  # default: --name-with-dashes
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    negated_flag: str | None = None  # booleans default on: the option turns them off

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


def _opt_text(value: Any) -> str:
    return "" if value is None else str(value)


def _opt_from_text(text: str) -> str | None:
    return text or None


FIELDS: tuple[Field, ...] = (
    Field("model", _text, f"hub id, local diffusers or converted folder, or '{TINY_MODEL}' (default {DEFAULT_MODEL})"),
    Field("revision", _optional(_text), f"hub revision (default {DEFAULT_REVISION} for the default model, else main); "
          "recorded as the revision actually loaded, empty for local folders",
          to_text=_opt_text, from_text=_opt_from_text),
    Field("num_images_per_prompt", _int_up_to(MAX_PICTURES_PER_DEVICE),
          f"variations per input, at most {MAX_PICTURES_PER_DEVICE}", flag="--num-per-image", metavar="K",
          to_text=str, from_text=_int_from_text),
    Field("steps", _int_up_to(MAX_STEPS), f"denoising steps, at most {MAX_STEPS}", to_text=str,
          from_text=_int_from_text),
    Field("guidance", _number, "classifier-free guidance scale (finite); 1 or less turns guidance off",
          to_text=repr, from_text=_float_from_text),
    Field("scheduler", _choice(tuple(SCHEDULERS)), "sampler", choices=tuple(SCHEDULERS)),
    Field("eta", _unit_interval, "DDIM eta, in [0, 1]: 0 is deterministic DDIM, 1 is DDPM-like noise",
          to_text=repr, from_text=_float_from_text),
    Field("seed", _seed, f"0..{SEED_LIMIT - 1}; picture n of the run (input i, variation j: n = i*K + j) "
          "uses fold_in(seed, n)", to_text=str, from_text=_int_from_text),
    Field("strength", _strength, "below 1: start from each input picture's own latents (with --mix/--interpolate, "
          "the first source's) noised to this level and run the last strength x steps, keeping its layout "
          "(img2img); 1 starts from pure noise",
          to_text=repr, from_text=_float_from_text),
    Field("mix_method", _choice(MIX_METHODS), "how pictures' embeddings are mixed or interpolated: slerp (on the "
          "sphere, norm interpolated) or linear (a weighted sum, which shrinks the norm between distant pictures)",
          choices=MIX_METHODS),
    Field("frames", _int_up_to(MAX_PICTURES_PER_DEVICE), "pictures along an interpolation's path (--interpolate), "
          "the first and last at its ends", metavar="F", from_text=_int_from_text, recorded=False),
    Field("size", _optional(_size), f"output height x width in pixels, at most {MAX_SIDE} a side; what the "
          "devices' memory holds is checked before sampling (default: the model's, 512x512 for SD)",
          metavar="HxW", to_text=lambda v: "" if v is None else f"{v[0]}x{v[1]}",
          from_text=lambda t: _size_from_text(t) if t else None, to_json=lambda v: None if v is None else list(v)),
    Field("preprocessing", _choice(PREPROCESSINGS),
          "v2: the v2.0 model card's resize; clip: the checkpoint's feature extractor", choices=PREPROCESSINGS),
    Field("dtype", _optional(_choice(tuple(DTYPES))),
          "params and activations (default bfloat16 on TPU/GPU, float32 on CPU: chosen for the devices used)",
          choices=tuple(DTYPES), to_text=_opt_text, from_text=_opt_from_text),
    Field("vae_dtype", _optional(_choice(tuple(DTYPES))),
          "the VAE's params and activations (default: --dtype); float32 avoids half-precision overflow when decoding",
          choices=tuple(DTYPES), to_text=_opt_text, from_text=_opt_from_text),
    Field("attention", _choice(ATTENTION_IMPLS), "attention implementation; auto chooses per backend",
          choices=ATTENTION_IMPLS, recorded=False),
    Field("safety_checker", _flag, "filter the generated pictures with the safety checker",
          negated_flag="--no-safety-checker", to_text=lambda v: "on" if v else "off",
          from_text=lambda t: {"on": True, "off": False}[t]),
    Field("batch_size", _int_up_to(MAX_PICTURES_PER_DEVICE),
          f"inputs per device per call; batch size x K is at most {MAX_PICTURES_PER_DEVICE}",
          from_text=_int_from_text, recorded=False),
    Field("grid", _flag, "also write OUT/<input stem>/grid.png: the input, then its variations", recorded=False),
)
_BY_NAME = {f.name: f for f in FIELDS}


def check_value(name: str, value: Any, argument: str | None = None) -> Any:
    """Setting ``name``'s check applied to ``value``; errors name ``argument`` (default ``name``)."""
    return _BY_NAME[name].check(argument or name, value)


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides a batch run's pictures, plus how the run is laid out.

    Construction validates every field (``SettingsError`` names the first bad one). ``size``
    None is the model's default; ``dtype`` None is chosen for the devices the run uses,
    ``vae_dtype`` None follows ``dtype``: ``resolved`` fills these in from the loaded pipeline.
    """

    model: str = DEFAULT_MODEL
    revision: str | None = None
    num_images_per_prompt: int = 4
    steps: int = 50
    guidance: float = 3.0
    scheduler: str = "pndm"
    eta: float = 0.0
    seed: int = 0
    strength: float = 1.0
    mix_method: str = "slerp"
    frames: int = 8
    size: tuple[int, int] | None = None
    preprocessing: str = "v2"
    dtype: str | None = None
    vae_dtype: str | None = None
    attention: str = "auto"
    safety_checker: bool = True
    batch_size: int = 1
    grid: bool = False

    def __post_init__(self) -> None:
        for spec in FIELDS:
            object.__setattr__(self, spec.name, spec.check(spec.name, getattr(self, spec.name)))
        per_device = self.batch_size * self.num_images_per_prompt
        if per_device > MAX_PICTURES_PER_DEVICE:
            raise SettingsError(f"batch_size: {self.batch_size} inputs x {self.num_images_per_prompt} variations "
                                f"is {per_device} pictures per device per call, more than {MAX_PICTURES_PER_DEVICE}")

    def replace(self, **changes: Any) -> "GenerationSettings":
        return dataclasses.replace(self, **changes)

    def recorded(self) -> dict[str, Any]:
        """The fields every output carries and a resumed run must match."""
        return {f.name: getattr(self, f.name) for f in FIELDS if f.recorded}

    def to_text(self) -> dict[str, str]:
        """PNG text chunks of the recorded fields."""
        return {f.name: f.to_text(getattr(self, f.name)) for f in FIELDS if f.recorded}

    def to_json(self) -> dict[str, Any]:
        """Manifest fields of the recorded fields."""
        return {f.name: f.to_json(getattr(self, f.name)) for f in FIELDS if f.recorded}

    @classmethod
    def recorded_from_text(cls, text: Mapping[str, str]) -> dict[str, Any] | None:
        """The recorded fields read back from ``to_text``'s chunks; None if any is missing or unreadable."""
        values = {}
        for f in FIELDS:
            if not f.recorded:
                continue
            if f.name not in text:
                return None
            try:
                values[f.name] = f.check(f.name, f.from_text(text[f.name]))
            except (SettingsError, KeyError):
                return None
        return values

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> "GenerationSettings":
        """The settings the parsed options give (fields without an option keep their defaults, or ``overrides``)."""
        return cls(**{**{f.name: getattr(args, f.name) for f in FIELDS if hasattr(args, f.name)}, **overrides})


def add_arguments(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None,
                  defaults: GenerationSettings | None = None) -> None:
    """One option per field of ``GenerationSettings`` (or of the fields named in ``only``), with its defaults
    (``defaults``' values, else the settings' own), choices and checks."""
    defaults = defaults or GenerationSettings()
    for f in FIELDS:
        if only is not None and f.name not in only:
            continue
        default = getattr(defaults, f.name)
        if f.negated_flag is not None:
            parser.add_argument(f.negated_flag, dest=f.name, action="store_false",
                                help=f"do not {f.help[0].lower()}{f.help[1:]}")
            continue
        if isinstance(default, bool):
            parser.add_argument(f.option, dest=f.name, action="store_true", help=f.help)
            continue
        shown = f.to_text(default) if default is not None else None
        help_text = f.help if shown is None or "default" in f.help else f"{f.help} (default {shown})"
        parser.add_argument(f.option, dest=f.name, type=_argparse_type(f), default=default, choices=f.choices,
                            metavar=f.metavar, help=help_text)


def _argparse_type(f: Field) -> Callable[[str], Any]:
    """Parse an option's text and apply the field's check, as argparse's ``type`` (errors exit 2)."""

    def parse(text: str) -> Any:
        try:
            value = f.from_text(text)
            if f.choices is not None:
                return value  # argparse lists the choices itself
            return f.check(f.option, value)
        except SettingsError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{f.option}: ")) from None

    parse.__name__ = f.name
    return parse

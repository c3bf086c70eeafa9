"""The key tables run backwards: Flax params -> diffusers-format folders (config.json + safetensors).

Each table rule says which PyTorch tensor fills which Flax param and how its layout changes
(conv kernels OIHW -> HWIO, linear weights [out, in] -> [in, out]); here every rule is applied in
reverse, with the same shape checks, so diffusers' ``from_pretrained`` reads back the exact
float32 values. The safetensors file is written by this module (a JSON header and the raw
little-endian bytes, as the format specifies), so writing needs neither torch nor safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from imvar_jax.models.config import to_dict

from .checkpoint import OPTIONAL, REQUIRED, SPECS
from .common import ConversionError, Rule, _flatten

_INVERSE = {
    "copy": lambda a: a,
    "conv": lambda a: a.transpose(3, 2, 0, 1),  # [kh, kw, in, out] -> [out, in, kh, kw]
    "linear": lambda a: a.T,  # [in, out] -> [out, in]
}


def to_torch_state(component: str, table: list[Rule], params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``params`` as the PyTorch state dict the table describes (float32, contiguous), every param used once."""
    flat = {path: np.asarray(v, np.float32) for path, v in _flatten(params).items()}
    state: dict[str, np.ndarray] = {}
    for rule in table:
        if rule.flax_path not in flat:
            raise ConversionError(f"{component}: param {'/'.join(rule.flax_path)} (for {rule.torch_key}) is missing")
        state[rule.torch_key] = np.ascontiguousarray(_INVERSE[rule.layout](flat.pop(rule.flax_path)))
    if flat:
        raise ConversionError(f"{component}: param {'/'.join(next(iter(flat)))} has no table rule")
    return state


def write_safetensors(state: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """A float32 safetensors file: 8-byte header length, the JSON header, then each tensor's bytes in order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, a in state.items():
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for a in state.values():
            f.write(a.astype("<f4", copy=False).tobytes())
    os.replace(tmp, path)


# model_index.json entries and weight files per component, as diffusers and transformers save them.
_LIBRARIES = {
    "unet": (["diffusers", "UNet2DConditionModel"], "diffusion_pytorch_model.safetensors"),
    "vae": (["diffusers", "AutoencoderKL"], "diffusion_pytorch_model.safetensors"),
    "image_encoder": (["transformers", "CLIPVisionModelWithProjection"], "model.safetensors"),
    "safety_checker": (["stable_diffusion", "StableDiffusionSafetyChecker"], "model.safetensors"),
}


def _config_json(name: str, config: Any) -> dict[str, Any]:
    """The component's config.json: ours holds the architecture fields under the reference libraries' names."""
    if name in ("unet", "vae"):
        return {"_class_name": _LIBRARIES[name][0][1], **to_dict(config)}
    if name == "image_encoder":
        return {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
                **to_dict(config)}
    # A transformers CLIPConfig: the checker's tower and projection; transformers fills in a text tower it never uses.
    vision = {"model_type": "clip_vision_model", **to_dict(config.vision_config)}
    return {"architectures": ["StableDiffusionSafetyChecker"], "model_type": "clip",
            "projection_dim": config.projection_dim, "vision_config": vision}


def save_diffusers_pipeline(configs: Mapping[str, Any], params: Mapping[str, Mapping[str, Any]],
                            scheduler_config: Mapping[str, Any], feature_extractor_config: Mapping[str, Any],
                            folder: str | os.PathLike) -> Path:
    """A ``StableDiffusionImageVariationPipeline`` folder that diffusers' ``from_pretrained`` loads.

    ``configs``/``params`` hold unet, vae and image_encoder, and the safety checker where the
    model has one (without it, model_index.json disables the checker, as diffusers writes it).
    Every component goes through its own key table backwards. ``folder`` must not exist; it
    appears by one rename of a finished temporary folder beside it, so a stopped export never
    leaves a folder that looks complete.
    """
    folder = Path(folder)
    if os.path.lexists(folder):
        raise FileExistsError(f"{folder}: already exists (choose a new destination)")
    missing = [n for n in REQUIRED if n not in configs or n not in params]
    if missing:
        raise ConversionError(f"{folder}: no {missing[0]} to export")
    names = [n for n in REQUIRED + OPTIONAL if n in configs]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        index: dict[str, Any] = {"_class_name": "StableDiffusionImageVariationPipeline",
                                 "feature_extractor": ["transformers", "CLIPImageProcessor"],
                                 "scheduler": ["diffusers", scheduler_config.get("_class_name", "PNDMScheduler")],
                                 "safety_checker": [None, None], "requires_safety_checker": "safety_checker" in names}
        for name in names:
            library, weights = _LIBRARIES[name]
            index[name] = library
            (tmp / name).mkdir(parents=True)
            state = to_torch_state(name, SPECS[name].table(configs[name]), params[name])
            write_safetensors(state, tmp / name / weights)
            _write_json(tmp / name / "config.json", _config_json(name, configs[name]))
        _write_json(tmp / "scheduler" / "scheduler_config.json",
                    {"_class_name": index["scheduler"][1], **scheduler_config})
        _write_json(tmp / "feature_extractor" / "preprocessor_config.json", dict(feature_extractor_config))
        _write_json(tmp / "model_index.json", index)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")

"""The key tables run backwards: Flax params -> a diffusers-format folder (config.json + safetensors).

Each table rule says which PyTorch tensor fills which Flax param and how its layout changes
(conv kernels OIHW -> HWIO, linear weights [out, in] -> [in, out]); here every rule is applied in
reverse, with the same shape checks, so diffusers' ``from_pretrained`` reads back the exact
float32 values. The safetensors file is written by this module (a JSON header and the raw
little-endian bytes, as the format specifies), so writing needs neither torch nor safetensors.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from imvar_jax.models.config import to_dict
from imvar_jax.models.unet import UNetConfig

from .common import ConversionError, Rule, _flatten
from .unet import table as unet_table

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


def save_diffusers_unet(config: UNetConfig, params: Mapping[str, Any], folder: str | os.PathLike) -> Path:
    """``folder``/config.json and diffusion_pytorch_model.safetensors that diffusers' UNet2DConditionModel loads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = to_torch_state("unet", unet_table(config), params)
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **to_dict(config)},
                                                   indent=2) + "\n")
    write_safetensors(state, folder / "diffusion_pytorch_model.safetensors")
    return folder

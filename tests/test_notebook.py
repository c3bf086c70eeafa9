"""The Colab/Kaggle notebook: a valid, output-free file that runs end to end headless on CPU.

The run mimics papermill: a cell injected after the one tagged ``parameters`` overrides the
defaults with a tiny random model, no install and two steps. The kernel is this interpreter,
through a kernelspec in a temporary folder, so nothing is registered outside the test.
"""

from __future__ import annotations

import ast
import base64
import io
import json
import math
import os
import re
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from PIL import Image

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "image_variations_tpu.ipynb"
PARAMETERS = ("MODEL", "REVISION", "DTYPE", "NUM_VARIATIONS", "STEPS", "GUIDANCE", "SEED",
              "IMAGE_URL_OR_PATH", "INSTALL", "REPO")
# The built-in "tiny" model has no revisions, as a local folder would not.
OVERRIDES = {"MODEL": "tiny", "REVISION": None, "INSTALL": False, "DTYPE": "float32", "STEPS": 2,
             "NUM_VARIATIONS": 2}
# More devices than pictures, so the run also pads the batch and drops the padding.
DEVICES = 4
KERNEL = "imvar-test-python"


def _read() -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return nb


def _parameters_index(nb: nbformat.NotebookNode) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def _assignments(source: str) -> dict[str, object]:
    values = {}
    for node in ast.parse(source).body:
        assert isinstance(node, ast.Assign), f"the parameters cell should only assign: {ast.unparse(node)}"
        for target in node.targets:
            values[target.id] = ast.literal_eval(node.value)
    return values


def _kernel_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["IMVAR_JAX_CACHE"] = str(cache)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={DEVICES}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _outputs(nb: nbformat.NotebookNode) -> tuple[str, list[Image.Image]]:
    text, images = [], []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.output_type != "error", f"{out.ename}: {out.evalue}"
            if out.output_type == "stream":
                text.append(out.text)
            elif "image/png" in out.get("data", {}):
                images.append(Image.open(io.BytesIO(base64.b64decode(out.data["image/png"]))))
    return "".join(text), images


def test_notebook_file_is_valid_clean_and_parameterised():
    nb = _read()
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "the notebook is stored with outputs"
    defaults = _assignments(nb.cells[_parameters_index(nb)].source)
    assert set(defaults) == set(PARAMETERS)
    assert defaults["MODEL"] == "lambdalabs/sd-image-variations-diffusers"
    assert defaults["DTYPE"] == "bfloat16"
    assert defaults["INSTALL"] is True
    for name, value in OVERRIDES.items():
        assert value is None or type(value) is type(defaults[name]), f"override of {name} changes its type"
    # Every parameter is used after the parameters cell.
    rest = "\n".join(c.source for c in code if "parameters" not in c.metadata.get("tags", []))
    for name in PARAMETERS:
        assert re.search(rf"\b{name}\b", rest), f"{name} is never used"


def test_notebook_runs_headless_on_cpu(tmp_path, monkeypatch):
    kernels = tmp_path / "jupyter" / "kernels" / KERNEL
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "test kernel", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    workdir = tmp_path / "run"
    workdir.mkdir()

    nb = _read()
    at = _parameters_index(nb) + 1
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in OVERRIDES.items()),
                                         metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(at, injected)
    client = NotebookClient(nb, timeout=600, kernel_name=KERNEL, resources={"metadata": {"path": str(workdir)}})
    cache = tmp_path / "cache"
    client.execute(env=_kernel_env(cache))
    nbformat.write(nb, tmp_path / "executed.ipynb")

    text, images = _outputs(nb)
    assert "INSTALL is False" in text
    assert f"{DEVICES} device(s), backend cpu" in text
    # The compiled programs went to the cache the kernel was given, not to the user's.
    assert f"compilation cache: {cache}" in text
    assert any(p.is_file() for p in cache.rglob("*"))
    # No input file in the working folder: the notebook draws its own picture, offline.
    assert "using a drawn test picture" in text
    n = OVERRIDES["NUM_VARIATIONS"]
    shown = re.search(r"(\d+) variations of (\d+)x(\d+)", text)
    assert shown, text
    count, w, h = map(int, shown.groups())
    assert count == n
    timing = re.search(r"second call \(compiled\): (\d+) pictures in ([\d.]+) s = ([\d.]+) pictures/s "
                       r"on (\d+) device\(s\)", text)
    assert timing, text
    assert int(timing[1]) == n and int(timing[4]) == DEVICES
    assert float(timing[3]) > 0
    assert "same seed, same pictures: True" in text

    assert len(images) == 2, f"expected the input and the grid, got {len(images)} pictures"
    preview, sheet = images
    assert max(preview.size) <= 256
    columns = min(4, n)
    assert sheet.size == (columns * w, math.ceil(n / columns) * h)

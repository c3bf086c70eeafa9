"""The shape of the package: no import cycles, layers import only downwards, one settings table."""

from __future__ import annotations

import ast
import re
import threading
from pathlib import Path

import numpy as np
import pytest

import imvar_jax
from imvar_jax import GenerationSettings, ImageVariationPipeline, SettingsError
from imvar_jax.cli import build_parser
from imvar_jax.settings import FIELDS

ROOT = Path(imvar_jax.__file__).parent
CONVERT = ROOT.parent / "convert"  # installed as imvar_jax.convert


def _modules() -> dict[str, Path]:
    found = {}
    for base, prefix in ((ROOT, "imvar_jax"), (CONVERT, "imvar_jax.convert")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if prefix == "imvar_jax" and parts[0] == "convert":
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """imvar_jax modules that ``name`` imports anywhere (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
        for target in targets:
            # The longest imvar_jax module a dotted name lands in.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_graph_reads_real_imports():
    graph = _graph()
    assert "imvar_jax.loading" in graph["imvar_jax.pipeline"]
    assert "imvar_jax.convert.checkpoint" in graph["imvar_jax.hub"]
    assert "imvar_jax.models.layers" in graph["imvar_jax.models.unet"]


def test_no_import_cycles():
    graph = _graph()
    # Packages import their submodules to re-export them; a cycle through an __init__ is not a layering fault.
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_layers_import_only_downwards():
    graph = _graph()
    for module, deps in graph.items():
        if module.startswith("imvar_jax.models"):
            above = {d for d in deps if not d.startswith("imvar_jax.models") and d != "imvar_jax.errors"}
            assert not above, f"{module} imports {sorted(above)} from above the models"
        if module.startswith("imvar_jax.schedulers"):
            assert not {d for d in deps if d.startswith("imvar_jax.models")}, f"{module} imports a model"
            assert not {d for d in deps if not d.startswith("imvar_jax.schedulers") and d != "imvar_jax.errors"}, module
        if module in ("imvar_jax.errors", "imvar_jax.conditioning"):
            assert not deps, f"{module} imports {sorted(deps)}"
        if module == "imvar_jax.sampling":
            assert not deps & {"imvar_jax.pipeline", "imvar_jax.cli", "imvar_jax.loading"}, deps
        if module.startswith("imvar_jax.convert"):
            assert "imvar_jax.hub" not in deps, f"{module} imports the hub, which is above the converter"
        if module.startswith("imvar_jax.tiny"):
            assert "imvar_jax.pipeline" not in deps


# ----------------------------------------------------------------------
# One settings object
# ----------------------------------------------------------------------

def test_cli_options_come_from_the_settings_table():
    parser = build_parser()
    generate = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("generate"))
    options = {o: action for action in generate._actions for o in action.option_strings}
    defaults = GenerationSettings()
    for field in FIELDS:
        action = options[field.negated_flag or field.option]
        assert action.dest == field.name
        if field.choices is not None:
            assert tuple(action.choices) == field.choices
        if field.negated_flag is None:
            assert action.default == getattr(defaults, field.name)
    parsed = GenerationSettings.from_args(generate.parse_args(["x.png"]))
    assert parsed == defaults


def test_text_round_trip_covers_every_recorded_field():
    settings = GenerationSettings(model="tiny", revision="v2.0", num_images_per_prompt=3, steps=7, guidance=2.5,
                                  scheduler="ddim", eta=0.25, seed=123, size=(16, 24), preprocessing="clip",
                                  dtype="bfloat16", vae_dtype="float32", safety_checker=False, strength=0.625,
                                  mix_method="linear")
    text = settings.to_text()
    assert set(text) == {f.name for f in FIELDS if f.recorded}
    assert all(isinstance(v, str) for v in text.values())
    assert GenerationSettings.recorded_from_text(text) == settings.recorded()
    for field in FIELDS:
        if field.recorded:
            assert GenerationSettings.recorded_from_text({k: v for k, v in text.items() if k != field.name}) is None
    assert set(settings.to_json()) == set(text)


@pytest.mark.parametrize("name, value, message", [
    ("steps", 0, "steps: expected a positive integer"),
    ("num_images_per_prompt", True, "num_images_per_prompt: expected a positive integer"),
    ("seed", 2**32, "seed: expected an integer in 0..4294967295"),
    ("guidance", float("nan"), "guidance: expected a finite number"),
    ("eta", -1.0, "eta: expected a number in [0, 1]"),
    ("scheduler", "heun", "scheduler: unknown 'heun'"),
    ("dtype", "float64", "dtype: unknown 'float64'"),
    ("size", (0, 16), "size: expected (height, width)"),
    ("attention", "flash", "attention: unknown 'flash'"),
])
def test_each_setting_is_checked_once_at_construction(name, value, message):
    with pytest.raises(SettingsError) as excinfo:
        GenerationSettings(**{name: value})
    assert re.match(re.escape(message), str(excinfo.value))


def test_the_api_checks_its_arguments_with_the_same_checks():
    pipe, params = ImageVariationPipeline.from_pretrained("tiny", safety_checker=False)
    pixels = np.zeros((1, 16, 16, 3), np.float32)
    with pytest.raises(SettingsError, match="^num_inference_steps: expected a positive integer"):
        pipe.generate(pixels, params, num_inference_steps=0)
    with pytest.raises(SettingsError, match="^guidance_scale: expected a finite number"):
        pipe.generate(pixels, params, guidance_scale=float("inf"))
    with pytest.raises(SettingsError, match="^scheduler: unknown 'heun'"):
        ImageVariationPipeline.from_pretrained("tiny", scheduler="heun")


# ----------------------------------------------------------------------
# Reentrancy
# ----------------------------------------------------------------------

def test_two_threads_get_only_their_own_callbacks():
    pipe, params = ImageVariationPipeline.from_pretrained("tiny", safety_checker=False)
    pixel_values = pipe.prepare_inputs(np.random.default_rng(0).random((1, 20, 20, 3)))
    steps = {"a": 3, "b": 5}
    seen: dict[str, list[tuple[int, np.ndarray]]] = {"a": [], "b": []}
    results: dict[str, np.ndarray] = {}
    start = threading.Barrier(2)

    def worker(name: str, seed: int) -> None:
        start.wait()
        for _ in range(2):
            out = pipe(pixel_values, params, seed, num_inference_steps=steps[name], guidance_scale=3.0,
                       callback=lambda i, t, x: seen[name].append((i, x)))
        results[name] = out.images

    threads = [threading.Thread(target=worker, args=(name, seed)) for name, seed in (("a", 0), ("b", 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert results.keys() == {"a", "b"}
    for name in ("a", "b"):
        # PNDM runs steps + 1 loop iterations and calls back on steps of them (diffusers' count).
        calls = steps[name] + 1
        indices = [i for i, _ in seen[name]]
        assert len(indices) == 2 * steps[name] and max(indices) == calls - 1, (name, indices)
    # Each thread's latents are its own: the two seeds' starting noise differs.
    assert not np.allclose(seen["a"][0][1], seen["b"][0][1])

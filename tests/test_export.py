"""The accelerator programs, checked on a CPU: full-size SD-v1 exported for cuda and tpu with ``jax.export``.

Params are abstract (``jax.ShapeDtypeStruct`` in bfloat16): nothing is allocated, each export
traces and lowers in seconds. The assertions read the lowered StableHLO, following calls into
the private functions JAX outlines (a loop body is one), and count each operation where it is
written: a loop's body is counted once, not once per trip.

JAX's cuDNN helpers read the local cuDNN version and GPU compute capability, neither of which a
CPU machine has; ``pinned_cuda_target`` pins them to a stated target. It is the only patch here.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.interpreters import mlir
from jax._src.lib.mlir import ir

from imvar_jax import CLIPVisionConfig, ImageVariationPipeline, UNetConfig, VAEConfig
from imvar_jax.export import abstract_params, export_sample, export_unet
from imvar_jax.models import abstract_params as module_params
from imvar_jax.models.unet import UNet2DConditionModel
from imvar_jax.parallel import picture_keys

STEPS = 50
# SD-v1's UNet self-attentions by head dim (the cross-attentions see one key and run no kernel):
# two per down block 0-2 (40, 80, 160), three per up block 1-3 (160, 80, 40), one in the mid block (160).
UNET_HEADS = {40: 5, 80: 5, 160: 6}
CLIP_HEADS = {64: 24}  # ViT-L/14: 24 layers, head dim 1024 / 16
CUDNN = "__cudnn$fmhaSoftmax"
MOSAIC = "tpu_custom_call"


@dataclass(frozen=True)
class CudaTarget:
    cudnn_version: int
    compute_capability: tuple[int, int]


HOPPER = CudaTarget(cudnn_version=91000, compute_capability=(9, 0))  # cuDNN 9.10 on sm_90 (H100/H200)
AMPERE = CudaTarget(cudnn_version=91000, compute_capability=(8, 0))  # cuDNN 9.10 on sm_80 (A100)


@pytest.fixture
def pinned_cuda_target(request, monkeypatch):
    """JAX's cuDNN helpers answer for ``request.param`` (default ``HOPPER``) instead of the local machine."""
    target: CudaTarget = getattr(request, "param", HOPPER)
    helpers = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")

    def capability(text: str) -> tuple[int, ...]:
        return tuple(int(x) for x in text.split("."))

    monkeypatch.setattr(helpers, "check_cudnn_version", lambda: target.cudnn_version)
    monkeypatch.setattr(helpers, "check_compute_capability", lambda c: target.compute_capability >= capability(c))
    monkeypatch.setattr(helpers, "is_cuda_compute_capability_equal",
                        lambda c: target.compute_capability == capability(c))
    return target


# ----------------------------------------------------------------------------------------------
# Reading a lowered module
# ----------------------------------------------------------------------------------------------

@dataclass
class Loop:
    trips: int | None  # None where the bound is not a constant
    ops: Counter = field(default_factory=Counter)  # everything in the body, nested loops included


@dataclass
class Lowered:
    text: str
    ops: Counter  # every op of the program; custom calls as "custom_call:<target>"
    loops: list[Loop]
    attention_heads: dict[str, Counter]  # kernel target -> head dims of its query operands


def _op_key(op: ir.Operation) -> str:
    if op.name == "stablehlo.custom_call":
        return "custom_call:" + ir.StringAttr(op.attributes["call_target_name"]).value
    return op.name


def _trip_count(loop: ir.Operation) -> int | None:
    """The constant a scan's ``while`` compares its counter against (``compare LT, %i, %c``)."""
    for op in loop.regions[0].blocks[0].operations:
        if op.operation.name == "stablehlo.compare":
            bound = op.operands[1].owner
            if isinstance(bound, ir.OpView):
                bound = bound.operation
            if bound.name == "stablehlo.constant":
                found = re.match(r"dense<(-?\d+)>", str(bound.attributes["value"]))
                return int(found.group(1)) if found else None
    return None


def _head_dim(op: ir.Operation, target: str) -> int:
    """The head dim of a kernel's query operand: cuDNN takes (q, k, v) as ``[B, T, N, H]``; splash takes its
    mask tables first and then q, k, v as ``[B, N, T, H]`` with H zero-padded to 128 lanes."""
    query = op.operands[0] if target == CUDNN else op.operands[len(op.operands) - 3]
    return ir.RankedTensorType(query.type).shape[-1]


def lanes(heads: dict[int, int]) -> Counter:
    """Head dims as the splash kernel sees them: padded to whole 128-lane tiles."""
    padded: Counter = Counter()
    for dim, count in heads.items():
        padded[-(-dim // 128) * 128] += count
    return padded


def lowered(exported: jax.export.Exported) -> Lowered:
    text = exported.mlir_module()
    with mlir.make_ir_context():
        module = ir.Module.parse(text)
        funcs = {ir.StringAttr(op.attributes["sym_name"]).value: op.operation
                 for op in module.body.operations if op.operation.name == "func.func"}
        loops: list[Loop] = []
        heads: dict[str, Counter] = {}

        def walk(op: ir.Operation, into: list[Counter]) -> None:
            for region in op.regions:
                for block in region.blocks:
                    for child in block.operations:
                        child = child.operation
                        key = _op_key(child)
                        for counter in into:
                            counter[key] += 1
                        target = key.removeprefix("custom_call:")
                        if target in (CUDNN, MOSAIC):
                            heads.setdefault(target, Counter())[_head_dim(child, target)] += 1
                        if child.name == "func.call":
                            walk(funcs[ir.FlatSymbolRefAttr(child.attributes["callee"]).value], into)
                        elif child.name == "stablehlo.while":
                            loop = Loop(_trip_count(child))
                            loops.append(loop)
                            walk(child, [*into, loop.ops])
                        else:
                            walk(child, into)

        ops: Counter = Counter()
        walk(funcs["main"], [ops])
    return Lowered(text, ops, loops, heads)


def _kernels(ops: Counter, target: str) -> int:
    return ops[f"custom_call:{target}"]


def _assert_clean(low: Lowered) -> None:
    """No float64 anywhere and no call back into Python (none was asked for)."""
    assert not re.search(r"\bf64\b", low.text), "float64 in the exported program"
    callbacks = [k for k in low.ops if k.startswith("custom_call:") and "callback" in k]
    assert not callbacks, callbacks


# ----------------------------------------------------------------------------------------------
# The programs
# ----------------------------------------------------------------------------------------------

def _full_size(platform: str) -> ImageVariationPipeline:
    configs = {"unet": UNetConfig.sd_v1(), "vae": VAEConfig.sd_v1(), "image_encoder": CLIPVisionConfig.sd_v1()}
    return ImageVariationPipeline.from_configs(configs, dtype="bfloat16", platform=platform)


def _sample(platform: str) -> tuple[ImageVariationPipeline, jax.export.Exported]:
    pipe = _full_size(platform)
    params = abstract_params(pipe)
    assert {jnp.dtype(x.dtype) for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    return pipe, export_sample(pipe, params, batch=1, num_images_per_prompt=1, num_inference_steps=STEPS)


@functools.cache
def _sd_v1_unet_params(dtype: str = "bfloat16") -> dict:
    """The full-size UNet's params as shapes (traced once for every test here)."""
    return module_params(UNetConfig.sd_v1(), dtype)


def _unet(platform: str) -> jax.export.Exported:
    unet = UNet2DConditionModel(UNetConfig.sd_v1(), dtype=jnp.bfloat16, platform=platform)
    # Guided: the unconditional and conditional halves of one picture, 64x64 latents (512x512 pictures).
    return export_unet(unet, _sd_v1_unet_params(), batch=2, latent_size=(64, 64))


def _denoising_loop(pipe: ImageVariationPipeline, low: Lowered) -> Loop:
    """Exactly one loop runs the UNet, with one trip per scheduler step; it is returned."""
    trips = pipe.scheduler.set_timesteps(STEPS, (1, 64, 64, 4)).timesteps.shape[0]
    with_unet = [loop for loop in low.loops
                 if loop.ops["stablehlo.convolution"] >= _conv_count(_sd_v1_unet_params())]
    assert len(with_unet) == 1, [(loop.trips, loop.ops["stablehlo.convolution"]) for loop in low.loops]
    assert with_unet[0].trips == trips
    assert [loop.trips for loop in low.loops].count(trips) == 1
    return with_unet[0]


def _conv_count(params: dict) -> int:
    """Convolutions of a model: its 4-d kernels (conv layers), read off its params tree."""
    return sum(1 for leaf in jax.tree.leaves(params) if len(leaf.shape) == 4)


def test_sampling_program_for_cuda_runs_cudnn_attention(pinned_cuda_target):
    pipe, exported = _sample("cuda")
    assert exported.platforms == ("cuda",)
    low = lowered(exported)
    _assert_clean(low)
    loop = _denoising_loop(pipe, low)
    # Every UNet self-attention in the loop and every CLIP attention outside it is a cuDNN kernel.
    assert _kernels(loop.ops, CUDNN) == sum(UNET_HEADS.values())
    assert low.attention_heads[CUDNN] == Counter(UNET_HEADS) + Counter(CLIP_HEADS)
    assert MOSAIC not in low.attention_heads


def test_sampling_program_for_tpu_runs_mosaic_splash():
    pipe, exported = _sample("tpu")
    assert exported.platforms == ("tpu",)
    low = lowered(exported)
    _assert_clean(low)
    loop = _denoising_loop(pipe, low)
    # Splash is compiled by Mosaic (a tpu_custom_call per attention), not interpreted: an
    # interpreted kernel would be loops of slices, and the only loops are the denoising loop and
    # the image encoder's and the decoder's maps over pictures (the decoder's one attention, the
    # VAE's, is a kernel too).
    assert _kernels(loop.ops, MOSAIC) == sum(UNET_HEADS.values())
    assert sorted(loop.trips for loop in low.loops) == sorted([1, 1, loop.trips])
    vae_heads = {512: 1}  # the decoder's mid-block attention: one float32 head, 512 wide
    assert low.attention_heads[MOSAIC] == lanes(UNET_HEADS) + lanes(CLIP_HEADS) + lanes(vae_heads)
    assert CUDNN not in low.attention_heads


def test_unet_for_cuda_on_hopper(pinned_cuda_target):
    low = lowered(_unet("cuda"))
    _assert_clean(low)
    assert not low.loops
    assert low.attention_heads[CUDNN] == Counter(UNET_HEADS)


@pytest.mark.parametrize("pinned_cuda_target", [AMPERE], indirect=True)
def test_unet_for_cuda_before_hopper_keeps_head_160_off_cudnn(pinned_cuda_target):
    # cuDNN takes heads up to 128 before sm_90: the 160-wide ones run the bounded-memory
    # chunked attention (a loop over query blocks) at 256 tokens and XLA's at 64.
    low = lowered(_unet("cuda"))
    _assert_clean(low)
    assert low.attention_heads[CUDNN] == Counter({d: n for d, n in UNET_HEADS.items() if d <= 128})


def test_unet_for_tpu():
    low = lowered(_unet("tpu"))
    _assert_clean(low)
    assert not low.loops
    assert low.attention_heads[MOSAIC] == lanes(UNET_HEADS)


def test_cuda_without_a_known_cudnn_falls_back():
    # Unpinned on this CPU machine JAX finds no cuDNN, so "auto" must not emit kernels it
    # cannot vouch for: the export still works, with XLA and chunked attention.
    low = lowered(_unet("cuda"))
    assert CUDNN not in low.attention_heads and low.ops["stablehlo.dot_general"] > 0


# ----------------------------------------------------------------------------------------------
# Saving an exported program
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler", ["pndm", "lms"])
def test_exported_program_with_any_scheduler_state_serializes(scheduler):
    pipe, params = ImageVariationPipeline.from_pretrained("tiny", scheduler=scheduler, safety_checker=False)
    exported = export_sample(pipe, params, batch=1, num_inference_steps=3)
    restored = jax.export.deserialize(exported.serialize())
    assert restored.in_tree == exported.in_tree and restored.out_tree == exported.out_tree
    assert restored.mlir_module() == exported.mlir_module()


def test_exported_program_serializes_and_runs_as_the_pipeline():
    """serialize -> deserialize -> call gives the pictures ``generate`` gives (tiny model, this CPU)."""
    pipe, params = ImageVariationPipeline.from_pretrained("tiny", scheduler="ddim", safety_checker=False)
    steps, k, seed, guidance, eta = 3, 2, 7, 4.0, 0.5
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(2)]
    exported = export_sample(pipe, params, batch=2, num_images_per_prompt=k, num_inference_steps=steps)
    restored = jax.export.deserialize(exported.serialize())
    assert restored.platforms == ("cpu",)

    h, w = (s // pipe.vae_scale_factor for s in pipe.size())
    state = pipe.scheduler.set_timesteps(steps, (2 * k, h, w, pipe.unet.config.in_channels))
    key_data = jax.random.key_data(picture_keys(seed, np.arange(2 * k)))
    out = restored.call({n: params[n] for n in ("unet", "vae", "image_encoder")}, pipe.prepare_inputs(pictures),
                        key_data, np.float32(guidance), np.float32(eta), state)
    want = pipe.generate(pictures, params, seed=seed, num_images_per_prompt=k, num_inference_steps=steps,
                         guidance_scale=guidance, eta=eta, devices=jax.local_devices()[:1])
    assert np.all(np.asarray(out.nonfinite_step) == -1) and np.all(np.asarray(out.decoded_finite))
    # The same program on the same device: the same float32 pictures (measured: bit-identical).
    np.testing.assert_array_equal(np.asarray(out.images), want.images)

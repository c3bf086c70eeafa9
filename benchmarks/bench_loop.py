"""Where a denoising step's time goes: the compiled sampling loop against the UNet call alone, in one run.

Two measurements of the same shapes in one process:

- wall time: the UNet call alone (jitted, batch 2 = one guided step of one picture; median of
  ``--repeats`` after a warm-up) against the sampling program's cost per UNet call inside its loop
  (the program with padded tables, one executable, run at two step counts: the difference of the
  two best-of-``--repeats`` times over the difference of UNet calls, so the image encoding and
  decoding cancel out);
- XLA:CPU's per-op profile (``jax.profiler``): one run of each program traced, every executed op
  (thunk) attributed by the name scope XLA kept in its metadata: the UNet's modules, the loop's
  ``guidance`` (classifier-free guidance's concatenate, split and combine, and the input scaling),
  ``scheduler``, ``step_noise`` and ``finite_check`` scopes (imvar_jax/sampling.py), ops XLA added
  inside the loop with no scope of ours (copies of the loop carry, loop control), and what runs
  outside the loop (the CLIP encode, the VAE decode). XLA:CPU times an op it runs asynchronously
  (its convolutions and matmuls) only for its launch, so the UNet's op time is far below its wall
  time and is shown only to compare the UNet inside the loop with the UNet alone; the loop's other
  ops are elementwise and run synchronously, so their op time is what they cost, and it is put
  against the UNet call's wall time. Op times are summed over threads.

One picture, guidance 3, float32, one CPU device, the checkpoint's scheduler unless ``--scheduler``.

    python benchmarks/bench_loop.py --model /tmp/bench/flax --size 256 --steps 4 8
    python benchmarks/bench_loop.py --model tiny --size 64 --steps 4 8            # every code path, seconds
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

from provenance import code_version

# The name scopes of imvar_jax/sampling.py's loop body, and what each holds.
LOOP_SCOPES = {"guidance": "guidance: input scaling, CFG concatenate / split / combine",
               "step_noise": "step noise (DDIM eta, Euler ancestral)",
               "scheduler": "scheduler step",
               "finite_check": "finiteness check"}
UNET = "UNet2DConditionModel"
MODULES = {UNET: "UNet", "CLIPVisionModelWithProjection": "CLIP encode",
           "AutoencoderKL": "VAE"}
UNET_PROFILE_CALLS = 2
# Thunks that only run other thunks (their time is their children's).
CONTROL_FLOW = {"while", "conditional", "call"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="/tmp/bench/flax", help="converted Flax folder, or tiny")
    p.add_argument("--size", type=int, default=256, help="picture side in pixels (default 256)")
    p.add_argument("--steps", type=int, nargs=2, default=(4, 8), help="two step counts (default 4 8)")
    p.add_argument("--scheduler", default="pndm", help="scheduler name (default pndm)")
    p.add_argument("--eta", type=float, default=0.0, help="eta (DDIM; default 0)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (default 3)")
    p.add_argument("--top", type=int, default=8, help="how many of the loop's other ops to list (default 8)")
    return p.parse_args()


def hlo_index(text: str) -> tuple[dict[str, tuple[str, str, str, str]], dict[str, set[str]]]:
    """From an optimized HLO module's text: each instruction's (opcode, op_name, computation, while body or
    ""), and each computation's callees (the computations its instructions name)."""
    instructions: dict[str, tuple[str, str, str, str]] = {}
    members: dict[str, list[str]] = collections.defaultdict(list)
    references: dict[str, list[str]] = {}
    computation = ""
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            computation = head.group(1)
            continue
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if m and computation:
            opcode = re.match(r"([\w\-]+)\(", _after_type(line[m.end():]))
            op_name = re.search(r'op_name="([^"]*)"', line)
            body = re.search(r"body=%?([\w.\-]+)", line)
            instructions[m.group(1)] = (opcode.group(1) if opcode else "?", op_name.group(1) if op_name else "",
                                        computation, body.group(1) if body else "")
            members[computation].append(m.group(1))
            references[m.group(1)] = re.findall(r"%([\w.\-]+)", line[m.end():])
    callees = {c: {r for i in names for r in references[i] if r in members and r != c} for c, names in members.items()}
    # An op XLA rewrote (a reduce become a "wrapped_reduce-window", say) may keep only its primitive's name, no
    # scope: it is named after the scoped instructions it fuses, else after its operands.
    scoped = {c: op for _, op, c, _ in instructions.values() if "/" in op}
    for _ in range(3):
        for name, (opcode, op_name, computation, body) in instructions.items():
            if "/" in op_name or opcode == "copy":
                continue
            refs = references[name]
            inner = [scoped[c] for c in refs if c in scoped]
            operands = [instructions[r][1] for r in refs if r in instructions and "/" in instructions[r][1]]
            if inner or operands:
                instructions[name] = (opcode, (inner or operands)[0], computation, body)
    return instructions, callees


def _after_type(rest: str) -> str:
    """What follows an instruction's result type: a tuple type is a balanced ``(...)``, any other one word."""
    if not rest.startswith("("):
        return rest.split(" ", 1)[1] if " " in rest else ""
    depth = 0
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return rest[i + 1:].lstrip()
    return ""


def reachable(start: str, callees: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        c = todo.pop()
        if c not in seen:
            seen.add(c)
            todo.extend(callees.get(c, ()))
    return seen


def loop_computations(instructions, callees) -> set[str]:
    """The computations the denoising loop runs: everything under the body of the outermost while loop that
    holds UNet ops (the UNet's chunked attention may hold loops of its own)."""
    unet_computations = {c for _, op_name, c, _ in instructions.values() if f"/{UNET}/" in op_name}
    best: set[str] = set()
    for opcode, _, _, body in instructions.values():
        if opcode == "while":
            under = reachable(body, callees)
            if under & unet_computations and len(under) > len(best):
                best = under
    return best


def classify(opcode: str, op_name: str, inside_loop: bool) -> str:
    for module, label in MODULES.items():
        if f"/{module}" in op_name:
            return f"loop: {label}" if inside_loop else f"outside the loop: {label}"
    if inside_loop:
        for scope, label in LOOP_SCOPES.items():
            if f"/{scope}/" in op_name or op_name.endswith(f"/{scope}"):
                return f"loop: {label}"
        if opcode == "copy":
            return "loop: XLA's copies"
        # XLA rewrote these and kept only the primitive's name (a reduce of the attention's softmax, say).
        return "loop: no scope kept" if op_name and "/" not in op_name else "loop: XLA's own (loop control, other)"
    return "outside the loop: other"


def op_times(compiled_text: str, trace_dir: Path) -> dict[str, float]:
    """Summed op time (s) per thunk name of the newest trace in ``trace_dir``."""
    from jax.profiler import ProfileData

    module = re.search(r"HloModule ([\w.\-]+)", compiled_text).group(1)
    xplane = max(trace_dir.rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    seconds: dict[str, float] = collections.defaultdict(float)
    for plane in ProfileData.from_file(str(xplane)).planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if stats.get("hlo_module") == module and "hlo_op" in stats:
                    seconds[stats["hlo_op"]] += event.duration_ns * 1e-9
    return seconds


def profile(fn, trace_dir: Path) -> None:
    import jax

    jax.profiler.start_trace(str(trace_dir))
    try:
        fn()
    finally:
        jax.profiler.stop_trace()


def main() -> None:
    args = parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from imvar_jax import ImageVariationPipeline, apply_cpu_flags
    from imvar_jax.pipeline import TABLE_STEPS
    from imvar_jax.sampling import Conditioning, Models, SampleOptions, sample

    apply_cpu_flags()
    print(f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; {os.cpu_count()} cpus; "
          f"jax {jax.__version__}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; code {code_version()}", flush=True)
    pipe, params = ImageVariationPipeline.from_pretrained(args.model, safety_checker=False, dtype="float32",
                                                          scheduler=args.scheduler)
    f = pipe.vae_scale_factor
    latent = (args.size // f, args.size // f)
    s = pipe.image_encoder.config.image_size
    rng = np.random.default_rng(0)
    pixel_values = jnp.asarray(rng.normal(size=(1, 1, 3, s, s)).astype(np.float32))
    latents = jnp.asarray(rng.normal(size=(1, 4, *latent)).astype(np.float32))
    one = jnp.ones((1, 1), jnp.float32)
    cond = Conditioning(pixel_values, one, 0 * one)
    keys = jax.random.split(jax.random.key(0), 1)
    models = Models(pipe.unet, pipe.vae, pipe.image_encoder)
    opts = SampleOptions(num_images_per_prompt=1, latent_size=latent, do_cfg=True, latents_given=True,
                         with_callback=False, scheduler=pipe.scheduler, padded_tables=True)
    eta = jnp.float32(args.eta)
    program = jax.jit(lambda p, x, state: sample(models, opts, p, cond, keys, x, jnp.float32(3.0), eta, state,
                                                 jnp.int32(1), jnp.int32(0)).images)
    states = {n: pipe.scheduler.set_timesteps(n, (1, *latent, 4), padded_to=TABLE_STEPS) for n in args.steps}
    calls = {n: int(state.length) for n, state in states.items()}
    low, high = args.steps
    compiled = program.lower(params, latents, states[low]).compile()

    # The UNet alone, on what one guided step of the loop feeds it.
    unet = pipe.unet
    x2 = jnp.asarray(rng.normal(size=(2, *latent, 4)).astype(np.float32))  # [2, h, w, 4]
    context = jnp.asarray(rng.normal(size=(2, 1, unet.config.context_dim)).astype(np.float32))  # [2, 1, D]
    t = states[low].timesteps[0]
    unet_alone = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c)).lower(
        params["unet"], x2, t, context).compile()

    def run_unet():
        unet_alone(params["unet"], x2, t, context).block_until_ready()

    def run_program(n):
        compiled(params, latents, states[n]).block_until_ready()

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    run_unet()
    run_program(low)
    # Interleaved, so that the machine's drift over the run reaches every measurement alike.
    unet_times, times = [], {n: [] for n in args.steps}
    for _ in range(args.repeats):
        unet_times.append(timed(run_unet))
        for n in args.steps:
            times[n].append(timed(lambda: run_program(n)))
    best = {n: min(ts) for n, ts in times.items()}
    unet_s = statistics.median(unet_times)
    step_s = (best[high] - best[low]) / (calls[high] - calls[low])

    with tempfile.TemporaryDirectory(prefix="imvar-loop-trace-") as work:
        loop_dir, unet_dir = Path(work) / "loop", Path(work) / "unet"
        profile(lambda: run_program(high), loop_dir)
        profile(lambda: [run_unet() for _ in range(UNET_PROFILE_CALLS)], unet_dir)
        loop_text, unet_text = compiled.as_text(), unet_alone.as_text()
        loop_ops = op_times(loop_text, loop_dir)
        unet_ops = op_times(unet_text, unet_dir)

    instructions, callees = hlo_index(loop_text)
    in_loop = loop_computations(instructions, callees)
    if not in_loop:
        raise SystemExit("bench_loop: found no while loop holding UNet ops in the compiled program's text "
                         "(has XLA's HLO text format changed?)")
    parts: dict[str, float] = collections.defaultdict(float)
    rest_ops: list[tuple[float, str, str, str]] = []
    for name, secs in loop_ops.items():
        opcode, op_name, computation, _ = instructions.get(name, ("?", "", "", ""))
        if opcode in CONTROL_FLOW:
            continue
        part = classify(opcode, op_name, computation in in_loop)
        parts[part] += secs
        if part.startswith("loop") and part != "loop: UNet":
            rest_ops.append((secs, name, opcode, op_name))
    unet_instructions, _ = hlo_index(unet_text)
    unet_op_s = sum(secs for name, secs in unet_ops.items()
                    if unet_instructions.get(name, ("?",))[0] not in CONTROL_FLOW) / UNET_PROFILE_CALLS

    n_calls = calls[high]
    print(f"\n{args.size}x{args.size} ({latent[0]}x{latent[1]} latents), one picture, guided {args.scheduler}"
          f" (eta {args.eta}), {low} and {high} steps ({calls[low]} and {calls[high]} UNet calls), float32, "
          f"one CPU device; wall times best of {args.repeats} (program) / median of {args.repeats} (UNet):")
    print(f"| wall time | seconds |\n|---|---|")
    print(f"| UNet call alone (batch 2) | {unet_s:.4f} |")
    print(f"| sampling program at {low} / {high} steps | {best[low]:.3f} / {best[high]:.3f} |")
    print(f"| loop, per UNet call (difference / {calls[high] - calls[low]}) | {step_s:.4f} |")
    print(f"loop per step / UNet alone: {step_s / unet_s:.3f}")

    in_loop_total = sum(v for k, v in parts.items() if k.startswith("loop"))
    print(f"\nXLA:CPU op time of one {high}-step run ({n_calls} UNet calls), per UNet call:")
    print("| part | ms per step | share of the loop's op time |\n|---|---|---|")
    for key in sorted(parts, key=lambda k: (not k.startswith("loop"), k != "loop: UNet", -parts[k])):
        per = parts[key] / n_calls if key.startswith("loop") else parts[key]
        share = f"{100 * parts[key] / in_loop_total:.2f}%" if key.startswith("loop") else "(once per run)"
        print(f"| {key} | {1e3 * per:.3f}{'' if key.startswith('loop') else ' (whole run)'} | {share} |")
    rest = (in_loop_total - parts.get("loop: UNet", 0.0)) / n_calls
    print(f"| UNet alone, op time of one call (of {UNET_PROFILE_CALLS} traced) | {1e3 * unet_op_s:.3f} | |")
    print(f"The loop's ops outside the UNet: {1e3 * rest:.3f} ms per step, {100 * rest / unet_s:.2f}% of the UNet "
          f"call alone's wall time.")
    print(f"\nThe loop's {args.top} largest ops outside the UNet (ms per step; op name as XLA kept it):")
    for secs, name, opcode, op_name in sorted(rest_ops, reverse=True)[:args.top]:
        print(f"  {1e3 * secs / n_calls:8.3f}  {name} ({opcode})  {op_name}")


if __name__ == "__main__":
    main()

"""``imvar-jax`` command line."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import Counter

from .hub import DEFAULT_MODEL
from .precision import DTYPES


def _convert(args: argparse.Namespace) -> int:
    from .convert.checkpoint import convert_checkpoint
    from .hub import resolve_source

    start = time.perf_counter()
    src = resolve_source(args.src, args.revision)
    source_name = args.src if str(src) != args.src else None
    try:
        dst = convert_checkpoint(src, args.dst, dtype=args.dtype, source_name=source_name, revision=args.revision,
                                 progress=lambda name: print(f"converting {name}", file=sys.stderr),
                                 note=lambda line: print(f"imvar-jax convert: {line}", file=sys.stderr))
    except OSError as e:
        # A write that fails mid-conversion (a full disk, DST made by another process meanwhile): one
        # line naming the file, or for the final rename its target.
        where = f"{os.fsdecode(e.filename2 or e.filename)}: " if e.filename else ""
        print(f"imvar-jax convert: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {dst} ({args.dtype}) in {time.perf_counter() - start:.1f} s")
    return 0


def _join(args: argparse.Namespace, name: str) -> str | None:
    """Join the multi-process job the arguments name (before anything touches a JAX device); returns the
    name this process's messages go by, or None after printing why it could not join."""
    from . import distributed

    try:
        address, count, index = distributed.resolve(args.coordinator, args.num_processes, args.process_id)
        if address is not None:
            # JAX's runtime ends a process that cannot join with its own fatal message: say first what it waits for.
            print(f"{name}: process {index} of {count} joining the job at {address} (waiting up to "
                  f"{args.process_timeout} s for every process)", file=sys.stderr, flush=True)
        job = distributed.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed,
                                     timeout_s=args.process_timeout)
    except distributed.DistributedError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return None
    return f"{name} [process {job.process_id}/{job.num_processes}]" if job.is_multiprocess else name


def _generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import distributed, hub
    from .batch import OutputError, SourceError, printable, run_generate, run_interpolate, run_mix
    from .settings import GenerationSettings, SettingsError

    given = [what for what, value in (("INPUT", args.inputs), ("--mix", args.mix),
                                      ("--interpolate", args.interpolate)) if value]
    if len(given) != 1:
        args.subparser.print_usage(sys.stderr)
        why = (f"{' and '.join(given)} cannot be combined" if given else "nothing to generate from") + \
            ": give INPUT files, or --mix, or --interpolate"
        print(f"imvar-jax generate: error: {why}", file=sys.stderr)
        return 2
    name = _join(args, "imvar-jax generate")
    if name is None:
        return 1
    if not args.no_compile_cache:
        hub.enable_compile_cache()
        hub.enable_executable_cache()
    try:
        settings = GenerationSettings.from_args(args)

        lines = {"report": lambda line: tqdm.write(f"{name}: error: {line}", file=sys.stderr),
                 "note": lambda line: tqdm.write(f"{name}: {line}", file=sys.stderr)}
        if args.mix:
            summary = run_mix(args.mix, args.out, settings, negative=args.negative, start_over=args.start_over,
                              **lines)
        elif args.interpolate:
            summary = run_interpolate(args.interpolate, args.out, settings, negative=args.negative,
                                      start_over=args.start_over, **lines)
        else:
            summary = run_generate(args.inputs, args.out, settings, negative=args.negative,
                                   start_over=args.start_over, **lines)
    except SettingsError as e:
        # Settings that only the loaded model can judge (such as --size) are argument errors too.
        args.subparser.print_usage(sys.stderr)
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except (OutputError, SourceError, distributed.DistributedError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        # A write that fails mid-run (disk full, folder made read-only): one line, the file named.
        where = f"{printable(os.fsdecode(e.filename))}: " if e.filename else ""
        print(f"{name}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    print(summary.line())
    return 1 if summary.failures else 0


def _model_status(model: str, revision: str | None, dtype: str) -> str:
    from pathlib import Path

    from . import hub
    from .convert.checkpoint import is_converted

    if model == hub.TINY_MODEL:
        return "built in (random weights, nothing to download)"
    path = Path(model).expanduser()
    if path.is_dir():
        if is_converted(path):
            return f"converted Flax folder {path}"
        return (f"PyTorch diffusers folder {path}, converted in memory on every load "
                "(imvar-jax convert makes a Flax folder once)")
    if not hub.is_hub_id(model):
        return "not found: no such folder, and not a hub id of the form owner/name"
    where = hub.converted_dir(model, revision, dtype)
    pinned = hub.pinned_revision(model, revision)
    if hub.is_cached(model, revision, dtype):
        return f"revision {pinned}, {dtype}: cached, converted in {where}"
    return f"revision {pinned}, {dtype}: not cached; the first load downloads it and converts it into {where}"


def _info(args: argparse.Namespace) -> int:
    import flax
    import jax
    import jaxlib
    from huggingface_hub import constants

    from . import __version__, hub
    from .precision import default_dtype
    from .xla_flags import CPU_FLAGS, OPT_IN

    print(f"imvar-jax {__version__}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}")
    print(f"devices (default backend {jax.default_backend()}):")
    for (platform, kind), count in sorted(Counter((d.platform, d.device_kind) for d in jax.devices()).items()):
        print(f"  {platform}: {count} x {kind}")
    platform = jax.local_devices()[0].platform
    dtype = args.dtype or default_dtype(platform)
    print(f"default dtype: {default_dtype(platform)} (for the {platform} devices generate uses)")
    print(f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '')!r} (with {OPT_IN}=1 the imvar-jax command adds "
          f"{' '.join(CPU_FLAGS)}: faster on CPU, but pictures then depend on the device count; "
          f"see imvar_jax.xla_flags)")
    print(f"imvar-jax cache: {hub.cache_dir()} (IMVAR_JAX_CACHE)")
    print(f"compile cache: {hub.compile_cache_dir()}, compiled programs: {hub.executable_cache_dir()}")
    print(f"Hugging Face hub cache: {constants.HF_HUB_CACHE}")
    print(f"model {args.model}: {_model_status(args.model, args.revision, dtype)}")
    return 0


def _add_generate(sub) -> None:
    from .batch.creative import FPS
    from .settings import add_arguments

    gen = sub.add_parser(
        "generate", help="generate variations of many pictures into a folder (resumable)",
        usage="%(prog)s (INPUT ... | --mix PATH[:WEIGHT] ... | --interpolate PATH PATH ...) [options]",
        description="Generate variations of every input picture on every device. Outputs go to "
                    "OUT/<input stem>/<j>.png with the settings in PNG text chunks and one line per picture "
                    "in OUT/manifest.jsonl. Running the same command again skips finished pictures, so an "
                    "interrupted run can simply be restarted. Exit code 1 if any input could not be used. "
                    "Instead of INPUTs, --mix makes one mixed conditioning of several pictures and "
                    "--interpolate a sweep between them.")
    gen.add_argument("inputs", nargs="*", metavar="INPUT",
                     help="picture files (any extension), folders (searched recursively for image files) "
                          "or glob patterns (** recurses); a file named X.npy is a CLIP image embedding "
                          "[D] or [1, D] (numpy.save), varied like a picture into OUT/X/")
    add_arguments(gen)
    creative = gen.add_argument_group(
        "creative controls",
        "--mix and --interpolate replace the INPUTs and take pictures or .npy embeddings, in order; they run "
        "in one process. With them, --strength below 1 starts every picture from the first source listed, "
        "which must then be a picture. Their outputs carry the sources' sha256s (and weights) and are "
        "resumed like the others.")
    sources = creative.add_mutually_exclusive_group()
    sources.add_argument("--mix", nargs="+", type=_mix_source, metavar="PATH[:WEIGHT]",
                         help="mix the sources' embeddings (--mix-method; weight default 1, normalised to sum "
                              "1; a path's last ':' starts a weight only if a number follows) into one "
                              "conditioning, varied --num-per-image times into OUT/mix/<j>.png (and "
                              "OUT/mix/grid.png with --grid: the sources, then the variations)")
    sources.add_argument("--interpolate", nargs="+", metavar="PATH",
                         help="--frames pictures along the path through two or more sources' embeddings "
                              "(--mix-method), every frame from the same noise: OUT/interpolation/frame-<f>.png "
                              "(frame-<f>-<j>.png with --num-per-image above 1), grid.png with every frame, and "
                              f"animation.gif and animation.webp of variation 0 at {FPS} frames per second")
    creative.add_argument("--negative", metavar="PATH",
                          help="a picture or .npy embedding to steer every picture away from: classifier-free "
                               "guidance's unconditional half uses its embedding instead of the empty one "
                               "(its sha256 is recorded and, on a re-run, compared like a setting)")
    gen.add_argument("--out", default="variations", help="output folder (default ./variations)")
    gen.add_argument("--start-over", action="store_true",
                     help="when OUT holds outputs made with other settings, delete imvar-jax's earlier outputs "
                          "and manifest there first (other files are never touched); without it such a run "
                          "is refused")
    gen.add_argument("--no-compile-cache", action="store_true",
                     help="do not use JAX's persistent compilation cache")
    _add_job_arguments(gen, "the pictures are spread over the devices of all of them")
    gen.set_defaults(func=_generate, subparser=gen)


def _add_job_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    job = parser.add_argument_group(
        "multi-process jobs", f"Run the same command on every host (or process) with one shared --out: {what}. "
        "Omit these for one process.")
    job.add_argument("--distributed", action="store_true",
                     help="join the job JAX detects from the cluster (TPU pod slices, SLURM, Open MPI)")
    job.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                     help="address of process 0, where the job meets (default $JAX_COORDINATOR_ADDRESS)")
    job.add_argument("--num-processes", type=int, metavar="N", default=None,
                     help="number of processes in the job (default $JAX_NUM_PROCESSES)")
    job.add_argument("--process-id", type=int, metavar="I", default=None,
                     help="this process's number, 0..N-1 (default $JAX_PROCESS_ID)")
    job.add_argument("--process-timeout", type=_positive_seconds, metavar="S", default=300,
                     help="seconds to wait for every process to join and, later, to reach the same point of "
                          "the job before failing (default 300)")


def _mix_source(text: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:WEIGHT`` -> ``(path, weight)``; a path with a ':' in it stays whole unless a number
    follows its last ':'."""
    path, colon, tail = text.rpartition(":")
    if not colon:
        return text, 1.0
    try:
        weight = float(tail)
    except ValueError:
        if os.path.lexists(path) and not os.path.lexists(text):
            raise argparse.ArgumentTypeError(f"{text!r}: the weight {tail!r} is not a number "
                                             f"(expected PATH or PATH:WEIGHT)") from None
        return text, 1.0
    if not math.isfinite(weight) or weight < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite weight >= 0, got {tail}")
    return path, weight


def _positive_seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of seconds, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 second, got {value}")
    return value


def _add_info(sub) -> None:
    from .hub import DEFAULT_MODEL

    info = sub.add_parser("info", help="devices, versions, cache folders and whether a model is cached",
                          description="Show the devices JAX sees, versions, cache folders, and whether "
                                      "--model is ready to load without a download or conversion.")
    info.add_argument("--model", default=DEFAULT_MODEL, help=f"model to check (default {DEFAULT_MODEL})")
    info.add_argument("--revision", default=None, help="hub revision to check")
    info.add_argument("--dtype", choices=list(DTYPES), default=None,
                      help="dtype of the converted copy to check (default: what generate would use)")
    info.set_defaults(func=_info)


def _train(args: argparse.Namespace) -> int:
    from .batch.inputs import InputError
    from .distributed import DistributedError
    from .settings import SettingsError
    from .training.optim import TrainConfig
    from .training.run import RunSettings, train

    name = _join(args, "imvar-jax train")
    if name is None:
        return 1
    settings = None
    if not args.resume:
        if not args.data:
            args.subparser.error("DATA: name the pictures to train on (or pass --resume)")
        try:
            optim = TrainConfig(learning_rate=args.lr, warmup_steps=args.warmup, trainable=args.trainable,
                                p_uncond=args.p_uncond, ema_decay=args.ema, accumulate=args.accumulate)
            settings = RunSettings(data=tuple(args.data), model=args.model,
                                   steps=RunSettings.steps if args.steps is None else args.steps,
                                   batch_size=args.batch_size, seed=args.seed, save_every=args.save_every,
                                   keep=args.keep, sample_every=args.sample_every,
                                   sample_steps=args.sample_steps, export=args.export, optim=optim)
        except SettingsError as e:
            args.subparser.error(str(e))
    if not args.no_compile_cache:
        from . import hub

        hub.enable_compile_cache()
        hub.enable_executable_cache()
    from tqdm import tqdm

    bar = None

    def progress(line: dict, steps: int) -> None:
        nonlocal bar
        if bar is None:  # made at the first step, so that a resumed run's bar starts where the run stands
            bar = tqdm(total=steps, initial=line["step"] - 1, unit="step", file=sys.stderr, dynamic_ncols=True)
        bar.set_postfix(loss=f"{line['loss']:.4f}", lr=f"{line['lr']:.2e}", refresh=False)
        bar.update(1)
        if line["step"] == steps:  # the export that follows reports below a finished bar
            bar.close()

    try:
        train(settings, args.out, resume=args.resume, steps=args.steps if args.resume else None,
              log=lambda line: tqdm.write(f"{name}: {line}", file=sys.stderr), progress=progress)
    except (FileNotFoundError, InputError, DistributedError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()
    return 0


def _add_train(sub) -> None:
    import dataclasses

    from .training.export import EXPORTS
    from .training.optim import TRAINABLE, TrainConfig
    from .training.run import RunSettings

    opt = TrainConfig()  # the defaults shown and used are the settings objects' own
    run = {f.name: f.default for f in dataclasses.fields(RunSettings) if f.default is not dataclasses.MISSING}
    train = sub.add_parser(
        "train", help="fine-tune the UNet on a folder of pictures (resumable)",
        description="Fine-tune the image-variation UNet on pictures, each conditioned on its own CLIP image "
                    "embedding. RUN gets settings.json, metrics.jsonl and checkpoints/; --resume continues "
                    "the run saved there with its recorded settings.")
    train.add_argument("data", nargs="*", metavar="DATA", help="picture files, folders or glob patterns")
    train.add_argument("--model", default=run["model"], help=f"model to fine-tune (default {run['model']})")
    train.add_argument("--out", required=True, metavar="RUN", help="the run's folder")
    train.add_argument("--resume", action="store_true", help="continue the run in RUN from its latest checkpoint")
    train.add_argument("--steps", type=int, default=None,
                       help=f"steps in all (default {run['steps']}; with --resume: the recorded number, or more)")
    train.add_argument("--batch-size", type=int, default=run["batch_size"],
                       help=f"pictures per step over every device (default {run['batch_size']})")
    train.add_argument("--lr", type=float, default=opt.learning_rate,
                       help=f"peak learning rate (default {opt.learning_rate})")
    train.add_argument("--warmup", type=int, default=opt.warmup_steps,
                       help=f"linear warm-up steps (default {opt.warmup_steps})")
    train.add_argument("--trainable", choices=list(TRAINABLE), default=opt.trainable,
                       help=f"the whole UNet, or only its cross-attention layers (default {opt.trainable})")
    train.add_argument("--p-uncond", type=float, default=opt.p_uncond,
                       help=f"probability of the zero (no image) condition (default {opt.p_uncond})")
    train.add_argument("--ema", type=float, default=opt.ema_decay,
                       help=f"EMA decay of the params (default {opt.ema_decay})")
    train.add_argument("--accumulate", type=int, default=opt.accumulate,
                       help=f"batches per optimizer update (default {opt.accumulate})")
    train.add_argument("--save-every", type=int, default=run["save_every"],
                       help=f"checkpoint every N steps (default {run['save_every']})")
    train.add_argument("--keep", type=int, default=run["keep"], help=f"checkpoints kept (default {run['keep']})")
    train.add_argument("--seed", type=int, default=run["seed"], help=f"the run's seed (default {run['seed']})")
    train.add_argument("--sample-every", type=int, default=run["sample_every"],
                       help="every N steps, a grid of variations of the first pictures in RUN/samples/ "
                            "(default: none)")
    train.add_argument("--sample-steps", type=int, default=run["sample_steps"],
                       help=f"denoising steps of the sample grids (default {run['sample_steps']})")
    train.add_argument("--export", choices=list(EXPORTS), default=run["export"],
                       help="which params the run's end writes to RUN/export/step-N/ as diffusers and imvar-jax "
                            f"pipelines: the EMA, the raw params or both (default {run['export']})")
    train.add_argument("--no-compile-cache", action="store_true",
                       help="do not keep compiled programs on disk (as generate)")
    _add_job_arguments(train, "each step's batch is split over the devices of all of them, and the run is "
                              "the same as in one process with as many devices")
    train.set_defaults(func=_train, subparser=train)


def _serve(args: argparse.Namespace) -> int:
    from .settings import GenerationSettings, SettingsError

    try:
        from .serving import ServeSettings
        from .serving.settings import api_key_from_env, parse_size

        sizes = tuple(parse_size(text) for text in args.sizes or ())
        generation = GenerationSettings.from_args(args)
        settings = ServeSettings(
            generation=generation, host=args.host, port=args.port, api_key=api_key_from_env(args.api_key),
            sizes=sizes, batch_per_device=args.batch_per_device, max_wait_ms=args.max_wait_ms,
            max_queue=args.max_queue, max_body_bytes=args.max_body_mb << 20, max_pixels=args.max_pixels,
            body_timeout_s=args.body_timeout, url_ttl_s=args.url_ttl, store_pictures=args.store_pictures,
            max_steps=args.max_steps)
    except SettingsError as e:
        args.subparser.error(str(e))
    try:
        from .serving.app import serve
    except ImportError as e:
        print(f"imvar-jax serve: error: the server needs the serve extra ({e.name} is missing): "
              f"pip install 'imvar-jax[serve]'", file=sys.stderr)
        return 1
    if not args.no_compile_cache:
        from . import hub

        hub.enable_compile_cache()
        hub.enable_executable_cache()
    if settings.api_key is None and settings.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"imvar-jax serve: warning: listening on {settings.host} without an API key: anyone who reaches "
              f"it can use the devices (--api-key or $IMVAR_JAX_API_KEY)", file=sys.stderr)
    return serve(settings, on_failure=lambda why: print(f"imvar-jax serve: error: {why}", file=sys.stderr))


def _add_serve(sub) -> None:
    from .serving.settings import API_KEY_ENV, MAX_N, SERVED_FIELDS, ServeSettings
    from .settings import GenerationSettings, add_arguments

    d = ServeSettings()
    serve = sub.add_parser(
        "serve", help="an OpenAI-compatible image-variations server (POST /v1/images/variations)",
        description="Serve OpenAI's image-variations API, with a web page at /. Requests from all clients are "
                    "batched onto every device; a request's pictures equal imvar-jax generate's with the same "
                    "seed and settings. /health answers 200 once every --size is compiled. Extensions to "
                    f"OpenAI's fields: seed, steps, guidance_scale, scheduler; n is 1..{MAX_N}.")
    add_arguments(serve, only=SERVED_FIELDS, defaults=GenerationSettings(guidance=d.generation.guidance))
    serve.add_argument("--size", action="append", dest="sizes", metavar="WxH",
                       help="a size requests may ask for, width x height as OpenAI writes it (repeat for several; "
                            "the first is the default; default: the model's own); each is compiled at start-up")
    serve.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host}: this machine only)")
    serve.add_argument("--port", type=int, default=d.port, help=f"port (default {d.port})")
    serve.add_argument("--api-key", default=None,
                       help=f"require 'Authorization: Bearer KEY' (default ${API_KEY_ENV}; none: no key needed)")
    serve.add_argument("--batch-per-device", type=int, default=d.batch_per_device,
                       help=f"pictures per device in one program call (default {d.batch_per_device})")
    serve.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                       help="how long a request waits for others to share its program call "
                            f"(default {d.max_wait_ms:g})")
    serve.add_argument("--max-queue", type=int, default=d.max_queue,
                       help=f"pictures waiting or running before new requests get 429 (default {d.max_queue})")
    serve.add_argument("--max-steps", type=int, default=d.max_steps,
                       help=f"the most steps a request may ask for (default {d.max_steps}; each new step count "
                            "or scheduler compiles on its first request)")
    serve.add_argument("--max-body-mb", type=int, default=d.max_body_bytes >> 20,
                       help=f"largest request body in MiB (default {d.max_body_bytes >> 20})")
    serve.add_argument("--max-pixels", type=int, default=d.max_pixels,
                       help=f"largest uploaded picture in pixels, width x height (default {d.max_pixels})")
    serve.add_argument("--body-timeout", type=float, default=d.body_timeout_s,
                       help=f"seconds a client may pause while sending a body (default {d.body_timeout_s:g})")
    serve.add_argument("--url-ttl", type=float, default=d.url_ttl_s,
                       help=f"seconds a response_format=url picture stays available (default {d.url_ttl_s:g})")
    serve.add_argument("--store-pictures", type=int, default=d.store_pictures,
                       help=f"response_format=url pictures kept at most (default {d.store_pictures})")
    serve.add_argument("--no-compile-cache", action="store_true",
                       help="do not use JAX's persistent compilation cache")
    serve.set_defaults(func=_serve, subparser=serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imvar-jax", description="Stable Diffusion Image Variations in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert a PyTorch diffusers checkpoint to a Flax checkpoint folder",
                          description="Convert a PyTorch diffusers checkpoint (local folder or hub id) into a "
                                      "Flax checkpoint folder that from_pretrained loads without PyTorch.")
    conv.add_argument("src", help=f"local diffusers folder or hub id (e.g. {DEFAULT_MODEL})")
    conv.add_argument("dst", help="new folder to write (must not exist)")
    conv.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of the stored params")
    conv.add_argument("--revision", default=None, help="hub revision (branch, tag or commit), e.g. v2.0")
    conv.set_defaults(func=_convert)
    _add_generate(sub)
    _add_info(sub)
    _add_train(sub)
    _add_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .convert.common import ConversionError
    from .models.config import ConfigError
    from .xla_flags import apply_cpu_flags, asked_for

    # Before any JAX backend starts (parsing --help starts none): the flags take effect only then.
    if asked_for():
        apply_cpu_flags()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConversionError, ConfigError, FileExistsError, ValueError) as e:
        print(f"imvar-jax {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"imvar-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

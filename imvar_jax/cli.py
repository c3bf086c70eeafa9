"""``imvar-jax`` command line."""

from __future__ import annotations

import argparse
import sys
import time

from .convert.checkpoint import HUB_DEFAULT, DTYPES


def _convert(args: argparse.Namespace) -> int:
    from .convert.checkpoint import convert_checkpoint, resolve_source

    start = time.perf_counter()
    src = resolve_source(args.src, args.revision)
    source_name = args.src if str(src) != args.src else None
    dst = convert_checkpoint(src, args.dst, dtype=args.dtype, source_name=source_name, revision=args.revision,
                             progress=lambda name: print(f"converting {name}", file=sys.stderr))
    print(f"wrote {dst} ({args.dtype}) in {time.perf_counter() - start:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imvar-jax", description="Stable Diffusion Image Variations in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert a PyTorch diffusers checkpoint to a Flax checkpoint folder",
                          description="Convert a PyTorch diffusers checkpoint (local folder or hub id) into a "
                                      "Flax checkpoint folder that from_pretrained loads without PyTorch.")
    conv.add_argument("src", help=f"local diffusers folder or hub id (e.g. {HUB_DEFAULT})")
    conv.add_argument("dst", help="new folder to write (must not exist)")
    conv.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of the stored params")
    conv.add_argument("--revision", default=None, help="hub revision (branch, tag or commit), e.g. v2.0")
    conv.set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .convert.common import ConversionError
    from .models.config import ConfigError

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

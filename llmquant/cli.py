"""The `llmquant` command: `quantize` a checkpoint, `eval` perplexity against a baseline."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .errors import first_line, missing_module
from .formats.registry import format_names
from .methods.presets import METHOD_NAMES, get_preset  # plain data: --help imports no torch

EXIT_BAD_INPUT = 2


def _group_size(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be an integer, got {text!r}") from None


def _add_quantize_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="quantize a Hugging Face checkpoint into an llmquant folder",
        description="Quantize SRC (a local folder or a Hub id) into OUT: packed safetensors shards, "
        "config.json with quantization_config, tokenizer, generation config and a model card.",
    )
    parser.add_argument("src", metavar="SRC", help="model folder or Hub id (floating-point safetensors)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="folder to write (must not exist)")
    parser.add_argument("--bits", type=int, default=4, help="code width: 2, 3, 4 or 8 (default 4)")
    parser.add_argument(
        "--group-size", type=_group_size, default=128, help="32, 64, 128, 256, or -1 for per row (default 128)"
    )
    parser.add_argument("--sym", action="store_true", help="symmetric codes (no zero points)")
    parser.add_argument(
        "--method",
        default="rtn",
        help="how codes are chosen: rtn (default, no data), gptq-rot (best quality: rotations folded into the "
        "weights, then GPTQ + clipping search; calibrated; a tied head is untied), gptq (the same without "
        f"rotations); all: {', '.join(METHOD_NAMES)} (docs/METHODS.md)",
    )
    parser.add_argument(
        "--skip",
        nargs="+",
        metavar="NAME",
        default=None,
        help="modules kept in floating point (default: the output head)",
    )
    _add_output_arguments(parser)
    from .calibration.data import add_arguments as add_calibration_arguments

    add_calibration_arguments(parser)  # quantize only: convert never calibrates


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        choices=format_names(),
        default="llmquant",
        help=f"checkpoint layout to write: llmquant (default), {' or '.join(format_names()[1:])} (read by vLLM, "
        "SGLang, TGI, transformers)",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_convert_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help=f"rewrite a quantized checkpoint ({', '.join(format_names())}) into another format",
        description="Rewrite the quantized checkpoint SRC into OUT in --format, without re-quantizing: codes, "
        "scales and zero points are carried over bit for bit.",
    )
    parser.add_argument("src", metavar="SRC", help=f"quantized model folder ({', '.join(format_names())})")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="folder to write (must not exist)")
    _add_output_arguments(parser)


def _warn(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)


def _run_convert(args: argparse.Namespace) -> int:
    from .checkpoint.convert import convert_checkpoint

    summary = convert_checkpoint(
        args.src,
        args.output,
        args.format,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(f"wrote {args.output}")
    print(f"  {summary.source_format} -> {summary.target_format}: {summary.layers} layers, bit-exact")
    print(f"  size: {summary.bytes_after / 2**20:.1f} MiB, time: {summary.seconds:.1f} s")
    _warn(summary.warnings)
    return 0


def _run_quantize(args: argparse.Namespace) -> int:
    from .calibration.data import check_seqlen_for, load_tokenizer
    from .calibration.data import from_arguments as calibration_from_arguments
    from .checkpoint.quantize import quantize_checkpoint
    from .config import QuantConfig

    config = QuantConfig(
        bits=args.bits, group_size=args.group_size, sym=args.sym, method=args.method, modules_to_not_convert=args.skip
    )
    calibration = None
    if get_preset(config.method).calibrated:  # loaded once the plan is checked (a refused family costs nothing)
        check_seqlen_for(args.src, args.calib_seqlen)  # before the tokenizer and the text are read
        calibration = lambda: calibration_from_arguments(load_tokenizer(args.src), args)  # noqa: E731
    summary = quantize_checkpoint(
        args.src,
        args.output,
        config,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        progress=not args.quiet,
        calibration=calibration,
        fmt=args.format,
    )
    mib = 2**20
    print(f"wrote {args.output}" + ("" if args.format == "llmquant" else f" ({args.format} format)"))
    print(
        f"  {config.short_name()} ({config.method}): {summary.params_quantized:,} of {summary.params_total:,} "
        f"parameters quantized in {len(summary.layers)} layers"
    )
    print(f"  bits per weight of the quantized layers (codes + scales + zeros): {summary.bits_per_weight:.3f}")
    print(
        f"  checkpoint size, all tensors: {summary.bytes_before / mib:.1f} MiB -> {summary.bytes_after / mib:.1f} MiB "
        f"({summary.bytes_before / max(summary.bytes_after, 1):.2f}x smaller)"
    )
    print(f"  time: {summary.seconds:.1f} s")
    _warn(summary.warnings)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="llmquant", description="Weight-only quantization for Hugging Face LLMs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_quantize_parser(subparsers)
    _add_convert_parser(subparsers)
    from .evals import cli as eval_cli

    eval_cli.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "quantize":
            return _run_quantize(args)
        if args.command == "convert":
            return _run_convert(args)
        from .evals import cli as eval_cli

        return eval_cli.run(args)
    except (ValueError, OSError) as error:  # bad input: one line, no traceback
        print(f"llmquant {args.command}: error: {first_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ModuleNotFoundError as error:  # a dependency missing from the environment: say how to install it
        top = (error.name or "").partition(".")[0]
        message = missing_module(top) if top and top != "llmquant" else None
        if message is None:
            raise  # our own module, or one that exists but failed inside: a bug, keep the traceback
        print(f"llmquant {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("llmquant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

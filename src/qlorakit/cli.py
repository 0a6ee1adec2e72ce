"""`qlorakit ...`: thin commands over the library. Errors a user can cause print one line, no traceback."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from .errors import QlorakitError

Command = Callable[[argparse.Namespace], int | None]


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .model.quantize_checkpoint import quantize_checkpoint

    quantize_checkpoint(
        args.model_dir,
        args.out_dir,
        blocksize=args.blocksize,
        quant_type=args.quant_type,
        double_quant=not args.no_double_quant,
        compute_dtype=args.compute_dtype,
        overwrite=args.overwrite,
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlorakit",
        description="QLoRA fine-tuning: NF4 + double quantization, 4-bit LoRA layers, paged optimizers.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more, and show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser(
        "quantize",
        help="write a pre-quantized (bitsandbytes-format) 4-bit checkpoint of a Hugging Face causal LM folder",
        description="Quantize the linear layers of the transformer blocks to 4 bits and write a checkpoint that "
        "transformers + bitsandbytes load with from_pretrained. Embeddings, norms and the head keep their dtype.",
    )
    q.add_argument("model_dir", help="a local Hugging Face causal-LM folder (config.json + *.safetensors)")
    q.add_argument("out_dir", help="where to write the quantized checkpoint (must not exist unless --overwrite)")
    q.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4")
    q.add_argument("--blocksize", type=int, default=64, help="4-bit block size, a power of two in 32..4096")
    q.add_argument("--no-double-quant", action="store_true", help="keep fp32 absmax constants")
    q.add_argument("--compute-dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    q.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    q.set_defaults(func=_cmd_quantize)

    d = sub.add_parser("demo", help="a short demonstration on the bundled default model")
    d.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except QlorakitError as err:
        if args.verbose:
            raise
        print(f"qlorakit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qlorakit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

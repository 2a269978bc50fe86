"""``csm-mlx convert``: CSM weights (original, transformers or MLX layout) → MLX safetensors + config.json."""

from __future__ import annotations

import argparse
import logging
import sys

from ..weights.convert import QUANT_BITS, convert_csm
from ..weights.hub import ModelNotAvailable, resolve_repo
from ..weights.io import WeightsError
from .signals import run_main


def setup_arg_parser() -> argparse.ArgumentParser:
    """Options of ``csm-mlx convert``."""
    parser = argparse.ArgumentParser(prog="csm-mlx convert", description=__doc__)
    parser.add_argument(
        "source", help="checkpoint file or directory (original .pt/.safetensors, or transformers dir), or a hub repo id"
    )
    parser.add_argument("out_dir", help="output directory (model.safetensors + config.json)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quantize", type=int, choices=QUANT_BITS, default=None, help="bits per weight")
    parser.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; returns 0, or 1 with a one-line message on a bad checkpoint or option."""
    args = setup_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def run() -> int:
        source = resolve_repo(args.source)
        print(convert_csm(source, args.out_dir, dtype=args.dtype, bits=args.quantize, group_size=args.group_size))
        return 0

    errors = (WeightsError, ValueError, ModelNotAvailable)
    return run_main(run, errors, "no output written", prefix="csm-mlx convert")


if __name__ == "__main__":
    sys.exit(main())

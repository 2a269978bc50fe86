"""``csm-mlx fuse``: merge LoRA adapters into the base weights, as a ``csm-mlx convert``-style folder."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..training.fuse import fuse_adapters
from ..weights.hub import DEFAULT_MODEL, ModelNotAvailable, resolve_repo
from ..weights.io import WeightsError
from .signals import run_main


def setup_arg_parser() -> argparse.ArgumentParser:
    """Options of ``csm-mlx fuse``."""
    p = argparse.ArgumentParser(prog="csm-mlx fuse", description=__doc__)
    p.add_argument("adapter", type=Path, help="adapter folder written by `csm-mlx finetune`")
    p.add_argument("out_dir", type=Path, help="output folder (model.safetensors + config.json)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="base weights the adapters were trained on")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: the checkpoint's")
    return p


def main(argv: list[str] | None = None) -> int:
    """Fuse; returns 0, or 1 with one line on bad input."""
    args = setup_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def run() -> int:
        print(fuse_adapters(resolve_repo(args.model), args.adapter, args.out_dir, dtype=args.dtype))
        return 0

    errors = (WeightsError, ValueError, ModelNotAvailable, OSError)
    return run_main(run, errors, "no output written", prefix="csm-mlx fuse")


if __name__ == "__main__":
    sys.exit(main())

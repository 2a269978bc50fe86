"""``csm-mlx`` console script: dispatches ``csm-mlx <command> ...`` to one tool module.

Each tool is also runnable as ``python -m csm.cli.<tool>`` (or ``python -m src.csm.cli.<tool>``
from a checkout) and owns its own argument parser through ``main(argv)``.
"""

from __future__ import annotations

import importlib
import sys

#: command name -> (module under csm.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "speak": ("generate_mlx", "synthesize speech from text to a WAV/FLAC file"),
    "convert": ("convert", "convert CSM weights to MLX safetensors (optionally quantized)"),
    "token-test": ("mlx_token_test", "compare the MLX sampler with the PyTorch reference sampler"),
    "finetune": ("finetune", "fine-tune CSM (LoRA or full) on your own recordings"),
    "fuse": ("fuse", "merge LoRA adapters into the base weights"),
    "serve": ("serve", "OpenAI-compatible speech server (POST /v1/audio/speech) with a web page"),
    "batch": ("batch", "synthesize a JSONL/text file of utterances into a folder with a manifest"),
}


def _usage() -> str:
    lines = ["usage: csm-mlx <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `csm-mlx <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``csm-mlx`` console script."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"csm-mlx: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f".{COMMANDS[command][0]}", __name__)
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

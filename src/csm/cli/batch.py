"""``csm-mlx batch``: a JSONL or text file of utterances → a folder of audio files + ``manifest.jsonl``.

JSONL lines: ``{"id": "a1", "text": "...", "speaker": 0, "voice": "name", "seed": 1,
"temperature": 0.9, "topk": 50}`` (only ``text`` is required); a text file has one utterance a
line. Resumable (a rerun skips what is done), every file written atomically, a failing line is
recorded in the manifest and the job goes on (exit status 1 at the end if any failed).
``--ray [ADDRESS]`` runs the same job on Ray actors (a local Ray when no address is given).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from .generate_mlx import USER_ERRORS
from .serve import add_model_args, load_generator
from .signals import run_main

logger = logging.getLogger("csm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csm-mlx batch", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("input", type=Path, help="a .jsonl file (one JSON object a line) or a text file")
    parser.add_argument("--out", "-o", type=Path, required=True, help="output folder (audio files + manifest.jsonl)")
    parser.add_argument("--format", choices=["wav", "flac"], default="wav")
    parser.add_argument("--seed", type=int, default=0, help="lines without a seed get SEED + line number")
    parser.add_argument("--temperature", type=float, default=0.9, help="default for lines without one (0 = greedy)")
    parser.add_argument("--topk", type=int, default=50, help="default for lines without one")
    parser.add_argument("--max-audio-ms", type=float, help="length cap per item (default: 3000 + 150 ms per character)")
    parser.add_argument("--voice", action="append", default=[], metavar="NAME=PATH",
                        help="a voice lines can name (folder of .wav+.txt, JSON list); repeatable")
    add_model_args(parser)
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                        help="run on Ray actors: a local Ray, or the cluster at ADDRESS")
    parser.add_argument("--workers", type=int, default=2, help="Ray actors (one model each)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    from ..batch.items import read_items
    from ..batch.run import run_job, synthesize

    if not args.input.is_file():
        raise ValueError(f"input file {args.input} not found")
    items = read_items(args.input, base_seed=args.seed, temperature=args.temperature, topk=args.topk)
    if not items:
        raise ValueError(f"{args.input} has no lines to speak")
    voices = dict(_voice_spec(spec) for spec in args.voice)

    def progress(total: int):
        return tqdm(total=total, unit="utt", desc="batch", disable=args.quiet, dynamic_ncols=True)

    if args.ray:
        from ..batch.ray_actors import ray_outcomes

        def outcomes(todo):
            return ray_outcomes(todo, address=None if args.ray == "local" else args.ray, workers=args.workers,
                                model=str(args.model), dtype=args.dtype, quantize=args.quantize, slots=args.slots,
                                voices=voices, max_audio_ms=args.max_audio_ms)

        ok, failed = run_job(items, args.out, outcomes, audio_format=args.format, progress=progress)
    else:
        from ..generation.engine import Engine

        generator = load_generator(args)
        with Engine(generator, slots=args.slots, max_queue=4 * args.slots) as engine:

            def outcomes(todo):
                return synthesize(generator, engine, todo, voices, args.max_audio_ms)

            ok, failed = run_job(items, args.out, outcomes, audio_format=args.format, progress=progress)
    done = len(items) - ok - failed
    logger.info("%d written, %d failed, %d already done; manifest: %s", ok, failed, done, args.out / "manifest.jsonl")
    if failed:
        print(f"error: {failed} of {len(items)} items failed (see {args.out / 'manifest.jsonl'})", file=sys.stderr)
        return 1
    return 0


def _voice_spec(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--voice takes NAME=PATH, got {spec!r}")
    return name, path


def main(argv: list[str] | None = None) -> int:
    """Run the batch job; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s: %(message)s")
    return run_main(lambda: run(args), USER_ERRORS, "finished items are in the manifest; rerun to resume")


if __name__ == "__main__":
    sys.exit(main())

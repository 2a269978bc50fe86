"""Speak text to a WAV/FLAC file: ``python -m csm.cli.generate_mlx --text "..." --output out.wav``.

Also ``csm-mlx speak`` and, from a checkout, ``python -m src.csm.cli.generate_mlx``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..audio import AudioError, AudioWriter, check_output_path, read_audio, trim_trailing_silence, write_audio
from ..backend import log_backend
from ..config import FRAME_RATE, SAMPLE_RATE
from ..prompt import Segment
from ..weights.hub import DEFAULT_MODEL, ModelNotAvailable, is_repo_id
from ..weights.io import WeightsError
from .signals import run_main

logger = logging.getLogger("csm")

#: Errors that end the run with one line on stderr and exit status 1 (no traceback).
USER_ERRORS = (ValueError, AudioError, WeightsError, ModelNotAvailable, OSError)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where there is one and the help text doesn't already give it."""

    def _get_help_string(self, action):
        empty = action.default is None or action.default is False or action.default == []
        if empty or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csm-mlx speak",
        description="Synthesize speech with Sesame's CSM-1B on MLX (24 kHz mono output).",
        formatter_class=_HelpFormatter,
    )
    what = parser.add_argument_group("what to say")
    what.add_argument("--text", "-t", help="text to speak (long text is split into sentences)")
    what.add_argument("--text-file", type=Path, help="read the text from a file instead")
    what.add_argument("--script", type=Path,
                      help="a conversation: JSON [{speaker, text}, ...] or lines 'SPEAKER: text'")
    what.add_argument("--speaker", type=int, default=0, help="speaker id of the generated voice")
    what.add_argument("--no-split", action="store_true", help="speak --text as one turn, without sentence splitting")

    voice = parser.add_argument_group("voice and context")
    voice.add_argument("--voice", help="a voice: folder of .wav+.txt, a JSON list, or conversational_a/_b")
    voice.add_argument("--context-audio", type=Path, action="append", default=[],
                       help="context audio file (repeatable; pairs with --context-text in order)")
    voice.add_argument("--context-text", action="append", default=[], help="transcript of each --context-audio")
    voice.add_argument("--context-speaker", type=int, action="append", default=[],
                       help="speaker id of each context segment (default: --speaker, which clones the voice)")

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=float, default=0.9, help="0 = greedy")
    sampling.add_argument("--topk", type=int, default=50, help="keep the k most likely codes (ties at the k-th kept)")
    sampling.add_argument("--seed", type=int, help="MLX seed: the same seed repeats the same WAV bytes")
    sampling.add_argument("--torch-seed", type=int,
                          help="draw the tokens PyTorch's CPU sampler draws after torch.manual_seed(N)")
    sampling.add_argument("--safety", action="store_true", help="never sample codes 1-31 (changes the distribution)")
    sampling.add_argument("--precision", choices=["float32", "reference"], default=None,
                          help="sampler arithmetic (default: the sampler's default, see docs)")
    sampling.add_argument("--max-audio-ms", type=float,
                          help="cap per turn (default: 3000 + 150 ms per character, at most 90 s)")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default=DEFAULT_MODEL, help="hub repo id or local path of the CSM weights")
    model.add_argument("--tokenizer", help="tokenizer.json path or hub repo (default: found with the weights)")
    model.add_argument("--mimi", help="Mimi checkpoint path or hub repo (default: found with the weights)")
    model.add_argument("--dtype", choices=["auto", "bfloat16", "float32", "float16"], default="auto",
                       help="CSM compute dtype; auto (default) = float32 on MLX's CPU backend (only float32 "
                            "matmuls use its BLAS), bfloat16 on Metal/CUDA (what the official generator runs)")
    model.add_argument("--quantize", type=int, choices=[4, 8], help="quantize CSM's linear layers on load")
    model.add_argument("--adapter", type=Path, help="LoRA adapter folder from `csm-mlx finetune` (applied unfused)")

    out = parser.add_argument_group("output")
    out.add_argument("--output", "-o", type=Path, default=Path("out.wav"), help="output audio file")
    out.add_argument("--format", choices=["wav", "flac"], help="container (default: from the file suffix)")
    out.add_argument("--stream", action="store_true", help="decode and write audio frame by frame as it is generated")
    out.add_argument("--play", action="store_true", help="also play the audio (needs sounddevice and a device)")
    out.add_argument("--pause-ms", type=float, default=150.0, help="silence between sentences / turns")
    out.add_argument("--trim-silence", action="store_true", help="trim trailing silence of each turn")
    out.add_argument("--no-watermark", action="store_true", help="skip the silentcipher watermark")
    out.add_argument("--save-logits", type=Path,
                     help="also save every sampled logits row as .npy (N, V), for `csm-mlx token-test --logits`")
    out.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return parser


def read_turns(args: argparse.Namespace):
    """The turns to speak, from --script, --text-file or --text."""
    from ..generation import Turn
    from ..generation.text import split_sentences

    if args.script is not None:
        return parse_script(args.script)
    text = args.text_file.read_text() if args.text_file is not None else args.text
    if text is None or not text.strip():
        raise ValueError("nothing to say: give --text, --text-file or --script")
    chunks = [" ".join(text.split())] if args.no_split else split_sentences(text)
    return [Turn(args.speaker, chunk) for chunk in chunks]


def parse_script(path: Path):
    """A conversation script: JSON ``[{"speaker": 0, "text": "..."}]`` or lines ``0: text``."""
    from ..generation import Turn

    raw = path.read_text()
    if path.suffix == ".json":
        try:
            turns = [Turn(int(t["speaker"]), str(t["text"])) for t in json.loads(raw)]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"script {path}: expected a JSON list of {{speaker, text}}: {err}") from None
    else:
        turns = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            speaker, sep, text = line.partition(":")
            if not sep or not speaker.strip().isdigit():
                raise ValueError(f"script {path}, line {number}: expected 'SPEAKER: text', got {line!r}")
            turns.append(Turn(int(speaker), text.strip()))
    if not turns:
        raise ValueError(f"script {path} has no turns")
    return turns


def read_context(args: argparse.Namespace) -> list[Segment]:
    """--context-audio/--context-text pairs, read (and resampled) before any model loads."""
    if len(args.context_audio) != len(args.context_text):
        raise ValueError("give one --context-text for every --context-audio")
    speakers = args.context_speaker or [args.speaker] * len(args.context_audio)
    if len(speakers) != len(args.context_audio):
        raise ValueError("give one --context-speaker for every --context-audio (or none)")
    return [
        Segment(speaker, text, read_audio(audio))
        for audio, text, speaker in zip(args.context_audio, args.context_text, speakers)
    ]


def sampling_options(args: argparse.Namespace) -> dict:
    options = dict(temperature=args.temperature, topk=args.topk, safety=args.safety,
                   max_audio_length_ms=args.max_audio_ms)
    if args.torch_seed is not None:
        options["torch_seed"] = args.torch_seed
    elif args.seed is not None:
        options["seed"] = args.seed
    if args.precision is not None:
        options["precision"] = args.precision
    return options


def run(args: argparse.Namespace) -> int:
    from ..generation import load
    from ..generation.generator import random_seed
    from ..generation.voices import load_voice
    from ..sampling import check_sampling_args

    # Everything that can be checked without the model is checked first.
    audio_format = check_output_path(args.output, args.format)
    check_sampling_args(args.topk, args.temperature, args.precision or "float32")
    if (args.stream or args.play) and args.save_logits:
        raise ValueError("--save-logits works without --stream/--play")
    turns = read_turns(args)
    context = read_context(args)
    if args.seed is None and args.torch_seed is None:
        args.seed = random_seed()

    started = time.perf_counter()
    speaker = load(args.model, dtype=args.dtype, quantize=args.quantize, tokenizer=args.tokenizer, mimi=args.mimi,
                   adapter=args.adapter)
    if args.voice:
        repo = args.model if is_repo_id(args.model) else None
        context = load_voice(args.voice, args.speaker, weights_dir=speaker.weights_dir, weights_repo=repo) + context
    logger.info("model ready in %.1f s", time.perf_counter() - started)
    log_backend(logger)

    options = sampling_options(args)
    started = time.perf_counter()
    if args.stream or args.play:
        audio = stream_to_file(speaker, turns, context, options, args, audio_format)
    else:
        audio = speak_to_file(speaker, turns, context, options, args, audio_format)
    elapsed = time.perf_counter() - started
    seconds = len(audio) / SAMPLE_RATE
    seed = f"torch seed {args.torch_seed}" if args.torch_seed is not None else f"seed {args.seed}"
    print(f"wrote {args.output}: {seconds:.2f} s of audio in {elapsed:.2f} s "
          f"(RTF {elapsed / max(seconds, 1e-9):.2f}), {seed}", file=sys.stderr)
    return 0


def _pause(args) -> np.ndarray:
    return np.zeros(int(SAMPLE_RATE * args.pause_ms / 1000), dtype=np.float32)


def _finish(audio: np.ndarray, args) -> np.ndarray:
    if args.no_watermark:
        return audio
    from ..audio.watermark import watermark

    return watermark(audio)


def speak_to_file(speaker, turns, context, options, args, audio_format) -> np.ndarray:
    progress = _progress(args)
    logits = [] if args.save_logits else None
    result = speaker.synthesize(turns, context, on_frame=lambda _turn: progress.update(1), record_logits=logits,
                                **options)
    progress.close()
    if logits:
        rows = np.concatenate([np.array(x.astype(mx.float32)) for x in logits])
        np.save(args.save_logits, rows)
        logger.info("saved %d logits rows to %s", len(rows), args.save_logits)
    pieces = [trim_trailing_silence(p) if args.trim_silence else p for p in result.turn_audio]
    joined = []
    for index, piece in enumerate(pieces):
        joined += [_pause(args)] * bool(index) + [piece]
    audio = _finish(np.concatenate(joined) if joined else np.zeros(0, np.float32), args)
    write_audio(args.output, audio, SAMPLE_RATE, audio_format)
    return audio


def stream_to_file(speaker, turns, context, options, args, audio_format) -> np.ndarray:
    """Decode, write (and optionally play) audio chunk by chunk as frames are generated.

    The chunks go to a temporary file that is renamed to ``--output`` only when complete.
    Streamed audio is not watermarked (the watermark needs the whole signal).
    """
    if not args.no_watermark:
        logger.warning("streamed audio is not watermarked (the watermark needs the whole signal)")
    player = _player() if args.play else None
    progress = _progress(args)
    written, current = [], 0
    with AudioWriter(args.output, SAMPLE_RATE, audio_format) as out:
        for chunk in speaker.stream_turns(turns, context, **options):
            pieces = ([_pause(args)] if chunk.turn != current else []) + [chunk.pcm]
            current = chunk.turn
            for piece in pieces:
                out.write(piece)
                written.append(piece)
                if player is not None:
                    player.write(piece.reshape(-1, 1))
            progress.update(chunk.frames)
    progress.close()
    if player is not None:
        player.stop()
    return np.concatenate(written) if written else np.zeros(0, np.float32)


def _player():
    try:
        import sounddevice
    except (ImportError, OSError):
        raise ValueError("--play needs the sounddevice package and an audio device (pip install 'csm-mlx[play]')") from None
    stream = sounddevice.OutputStream(samplerate=SAMPLE_RATE, channels=1, dtype="float32")
    stream.start()
    return stream


def _progress(args):
    """A frames progress bar that also shows the real-time factor (compute s per audio s)."""
    from tqdm import tqdm

    class FrameProgress(tqdm):
        def update(self, n=1):
            super().update(n)
            if not self.disable and self.n:
                audio_s = self.n / FRAME_RATE
                self.set_postfix_str(f"RTF {self.format_dict['elapsed'] / audio_s:.2f}", refresh=False)

    return FrameProgress(unit="frame", disable=args.quiet, desc="generating", dynamic_ncols=True)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s: %(message)s")
    return run_main(lambda: run(args), USER_ERRORS, "no output written")


if __name__ == "__main__":
    sys.exit(main())

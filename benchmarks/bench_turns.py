"""Prefix reuse: time to the first frame of each turn of a long text, with and without the kept cache.

A long text is spoken sentence by sentence, each sentence with the earlier ones (text + generated
codes) as context. Without reuse every turn prefills its whole history again; with
:class:`csm.generation.frames.PromptCache` a turn prefills only its new rows (the previous turn's
last frame, the end-of-audio row and its text). Both runs use the same random full-size weights
and the same noise stream, in one process; the codes of every turn are compared.

Run: ``python benchmarks/bench_turns.py [--turns 20] [--frames 20] [--dtype bfloat16] [--cpu]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import csm  # noqa: E402,F401  (first: an installed OpenBLAS before mlx.core on Linux)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from bench_generate import build_csm  # noqa: E402
from csm.generation.frames import FrameSamplers, PromptCache, generate_frames  # noqa: E402
from csm.prompt import audio_rows, text_rows  # noqa: E402


def speak(model, turns: list[list[int]], frames: int, reuse: bool) -> tuple[list[float], list[int], list]:
    """Per turn: seconds to its first frame, rows prefilled, codes ``(32, T)``."""
    samplers = FrameSamplers(temperature=0.9, topk=50, key=mx.random.key(0))
    cache = PromptCache() if reuse else None
    history: list[tuple[np.ndarray, np.ndarray]] = []
    firsts, prefilled, codes = [], [], []
    for ids in turns:
        parts = history + [text_rows(ids)]
        tokens, mask = (np.concatenate([p[i] for p in parts]) for i in (0, 1))
        start, turn = time.perf_counter(), []
        for frame in generate_frames(model, tokens, mask, samplers, max_frames=frames, prompt_cache=cache):
            if not turn:
                firsts.append(time.perf_counter() - start)
            turn.append(frame[0])
        codes.append(np.stack(turn, axis=1))
        prefilled.append(cache.prefilled[-1] if cache else len(tokens))
        history += [text_rows(ids), audio_rows(codes[-1])]
    return firsts, prefilled, codes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=20, help="sentences (turns)")
    parser.add_argument("--words", type=int, default=14, help="text tokens per sentence")
    parser.add_argument("--frames", type=int, default=20, help="frames per turn (random weights never end a turn)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--cpu", action="store_true", help="run MLX on the CPU")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.cpu:
        mx.set_default_device(mx.cpu)
    model = build_csm(getattr(mx, args.dtype))
    rng = np.random.default_rng(0)
    turns = [rng.integers(0, model.args.text_vocab_size, args.words).tolist() for _ in range(args.turns)]
    speak(model, turns[:2], 3, reuse=True)  # warm-up: traces and kernels
    full = speak(model, turns, args.frames, reuse=False)
    reuse = speak(model, turns, args.frames, reuse=True)
    same = sum(np.array_equal(a, b) for a, b in zip(full[2], reuse[2]))
    result = {
        "device": str(mx.default_device()), "dtype": args.dtype, "turns": args.turns, "frames_per_turn": args.frames,
        "first_frame_ms": {"full_prefill": [round(1e3 * s, 1) for s in full[0]],
                           "prefix_reuse": [round(1e3 * s, 1) for s in reuse[0]]},
        "rows_prefilled": {"full_prefill": full[1], "prefix_reuse": reuse[1]},
        "turns_with_identical_codes": same,
    }
    print(f"{'turn':>4} {'rows (full)':>11} {'ms (full)':>10} {'rows (reuse)':>12} {'ms (reuse)':>10}")
    for i in range(args.turns):
        print(f"{i + 1:>4} {full[1][i]:>11} {1e3 * full[0][i]:>10.1f} {reuse[1][i]:>12} {1e3 * reuse[0][i]:>10.1f}")
    total_full, total_reuse = sum(full[0]), sum(reuse[0])
    print(f"sum of time to first frame: full {1e3 * total_full:.0f} ms, reuse {1e3 * total_reuse:.0f} ms "
          f"({total_full / total_reuse:.2f}x); turns with identical codes: {same}/{args.turns} ({args.dtype})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

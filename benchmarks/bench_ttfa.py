"""Time to first audio in a warm process: prompt prefill + first frame + first streamed Mimi chunk.

Full-size random weights (CSM-1B in ``--dtype``, Mimi float32), batch 1. After one warm-up
request, requests arrive with prompt lengths in ``--lengths`` order; each is timed from the call
to the first 80 ms of PCM on the host. A length seen before shows the warm cost; a new length
shows what new shapes cost (kernel plans, graphs) on top. With prefill buckets on (the GPU default,
``csm.models.buckets``) a new length inside a bucket seen before runs known shapes: each request
says whether its padded row count is new. Also reported: the steady ms/frame of the same loop.

The warm-up request's own time is printed too: on a machine whose MLX kernel cache is empty it is
the cold start (MLX JIT-compiles the frame's kernels; see docs/model.md, "Fused CUDA kernels").

Run: ``python benchmarks/bench_ttfa.py [--lengths 200 200 201 260 200] [--prefill-rows 0|64] [--json F]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from pathlib import Path

import csm  # noqa: F401  (first: loads an installed BLAS before mlx.core, see csm.backend)
import mlx.core as mx
import numpy as np

from csm.backend import default_dtype
from csm.config import MAX_SEQ_LEN
from csm.generation.frames import FrameSamplers, generate_frames
from csm.models.buckets import padded_rows, prefill_bucket, prefill_buckets
from csm.prompt import text_rows

from bench_generate import build_csm, build_mimi


def first_audio(model, mimi, length: int, seed: int, frames: int = 1) -> tuple[float, float]:
    """(seconds to the first PCM chunk, seconds per later frame) for a ``length``-row prompt."""
    tokens, mask = text_rows(np.random.default_rng(seed).integers(0, 128_000, length).tolist())
    samplers = FrameSamplers(key=mx.random.key(seed), temperature=0.9, topk=50)
    state = mimi.make_state(1)
    start = time.perf_counter()
    stamps = []
    for codes in generate_frames(model, tokens, mask, samplers, max_frames=frames):
        pcm = mimi.decode_step(mx.array(np.clip(codes, 0, 2047))[:, :, None], state)
        np.asarray(pcm)  # on the host: what a player would get
        stamps.append(time.perf_counter())
    per_frame = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
    return stamps[0] - start, per_frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[200, 200, 201, 230, 260, 300, 200, 333, 333])
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    parser.add_argument("--frames", type=int, default=10, help="frames per request (the first is what counts)")
    parser.add_argument("--prefill-rows", type=int, help="pad prompt prefills to multiples of N rows, 0: off "
                        "(default: csm's choice for the device: 64 on a GPU, off on the CPU)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with contextlib.nullcontext() if args.prefill_rows is None else prefill_buckets(args.prefill_rows):
        run(args)


def run(args: argparse.Namespace) -> None:
    dtype = default_dtype() if args.dtype == "auto" else args.dtype
    model, mimi = build_csm(getattr(mx, dtype)), build_mimi()
    # Warm-up: traces and kernel compiles. With an empty MLX kernel cache (a fresh machine, or
    # MLX_PTX_CACHE_DIR=$(mktemp -d) on CUDA) this is what a user's very first request waits.
    started = time.perf_counter()
    first_audio(model, mimi, 50, seed=99, frames=3)
    warm_up = time.perf_counter() - started
    print(f"warm-up request (50 rows, 3 frames; compiles included): {warm_up:.1f} s", flush=True)
    rows = []
    seen: set[int] = set()
    shapes = {padded_rows(50, MAX_SEQ_LEN)}  # the warm-up's
    for index, length in enumerate(args.lengths):
        ttfa, per_frame = first_audio(model, mimi, length, seed=index, frames=args.frames)
        padded = padded_rows(length, MAX_SEQ_LEN)
        rows.append({"prompt_rows": length, "new_length": length not in seen, "prefill_rows": padded,
                     "new_shape": padded not in shapes, "ttfa_ms": round(ttfa * 1e3, 1),
                     "ms_per_frame": round(per_frame * 1e3, 2)})
        seen.add(length)
        shapes.add(padded)
        print(f"prompt {length:>5} rows ({'new' if rows[-1]['new_length'] else 'seen'} length, prefill on {padded} rows, "
              f"{'new' if rows[-1]['new_shape'] else 'seen'} shape): first audio {rows[-1]['ttfa_ms']:>7.1f} ms, "
              f"then {rows[-1]['ms_per_frame']:.1f} ms/frame", flush=True)
    report = {"device": str(mx.default_device()), "machine": platform.machine(), "mlx": mx.__version__,
              "dtype": dtype, "prefill_bucket": prefill_bucket(), "warm_up_s": round(warm_up, 2), "requests": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

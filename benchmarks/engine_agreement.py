"""How often a seeded request's tokens differ between the batching engine and its solo run.

Row noise depends on the row's own seed only, so any difference comes from the logits: batched
matmuls round differently from batch-1 ones. Once one token differs the rows diverge, so both
the fraction of differing tokens and the fraction of requests that are identical are reported,
for bfloat16 and float32, with ``--slots`` requests sharing the batch.
Run: ``python benchmarks/engine_agreement.py --tiny [--requests 16]`` (or ``--model PATH``, e.g. a
folder written offline by ``random_weights.py --model-folder``; ``--dtypes float32`` on a CPU,
where bfloat16 matmuls are ~30x slower).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from bench_serve import resolve_model

import csm
from csm.generation import Turn
from csm.generation.engine import Engine, Request

TEXTS = ["Hello from Sesame.", "How are you today?", "This is a test of speech synthesis.", "The past is a story."]


def compare(model: Path, dtype: str, requests: int, slots: int, max_ms: int) -> dict:
    generator = csm.load(str(model), dtype=dtype)
    batch = [Request(TEXTS[i % len(TEXTS)], seed=1000 + i, max_audio_length_ms=max_ms) for i in range(requests)]
    with Engine(generator, slots=slots) as engine:
        engine_codes = [job.result().codes[0] for job in [engine.submit(r) for r in batch]]
    tokens = differing = identical = 0
    first_divergence = []
    for request, codes in zip(batch, engine_codes):
        solo = generator.synthesize([Turn(0, request.text)], seed=request.seed, max_audio_length_ms=max_ms).codes[0]
        frames = min(solo.shape[1], codes.shape[1])
        diff = solo[:, :frames] != codes[:, :frames]
        tokens += 32 * max(solo.shape[1], codes.shape[1])
        differing += int(diff.sum()) + 32 * abs(solo.shape[1] - codes.shape[1])
        identical += int(not diff.any() and solo.shape == codes.shape)
        if diff.any():
            first_divergence.append(int(np.argmax(diff.any(axis=0))))
    return {"dtype": dtype, "requests": requests, "slots": slots, "tokens": tokens,
            "differing_fraction": round(differing / tokens, 5), "identical_requests": identical,
            "first_divergence_frames": first_divergence}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--max-ms", type=int, default=1600)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = resolve_model(args.model, args.tiny, Path(tmp))
        rows = [compare(model, dtype, args.requests, args.slots, args.max_ms) for dtype in args.dtypes]
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

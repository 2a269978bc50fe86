"""End-to-end generation speed: CSM frames + Mimi decode at full size, random weights.

Measures, in one process on one device (MLX's default device unless ``--cpu``):

* prefill + first frame (time to first audio, before Mimi);
* steady-state ms per frame of the frame loop, with speculation (frame t+1 built before
  frame t is read — the ``seed`` path) and without (the ``torch_seed`` path);
* Mimi decode ms per frame, one-shot and streaming (1 frame per call);
* the real-time factor (compute s per audio s, < 1 is faster than real time) of
  frame loop + streaming decode.

The ratio speculative/non-speculative is measured in the same run. Random full-size weights
(CSM-1B in ``--dtype``, Mimi in float32); the random model never stops early in practice.
Run: ``python benchmarks/bench_generate.py [--frames 40] [--dtype auto]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import csm  # noqa: F401  (first: loads an installed OpenBLAS before mlx.core, see csm.backend)
import mlx.core as mx
import numpy as np

from csm.backend import default_dtype
from csm.codec import Mimi, MimiArgs
from csm.config import FRAME_MS, FRAME_WIDTH, NUM_CODEBOOKS
from csm.generation.frames import FrameSamplers, generate_frames, next_frame_rows
from csm.models import CSM, CSMArgs
from csm.models.frame_step import Draw
from csm.sampling import TorchCompatibleGenerator
from csm.prompt import text_rows


def doc_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser: its docstring's first line as the description, the rest as the epilog."""
    return argparse.ArgumentParser(description=doc.splitlines()[0], epilog=doc.split("\n\n", 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def build_csm(dtype: mx.Dtype, args: CSMArgs | None = None) -> CSM:
    """Random weights (CSM-1B unless ``args``) in ``dtype``; the audio head at a trained-like scale."""
    model = CSM(args or CSMArgs.from_flavors("llama-1B", "llama-100M"))
    model.audio_head = mx.random.normal(model.audio_head.shape) * 0.03
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def steady_frames(model: CSM, prompt_rows: int = 200, host: list[tuple[float, float]] | None = None):
    """After a ``prompt_rows``-row text prompt, a callable that runs (and evaluates) one more compiled
    frame, batch 1, top-k 50 at 0.9: the loop generation runs, for profilers to watch.

    ``host``, if given, gets each frame's (seconds in the compiled call, seconds in ``mx.eval``): the
    first is host time alone (the trace replayed into a lazy graph), the second the dispatch and the wait.
    """
    draw = Draw(topk=50, temperature=0.9)
    frame, samplers = model.compiled_frame(draw), FrameSamplers(temperature=0.9, topk=50, key=mx.random.key(0))
    vocab, cache = model.args.audio_vocab_size, model.make_cache(1)
    tokens, mask = text_rows(np.random.default_rng(0).integers(0, model.args.text_vocab_size, prompt_rows).tolist())
    rows = (mx.array(tokens)[None], mx.array(mask)[None])

    def next_frame() -> mx.array:
        nonlocal rows
        noise = samplers.frame_noise(1, vocab, frame.noise_dtype())
        start = time.perf_counter()
        codes = frame(*rows, cache, noise)
        called = time.perf_counter()
        mx.eval(codes)
        if host is not None:
            host.append((called - start, time.perf_counter() - called))
        rows = next_frame_rows(codes)
        return codes

    next_frame()  # the prompt's frame
    return next_frame


def build_mimi() -> Mimi:
    mimi = Mimi(MimiArgs(), num_codebooks=NUM_CODEBOOKS)
    mx.eval(mimi.parameters())
    return mimi


def time_frames(model, tokens, mask, samplers, frames: int) -> tuple[float, float, list[np.ndarray]]:
    """(seconds to the first frame, seconds per later frame, codes)."""
    start = time.perf_counter()
    codes, stamps = [], []
    for frame in generate_frames(model, tokens, mask, samplers, max_frames=frames):
        stamps.append(time.perf_counter())
        codes.append(frame[0])
    first = stamps[0] - start
    per_frame = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
    return first, per_frame, codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--prompt", type=int, default=200, help="prompt rows (text tokens)")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32", "float16"], default="auto",
                        help="CSM dtype (auto: float32 on MLX's CPU backend, bfloat16 on a GPU)")
    parser.add_argument("--cpu", action="store_true", help="run MLX on the CPU")
    args = parser.parse_args()
    if args.cpu:
        mx.set_default_device(mx.cpu)
    if args.dtype == "auto":
        args.dtype = default_dtype()
    model = build_csm(getattr(mx, args.dtype))
    mimi = build_mimi()
    rng = np.random.default_rng(0)
    tokens, mask = text_rows(rng.integers(0, 128_000, args.prompt).tolist())
    assert tokens.shape[1] == FRAME_WIDTH
    draw = dict(temperature=0.9, topk=50)

    time_frames(model, tokens[:8], mask[:8], FrameSamplers(key=mx.random.key(1), **draw), 3)  # warm-up
    first, spec, codes = time_frames(model, tokens, mask, FrameSamplers(key=mx.random.key(0), **draw), args.frames)
    _, nospec, _ = time_frames(
        model, tokens, mask, FrameSamplers(generator=TorchCompatibleGenerator(0), **draw), args.frames
    )
    codes = mx.array(np.clip(np.stack(codes, axis=1), 0, 2047)[None])

    mx.eval(mimi.decode(codes[..., :2]))  # warm-up
    start = time.perf_counter()
    mx.eval(mimi.decode(codes))
    one_shot = (time.perf_counter() - start) / codes.shape[-1]
    state = mimi.make_state(1)
    mx.eval(mimi.decode_step(codes[..., :1], state))
    start = time.perf_counter()
    for t in range(1, codes.shape[-1]):
        mx.eval(mimi.decode_step(codes[..., t : t + 1], state))
    streaming = (time.perf_counter() - start) / (codes.shape[-1] - 1)

    report = {
        "device": str(mx.default_device()),
        "machine": platform.machine(),
        "mlx": mx.__version__,
        "dtype": args.dtype,
        "prompt_rows": args.prompt,
        "frames": args.frames,
        "first_frame_ms": round(first * 1e3, 1),
        "frame_ms_speculative": round(spec * 1e3, 2),
        "frame_ms_no_speculation": round(nospec * 1e3, 2),
        "speculation_speedup": round(nospec / spec, 3),
        "mimi_decode_ms_per_frame_one_shot": round(one_shot * 1e3, 2),
        "mimi_decode_ms_per_frame_streaming": round(streaming * 1e3, 2),
        "rtf_streaming": round((spec + streaming) * 1e3 / FRAME_MS, 3),
        "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 2),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

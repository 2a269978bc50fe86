"""Time to sample one CSM frame (32 codebooks x 2051 logits): MLX sampler vs the PyTorch reference.

The model samples codebook 0, then 1..31, one (B, 2051) call each; MLX evaluates the whole frame
once (the sampler is lazy), torch runs eagerly. Run: ``python benchmarks/bench_sampling.py``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import csm  # noqa: F401  (first: loads an installed OpenBLAS before mlx.core, see csm.backend)
import mlx.core as mx
import numpy as np
import torch

from csm.analysis.token_parity import torch_sample_topk
from csm.config import AUDIO_VOCAB_SIZE, NUM_CODEBOOKS
from csm.sampling import TorchCompatibleGenerator, sample_topk

TOPK, TEMPERATURE = 50, 0.9  # the official generator's defaults


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def mlx_frame(logits: list[mx.array], **kwargs) -> Callable[[], None]:
    """32 sequential sampler calls, one evaluation per frame (what the frame loop does)."""
    keys = mx.random.split(mx.random.key(0), NUM_CODEBOOKS)

    def run() -> None:
        extra = [{"key": keys[i]} for i in range(NUM_CODEBOOKS)] if not kwargs else [kwargs] * NUM_CODEBOOKS
        mx.eval([sample_topk(x, TOPK, TEMPERATURE, **e) for x, e in zip(logits, extra)])

    return run


def torch_frame(logits: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        for x in logits:
            torch_sample_topk(x, TOPK, TEMPERATURE, torch.empty_like(x).exponential_(1))

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    frame = rng.standard_normal((NUM_CODEBOOKS, args.batch, AUDIO_VOCAB_SIZE)).astype(np.float32) * 3
    rows = {
        dtype: [mx.array(x).astype(dtype) for x in frame] for dtype in (mx.float32, mx.bfloat16)
    }
    mx.eval(rows)
    torch_rows = {
        dtype: [torch.from_numpy(x).to(dtype) for x in frame] for dtype in (torch.float32, torch.bfloat16)
    }
    batched = mx.array(frame.transpose(1, 0, 2))  # (B, 32, V): all codebooks in one call
    timings = {
        "torch float32 (reference)": median_ms(torch_frame(torch_rows[torch.float32]), args.repeats),
        "torch bfloat16 (official)": median_ms(torch_frame(torch_rows[torch.bfloat16]), args.repeats),
        "mlx float32, key": median_ms(mlx_frame(rows[mx.float32]), args.repeats),
        "mlx bf16 logits, precision=float32, key": median_ms(mlx_frame(rows[mx.bfloat16]), args.repeats),
        "mlx bf16 logits, precision=reference, generator": median_ms(
            mlx_frame(rows[mx.bfloat16], generator=TorchCompatibleGenerator(0), precision="reference"), args.repeats
        ),
        "mlx float32, one (B, 32, V) call": median_ms(
            lambda: mx.eval(sample_topk(batched, TOPK, TEMPERATURE, key=mx.random.key(0))), args.repeats
        ),
    }
    base = timings["torch float32 (reference)"]
    print(f"one frame = {NUM_CODEBOOKS} x ({args.batch}, {AUDIO_VOCAB_SIZE}) logits, top-k {TOPK}, T {TEMPERATURE}")
    print(f"{platform.machine()} {platform.processor() or ''} | mlx {mx.__version__} torch {torch.__version__} "
          f"({torch.get_num_threads()} threads) | median of {args.repeats}")
    for name, ms in timings.items():
        print(f"{name:<50} {ms:8.3f} ms/frame   {base / ms:5.2f}x torch float32")


if __name__ == "__main__":
    main()

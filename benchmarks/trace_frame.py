"""Where a steady compiled frame's GPU time goes: a CUPTI trace of MLX's kernels, taken with PyTorch's profiler.

Full-size random CSM-1B weights in bf16, batch 1, a 200-row prompt; after ``--warmup`` frames,
``--frames`` compiled frames run under ``torch.profiler`` (CUDA activity: CUPTI records every kernel the
process launches, MLX's included). Printed per frame: wall time, the GPU's span and busy time (the
union of kernel, copy and memset intervals), the gaps between launches, and the kernels ranked by
time with their count and mean duration. The trace itself goes to ``--trace`` (Chrome/Perfetto JSON).

Needs MLX's CUDA backend and a CUDA build of PyTorch in the same process (``nsys`` is not needed).
``--model mimi`` traces Mimi's streaming decode step instead (random full-size weights, float32,
``--batch`` streams, one frame a step, codes made on the device ahead of the steps).

Run: ``python benchmarks/trace_frame.py [--model csm|mimi] [--frames 3] [--top 25] [--trace frame.json]``;
set ``CSM_FUSED_STACK=1`` or ``CSM_FUSED_KERNELS=0`` to trace the other CSM paths.
"""

from __future__ import annotations

import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import csm  # noqa: F401  (first: loads an installed BLAS before mlx.core)
import mlx.core as mx
import numpy as np

from bench_generate import build_csm, build_mimi, doc_parser, steady_frames
from csm.backend import is_cuda

GPU_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")


def busy_time(events: list[dict]) -> float:
    """Microseconds covered by the union of the events' [ts, ts + dur) intervals (sorted by ts)."""
    busy, end = 0.0, float("-inf")
    for e in events:
        start, stop = e["ts"], e["ts"] + e["dur"]
        if start >= end:
            busy += stop - start
        elif stop > end:
            busy += stop - end
        end = max(end, stop)
    return busy


def summarize(events: list[dict], frames: int, wall: float, top: int) -> None:
    events = sorted(events, key=lambda e: e["ts"])
    span = events[-1]["ts"] + events[-1]["dur"] - events[0]["ts"]
    busy = busy_time(events)
    gaps = np.array([b["ts"] - (a["ts"] + a["dur"]) for a, b in zip(events, events[1:])])
    print(f"{frames} frames: wall {wall / frames * 1e3:.2f} ms/frame; GPU span {span / frames / 1e3:.2f} ms, "
          f"busy {busy / frames / 1e3:.2f} ms, {len(events) / frames:.0f} launches a frame")
    print(f"gaps between launches: median {np.median(gaps):.2f} µs, 90th percentile {np.percentile(gaps, 90):.2f} µs, "
          f"{gaps[gaps > 0].sum() / frames / 1e3:.2f} ms a frame")
    per_name: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        entry = per_name[e["name"][:80]]
        entry[0] += 1
        entry[1] += e["dur"]
    print(f"{'ms/frame':>9} {'a frame':>8} {'µs each':>8}  kernel")
    for name, (count, total) in sorted(per_name.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{total / frames / 1e3:9.3f} {count / frames:8.0f} {total / count:8.2f}  {name}")


def steady_mimi_steps(batch: int):
    """A callable that runs (and evaluates) one more streamed Mimi decode step of one frame."""
    mimi = build_mimi()
    state, step = mimi.make_state(batch), [0]
    codes = mx.array(np.random.default_rng(2).integers(0, 2048, (batch, 32, 64)).astype(np.int32))
    mx.eval(codes)

    def next_step() -> mx.array:
        t = step[0] % codes.shape[-1]
        pcm = mimi.decode_step(codes[:, :, t : t + 1], state, check_range=False)
        mx.eval(pcm)
        step[0] += 1
        return pcm

    return next_step


def main(argv: list[str] | None = None) -> int:
    parser = doc_parser(__doc__)
    parser.add_argument("--model", choices=["csm", "mimi"], default="csm", help="a CSM frame or a Mimi decode step")
    parser.add_argument("--batch", type=int, default=1, help="Mimi streams decoded together (--model mimi)")
    parser.add_argument("--frames", type=int, default=3, help="frames traced")
    parser.add_argument("--warmup", type=int, default=4, help="frames run before the trace (kernel builds, traces)")
    parser.add_argument("--top", type=int, default=25, help="kernels listed")
    parser.add_argument("--trace", type=Path, help="keep the Chrome-trace JSON here")
    args = parser.parse_args(argv)
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        print("trace_frame.py needs PyTorch (a CUDA build) for its CUPTI profiler", file=sys.stderr)
        return 1
    if not (is_cuda() and torch.cuda.is_available()):
        print("trace_frame.py needs MLX's CUDA backend and a CUDA build of PyTorch on the same GPU", file=sys.stderr)
        return 1
    torch.zeros(1, device="cuda")  # PyTorch's CUDA context first: the profiler attaches to it

    host: list[tuple[float, float]] = []
    next_frame = steady_frames(build_csm(mx.bfloat16), host=host) if args.model == "csm" else steady_mimi_steps(args.batch)
    for _ in range(args.warmup):
        next_frame()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(args.frames):
            next_frame()
        wall = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = args.trace or Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = [e for e in json.loads(Path(path).read_text())["traceEvents"] if e.get("cat") in GPU_EVENTS]
    if not events:
        print("the profiler recorded no GPU activity (is PyTorch on the same CUDA driver as MLX?)", file=sys.stderr)
        return 1
    summarize(events, args.frames, wall, args.top)
    if host:
        call, run = np.median(np.array(host[-args.frames:]), axis=0) * 1e3
        print(f"host: {call:.2f} ms in the compiled call (the trace replayed into a lazy graph), "
              f"{run:.2f} ms in mx.eval (dispatch and wait), median of the traced frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a steady CSM frame's GPU time goes, kernel by kernel (NVIDIA Nsight Compute).

Two steps, because the profiler wraps the process:

1. ``--run`` runs the compiled frame loop generation runs (full-size random weights, batch 1, a
   200-row prompt, top-k 50, temperature 0.9), one frame after another; profile it with ``ncu``,
   skipping the prompt and the first frames (their compiles and the prefill) and taking about one
   frame's kernels (a fused H200 frame is ~1,100 kernel launches)::

     FRAMES=11 ncu --graph-profiling node --metrics gpu__time_duration.sum \\
         --launch-skip 9000 --launch-count 1100 --csv \\
         python benchmarks/profile_kernels.py --run > ncu.csv

   (``--graph-profiling node``: MLX's CUDA backend launches kernels as CUDA-graph nodes.)
2. ``--summarize ncu.csv`` sums the durations by kernel and prints the largest.

ncu replays every kernel with cold caches at base clocks, so its times run above a real frame's;
what it shows is the proportions. Used for stop 17's breakdown in docs/model.md.
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

_UNIT_US = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}


def run_frames(frames: int) -> None:
    """The steady frame loop the profiler watches (no timing of its own)."""
    import csm  # noqa: F401  (first: loads an installed BLAS before mlx.core)
    import mlx.core as mx

    from bench_generate import build_csm, steady_frames

    next_frame = steady_frames(build_csm(mx.bfloat16))
    for _ in range(frames):
        next_frame()


def summarize(path: Path, top: int) -> list[tuple[str, int, float]]:
    """``(kernel, launches, total µs)`` from ncu's ``--csv`` output, largest total first."""
    lines = [line for line in path.read_text().splitlines() if line.startswith('"')]
    reader = csv.DictReader(lines)
    total: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for row in reader:
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = row["Kernel Name"].split("(")[0][:100]
        total[name] += float(row["Metric Value"].replace(",", "")) * _UNIT_US[row["Metric Unit"]]
        count[name] += 1
    return [(name, count[name], us) for name, us in total.most_common(top)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--run", action="store_true", help="run the frame loop (under ncu); FRAMES=N frames (11)")
    group.add_argument("--summarize", type=Path, metavar="CSV", help="sum ncu's --csv output by kernel")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    if args.run:
        run_frames(int(os.environ.get("FRAMES", "11")))
        return 0
    rows = summarize(args.summarize, args.top)
    grand = sum(us for _, _, us in rows)
    print(f"{'share':>6} {'total ms':>9} {'launches':>8} {'µs each':>8}  kernel (top {args.top}: {grand / 1e3:.2f} ms)")
    for name, launches, us in rows:
        print(f"{us / grand:6.1%} {us / 1e3:9.3f} {launches:8d} {us / launches:8.1f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cold start: the first frames of a process whose MLX kernel caches are empty (a machine's first run).

MLX JIT-compiles the element-wise kernels that ``mx.compile`` fuses, and csm's custom CUDA kernels:
on CUDA with NVRTC (kept in ``MLX_PTX_CACHE_DIR``), on the CPU with the C++ compiler (kept under
``$TMPDIR/mlx/<version>/cpu``). This runs the compiled frame in a child process with both caches
pointed at a fresh folder and times each of the first ``--frames`` frames after a ``--prompt``-row
prompt; then a second child on the same, now filled, folders. The difference is what a first run
on a machine pays; the count of compiled kernels comes from the folder.

Run: ``python benchmarks/bench_cold_start.py [--size full|tiny] [--frames 3] [--prompt 20] [--cpu] [--json F]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = "--child"


def child(size: str, frames: int, prompt: int, cpu: bool) -> None:
    """Time the first frames in this process and print them as one JSON line."""
    import csm  # noqa: F401  (first: BLAS and environment, see csm.backend)
    import mlx.core as mx

    from csm.backend import default_dtype
    from csm.generation.frames import FrameSamplers, next_frame_rows
    from csm.prompt import text_rows

    if cpu:
        mx.set_default_device(mx.cpu)
    dtype = getattr(mx, default_dtype())
    from count_primitives import build

    model = build(size, dtype)
    tokens, mask = text_rows(list(range(1, prompt + 1)))
    samplers = FrameSamplers(temperature=0.9, topk=50, key=mx.random.key(0))
    frame, cache = model.compiled_frame(samplers.draw), model.make_cache(1)
    rows = (mx.array(tokens[None]), mx.array(mask[None]))
    seconds = []
    for _ in range(frames):
        start = time.perf_counter()
        codes = frame(*rows, cache, samplers.frame_noise(1, model.args.audio_vocab_size, mx.float32))
        mx.eval(codes)
        seconds.append(time.perf_counter() - start)
        rows = next_frame_rows(codes)
    print(json.dumps({"device": str(mx.default_device()), "dtype": str(dtype), "seconds": seconds}))


def run_child(args: argparse.Namespace, caches: Path) -> dict:
    env = {**os.environ, "MLX_PTX_CACHE_DIR": str(caches / "ptx"), "TMPDIR": str(caches / "tmp")}
    (caches / "tmp").mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, CHILD, args.size, str(args.frames), str(args.prompt), str(int(args.cpu))]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=Path(__file__).parent)
    if done.returncode != 0:
        raise SystemExit(f"child failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    compiled = [p for p in caches.rglob("*") if p.suffix in (".ptx", ".so", ".dylib")]
    result["kernels_cached"] = len(compiled)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=20, help="prompt rows")
    parser.add_argument("--cpu", action="store_true", help="run MLX on the CPU")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="csm-cold-") as folder:
        cold = run_child(args, Path(folder))
        warm = run_child(args, Path(folder))
    print(f"CSM {args.size}, {cold['device']}, {cold['dtype']}, {args.prompt}-row prompt; seconds per frame:")
    for name, result in (("cold caches", cold), ("warm caches", warm)):
        frames = "  ".join(f"{s:7.2f}" for s in result["seconds"])
        print(f"  {name:<12} {frames}   ({result['kernels_cached']} compiled kernels in the cache folder)")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "prompt": args.prompt, "cold": cold, "warm": warm}, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1")
    else:
        main()

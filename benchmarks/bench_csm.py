"""CSM frame speed: csm-mlx vs PyTorch on the same random weights, in one run; batch scaling; quality.

Every side loads one random checkpoint (``random_weights.py``: transformers layout, written once
to ``--weights``) and runs in its own subprocess (its own peak memory), one after the other:

* ``torch-eager``: the transformers modules run eagerly with a growing ``DynamicCache``
  (``tests/csm_reference.TorchCSM``, the official ``generate_frame`` step by step);
* ``torch-static``: static KV caches and fixed shapes (``torch_static.py``), eager;
* ``torch-compiled``: the same under ``torch.compile(mode=--torch-compile)`` — on CUDA
  ``reduce-overhead`` (CUDA graphs, as csm-streaming runs), the fastest PyTorch frame people use;
* ``mlx`` (and ``mlx-q8`` / ``mlx-q4`` with ``--quantized``): the compiled frame generation runs
  (``CSM.compiled_frame``; same tokens as ``CSM.generate_frame`` with ``sample_topk``).

Measured: prefill of a 200-row prompt (backbone + codebook-0 head), ms per frame (backbone step +
31 depth-decoder steps + top-k 50 / temperature 0.9 sampling of all 32 codebooks; the fastest of
``--frames``), peak RSS. Speed-ups are PyTorch time / MLX time against eager *and* against the
fastest PyTorch side. ``--batch-sizes 1,4,16,64`` adds MLX total frames/s per batch size.
``--quality-frames N`` teacher-forces N frames (N x 32 logits rows) and reports the bfloat16,
8-bit and 4-bit logit error and argmax agreement against float32, with counts.

CPU (2 cores, ~15 min): ``python benchmarks/bench_csm.py --dtype float32``
CUDA: ``python benchmarks/bench_csm.py --torch-device cuda --dtype bfloat16 --quantized
--quality-frames 50 --batch-sizes 1,4,16,64 --json out.json``
Quick check: ``--size small``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

PROMPT_LEN = 200
TOPK, TEMPERATURE = 50, 0.9
TORCH_SIDES = ("torch-eager", "torch-static", "torch-compiled")


def prompt(batch: int = 1, length: int = PROMPT_LEN, k: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(B, length, k+1) rows of random audio codes and their mask (the same for every side)."""
    rng = np.random.default_rng(0)
    tokens = np.zeros((batch, length, k + 1), np.int32)
    mask = np.zeros_like(tokens, dtype=bool)
    tokens[:, :, :k] = rng.integers(0, 2048, (1, length, k))
    mask[:, :, :k] = True
    return tokens, mask


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn, sync=lambda: None) -> float:
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


# ---------------------------------------------------------------- MLX
def mlx_model(weights: Path, dtype: str, bits: int | None = None):
    from csm.models import load_csm
    from csm.weights.convert import quantize_csm

    model = load_csm(weights, dtype=dtype)
    if bits:
        quantize_csm(model, bits=bits, group_size=64)
    return model


def mlx_frames(model, batch: int, frames: int) -> tuple[float, float]:
    """(prefill seconds, fastest frame seconds) at batch size ``batch``."""
    import mlx.core as mx

    from csm.generation.frames import FrameSamplers

    tokens, mask = (mx.array(a) for a in prompt(batch))
    # The compiled frame generation runs, its noise drawn per frame as generate_frames draws it.
    samplers = FrameSamplers(temperature=TEMPERATURE, topk=TOPK, key=mx.random.key(0))
    compiled = model.compiled_frame(samplers.draw)
    vocab = model.args.audio_vocab_size

    def generate_frame(rows_tokens, rows_mask, cache):
        return compiled(rows_tokens, rows_mask, cache, samplers.frame_noise(batch, vocab, compiled.noise_dtype()))

    def prefill():
        mx.eval(model.codebook0_head(model.forward_backbone(tokens, mask, model.make_cache(batch))[:, -1]))

    prefill()  # warm-up
    prefill_s = timed(prefill)
    cache = model.make_cache(batch)
    codes = generate_frame(tokens, mask, cache)
    mx.eval(codes)
    row_mask = mx.array(np.tile(np.r_[np.ones(32, bool), False], (batch, 1, 1)))

    def frame():
        nonlocal codes
        row = mx.concatenate([codes, mx.zeros((batch, 1), mx.int32)], axis=1)[:, None]
        codes = generate_frame(row, row_mask, cache)
        mx.eval(codes)

    frame()  # warm-up
    return prefill_s, min(timed(frame) for _ in range(frames))


def run_mlx(args, bits: int | None) -> dict:
    import mlx.core as mx

    from csm.backend import blas_status

    model = mlx_model(args.weights, args.dtype, bits)
    prefill_s, frame_s = mlx_frames(model, 1, args.frames)
    out = {"prefill_s": prefill_s, "frame_s": frame_s, "peak_gb": peak_rss_gb(),
           "device": str(mx.default_device()), "blas": blas_status().path or blas_status().reason}
    if args.batch_sizes and not bits:
        out["batch"] = {}
        for batch in args.batch_sizes:
            _, seconds = mlx_frames(model, batch, max(2, args.frames // 2))
            out["batch"][str(batch)] = {"ms_per_step": 1e3 * seconds, "frames_per_s": batch / seconds}
    return out


def teacher_forced_logits(model, frames: int) -> np.ndarray:
    """(frames x 32, V) float32 logits after a 20-row prompt, every code forced to the same random values."""
    import mlx.core as mx

    tokens, mask = (mx.array(a[:, :20]) for a in prompt())
    codes = np.random.default_rng(1).integers(0, 2048, (frames, 1, 32)).astype(np.int32)
    row_mask = mx.array(np.r_[np.ones(32, bool), False][None, None])
    cache, rows = model.make_cache(1), []
    for t in range(frames):
        forced = mx.array(codes[t])
        logits = []
        model.generate_frame(tokens, mask, cache, lambda x, i: (logits.append(x), forced[:, i : i + 1])[1])
        rows.append(np.concatenate([np.array(x.astype(mx.float32)) for x in logits]))
        tokens, mask = mx.array(np.concatenate([codes[t], [[0]]], axis=1)[:, None]), row_mask
    return np.concatenate(rows)


def compare(got: np.ndarray, want: np.ndarray) -> dict:
    agree = int((got.argmax(-1) == want.argmax(-1)).sum())
    return {"mean_err_rel": float(np.abs(got - want).mean() / want.std()), "argmax_agree": agree, "rows": len(want)}


def run_quality(args) -> dict:
    """bf16 / q8 / q4 teacher-forced logits against float32 (and q8/q4 against bf16)."""
    frames = args.quality_frames
    reference = teacher_forced_logits(mlx_model(args.weights, "float32"), frames)
    bf16 = teacher_forced_logits(mlx_model(args.weights, "bfloat16"), frames)
    out = {"bfloat16 vs float32": compare(bf16, reference)}
    for bits in (8, 4):
        got = teacher_forced_logits(mlx_model(args.weights, "bfloat16", bits), frames)
        out[f"{bits}-bit vs float32"] = compare(got, reference)
        out[f"{bits}-bit vs bfloat16"] = compare(got, bf16)
    return out


# ---------------------------------------------------------------- PyTorch
def run_torch(args, side: str) -> dict:
    import torch
    from transformers import DynamicCache

    from csm_reference import TorchCSM
    from random_weights import load_torch
    from torch_static import StaticFrame, check_against_eager, sample

    device = args.torch_device
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    hf = load_torch(args.weights, args.torch_dtype, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    tokens, mask = (torch.from_numpy(a).to(device) for a in prompt())
    tokens = tokens.long()
    row_mask = torch.from_numpy(np.r_[np.ones(32, bool), False][None, None]).to(device)
    out = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    with torch.no_grad():
        if side == "torch-eager":
            ref = TorchCSM(hf)
            choose = lambda x, _: sample(x, TOPK, TEMPERATURE)  # noqa: E731
            prefill = lambda: hf.lm_head(ref.backbone(tokens, mask, DynamicCache(config=hf.config))[:, -1])  # noqa: E731
            cache = DynamicCache(config=hf.config)
            step = lambda rows, m: ref.frame(rows, m, cache, choose)  # noqa: E731
        else:
            mode = args.torch_compile if side == "torch-compiled" else None
            static = StaticFrame(hf, 1, PROMPT_LEN + args.frames + 8, topk=TOPK, temperature=TEMPERATURE,
                                 compile_mode=mode)
            positions = static.backbone.positions
            prefill = lambda: static.backbone_logits(tokens, mask, positions[:PROMPT_LEN])  # noqa: E731
            offset = [0]

            def step(rows, m):
                pos = positions[offset[0] : offset[0] + rows.shape[1]]
                offset[0] += rows.shape[1]
                return static.frame(rows, m, pos)

            out["static_vs_eager_logit_err"] = check_against_eager(hf, tokens[:, :20], mask[:, :20], TorchCSM(hf))
        prefill()
        out["prefill_s"] = timed(prefill, sync)
        codes = step(tokens, mask)
        times = []
        for index in range(args.frames + 2):  # two warm-up frames (compilation)
            row = torch.cat([codes, torch.zeros_like(codes[:, :1])], dim=1)[:, None]
            start = time.perf_counter()
            codes = step(row, row_mask)
            sync()
            times.append(time.perf_counter() - start)
            if index == 0:
                out["first_frame_s"] = times[0]
    out |= {"frame_s": min(times[2:]), "peak_gb": peak_rss_gb()}
    if device == "cuda":
        out["device_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


# ---------------------------------------------------------------- driver
def child(side: str, args) -> dict:
    options = {"--weights": args.weights, "--dtype": args.dtype, "--torch-dtype": args.torch_dtype,
               "--frames": args.frames, "--torch-threads": args.torch_threads, "--torch-device": args.torch_device,
               "--torch-compile": args.torch_compile, "--quality-frames": args.quality_frames,
               "--batch-sizes": ",".join(map(str, args.batch_sizes))}
    cmd = [sys.executable, __file__, "--side", side] + [str(x) for item in options.items() for x in item]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_side(side: str, args) -> dict:
    if side in TORCH_SIDES:
        return run_torch(args, side)
    import csm  # noqa: F401  (before mlx.core: loads an installed OpenBLAS, see csm.backend)
    if side == "quality":
        return run_quality(args)
    return run_mlx(args, {"mlx-q8": 8, "mlx-q4": 4}.get(side))


def print_report(results: dict, args) -> None:
    speed = {k: v for k, v in results.items() if "frame_s" in v}
    torch_sides = [k for k in speed if k in TORCH_SIDES]
    fastest = min(torch_sides, key=lambda k: speed[k]["frame_s"]) if torch_sides else None
    dtypes = args.dtype if args.torch_dtype == args.dtype else f"MLX {args.dtype}, PyTorch {args.torch_dtype}"
    print(f"\nCSM {args.size} random weights, {dtypes}, batch 1, prompt {PROMPT_LEN} rows, fastest of "
          f"{args.frames} frames; PyTorch on {args.torch_device}; {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'side':<15} {'prefill s':>10} {'ms/frame':>10} {'peak RSS GB':>12} "
          f"{'x eager (frame/prefill)':>24} {'x ' + str(fastest) + ' (frame/prefill)':>34}")
    for name, r in speed.items():
        ratios = []
        for base in ("torch-eager", fastest):
            b = speed.get(base)
            ratios.append(f"{b['frame_s'] / r['frame_s']:.2f} / {b['prefill_s'] / r['prefill_s']:.2f}" if b else "-")
        print(f"{name:<15} {r['prefill_s']:>10.3f} {1e3 * r['frame_s']:>10.1f} {r['peak_gb']:>12.2f} "
              f"{ratios[0]:>24} {ratios[1]:>34}")
    print("(x = PyTorch time / this time: > 1 means faster than that PyTorch side)")
    for name, r in results.items():
        if "error" in r:
            print(f"{name}: failed: {r['error']}")
        if "static_vs_eager_logit_err" in r:
            print(f"{name}: logits vs torch-eager, one teacher-forced frame: max err / max |logit| "
                  f"{r['static_vs_eager_logit_err']:.1e}")
    if "batch" in results.get("mlx", {}):
        print("\nMLX batch scaling (ms per batched frame step, total frames/s):")
        for batch, r in results["mlx"]["batch"].items():
            print(f"  batch {batch:>3}: {r['ms_per_step']:9.1f} ms  {r['frames_per_s']:8.1f} frames/s")
    if "quality" in results and "error" not in results["quality"]:
        print(f"\nquality, teacher-forced {args.quality_frames} frames x 32 codebooks (MLX):")
        for name, r in results["quality"].items():
            print(f"  {name:<22} mean |dlogit|/std {r['mean_err_rel']:.4f}   argmax agree "
                  f"{r['argmax_agree']}/{r['rows']} ({100 * r['argmax_agree'] / r['rows']:.1f}%)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["full", "small"], default="full", help="random CSM size (default: full)")
    parser.add_argument("--weights", type=Path, help="checkpoint folder (written if missing; default: a temp dir)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                        help="compute dtype of every side (default: bfloat16; use float32 on CPU)")
    parser.add_argument("--torch-dtype", choices=["float32", "bfloat16"],
                        help="PyTorch's dtype when it should differ from --dtype (e.g. MLX float32 on CPU vs "
                             "PyTorch's faster bf16 CPU kernels)")
    parser.add_argument("--frames", type=int, default=3, help="timed frames (the fastest is reported)")
    parser.add_argument("--torch-device", choices=["cpu", "cuda"], default="cpu", help="where PyTorch runs")
    parser.add_argument("--torch-compile", default=None, choices=["none", "default", "reduce-overhead", "max-autotune"],
                        help="torch.compile mode of torch-compiled (default: reduce-overhead on cuda, none on cpu)")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--sides", help="comma-separated subset of: " + ",".join(TORCH_SIDES + ("mlx", "mlx-q8", "mlx-q4")))
    parser.add_argument("--quantized", action="store_true", help="also time 8- and 4-bit MLX")
    parser.add_argument("--quality-frames", type=int, default=0, help="teacher-forced frames for the quality figures")
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                        help="MLX batch scaling, e.g. 1,4,16,64")
    parser.add_argument("--json", type=Path, help="also write all results to this JSON file")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.torch_dtype = args.torch_dtype or args.dtype
    if args.torch_compile is None:
        args.torch_compile = "reduce-overhead" if args.torch_device == "cuda" else "none"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.side:
        print(json.dumps(run_side(args.side, args)))
        return 0
    from random_weights import write_random_checkpoint

    args.weights = args.weights or Path(tempfile.gettempdir()) / f"csm-bench-{args.size}"
    write_random_checkpoint(args.weights, args.size)
    sides = args.sides.split(",") if args.sides else [
        "torch-eager", "torch-static", *(["torch-compiled"] if args.torch_compile != "none" else []),
        "mlx", *(["mlx-q8", "mlx-q4"] if args.quantized else [])]
    results = {}
    for side in sides + (["quality"] if args.quality_frames else []):
        results[side] = child(side, args)
        print(side, json.dumps(results[side]), flush=True)
    print_report(results, args)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark one fine-tuning step of CSM-1B at full size (random weights built in-process).

For each mode (LoRA rank 16 on every backbone/decoder layer Linear, or full fine-tuning) and dtype,
runs ``--steps`` optimizer steps on synthetic samples (``--rows`` rows: 1/4 text, 3/4 audio
frames, every audio frame scored, depth decoder on 1/16 of them) through the real
:class:`csm.training.trainer.Trainer`, each configuration in its own subprocess so peak memory
is its own. Prints step time (the first step, which includes graph setup, reported apart),
samples/s, the CPU seconds of a step (all threads), MLX peak memory and peak RSS.

Nothing is downloaded or read from disk (no tokenizer, no Mimi: samples are random tokens), so it
runs on a machine without network. ``--size small`` (``random_weights.py``'s small config, needs
transformers) checks the script quickly on a CPU; ``full`` (default) is CSM-1B.

    python benchmarks/bench_finetune.py --mode lora --dtype bfloat16 --steps 3 --batch-size 1
    python benchmarks/bench_finetune.py --mode full --dtype bfloat16 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time


def model_args(size: str):
    """CSMArgs of a benchmark size: CSM-1B, or ``random_weights.py``'s small config."""
    from csm.models.csm import CSMArgs

    if size == "full":
        return CSMArgs()
    from random_weights import csm_config

    from csm.weights.csm_checkpoint import args_from_config

    return args_from_config(csm_config(size).to_dict())


def _one(mode: str, dtype: str, steps: int, batch_size: int, rows: int, size: str) -> dict:
    import csm  # noqa: F401  (first: loads an installed BLIS/OpenBLAS before mlx.core, see csm.backend)
    import mlx.core as mx

    from csm.backend import blas_status
    import numpy as np
    from mlx.utils import tree_flatten

    from csm.models.csm import CSM
    from csm.training.batching import Sample
    from csm.training.lora import LoRAConfig, apply_lora
    from csm.training.trainer import Trainer, TrainConfig

    built = time.perf_counter()
    mx.random.seed(0)
    model = CSM(model_args(size))
    model.audio_head = mx.random.normal(model.audio_head.shape) * 0.02
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    if mode == "lora":
        apply_lora(model, LoRAConfig(rank=16, alpha=32))
    build_s = time.perf_counter() - built
    rng = np.random.default_rng(0)
    n_text = rows // 4
    samples = []
    for i in range(max(4, batch_size)):
        tokens = np.zeros((rows, 33), np.int32)
        mask = np.zeros((rows, 33), bool)
        tokens[:n_text, 32], mask[:n_text, 32] = rng.integers(0, 128_000, n_text), True
        tokens[n_text:, :32], mask[n_text:, :32] = rng.integers(0, 2048, (rows - n_text, 32)), True
        samples.append(Sample(tokens, mask, np.arange(rows) >= n_text, str(i)))
    config = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=1e-5, save_every=0)
    trainer = Trainer(model, samples, [], config, tempfile.mkdtemp())
    times, cpu = [], []
    for _ in range(steps):
        start = time.process_time()
        times.append(trainer.train_step()["step_seconds"])
        cpu.append(time.process_time() - start)  # all threads: honest on a shared, oversubscribed machine
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    steady = times[1:] or times
    return {
        "size": size, "mode": mode, "dtype": dtype, "batch": batch_size, "rows": rows, "trainable_M": trainable / 1e6,
        "build_s": build_s, "first_step_s": times[0], "step_s": float(np.mean(steady)),
        "step_cpu_s": float(np.mean(cpu[1:] or cpu)),
        "samples_per_s": batch_size / float(np.mean(steady)),
        "mlx_peak_gb": mx.get_peak_memory() / 2**30,
        "rss_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "blas": blas_status().path or blas_status().reason,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["lora", "full", "both"], default="lora")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "both"], default="bfloat16")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rows", type=int, default=200, help="rows per sample (200 = 150 frames = 12 s of audio)")
    p.add_argument("--size", choices=["full", "small"], default="full", help="model size (small: a quick check)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_one(args.mode, args.dtype, args.steps, args.batch_size, args.rows, args.size)))
        return
    modes = ["lora", "full"] if args.mode == "both" else [args.mode]
    dtypes = ["bfloat16", "float32"] if args.dtype == "both" else [args.dtype]
    for mode in modes:
        for dtype in dtypes:
            cmd = [sys.executable, __file__, "--child", "--mode", mode, "--dtype", dtype, "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--rows", str(args.rows), "--size", args.size]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(f"{mode} {dtype}: failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{args.size} {mode:4} {dtype:8} batch {r['batch']} rows {r['rows']}: "
                  f"trainable {r['trainable_M']:.1f} M, "
                  f"first step {r['first_step_s']:.1f} s, step {r['step_s']:.1f} s (CPU {r['step_cpu_s']:.1f} s), "
                  f"{r['samples_per_s']:.3f} samples/s, "
                  f"MLX peak {r['mlx_peak_gb']:.1f} GB, RSS peak {r['rss_peak_gb']:.1f} GB (build {r['build_s']:.0f} s), "
                  f"BLAS: {r['blas']}")


if __name__ == "__main__":
    main()

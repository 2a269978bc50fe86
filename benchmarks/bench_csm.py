"""Benchmark CSM-1B (random weights, full size): MLX vs the PyTorch (transformers) reference on CPU.

Measures, per backend, in its own subprocess (so peak memory is that backend's alone):
prefill of a 200-row prompt (backbone + codebook-0 head), ms per frame (backbone step + 31
depth-decoder steps + top-k 50 / temperature 0.9 sampling of all 32 codebooks) and peak RSS.
MLX is also run 8- and 4-bit quantized, with its logit error / argmax agreement vs bf16
(teacher-forced on the same codes). Prints one table with MLX/PyTorch ratios.

    python benchmarks/bench_csm.py --frames 3 [--quantized]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

PROMPT_LEN = 200
TOPK, TEMPERATURE = 50, 0.9


def _prompt(k: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = np.zeros((1, PROMPT_LEN, k + 1), np.int32)
    mask = np.zeros_like(tokens, dtype=bool)
    tokens[0, :, :k] = rng.integers(0, 2048, (PROMPT_LEN, k))
    mask[0, :, :k] = True
    return tokens, mask


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _timed(fn, sync=lambda: None) -> float:
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def run_mlx(frames: int, bits: int | None) -> dict:
    import mlx.core as mx

    from csm.models import CSM, CSMArgs
    from csm.sampling import sample_topk
    from csm.weights.convert import quantize_csm

    mx.random.seed(0)
    model = CSM(CSMArgs())
    model.audio_head = 0.02 * mx.random.normal(model.audio_head.shape)
    model.set_dtype(mx.bfloat16)
    reference = None
    if bits:
        mx.eval(model.parameters())
        reference = teacher_forced_logits(model)
        quantize_csm(model, bits=bits, group_size=64)
    mx.eval(model.parameters())
    tokens, mask = (mx.array(a) for a in _prompt())
    sampler = lambda logits, i: sample_topk(logits, TOPK, TEMPERATURE)  # noqa: E731

    def prefill():
        cache = model.make_cache(1)
        mx.eval(model.codebook0_head(model.forward_backbone(tokens, mask, cache)[:, -1]))

    prefill()  # warm-up
    prefill_s = _timed(prefill)
    cache = model.make_cache(1)
    codes = model.generate_frame(tokens, mask, cache, sampler)
    mx.eval(codes)
    row_mask = mx.array(np.r_[np.ones(32, bool), False][None, None])

    def frame():
        nonlocal codes
        row = mx.concatenate([codes, mx.zeros((1, 1), mx.int32)], axis=1)[:, None]
        codes = model.generate_frame(row, row_mask, cache, sampler)
        mx.eval(codes)

    frame()  # warm-up
    frame_s = min(_timed(frame) for _ in range(frames))
    out = {"prefill_s": prefill_s, "frame_s": frame_s, "peak_gb": _peak_rss_gb(), "mlx_peak_gb": mx.get_peak_memory() / 2**30}
    if reference is not None:
        got = teacher_forced_logits(model)
        err = np.abs(got - reference)
        out |= {"mean_err_rel": float(err.mean() / reference.std()), "argmax_agree": float((got.argmax(-1) == reference.argmax(-1)).mean())}
    return out


def teacher_forced_logits(model) -> np.ndarray:
    """All 32 codebooks' logits of one frame after a 20-row prompt, with fixed codes: (32, V) float32."""
    import mlx.core as mx

    tokens, mask = (mx.array(a[:, :20]) for a in _prompt())
    codes = mx.array(np.random.default_rng(1).integers(0, 2048, (1, 32)).astype(np.int32))
    logits = []

    def forced(x, i):
        logits.append(x.astype(mx.float32))
        return codes[:, i : i + 1]

    model.generate_frame(tokens, mask, model.make_cache(1, max_len=32), forced)
    return np.concatenate([np.array(x) for x in logits])


def run_torch(frames: int, device: str = "cpu") -> dict:
    import torch
    from transformers import CsmConfig, CsmForConditionalGeneration, DynamicCache

    sys.path.insert(0, "tests")
    from csm_reference import ROPE_BACKBONE, ROPE_DECODER, TorchCSM

    from csm.analysis.token_parity import torch_sample_topk

    torch.manual_seed(0)
    config = CsmConfig(rope_parameters=dict(ROPE_BACKBONE), depth_decoder_config={"rope_parameters": dict(ROPE_DECODER)})
    with torch.device("meta"):
        hf = CsmForConditionalGeneration(config)
    hf = hf.to_empty(device=device).to(torch.bfloat16).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.02)
    ref = TorchCSM(hf)
    tokens, mask = (torch.from_numpy(a).to(device) for a in _prompt())
    tokens = tokens.long()

    def sample(logits, _):  # the official sample_topk (exponential race)
        return torch_sample_topk(logits, TOPK, TEMPERATURE, torch.empty_like(logits).exponential_(1))[:, 0]

    with torch.no_grad():
        prefill = lambda: hf.lm_head(ref.backbone(tokens, mask, DynamicCache(config=hf.config))[:, -1])  # noqa: E731
        prefill()
        prefill_s = _timed(prefill, sync)
        cache = DynamicCache(config=hf.config)
        codes = ref.frame(tokens, mask, cache, sample)
        row_mask = torch.from_numpy(np.r_[np.ones(32, bool), False][None, None]).to(device)
        times = []
        for _ in range(frames + 1):
            row = torch.cat([codes, torch.zeros(1, 1, dtype=codes.dtype, device=device)], dim=1)[:, None]
            start = time.perf_counter()
            codes = ref.frame(row, row_mask, cache, sample)
            sync()
            times.append(time.perf_counter() - start)
    out = {"prefill_s": prefill_s, "frame_s": min(times[1:]), "peak_gb": _peak_rss_gb(), "threads": torch.get_num_threads()}
    if device == "cuda":
        out["device_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _child(backend: str, frames: int, torch_device: str) -> dict:
    cmd = [sys.executable, __file__, "--frames", str(frames), "--backend", backend, "--torch-device", torch_device]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"{backend} run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=3, help="timed frames (the fastest is reported)")
    parser.add_argument("--quantized", action="store_true", help="also run 8- and 4-bit MLX (slow on CPU)")
    parser.add_argument("--torch-device", choices=["cpu", "cuda"], default="cpu",
                        help="where the PyTorch reference runs (MLX uses its default device)")
    parser.add_argument("--backend", choices=["mlx", "mlx-q8", "mlx-q4", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        bits = {"mlx-q8": 8, "mlx-q4": 4}.get(args.backend)
        print(json.dumps(run_torch(args.frames, args.torch_device) if args.backend == "torch" else run_mlx(args.frames, bits)))
        return 0
    backends = ("torch", "mlx", "mlx-q8", "mlx-q4") if args.quantized else ("torch", "mlx")
    results = {}
    for backend in backends:
        results[backend] = _child(backend, args.frames, args.torch_device)
        print(backend, json.dumps(results[backend]), flush=True)
    base = results["torch"]
    print(f"CSM-1B random weights, bf16, batch 1, prompt {PROMPT_LEN} rows, {args.frames} timed frames, "
          f"PyTorch on {args.torch_device}")
    print(f"{'backend':<8} {'prefill s':>10} {'ms/frame':>10} {'peak RSS GB':>12} {'prefill x':>10} {'frame x':>8} {'quality':>30}")
    for name, r in results.items():
        quality = f"err/std {r['mean_err_rel']:.4f} argmax {r['argmax_agree']:.3f}" if "argmax_agree" in r else ""
        print(f"{name:<8} {r['prefill_s']:>10.3f} {1000 * r['frame_s']:>10.1f} {r['peak_gb']:>12.2f} "
              f"{base['prefill_s'] / r['prefill_s']:>10.2f} {base['frame_s'] / r['frame_s']:>8.2f} {quality:>30}")
    print("(x = PyTorch time / this time: > 1 means faster than the PyTorch reference)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Mimi decode speed, MLX (csm.codec) vs transformers ``MimiModel`` (PyTorch CPU), in one run.

Full-size (released) config, random weights (transformers' init plus random codebooks), both
sides holding the same weights. Reports ms per 80 ms frame for a one-shot decode of ``--frames``
frames and for streaming one frame per call, and the PyTorch/MLX ratios. transformers has no
streaming conv state, so its "streaming" is per-frame ``decode`` carrying only the transformer
KV cache (it is not equal to the one-shot audio; timing only). Run: ``python benchmarks/bench_mimi.py``.
"""

from __future__ import annotations

import argparse
import inspect
import platform
import time

import mlx.core as mx
import numpy as np
import torch
from transformers import MimiConfig, MimiModel

from csm.codec import mimi_from_weights
from csm.weights.io import torch_to_mlx


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def build(seed: int):
    torch.manual_seed(seed)
    ref = MimiModel(MimiConfig()).eval()
    with torch.no_grad():
        for module in ref.modules():
            if hasattr(module, "embed_sum"):
                module.embed_sum.normal_()
                module._embed = None
    weights = {k: torch_to_mlx(v) for k, v in ref.state_dict().items()}
    return ref, mimi_from_weights(weights, ref.config.to_dict(), 32, source="random full-size")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=50, help="frames per one-shot decode (80 ms each)")
    parser.add_argument("--stream-frames", type=int, default=25, help="frames streamed one by one")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--torch-device", choices=["cpu", "cuda"], default="cpu",
                        help="where the PyTorch reference runs (MLX uses its default device)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ref, ours = build(0)
    ref = ref.to(args.torch_device)
    sync = torch.cuda.synchronize if args.torch_device == "cuda" else (lambda: None)
    codes = np.random.default_rng(0).integers(0, 2048, (1, 32, args.frames))
    codes_t, codes_m = torch.from_numpy(codes).to(args.torch_device), mx.array(codes.astype(np.int32))

    with torch.no_grad():
        ref_audio = ref.decode(codes_t).audio_values.cpu().numpy()
    ours_audio = np.array(ours.decode(codes_m))
    err = np.abs(ours_audio - ref_audio).max() / np.abs(ref_audio).max()

    def torch_one_shot():
        with torch.no_grad():
            ref.decode(codes_t)
        sync()

    def mlx_one_shot():
        mx.eval(ours.decode(codes_m))

    # transformers renamed the decoder cache argument across 5.x releases.
    params = inspect.signature(ref.decode).parameters
    cache_arg = next(n for n in ("decoder_cache", "decoder_past_key_values") if n in params)
    extra = {"use_cache": True} if "use_cache" in params else {}

    def torch_stream():
        cache = None
        with torch.no_grad():
            for t in range(args.stream_frames):
                out = ref.decode(codes_t[:, :, t : t + 1], **{cache_arg: cache}, **extra)
                cache = getattr(out, cache_arg)
        sync()

    def mlx_stream():
        state = ours.make_state()
        for t in range(args.stream_frames):
            mx.eval(ours.decode_step(codes_m[:, :, t : t + 1], state, check_range=False))

    per_frame = {
        "one-shot": (best_of(torch_one_shot, args.repeats) / args.frames,
                     best_of(mlx_one_shot, args.repeats) / args.frames),
        "streaming": (best_of(torch_stream, args.repeats) / args.stream_frames,
                      best_of(mlx_stream, args.repeats) / args.stream_frames),
    }  # fmt: skip
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch on {args.torch_device} "
          f"({args.threads} CPU threads), "
          f"mlx {mx.__version__} ({mx.default_device()}), torch {torch.__version__}")  # fmt: skip
    print(f"decode parity (full size, {args.frames} frames): max abs err / max |ref| = {err:.2e}")
    print(f"{'mode':<10} {'torch ms/frame':>15} {'mlx ms/frame':>13} {'torch/mlx':>10} {'mlx RTF':>8}")
    for mode, (t_torch, t_mlx) in per_frame.items():
        print(f"{mode:<10} {1e3 * t_torch:>15.1f} {1e3 * t_mlx:>13.1f} {t_torch / t_mlx:>10.2f} {t_mlx / 0.08:>8.2f}")


if __name__ == "__main__":
    main()

"""Mimi decode speed: MLX (csm.codec) vs PyTorch (transformers ``MimiModel``, kyutai ``moshi``), in one run.

Full-size (released) config, random weights, each PyTorch model paired with an MLX Mimi holding
the same weights. Reports ms per 80 ms frame and PyTorch/MLX ratios for:

* ``one-shot``: decode ``--frames`` frames at once (transformers vs MLX);
* ``streaming``: one frame per call with full streaming state (conv buffers + transformer KV
  cache): moshi's ``MimiModel.decode`` inside ``mimi.streaming(1)`` (on CUDA moshi replays CUDA
  graphs there) vs MLX ``decode_step``. Same work and same audio: the streamed outputs are
  compared and the error printed. Needs ``moshi`` (``pip install --no-deps moshi``); skipped without;
* ``per-frame (no conv state)``: transformers ``decode`` per frame carrying only the transformer
  KV cache — transformers has no streaming conv state, so this is *not* equivalent work (its
  audio differs from one-shot); printed for reference only, against MLX streaming.

MLX alone (``--batch B``, always printed; ``--mlx-only`` skips PyTorch): streaming ms per frame
step with the compiled step (the default of ``decode_step``) and op by op, at batch 1, at batch
B (B streams in one state, per step and per stream-frame), and B batch-1 states stepped one after
the other (what the serving engine did before it batched its rows). On CUDA, also the compiled
batch-1 step with the fused window attention and with MLX's SDPA, steps alternating in one process.

CPU: ``python benchmarks/bench_mimi.py``; CUDA: ``python benchmarks/bench_mimi.py --torch-device cuda``.
"""

from __future__ import annotations

import inspect
import platform
import time

import csm  # noqa: F401  (first: loads an installed OpenBLAS before mlx.core, see csm.backend)
import mlx.core as mx
import numpy as np
import torch
from transformers import MimiConfig, MimiModel

from csm.codec import Mimi, MimiArgs, mimi_from_weights
from csm.models import fused
from csm.weights.io import torch_to_mlx
from bench_generate import doc_parser


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


def build_moshi(seed: int):
    """A random moshi ``MimiModel`` (32 codebooks, random codebooks) and an MLX Mimi from its state dict."""
    from moshi.models.loaders import get_mimi

    torch.manual_seed(seed)
    ref = get_mimi(None, num_codebooks=32).eval()
    with torch.no_grad():
        for name, buffer in ref.named_buffers():
            if name.endswith("embedding_sum"):
                buffer.normal_()
    # moshi >= 0.2 names (out_projs.0 / in_projs.0) -> the released checkpoint's names
    rename = lambda k: k.replace("out_projs.0.", "out_proj.").replace("in_projs.0.weight", "in_proj_weight")  # noqa: E731
    weights = {rename(k): torch_to_mlx(v) for k, v in ref.state_dict().items()}
    return ref, mimi_from_weights(weights, None, 32, source="random moshi")


def moshi_streaming(args, codes: np.ndarray, sync):
    """(torch seconds per frame, MLX seconds per frame, max err / max |ref|) of true streaming decode."""
    try:
        import moshi  # noqa: F401
    except ImportError:
        return None
    ref, ours = build_moshi(1)
    ref = ref.to(args.torch_device)
    codes_t = torch.from_numpy(codes[..., : args.stream_frames]).to(args.torch_device)
    codes_m = mx.array(codes[..., : args.stream_frames].astype(np.int32))
    audio = {}

    def torch_stream():
        with torch.no_grad(), ref.streaming(1):
            audio["torch"] = [ref.decode(codes_t[:, :, t : t + 1]) for t in range(args.stream_frames)]
        sync()

    def mlx_stream():
        state = ours.make_state()
        audio["mlx"] = [ours.decode_step(codes_m[:, :, t : t + 1], state, check_range=False)
                        for t in range(args.stream_frames)]
        mx.eval(audio["mlx"])

    t_torch = best_of(torch_stream, args.repeats) / args.stream_frames
    t_mlx = best_of(mlx_stream, args.repeats) / args.stream_frames
    want = torch.cat(audio["torch"], dim=-1).float().cpu().numpy()
    got = np.concatenate([np.array(x) for x in audio["mlx"]], axis=-1)
    n = min(want.shape[-1], got.shape[-1])
    return t_torch, t_mlx, float(np.abs(got[..., :n] - want[..., :n]).max() / np.abs(want).max())


def mlx_streaming(mimi: Mimi, frames: int, batch: int, repeats: int) -> list[tuple[str, float, int]]:
    """(label, seconds per frame step, streams per step) of MLX streaming decode variants."""
    codes = mx.array(np.random.default_rng(2).integers(0, 2048, (batch, 32, frames)).astype(np.int32))

    # An older checkout's decode_step has no compiled option: its one variant is timed ("before" runs).
    has_option = "compiled" in inspect.signature(mimi.decode_step).parameters

    def run(rows: int, states: int, compiled: bool):
        option = {"compiled": compiled} if has_option else {}

        def go():
            made = [mimi.make_state(rows) for _ in range(states)]
            for t in range(frames):
                out = [mimi.decode_step(codes[i * rows : (i + 1) * rows, :, t : t + 1], state, check_range=False,
                                        **option) for i, state in enumerate(made)]  # fmt: skip
                mx.eval(out)

        return best_of(go, repeats) / frames

    if not has_option:
        rows = [("decode_step, batch 1", run(1, 1, False), 1)]
        return rows + ([(f"decode_step, batch {batch}", run(batch, 1, False), batch),
                        (f"{batch} x batch 1", run(1, batch, False), batch)] if batch > 1 else [])  # fmt: skip
    rows = [("compiled, batch 1", run(1, 1, True), 1), ("op by op, batch 1", run(1, 1, False), 1)]
    if fused.active():
        rows += fused_vs_sdpa(mimi, codes[:1], steps=max(4 * frames, 100))
    if batch > 1:
        rows += [(f"compiled, batch {batch}", run(batch, 1, True), batch),
                 (f"op by op, batch {batch}", run(batch, 1, False), batch),
                 (f"{batch} x compiled batch 1", run(1, batch, True), batch)]  # fmt: skip
    return rows


def fused_vs_sdpa(mimi: Mimi, codes: mx.array, steps: int) -> list[tuple[str, float, int]]:
    """CUDA: the compiled batch-1 step with the fused window attention and with MLX's SDPA (a second
    Mimi on the same weights, traced with the fused kernels off), steps alternating in one process
    (which goes first swaps every step); the median of each."""
    plain = Mimi(mimi.args, mimi.num_codebooks)
    plain.update(mimi.parameters())
    pairs = [(mimi, mimi.make_state(1), []), (plain, plain.make_state(1), [])]
    with fused.fused_kernels(False):
        mx.eval(plain.decode_step(codes[:, :, :1], pairs[1][1], check_range=False))  # traced here
    mx.eval(mimi.decode_step(codes[:, :, :1], pairs[0][1], check_range=False))
    for t in range(1, steps + 1):
        frame = codes[:, :, t % codes.shape[-1] : t % codes.shape[-1] + 1]
        for model, state, times in pairs if t % 2 else pairs[::-1]:
            start = time.perf_counter()
            mx.eval(model.decode_step(frame, state, check_range=False))
            times.append(time.perf_counter() - start)
    return [(f"{label} (alternating)", float(np.median(times[steps // 10 :])), 1)
            for label, (_, _, times) in zip(("compiled, fused attention", "compiled, MLX SDPA"), pairs)]  # fmt: skip


def print_mlx_streaming(rows: list[tuple[str, float, int]], frames: int) -> None:
    print(f"MLX streaming decode ({frames} frames, {mx.default_device()}):")
    print(f"{'variant':<40} {'ms/step':>9} {'ms/stream-frame':>16}")
    for label, seconds, streams in rows:
        print(f"{label:<40} {1e3 * seconds:>9.2f} {1e3 * seconds / streams:>16.2f}")


def random_mimi(seed: int, tiny: bool) -> Mimi:
    """An MLX Mimi with random weights (no PyTorch): full size, or the tests' tiny one."""
    mx.random.seed(seed)
    args = MimiArgs(hidden_size=32, num_filters=8, upsampling_ratios=(8, 4), codebook_size=2048, codebook_dim=64,
                    vector_quantization_hidden_dimension=64, upsample_groups=32, num_hidden_layers=2,
                    num_attention_heads=2, head_dim=16, sliding_window=250,
                    intermediate_size=64) if tiny else MimiArgs()  # fmt: skip
    mimi = Mimi(args)
    mx.eval(mimi.parameters())
    return mimi


def main() -> None:
    parser = doc_parser(__doc__)
    parser.add_argument("--frames", type=int, default=50, help="frames per one-shot decode (80 ms each)")
    parser.add_argument("--stream-frames", type=int, default=25, help="frames streamed one by one")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--torch-device", choices=["cpu", "cuda"], default="cpu",
                        help="where the PyTorch reference runs (MLX uses its default device)")
    parser.add_argument("--batch", type=int, default=1, help="MLX streams decoded together (MLX table)")
    parser.add_argument("--mlx-only", action="store_true", help="only the MLX streaming table (no PyTorch)")
    parser.add_argument("--tiny", action="store_true", help="with --mlx-only: a tiny random Mimi (launch-bound)")
    args = parser.parse_args()
    if args.mlx_only:
        mimi = random_mimi(0, args.tiny)
        print(f"Mimi: {'tiny' if args.tiny else 'full-size'}, random weights, float32")
        print_mlx_streaming(mlx_streaming(mimi, args.stream_frames, args.batch, args.repeats),
                            args.stream_frames)  # fmt: skip
        return
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
    }  # fmt: skip
    streaming = moshi_streaming(args, codes, sync)
    if streaming is not None:
        per_frame["streaming (moshi)"] = streaming[:2]
    per_frame["per-frame, no conv state"] = (best_of(torch_stream, args.repeats) / args.stream_frames,
                                             best_of(mlx_stream, args.repeats) / args.stream_frames)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch on {args.torch_device} "
          f"({args.threads} CPU threads), "
          f"mlx {mx.__version__} ({mx.default_device()}), torch {torch.__version__}")  # fmt: skip
    print(f"one-shot decode vs transformers ({args.frames} frames): max abs err / max |ref| = {err:.2e}")
    if streaming is None:
        print("streaming (moshi): skipped, moshi is not installed (pip install --no-deps moshi)")
    else:
        print(f"streaming decode vs moshi ({args.stream_frames} frames): max abs err / max |ref| = {streaming[2]:.2e}")
    print(f"{'mode':<26} {'torch ms/frame':>15} {'mlx ms/frame':>13} {'torch/mlx':>10} {'mlx RTF':>8}")
    for mode, (t_torch, t_mlx) in per_frame.items():
        print(f"{mode:<26} {1e3 * t_torch:>15.1f} {1e3 * t_mlx:>13.1f} {t_torch / t_mlx:>10.2f} {t_mlx / 0.08:>8.2f}")
    print("(per-frame, no conv state: transformers decodes each frame without conv state — different work "
          "and audio than streaming; shown for reference, not a like-for-like ratio)")
    print_mlx_streaming(mlx_streaming(ours, args.stream_frames, args.batch, args.repeats), args.stream_frames)


if __name__ == "__main__":
    main()

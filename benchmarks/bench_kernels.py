"""Each fused CUDA kernel alone: µs per call and the weight bandwidth it reaches, against the MLX ops it replaces.

A steady CSM frame's GPU time is mostly the depth decoder's four layer kernels (docs/model.md,
"Where a fused frame's GPU time goes"), and a one-row kernel is bound by how many loads it keeps in
flight rather than by its bytes. This times every kernel of ``csm.models.fused`` (and the sampler)
at CSM-1B's shapes, batch ``--rows``, bf16: ``--calls`` independent calls evaluated together (one
command buffer, so launch gaps are what a compiled frame has), each reading its own copy of the
weights (``--copies`` of them, cycled: more bytes than the GPU's L2, as in a real frame). The same
work as MLX ops is timed next to it; ``GB/s`` is weight bytes / time, to set against the GPU's
bandwidth (H200: ~4.8 TB/s).

CUDA: ``python benchmarks/bench_kernels.py``. Elsewhere the fused kernels do not run and only the MLX
ops are timed (a check that the script works).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import csm  # noqa: E402,F401  (first: loads an installed BLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from mlx.utils import tree_map  # noqa: E402

from csm.models import fused, fused_sampler, fused_stack  # noqa: E402
from csm.models.llama import Llama, LlamaArgs  # noqa: E402
from csm.sampling import sample_topk  # noqa: E402
from bench_generate import doc_parser  # noqa: E402

DECODER = dict(D=1024, H=8, KV=2, HD=128, I=8192, S=32)
BACKBONE = dict(D=2048, H=32, KV=8, HD=64, I=8192, S=2048)
VOCAB = 2051


def timed(make: Callable[[int], mx.array], calls: int, repeats: int) -> float:
    """Median seconds per call of ``make(i)`` over ``repeats`` rounds of ``calls`` calls evaluated together."""
    mx.eval([make(i) for i in range(calls)])  # builds, compiles, warms
    rounds = []
    for _ in range(repeats):
        outs = [make(i) for i in range(calls)]
        start = time.perf_counter()
        mx.eval(outs)
        rounds.append((time.perf_counter() - start) / calls)
    return statistics.median(rounds)


def cases(shape: dict, rows: int, copies: int, dtype: mx.Dtype) -> dict[str, tuple[int, Callable, Callable]]:
    """name -> (weight bytes a call reads, fused call(i), MLX-ops call(i))."""
    D, H, KV, HD, inter, S = (shape[k] for k in ("D", "H", "KV", "HD", "I", "S"))

    def weights(shape_):
        return [(mx.random.normal(shape_) * shape_[-1] ** -0.5).astype(dtype) for _ in range(copies)]

    x = mx.random.normal((rows, D)).astype(dtype)
    scale = mx.ones((D,), dtype)
    periods = mx.array(10000.0 ** (mx.arange(0, HD, 2) / HD))
    pos = mx.full((rows,), 17, mx.int32)
    qkv, out_w = weights(((H + 2 * KV) * HD, D)), weights((D, H * HD))
    w13, w2 = weights((2 * inter, D)), weights((D, inter))
    keys = mx.random.normal((rows, KV, S, HD)).astype(dtype)
    values = mx.random.normal((rows, KV, S, HD)).astype(dtype)
    q = mx.random.normal((rows, H, HD)).astype(dtype)
    slot = mx.array([min(S, 32) - 1], mx.int32)
    gated = mx.random.normal((rows, inter)).astype(dtype)
    mask = mx.repeat((mx.arange(S) < 201)[None], rows, axis=0)  # 201 positions seen (a 200-row prompt)
    mx.eval(x, keys, values, q, gated, mask, qkv, out_w, w13, w2)
    seen = S if S > fused.MAX_ATTEND else int(slot.item()) + 1

    def ops_qkv(i):
        h = mx.fast.rms_norm(x, scale, 1e-5) @ qkv[i % copies].T
        heads = h.reshape(rows, 1, -1, HD).transpose(0, 2, 1, 3)
        return mx.fast.rope(heads[:, : H + KV], HD, traditional=True, base=None, scale=1.0, offset=17, freqs=periods)

    def ops_attend(i):
        att = mx.fast.scaled_dot_product_attention(
            q[:, :, None], keys[:, :, :seen], values[:, :, :seen], scale=HD**-0.5,
            mask=None if S <= fused.MAX_ATTEND else mask[:, None, None, :],
        )
        return mx.addmm(x, att.reshape(rows, -1), out_w[i % copies].T)

    def ops_gate_up(i):
        gate, up = mx.split(mx.fast.rms_norm(x, scale, 1e-5) @ w13[i % copies].T, 2, axis=-1)
        return nn.silu(gate) * up

    result = {
        "norm_qkv_rope": (qkv[0].nbytes, lambda i: fused.norm_qkv_rope(x, scale, 1e-5, qkv[i % copies], periods, pos, H, KV, HD)[0], ops_qkv),
        "norm_gate_up": (w13[0].nbytes, lambda i: fused.norm_gate_up(x, scale, 1e-5, w13[i % copies]), ops_gate_up),
        "down": (w2[0].nbytes, lambda i: fused.down(gated, w2[i % copies], x), lambda i: mx.addmm(x, gated, w2[i % copies].T)),
    }
    if S <= fused.MAX_ATTEND:
        result["attend_out"] = (out_w[0].nbytes, lambda i: fused.attend_out(q, keys, values, slot, out_w[i % copies], x), ops_attend)
    else:
        result["attend_masked + down"] = (
            out_w[0].nbytes, lambda i: fused.down(fused.attend_masked(q, keys, values, mask), out_w[i % copies], x), ops_attend,
        )
    return result


def stack_steps(rows: int, repeats: int, steps: int = 30) -> dict[str, float]:
    """Seconds per one-row step of the 4-layer depth decoder over ``steps`` chained steps (a frame's
    worth): the stack kernel (one launch a step, :mod:`csm.models.fused_stack`) against the per-layer
    kernels and the MLX ops."""
    args = LlamaArgs(num_layers=4, embed_dim=DECODER["D"], num_heads=DECODER["H"], num_kv_heads=DECODER["KV"],
                     intermediate_dim=DECODER["I"], head_dim=DECODER["HD"])
    model = Llama(args)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * p.shape[-1] ** -0.5 if p.ndim == 2 else mx.ones(p.shape),
                          model.parameters()))
    model.set_dtype(mx.bfloat16)
    x0 = mx.random.normal((rows, 1, args.embed_dim)).astype(mx.bfloat16)
    mx.eval(model.parameters(), x0)
    result = {}
    for name, stack, kernels in (("stack kernel", True, True), ("layer kernels", False, True), ("MLX ops", False, False)):
        saved, fused_stack._enabled = fused_stack._enabled, stack
        rounds = []
        try:
            with fused.fused_kernels(kernels):
                for _ in range(repeats + 1):  # the first builds and warms
                    caches, x = model.make_cache(rows, 32, mx.bfloat16), x0
                    for _ in range(steps):
                        x = model(x, caches, None, caches[0].offset)
                    start = time.perf_counter()
                    mx.eval(x, *[c.keys for c in caches])
                    rounds.append((time.perf_counter() - start) / steps)
        finally:
            fused_stack._enabled = saved
        result[name] = statistics.median(rounds[1:])
    return result


def main() -> int:
    parser = doc_parser(__doc__)
    parser.add_argument("--rows", type=int, default=1, help="batch rows (the fused path takes up to 8)")
    parser.add_argument("--calls", type=int, default=64, help="calls evaluated together per round")
    parser.add_argument("--copies", type=int, default=16, help="weight copies cycled (more bytes than L2)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = mx.bfloat16
    on_gpu = fused.active()
    print(f"{mx.default_device()}, bf16, {args.rows} row(s), {args.calls} calls a round; fused kernels "
          f"{'on' if on_gpu else 'unavailable here (MLX ops only)'}")
    print(f"{'kernel':<34} {'fused µs':>9} {'GB/s':>7} {'MLX ops µs':>11} {'GB/s':>7}")
    for stack, shape in (("decoder", DECODER), ("backbone", BACKBONE)):
        for name, (nbytes, fused_call, ops_call) in cases(shape, args.rows, args.copies, dtype).items():
            with fused.fused_kernels(False):
                ops = timed(ops_call, args.calls, args.repeats)
            line = f"{stack + ' ' + name:<34} "
            if on_gpu:
                got = timed(fused_call, args.calls, args.repeats)
                line += f"{got * 1e6:9.1f} {nbytes / got / 1e9:7.0f} "
            else:
                line += f"{'-':>9} {'-':>7} "
            print(line + f"{ops * 1e6:11.1f} {nbytes / ops / 1e9:7.0f}", flush=True)
    logits = mx.random.normal((args.rows, VOCAB)).astype(dtype)
    noise = mx.random.uniform(shape=(args.rows, VOCAB)) + 0.5
    ops = timed(lambda i: sample_topk(logits, 50, 0.9, noise=noise), args.calls, args.repeats)
    line = f"{'sampler (top-k 50)':<34} "
    if on_gpu and fused_sampler.applies(logits, noise, 0.9, "float32"):
        got = timed(lambda i: fused_sampler.sample_race(logits, noise, 50, 0.9), args.calls, args.repeats)
        line += f"{got * 1e6:9.1f} {'':>7} "
    else:
        line += f"{'-':>9} {'':>7} "
    print(line + f"{ops * 1e6:11.1f}")
    if on_gpu and fused_stack.multiprocessors():
        print(f"decoder step, 4 layers, {args.rows} row(s), 30 chained steps (µs a step):")
        for name, seconds in stack_steps(args.rows, args.repeats).items():
            print(f"  {name:<16} {seconds * 1e6:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Count the MLX primitives one steady-state CSM frame (or streamed Mimi frame) runs, by primitive (device-independent).

The frame (backbone step over the last frame + codebook 0 + 31 depth-decoder steps + 32
samplings) is built lazily after a prompt prefill, its graph is written with ``mx.export_to_dot``
and every node is counted except views (reshapes, transposes, slices, broadcasts: no kernel) and
leaves (weights, inputs). On the CPU, MLX's fast ops (RMSNorm, RoPE, SDPA) are unfused there and
appear as their element-wise pieces, so CPU counts are higher than GPU counts for the same code.

``--model mimi`` counts one streamed Mimi decode step (``Mimi.decode_step`` of one frame, batch
``--batch``, after ``--warm`` frames so the transformer's window is in its steady state), random
weights, float32; ``--path eager`` runs the step op by op (where the codec has that path).
``--by-module`` adds the compiled step's count per stage (quantizer, upsample, transformer, each
SEANet layer): stage k's count is that of the traced step cut after stage k (its outputs and the
state so far) minus the cut after stage k - 1, so the stages add up to the whole step.

A fused element-wise node (``Compiled...``) is one kernel and counts 1. ``gpu~`` adds what a GPU
backend launches beyond one kernel per node: MLX's GPU ``Concatenate`` copies each input with its
own kernel (``gpu~`` = count + inputs - 1 per concatenate). Not modelled: the CPU unfuses
``mx.fast`` ops (LayerNorm: 5 nodes, RoPE: ~9, 1 kernel each on a GPU) and reshapes that copy.

Run: ``python benchmarks/count_primitives.py [--model csm|mimi] [--size tiny|full|both] [--cpu] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import re

import mlx.core as mx
import numpy as np

from csm.generation.frames import FrameSamplers, next_frame_rows
from csm.models import CSM, CSMArgs
from csm.models.llama import LlamaArgs
from csm.prompt import text_rows

from bench_generate import build_csm

#: Primitives that only re-describe memory (no kernel of their own when their input is contiguous).
VIEW_OPS = frozenset(
    {"Reshape", "Transpose", "Slice", "Broadcast", "BroadcastAxes", "AsStrided", "ExpandDims",
     "Squeeze", "Flatten", "Unflatten", "StopGradient", "Depends", "Split"}
)
_NODE = re.compile(r'\[label ="([^"]+)", shape=rectangle\]')


def tiny_args() -> CSMArgs:
    """A 2-layer backbone and a 4-layer depth decoder (the decoder depth of CSM-1B), narrow."""
    backbone = LlamaArgs(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, intermediate_dim=128)
    decoder = LlamaArgs(num_layers=4, embed_dim=32, num_heads=4, num_kv_heads=2, intermediate_dim=64)
    return CSMArgs(backbone=backbone, decoder=decoder, text_vocab_size=512, audio_vocab_size=64)


def build(size: str, dtype: mx.Dtype) -> CSM:
    return build_csm(dtype, tiny_args() if size == "tiny" else None)


def frame_graph(model: CSM, path: str, prompt_rows: int = 20) -> str:
    """The dot graph of the second frame (the first one after the prompt prefill).

    ``path``: ``"compiled"`` (what generation runs: :class:`csm.models.frame_step.CompiledFrame`)
    or ``"eager"`` (``CSM.generate_frame`` with a Python sampler, op by op).
    """
    tokens, mask = text_rows(list(range(1, prompt_rows + 1)))
    samplers = FrameSamplers(temperature=0.9, topk=50, key=mx.random.key(0))
    cache = model.make_cache(1)
    compiled = model.compiled_frame(samplers.draw) if path == "compiled" else None

    def frame(rows):
        if path == "eager":
            return model.generate_frame(*rows, cache, samplers.next_frame())
        return compiled(*rows, cache, samplers.frame_noise(1, model.args.audio_vocab_size, mx.float32))

    codes = frame((mx.array(tokens[None]), mx.array(mask[None])))
    mx.eval(codes, [[c.keys, c.values] for c in cache.backbone])
    codes = frame(next_frame_rows(codes))
    out = io.StringIO()
    mx.export_to_dot(out, codes, *[c.keys for c in cache.backbone])
    return out.getvalue()


def tiny_mimi_args():
    """The test suite's tiny Mimi (2 transformer layers, 2 upsampling stages, window 5)."""
    from csm.codec import MimiArgs

    return MimiArgs(hidden_size=32, num_filters=8, upsampling_ratios=(8, 4), codebook_size=64, codebook_dim=64,
                    vector_quantization_hidden_dimension=64, upsample_groups=32, num_hidden_layers=2,
                    num_attention_heads=2, head_dim=16, sliding_window=5, intermediate_size=64, num_quantizers=4)


def build_mimi(size: str):
    from csm.codec import Mimi, MimiArgs

    args = tiny_mimi_args() if size == "tiny" else MimiArgs()
    model = Mimi(args, num_codebooks=args.num_quantizers)
    mx.eval(model.parameters())
    return model


def mimi_step_graph(mimi, path: str, batch: int = 1, warm: int = 3) -> str:
    """The dot graph of one streamed Mimi frame, after ``warm`` frames (``path``: compiled or eager)."""
    import inspect

    kwargs = {"compiled": path == "compiled"} if "compiled" in inspect.signature(mimi.decode_step).parameters else {}
    rng = np.random.default_rng(0)
    state = mimi.make_state(batch)

    def step():
        codes = mx.array(rng.integers(0, mimi.args.codebook_size, (batch, mimi.num_codebooks, 1)).astype(np.int32))
        return mimi.decode_step(codes, state, check_range=False, **kwargs)

    for _ in range(warm):
        mx.eval(step(), state_arrays(state))
    pcm = step()
    out = io.StringIO()
    mx.export_to_dot(out, pcm, *state_arrays(state))
    return out.getvalue()


def state_arrays(state) -> list:
    """Every MLX array reachable from a streaming state (dataclasses, lists, caches)."""
    if isinstance(state, mx.array):
        return [state]
    if isinstance(state, (list, tuple)):
        return [a for s in state for a in state_arrays(s)]
    if isinstance(state, dict):
        return [a for s in state.values() for a in state_arrays(s)]
    if hasattr(state, "__dict__"):
        return state_arrays(vars(state))
    return []


def count(dot: str) -> collections.Counter:
    """Primitive name -> count, views excluded."""
    names = (name.split(" ")[0] for name in _NODE.findall(dot))
    return collections.Counter(n for n in names if n not in VIEW_OPS)


_NODE_ID = re.compile(r'\{ (\S+) \[label ="Concatenate')
_EDGE = re.compile(r'^(\S+) -> (\S+)$', re.M)


def extra_gpu_copies(dot: str) -> int:
    """Kernels a GPU backend adds to one per node: a concatenate of n inputs is n copies."""
    concats = set(_NODE_ID.findall(dot))
    inputs = collections.Counter(dst for _, dst in _EDGE.findall(dot) if dst in concats)
    return sum(n - 1 for n in inputs.values())


def mimi_stages(mimi, state) -> list[tuple[str, object]]:
    """(name, x -> x) of one streamed decode step over ``state``, in the order ``Mimi._stream`` runs them."""
    stages = [("quantizer", lambda codes: mimi.quantizer.decode(codes.transpose(0, 2, 1))),
              ("upsample", lambda x: mimi.upsample.step(x, state.upsample)),
              ("transformer", lambda x: mimi.decoder_transformer.step(x, state.transformer))]  # fmt: skip
    for i, (layer, sub) in enumerate(zip(mimi.decoder.layers, state.decoder)):
        run = (lambda layer, sub: lambda x: layer(x) if sub is None else layer.step(x, sub))(layer, sub)
        stages.append((f"seanet.{i} {type(layer).__name__}", run))
    return stages


def mimi_stage_counts(mimi, batch: int = 1, warm: int = 3) -> list[tuple[str, collections.Counter, int, int]]:
    """(stage, primitives added, count, gpu~) of the compiled streamed step, stage by stage (module doc)."""
    rng = np.random.default_rng(0)
    state = mimi.make_state(batch)
    draw = lambda: mx.array(rng.integers(0, mimi.args.codebook_size, (batch, mimi.num_codebooks, 1)).astype(np.int32))  # noqa: E731
    for _ in range(warm):
        mx.eval(mimi.decode_step(draw(), state, check_range=False), state.arrays())
    codes = draw()
    names = [name for name, _ in mimi_stages(mimi, state)]
    rows, before, before_gpu = [], collections.Counter(), 0
    for cut in range(1, len(names) + 1):

        def prefix(codes, *arrays, cut=cut):
            sub = mimi.make_state(batch)
            sub.set_arrays(list(arrays))
            x = codes
            for _, run in mimi_stages(mimi, sub)[:cut]:
                x = run(x)
            return [x, *sub.arrays()]

        out = io.StringIO()
        mx.export_to_dot(out, *mx.compile(prefix, inputs=mimi.state)(codes, *state.arrays()))
        counts = count(out.getvalue())
        gpu = sum(counts.values()) + extra_gpu_copies(out.getvalue())
        delta = collections.Counter(counts)
        delta.subtract(before)  # keeps negatives: a node of the previous cut may fuse into this stage's
        rows.append((names[cut - 1], +delta, sum(counts.values()) - sum(before.values()), gpu - before_gpu))
        before, before_gpu = counts, gpu
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["csm", "mimi"], default="csm")
    parser.add_argument("--batch", type=int, default=1, help="Mimi streams decoded together (--model mimi)")
    parser.add_argument("--warm", type=int, default=3, help="Mimi frames streamed before the counted one")
    parser.add_argument("--size", choices=["tiny", "full", "both"], default="both")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--cpu", action="store_true", help="count on the CPU stream (fast ops unfused)")
    parser.add_argument("--path", choices=["compiled", "eager", "both"], default="both",
                        help="the compiled frame generation runs, the op-by-op one, or both")
    parser.add_argument("--top", type=int, default=15, help="primitives listed by count")
    parser.add_argument("--json", help="also write {'size/path': {primitive: count}} here")
    parser.add_argument("--by-module", action="store_true", help="Mimi: the compiled step's count per stage")
    args = parser.parse_args(argv)
    if args.cpu:
        mx.set_default_device(mx.cpu)
    results = {}
    for size in (["tiny", "full"] if args.size == "both" else [args.size]):
        model = build_mimi(size) if args.model == "mimi" else build(size, getattr(mx, args.dtype))
        for path in (["eager", "compiled"] if args.path == "both" else [args.path]):
            dot = mimi_step_graph(model, path, args.batch, args.warm) if args.model == "mimi" else frame_graph(model, path)
            counts = count(dot)
            results[f"{size}/{path}"] = dict(counts.most_common())
            top = ", ".join(f"{name} {n}" for name, n in counts.most_common(args.top))
            dtype = "float32" if args.model == "mimi" else args.dtype
            print(f"{args.model} {size:5s} {path:8s} {mx.default_device()} {dtype}: {sum(counts.values()):6d} work primitives/frame"
                  f" (gpu~ {sum(counts.values()) + extra_gpu_copies(dot)})")
            print(f"      {top}")
        if args.model == "mimi" and args.by_module:
            for name, added, total, gpu in mimi_stage_counts(model, args.batch, args.warm):
                top = ", ".join(f"{n} {c}" for n, c in added.most_common(6))
                print(f"  {name:34s} {total:4d} (gpu~ {gpu:4d})  {top}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(mx.default_device()), "dtype": args.dtype, "counts": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    np.set_printoptions(linewidth=120)
    raise SystemExit(main())

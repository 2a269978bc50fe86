"""CSM frame speed: csm-mlx vs mlx-audio's ``SesameModel`` on the same random weights, in one process.

mlx-audio (``pip install "csm-mlx[bench]"``, or ``pip install --no-deps mlx-audio==0.6.2`` next to
csm-mlx's own dependencies) is the MLX port of CSM most people use. Both models load one random
checkpoint (``random_weights.py``; mlx-audio gets it in the original layout through its own
``sanitize``) in ``--dtype``, on MLX's default device. Each timed frame is what its project runs
per 80 ms of audio, batch 1, after a 200-row prompt:

* mlx-audio: ``SesameModel.generate_frame`` with its own sampler (``make_sampler(temp=0.9,
  top_k=50)``), its caches set up once (``setup_caches``);
* csm-mlx: the compiled frame its generation loop runs (``CSM.compiled_frame``: backbone step,
  32 samplings with ``sample_topk``'s arithmetic, depth decoder; top-k 50, temperature 0.9), and
  "csm-mlx eager", ``CSM.generate_frame`` op by op (the path a custom Python sampler takes).

Frames alternate between the three (``--frames`` rounds after warm-up) so that machine drift hits
both; the table gives the median and fastest ms/frame and the ratio csm-mlx / mlx-audio (< 1:
csm-mlx is faster). ``--json PATH`` also writes the numbers.

CUDA / Metal: ``python benchmarks/bench_peer.py --frames 30 --json peer.json``
CPU (2 cores): ``python benchmarks/bench_peer.py --size small --dtype float32 --frames 5``
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import csm  # noqa: E402,F401  (first: loads an installed OpenBLAS before mlx.core, see csm.backend)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from bench_csm import PROMPT_LEN, TEMPERATURE, TOPK, prompt  # noqa: E402
from bench_generate import doc_parser  # noqa: E402
from random_weights import write_random_checkpoint  # noqa: E402


def sesame_config(args) -> dict:
    """mlx-audio's ``SesameModel`` config for csm-mlx's :class:`CSMArgs` (both stacks spelled out)."""
    import dataclasses

    def stack(llama) -> dict:
        return dict(num_hidden_layers=llama.num_layers, num_attention_heads=llama.num_heads,
                    num_key_value_heads=llama.num_kv_heads, head_dim=llama.head_dim, hidden_size=llama.embed_dim,
                    intermediate_size=llama.intermediate_dim, rms_norm_eps=llama.norm_eps,
                    max_position_embeddings=llama.max_seq_len, attention_bias=False, mlp_bias=False,
                    rope_theta=llama.rope_base, rope_scaling=dict(llama.rope_scaling or {}) | {"rope_type": "llama3"},
                    attention_dropout=0.0, hidden_act="silu", initializer_range=0.02, use_cache=True)

    fields = {f.name for f in dataclasses.fields(args)}
    assert {"backbone", "decoder", "text_vocab_size", "audio_vocab_size", "audio_num_codebooks"} <= fields, fields
    decoder = stack(args.decoder) | dict(backbone_hidden_size=args.backbone.embed_dim, model_type="csm_depth_decoder",
                                         num_codebooks=args.audio_num_codebooks, vocab_size=args.audio_vocab_size)
    return stack(args.backbone) | dict(
        model_type="csm", backbone_flavor="llama-1B", decoder_flavor="llama-100M",
        text_vocab_size=args.text_vocab_size, audio_vocab_size=args.audio_vocab_size,
        audio_num_codebooks=args.audio_num_codebooks, depth_decoder_config=decoder)


def load_peer(folder: Path, ours, dtype: str):
    """mlx-audio's ``SesameModel`` holding the checkpoint's weights (original names, its sanitize)."""
    from mlx_audio.tts.models.sesame.sesame import Model, SesameModel

    from csm.weights import csm_checkpoint
    from csm.weights.io import read_tensors

    weights = csm_checkpoint.to_original(read_tensors(folder / "model.safetensors"), ours.args)
    weights = {k.removeprefix("model."): v.astype(getattr(mx, dtype)) for k, v in Model.sanitize(None, weights).items()}
    peer = SesameModel(sesame_config(ours.args))
    peer.load_weights(list(weights.items()), strict=True)
    mx.eval(peer.parameters())
    peer.setup_caches(1)
    return peer


def frame_loops(ours, peer) -> dict:
    """Zero-argument callables, each producing (and evaluating) one more frame of its model.

    ``csm-mlx``: the compiled frame generation runs (``CSM.compiled_frame``, noise drawn per frame
    as ``generate_frames`` draws it); ``csm-mlx eager``: ``CSM.generate_frame`` op by op with a
    ``sample_topk`` sampler (the path custom samplers take); ``mlx-audio``: its own frame. The
    csm-mlx sides feed their codes back through ``next_frame_rows`` (compiled), as generation does.
    """
    from mlx_audio.lm.sample_utils import make_sampler

    from csm.generation.frames import FrameSamplers, next_frame_rows
    from csm.models import fused
    from csm.models.frame_step import CompiledFrame
    from csm.sampling import sample_topk

    tokens, mask = (mx.array(a) for a in prompt())
    row_mask = mx.array(np.r_[np.ones(32, bool), False][None, None])
    samplers = FrameSamplers(temperature=TEMPERATURE, topk=TOPK, key=mx.random.key(0))
    compiled = ours.compiled_frame(samplers.draw)
    vocab = ours.args.audio_vocab_size

    def our_frame(rows, cache):
        return compiled(*rows, cache, samplers.frame_noise(1, vocab, compiled.noise_dtype()))

    def eager_frame(rows, cache):
        return ours.generate_frame(*rows, cache, lambda logits, i: sample_topk(logits, TOPK, TEMPERATURE))

    # csm-mlx sides: (rows, cache) -> codes. Where the fused CUDA layer kernels apply
    # (csm.models.fused), also the compiled frame without them.
    sides = {"csm-mlx": our_frame, "csm-mlx eager": eager_frame}
    if fused.active():
        unfused = CompiledFrame(ours, samplers.draw)

        def unfused_frame(rows, cache):
            with fused.fused_kernels(False):  # traced (first calls) without the kernels
                return unfused(*rows, cache, samplers.frame_noise(1, vocab, unfused.noise_dtype()))

        sides["csm-mlx unfused"] = unfused_frame
    caches = {name: ours.make_cache(1) for name in sides}
    state = {name: frame((tokens, mask), caches[name]) for name, frame in sides.items()}
    peer_sampler = make_sampler(temp=TEMPERATURE, top_k=TOPK)
    state["mlx-audio"] = peer.generate_frame(tokens, mask, mx.arange(PROMPT_LEN)[None], peer_sampler)
    mx.eval(*state.values())
    position = [PROMPT_LEN]

    def row(codes):  # mlx-audio's own feedback row, as its generate loop builds it
        return mx.concatenate([codes.astype(mx.int32), mx.zeros((1, 1), mx.int32)], axis=1)[:, None]

    def our_loop(name):
        def next_frame():
            state[name] = sides[name](next_frame_rows(state[name]), caches[name])
            mx.eval(state[name])

        return next_frame

    def peer_frame():
        state["mlx-audio"] = peer.generate_frame(row(state["mlx-audio"]), row_mask, mx.array([[position[0]]]),
                                                 peer_sampler)
        mx.eval(state["mlx-audio"])
        position[0] += 1

    return {name: our_loop(name) for name in sides} | {"mlx-audio": peer_frame}


def main(argv=None) -> int:
    parser = doc_parser(__doc__)
    parser.add_argument("--size", choices=["full", "small"], default="full", help="random CSM size (default: full)")
    parser.add_argument("--weights", type=Path, help="checkpoint folder (written if missing; default: a temp dir)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="both models' dtype")
    parser.add_argument("--frames", type=int, default=20, help="timed frames per model (alternating)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed frames per model first")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    try:
        import mlx_audio  # noqa: F401
    except ImportError:
        raise SystemExit('mlx-audio is not installed: pip install "csm-mlx[bench]" (or --no-deps mlx-audio)') from None
    from importlib.metadata import version

    from csm.models import load_csm

    folder = write_random_checkpoint(args.weights or Path(tempfile.gettempdir()) / f"csm-bench-{args.size}", args.size)
    ours = load_csm(folder, dtype=args.dtype)
    peer = load_peer(folder, ours, args.dtype)
    loops = frame_loops(ours, peer)
    times = {name: [] for name in loops}
    for index in range(args.warmup + args.frames):
        for name, step in loops.items():
            start = time.perf_counter()
            step()
            if index >= args.warmup:
                times[name].append(time.perf_counter() - start)
    result = {
        "device": str(mx.default_device()), "machine": platform.machine(), "mlx": mx.__version__,
        "mlx_audio": version("mlx-audio"), "size": args.size, "dtype": args.dtype, "prompt_rows": PROMPT_LEN,
        "frames": args.frames, "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "ms_per_frame": {name: {"median": 1e3 * statistics.median(t), "min": 1e3 * min(t)} for name, t in times.items()},
    }
    ms = result["ms_per_frame"]
    result["ratio_csm_mlx_over_mlx_audio"] = ms["csm-mlx"]["median"] / ms["mlx-audio"]["median"]
    print(f"CSM {args.size} random weights, {args.dtype}, batch 1, prompt {PROMPT_LEN} rows, {args.frames} alternating "
          f"frames each; {result['device']} ({result['machine']}), mlx {result['mlx']}, mlx-audio {result['mlx_audio']}")
    print(f"{'model':<14} {'median ms/frame':>16} {'fastest ms/frame':>17}")
    for name, r in ms.items():
        print(f"{name:<14} {r['median']:>16.1f} {r['min']:>17.1f}")
    print(f"csm-mlx / mlx-audio (median): {result['ratio_csm_mlx_over_mlx_audio']:.2f}  (< 1: csm-mlx is faster)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The compiled frame (csm.models.frame_step) and prefix reuse (csm.generation.frames.PromptCache).

The compiled frame is what generation runs; it is checked here frame by frame against the PyTorch
reference (transformers modules + the official sampler re-typed in torch) fed the same noise, and
against the op-by-op frame for left-padded batches. Prefix reuse must give the tokens of a full
re-prefill while prefilling only the rows the cache does not hold.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from csm.generation.frames import FrameSamplers, PromptCache, generate_frames
from csm.models import build_csm
from csm.models.frame_step import Draw
from csm.prompt import audio_rows, text_rows
from csm.sampling import TorchCompatibleGenerator, sample_topk
from csm.weights.csm_checkpoint import args_from_config
from csm_reference import TorchCSM, audio_row, hf_state_to_mlx, random_prompt, tiny_hf_csm
from torch_reference import torch_sample_topk

FRAMES = 8
VOCAB = 2051

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_csm(seed=2)


@pytest.fixture(scope="module")
def model(hf):
    return build_csm(args_from_config(hf.config.to_dict()), hf_state_to_mlx(hf))


def exp_noise(seed: int, batch: int) -> np.ndarray:
    return np.random.default_rng(seed).exponential(size=(32, batch, VOCAB)).astype(np.float32)


@pytest.mark.parametrize("temperature, topk", [(0.9, 50), (0.0, 50), (1.3, 2051)])
def test_compiled_frames_equal_torch_with_shared_noise(hf, model, temperature, topk):
    """float32, batch 2: every code of FRAMES frames equals the official frame + sampler's."""
    from transformers import DynamicCache

    tokens, mask = random_prompt(2, 9, seed=4)
    ref, ref_cache, cache = TorchCSM(hf), DynamicCache(config=hf.config), model.make_cache(2)
    frame = model.compiled_frame(Draw(topk=topk, temperature=temperature))
    t_rows = (torch.from_numpy(tokens).long(), torch.from_numpy(mask))
    x_rows = (mx.array(tokens), mx.array(mask))
    for index in range(FRAMES):
        noise = exp_noise(index, 2)

        def choose(logits, i, q=noise):
            if temperature == 0:
                return logits.argmax(-1)
            return torch_sample_topk(logits, topk, temperature, torch.from_numpy(q[i]))[:, 0]

        with torch.no_grad():
            want = ref.frame(*t_rows, ref_cache, choose).numpy().astype(np.int32)
        got = np.array(frame(*x_rows, cache, None if temperature == 0 else mx.array(noise)))
        np.testing.assert_array_equal(got, want, err_msg=f"frame {index}")
        step = audio_row(want)
        t_rows = (torch.from_numpy(step[0]).long(), torch.from_numpy(step[1]))
        x_rows = (mx.array(step[0]), mx.array(step[1]))
    assert cache.offset == 9 + FRAMES - 1


@pytest.mark.parametrize("length", [10, 253])
def test_compiled_frame_equals_op_by_op_frame_left_padded(model, length):
    """A left-padded batch: the compiled frame gives the codes of ``generate_frame`` + ``sample_topk``.

    From 253 rows the frames cross the first 256-position attention span (a new trace).
    """
    long_t, long_m = random_prompt(1, length, seed=5)
    short_t, short_m = random_prompt(1, 6, seed=6)
    pad = length - 6
    tokens = np.concatenate([long_t, np.pad(short_t, ((0, 0), (pad, 0), (0, 0)))])
    mask = np.concatenate([long_m, np.pad(short_m, ((0, 0), (pad, 0), (0, 0)))])
    frame = model.compiled_frame(Draw(topk=20, temperature=0.8))
    caches = model.make_cache(2), model.make_cache(2)
    rows = [(mx.array(tokens), mx.array(mask))] * 2
    for index in range(5):
        noise = mx.array(exp_noise(100 + index, 2))
        sampler = lambda logits, i, q=noise: sample_topk(logits, 20, 0.8, noise=q[i])  # noqa: E731
        eager = np.array(model.generate_frame(*rows[0], caches[0], sampler))
        compiled = np.array(frame(*rows[1], caches[1], noise))
        np.testing.assert_array_equal(compiled, eager, err_msg=f"frame {index}")
        rows = [tuple(mx.array(a) for a in audio_row(eager))] * 2


def turn_prompts(first: int = 7, frames: int = 4):
    """Two turns' prompts as the official layout nests them: P2 = P1 + audio(codes1) + text2."""
    p1 = text_rows(list(range(3, 3 + first)))
    return p1, lambda codes: tuple(np.concatenate(parts) for parts in zip(p1, audio_rows(codes), text_rows([9, 8, 7])))


def run_turns(model, prompt_cache: PromptCache | None, seed: int = 5, frames: int = 4):
    samplers = FrameSamplers(temperature=0.9, topk=50, generator=TorchCompatibleGenerator(seed))
    p1, second = turn_prompts()
    codes1 = np.stack(list(generate_frames(model, *p1, samplers, max_frames=frames, prompt_cache=prompt_cache)))[:, 0]
    p2 = second(codes1.T)
    codes2 = np.stack(list(generate_frames(model, *p2, samplers, max_frames=frames, prompt_cache=prompt_cache)))[:, 0]
    return codes1, codes2, p2


def test_prefix_reuse_prefills_only_new_rows_with_the_same_tokens(model):
    cache = PromptCache()
    codes1, codes2, p2 = run_turns(model, cache)
    fresh1, fresh2, _ = run_turns(model, None)
    np.testing.assert_array_equal(codes1, fresh1)
    np.testing.assert_array_equal(codes2, fresh2)
    # The cache held P1 + the 3 frames fed back; turn 2 prefills frame 4, the end-of-audio row, 3 text rows.
    assert cache.prefilled == [7, 1 + 1 + 3]
    assert cache.frames.offset == len(p2[0]) + 3 and len(cache.tokens) == cache.frames.offset


def test_prefix_reuse_trims_to_the_common_prefix(model):
    cache = PromptCache()
    run_turns(model, cache)
    p1, _ = turn_prompts()
    changed = (p1[0].copy(), p1[1])
    changed[0][4, -1] += 1  # row 4 differs: rows 0..3 are kept, the rest prefilled again
    list(generate_frames(model, *changed, FrameSamplers(temperature=0, topk=5, key=mx.random.key(0)),
                         max_frames=1, prompt_cache=cache))
    assert cache.prefilled[-1] == len(p1[0]) - 4
    other = (changed[0].copy(), changed[1])
    other[0][0, -1] += 1  # the first row differs: nothing is kept
    list(generate_frames(model, *other, FrameSamplers(temperature=0, topk=5, key=mx.random.key(0)),
                         max_frames=1, prompt_cache=cache))
    assert cache.prefilled[-1] == len(p1[0])


def test_prefix_reuse_with_build_ahead_across_end_frames(tmp_path):
    """The seed path builds a frame ahead, so a turn that ends has fed its end frame (= the next
    prompt's end-of-audio row) and computed one frame more: a 3-turn conversation of a model whose
    turns end must give the codes of the same loop re-prefilling every turn from scratch."""
    import csm
    from csm.generation import Turn
    from csm.prompt import Segment, build_prompt
    from tiny_checkpoint import write_model_dir

    write_model_dir(tmp_path, seed=3, turns_end=True)
    speaker = csm.load(str(tmp_path), dtype="float32")
    turns = [Turn(0, "Hello there!"), Turn(1, "Hi, how are you?"), Turn(0, "Fine, thanks.")]
    cap = 20
    result = speaker.synthesize(turns, seed=0, max_audio_length_ms=cap * 80)  # turns of 8, 15, 3 frames
    assert all(0 < c.shape[1] < cap for c in result.codes)  # every turn ended by its end frame
    samplers = FrameSamplers(temperature=0.9, topk=50, key=mx.random.key(0))
    history = []
    for turn, codes in zip(turns, result.codes):
        tokens, mask = build_prompt(speaker.tokenizer, history, turn.speaker, turn.text)
        frames = [f[0] for f in generate_frames(speaker.model, tokens, mask, samplers, max_frames=cap)]
        np.testing.assert_array_equal(np.stack(frames, axis=1), codes)
        history.append(Segment(turn.speaker, turn.text, codes=codes))


def test_compiled_frame_is_built_once_per_thread(model):
    """A trace holds its thread's MLX streams: each thread gets its own compiled frame, once."""
    import threading

    draw = Draw(topk=50, temperature=0.9)
    here = model.compiled_frame(draw)
    assert model.compiled_frame(draw) is here
    assert model.compiled_frame(Draw(topk=50, temperature=0.8)) is not here
    elsewhere = []
    worker = threading.Thread(target=lambda: elsewhere.extend([model.compiled_frame(draw), model.compiled_frame(draw)]))
    worker.start()
    worker.join()
    assert elsewhere[0] is elsewhere[1] and elsewhere[0] is not here


# Runs in a fresh process whose temp dir is empty, so MLX's CPU JIT cache (TMPDIR/mlx/<version>/cpu)
# lists exactly the fused kernels the compiled frame needed.
_JIT_FRAMES = r"""
import mlx.core as mx
from csm.generation.frames import FrameSamplers, next_frame_rows
from csm.models import CSM, CSMArgs
from csm.models.llama import LlamaArgs
from csm.prompt import text_rows

mx.set_default_device(mx.cpu)
backbone = LlamaArgs(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, intermediate_dim=128)
decoder = LlamaArgs(num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, intermediate_dim=64)
model = CSM(CSMArgs(backbone=backbone, decoder=decoder, text_vocab_size=512, audio_vocab_size=64))
samplers = FrameSamplers(temperature=0.9, topk=20, key=mx.random.key(0))
frame, cache = model.compiled_frame(samplers.draw), model.make_cache(1)
tokens, mask = text_rows(list(range(1, 9)))
rows = (mx.array(tokens[None]), mx.array(mask[None]))
for _ in range(2):  # the prompt frame, then a one-row step
    codes = frame(*rows, cache, samplers.frame_noise(1, 64, mx.float32))
    mx.eval(codes)
    rows = next_frame_rows(codes)
"""


def test_compiled_frame_jit_kernels_do_not_repeat_per_codebook(tmp_path):
    """A fused kernel is JIT-compiled per distinct scalar constant: none may differ per codebook.

    ``mx.compile`` writes scalar constants into the generated kernel's source, so an offset written
    as ``i * vocab`` in the 31-step depth loop cost 31 compiles of one kernel (on a cold H200 the
    first frame took 129 s). Constants may differ per transformer stack (eps, width), never per step.
    """
    import collections
    import os
    import re
    import subprocess
    import sys

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", _JIT_FRAMES], env=env, check=True, timeout=300)
    libraries = [p.name for p in tmp_path.glob("mlx/*/cpu/*") if p.suffix in (".so", ".dylib")]
    assert len(libraries) > 5, f"no JIT cache found under {tmp_path}: {libraries}"
    # Name = ops + a hash of the constants + layout: the same ops with other constants share a key.
    kernels = collections.Counter(re.sub(r"_\d{6,}_", "_", name) for name in libraries)
    repeated = {name: n for name, n in kernels.items() if n > 2}
    assert not repeated, f"kernels compiled once per constant value (per step?): {repeated}"


def test_compiled_step_attends_the_whole_cache_only_where_the_fused_kernel_serves_it(model, monkeypatch):
    """Where ``fused.attend_masked`` serves the step, one span (the whole cache) for every frame;
    elsewhere the span grows with the cache in steps of 256 (the MLX ops pay for every position)."""
    from csm.models import fused

    frame = model.compiled_frame(Draw(topk=5, temperature=0.9))
    cache = model.make_cache(1, max_len=1024)
    spans = {}
    for fused_serves in (False, True):
        monkeypatch.setattr(fused, "applies_to_rows", lambda layer, rows, dtype, on=fused_serves: on)
        spans[fused_serves] = []
        for offset in (0, 255, 256, 700):
            for layer_cache in cache.backbone:
                layer_cache.offset = offset
            spans[fused_serves].append(frame._step_span(cache, 1))
    assert spans == {False: [256, 256, 512, 768], True: [1024] * 4}


def test_compiled_frame_on_a_full_cache_raises_as_the_op_by_op_frame_does(model):
    """A frame past the cache's last position is an error on both paths (the compiled step once
    clamped its write to the last position and went on), and leaves the offset where it was."""
    draw = Draw(topk=5, temperature=0.9)
    tokens, mask = random_prompt(1, 10, seed=1)
    noise = mx.array(exp_noise(3, 1))
    caches = model.make_cache(1, max_len=12), model.make_cache(1, max_len=12)
    sampler = lambda logits, i: sample_topk(logits, 5, 0.9, noise=noise[i])  # noqa: E731
    codes = [model.generate_frame(mx.array(tokens), mx.array(mask), caches[0], sampler),
             model.compiled_frame(draw)(mx.array(tokens), mx.array(mask), caches[1], noise)]
    for _ in range(2):  # positions 10 and 11: the last two
        codes = [model.generate_frame(*map(mx.array, audio_row(np.array(codes[0]))), caches[0], sampler),
                 model.compiled_frame(draw)(*map(mx.array, audio_row(np.array(codes[1]))), caches[1], noise)]
        np.testing.assert_array_equal(np.array(codes[1]), np.array(codes[0]))
    assert caches[0].offset == caches[1].offset == 12
    with pytest.raises(ValueError, match="KV cache holds 12 positions"):
        model.generate_frame(*map(mx.array, audio_row(np.array(codes[0]))), caches[0], sampler)
    with pytest.raises(ValueError, match="KV cache holds 12 positions"):
        model.compiled_frame(draw)(*map(mx.array, audio_row(np.array(codes[1]))), caches[1], noise)
    assert caches[1].offset == 12

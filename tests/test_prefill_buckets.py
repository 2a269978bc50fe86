"""Bucketed prompt prefill (csm.models.buckets): padded rows and rounded spans change no result.

A prefill padded on the right to a bucket, attending over a rounded span, must give the hidden
states, cache and tokens of the unpadded prefill: at offset 0 and at an offset (prefix reuse), for
left-padded batches, through the compiled and the op-by-op frame, and in the engine. Tiny random
model, float32, the CPU (where bucketing is off by default and is switched on here).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from csm.generation.frames import FrameSamplers, PromptCache, generate_frames, next_frame_rows
from csm.models import CSM, CSMArgs, buckets
from csm.models.buckets import padded_rows, prefill_bucket, prefill_buckets
from csm.models.frame_step import Draw
from csm.models.llama import LlamaArgs
from csm.prompt import audio_rows, text_rows
from csm.sampling import sample_topk

BUCKET = 16  # small, so that tiny prompts span several buckets
VOCAB = 64
#: float32, bucketed vs unpadded hidden states (magnitude <= 4) and cached keys: bit-exact on this
#: CPU (MLX 0.32.4, BLIS); the padded rows change only matmul and softmax shapes, so another BLAS or
#: backend may round differently: a few float32 ulps allowed.
ATOL = 1e-6
FRAMES = 4


@pytest.fixture(scope="module")
def model():
    mx.random.seed(1)
    backbone = LlamaArgs(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, intermediate_dim=128)
    decoder = LlamaArgs(num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, intermediate_dim=64)
    csm = CSM(CSMArgs(backbone=backbone, decoder=decoder, text_vocab_size=512, audio_vocab_size=VOCAB))
    csm.audio_head = mx.random.normal(csm.audio_head.shape)  # zeros by default: every logit equal
    mx.eval(csm.parameters())
    return csm


def prompt(length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(length, 33) rows: text rows, then audio rows."""
    rng = np.random.default_rng(seed)
    text = text_rows(rng.integers(1, 512, length - length // 2).tolist())
    audio = audio_rows(rng.integers(1, VOCAB, (32, length // 2)))
    return tuple(np.concatenate([t, a[:-1]])[:length] for t, a in zip(text, audio))


def batch(lengths: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, S, 33) rows, the shorter prompts left-padded (all-False mask)."""
    rows = [prompt(n, seed + i) for i, n in enumerate(lengths)]
    pad = [((max(lengths) - n, 0), (0, 0)) for n in lengths]
    return tuple(np.stack([np.pad(r[j], p) for r, p in zip(rows, pad)]) for j in range(2))


def noise(index: int, b: int) -> mx.array:
    return mx.array(np.random.default_rng(index).exponential(size=(32, b, VOCAB)).astype(np.float32))


def prefill_and_frames(model, tokens, mask, chunks, bucket: int, compiled: bool, max_len: int):
    """Prefill ``tokens`` in ``chunks`` (row counts; the later ones at an offset), then FRAMES frames.

    Returns (hidden states of every prompt row, the cache, (FRAMES, B, 32) codes).
    """
    cache, draw, hidden, codes = model.make_cache(tokens.shape[0], max_len), Draw(topk=20, temperature=0.8), [], []
    bounds = np.cumsum([0, *chunks])
    with prefill_buckets(bucket):
        for low, high in zip(bounds[:-2], bounds[1:-1]):
            hidden.append(model.forward_backbone(mx.array(tokens[:, low:high]), mx.array(mask[:, low:high]), cache))
        rows = (mx.array(tokens[:, bounds[-2]:]), mx.array(mask[:, bounds[-2]:]))
        frame = model.compiled_frame(draw)
        for index in range(FRAMES):
            q = noise(index, tokens.shape[0])
            if compiled:
                codes.append(frame(*rows, cache, q))
            else:
                sampler = lambda logits, i, q=q: sample_topk(logits, 20, 0.8, noise=q[i])  # noqa: E731
                if index == 0:  # the last chunk's hidden states, then the frame from its last row
                    hidden.append(model.forward_backbone(*rows, cache))
                    h = hidden[-1][:, -1]
                    c0 = sampler(model.codebook0_head(h), 0)
                    codes.append(model.decode_codebooks(h, c0, cache, sampler))
                else:
                    codes.append(model.generate_frame(*rows, cache, sampler))
            rows = next_frame_rows(codes[-1])
    return hidden, cache, np.stack([np.array(c) for c in codes])


CASES = {
    "one bucket": ([5], [5], 2048),
    "exactly a bucket": ([16], [16], 2048),
    "two buckets": ([21], [21], 2048),
    "prefix reuse": ([10], [7, 3], 2048),
    "reuse across buckets": ([34], [20, 13, 1], 2048),
    "reuse past a 256 span": ([259], [250, 9], 2048),
    "padding clamped by the cache": ([18], [18], 24),
    "left-padded batch": ([11, 4], [11], 2048),
    "left-padded batch, reuse": ([19, 14], [12, 7], 2048),  # every row starts in the first chunk
}


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "op-by-op"])
@pytest.mark.parametrize("case", list(CASES))
def test_bucketed_prefill_equals_unpadded(model, case, compiled):
    lengths, chunks, max_len = CASES[case]
    tokens, mask = batch(lengths, seed=3)
    plain = prefill_and_frames(model, tokens, mask, chunks, 0, compiled, max_len)
    padded = prefill_and_frames(model, tokens, mask, chunks, BUCKET, compiled, max_len)
    for want, got in zip(plain[0], padded[0]):
        assert got.shape == want.shape
        np.testing.assert_allclose(np.array(got), np.array(want), atol=ATOL, rtol=0)
    assert padded[1].offset == plain[1].offset == sum(chunks) + FRAMES - 1
    for a, b in zip(plain[1].backbone, padded[1].backbone):
        end = a.offset
        np.testing.assert_allclose(np.array(b.keys[:, :, :end]), np.array(a.keys[:, :, :end]), atol=ATOL, rtol=0)
    np.testing.assert_array_equal(padded[2], plain[2])


def turns(model, prompt_cache: PromptCache, bucket: int) -> list[np.ndarray]:
    """Two turns through generate_frames: P2 = P1 + the audio of turn 1 + more text."""
    samplers = FrameSamplers(temperature=0.9, topk=20, key=mx.random.key(7))
    p1 = prompt(9, seed=11)
    with prefill_buckets(bucket):
        codes1 = np.stack(list(generate_frames(model, *p1, samplers, max_frames=FRAMES, prompt_cache=prompt_cache)))
        p2 = tuple(np.concatenate(parts) for parts in zip(p1, audio_rows(codes1[:, 0].T), text_rows([9, 8, 7])))
        codes2 = np.stack(list(generate_frames(model, *p2, samplers, max_frames=FRAMES, prompt_cache=prompt_cache)))
    return [codes1, codes2]


def test_prefix_reuse_turns_equal_unpadded(model):
    """PromptCache across turns (the second prefill at an offset): the tokens of unpadded prefills."""
    plain, padded = PromptCache(), PromptCache()
    want, got = turns(model, plain, 0), turns(model, padded, BUCKET)
    for a, b in zip(want, got):
        np.testing.assert_array_equal(b, a)
    assert padded.prefilled == plain.prefilled == [9, 1 + 1 + 3]  # the last frame, the end row, 3 text rows
    assert padded.frames.offset == plain.frames.offset


def test_prompts_in_one_bucket_share_one_shape(model, monkeypatch):
    """Prompt lengths of one bucket, at offset 0 or after a cached prefix, run one (rows, span) shape."""
    shapes = []
    run = model.backbone_rows

    def record(tokens, *args, span):
        shapes.append((tokens.shape, span))
        return run(tokens, *args, span=span)

    monkeypatch.setattr(model, "backbone_rows", record)

    def prefill(lengths: list[int], bucket: int, offset: int = 0) -> set:
        shapes.clear()
        with prefill_buckets(bucket):
            for n in lengths:
                cache = model.make_cache(1)
                if offset:  # a cached prefix first (prefix reuse), not recorded
                    model.forward_backbone(*(mx.array(a[None]) for a in prompt(offset, 0)), cache)
                    shapes.pop()
                mx.eval(model.forward_backbone(*(mx.array(a[None]) for a in prompt(n, n)), cache))
        return set(shapes)

    assert prefill([2, 5, 9, 16], BUCKET) == {((1, 16, 33), 256)}
    assert prefill([17, 30], BUCKET) == {((1, 32, 33), 256)}
    assert prefill([2, 7, 16], BUCKET, offset=20) == {((1, 16, 33), 256)}
    assert prefill([1], BUCKET, offset=20) == {((1, 1, 33), 256)}  # one row (an op-by-op frame step): not padded
    assert prefill([3, 12], BUCKET, offset=250) == {((1, 16, 33), 512)}
    assert len(prefill([5, 9, 16], 0)) == 3  # off: one shape per length


def test_padded_rows_and_default(monkeypatch):
    monkeypatch.setattr(buckets, "_override", None)  # as if CSM_PREFILL_ROWS were unset
    previous = mx.default_device()
    try:  # off on the CPU unless asked, on for a GPU
        for device, expected in ((mx.cpu, 0), (mx.gpu, buckets.PREFILL_ROWS)):
            if mx.is_available(device):
                mx.set_default_device(device)
                assert prefill_bucket() == expected, device
    finally:
        mx.set_default_device(previous)
    with prefill_buckets(64):
        assert [padded_rows(n, 2048) for n in (1, 2, 64, 65, 2000)] == [1, 64, 64, 128, 2048]
        assert padded_rows(40, 50) == 50 and padded_rows(60, 50) == 60  # clamped to the room, never below
        with prefill_buckets(0):
            assert padded_rows(40, 2048) == 40
        assert prefill_bucket() == 64
    assert buckets.PREFILL_ROWS == 64
    with pytest.raises(ValueError):
        with prefill_buckets(-1):
            pass


def test_engine_with_buckets_equals_solo_without(tmp_path):
    """The engine prefills each joining prompt alone (batch 1); bucketed, its greedy codes are the solo run's."""
    import csm
    from csm.generation import Turn
    from csm.generation.engine import Engine, Request
    from tiny_checkpoint import write_model_dir

    write_model_dir(tmp_path, seed=3)
    speaker = csm.load(str(tmp_path), dtype="float32")
    requests = [Request("Hello from Sesame.", temperature=0, seed=1, max_audio_length_ms=400),
                Request("This is a longer test of the engine.", temperature=0, seed=2, max_audio_length_ms=400)]
    with prefill_buckets(BUCKET), Engine(speaker, slots=2) as engine:
        results = [job.result(timeout=120) for job in [engine.submit(r) for r in requests]]
    for request, result in zip(requests, results):
        alone = speaker.synthesize([Turn(0, request.text)], seed=request.seed, temperature=0,
                                   max_audio_length_ms=request.max_audio_length_ms)
        np.testing.assert_array_equal(result.codes[0], alone.codes[0])

"""The continuous-batching engine against solo runs of the same requests (tiny model, float32).

A request's noise depends on its own seed only, so every request's codes must equal those of
``Generator.synthesize`` with the same options, whoever shares the batch and whenever it joins.
Measured here: 0 of all compared tokens differ (float32, this CPU); the seeded tests allow 1 %.
"""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("torch")

import csm  # noqa: E402
from csm.generation import Turn  # noqa: E402
from csm.generation.engine import Cancelled, Engine, QueueFull, Request  # noqa: E402
from csm.generation.slots import row_noise  # noqa: E402
from csm.prompt import Segment  # noqa: E402
from csm.generation.frames import FrameSamplers  # noqa: E402
from batched_rows import assert_same_as_solo  # noqa: E402
from tiny_checkpoint import write_model_dir  # noqa: E402

MS = 480  # 6 frames per request


@pytest.fixture(scope="module")
def speaker(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-engine")
    write_model_dir(path, seed=3)
    return csm.load(str(path), dtype="float32")


def solo(speaker, request: Request):
    """The request run alone through the Generator (the reference)."""
    return speaker.synthesize(
        [Turn(request.speaker, request.text)], request.context, seed=request.seed, temperature=request.temperature,
        topk=request.topk, max_audio_length_ms=request.max_audio_length_ms,
    )


def solo_stream(speaker, request: Request) -> np.ndarray:
    """The request's audio streamed alone (Mimi's streaming decode, as the engine decodes)."""
    return np.concatenate([c.pcm for c in speaker.generate_stream(
        request.text, request.speaker, request.context, seed=request.seed, temperature=request.temperature,
        topk=request.topk, max_audio_length_ms=request.max_audio_length_ms)])  # fmt: skip


def differing(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of tokens that differ (a length mismatch counts every missing token)."""
    frames = min(a.shape[1], b.shape[1])
    diff = (a[:, :frames] != b[:, :frames]).sum() + 32 * abs(a.shape[1] - b.shape[1])
    return diff / (32 * max(a.shape[1], b.shape[1], 1))


def test_row_noise_is_the_solo_draw():
    """Two frames of per-row noise equal what a solo run's FrameSamplers draws from the same seed."""
    keys = mx.stack([mx.random.key(s) for s in (1, 2, 3)])
    solos = [FrameSamplers(temperature=0.9, topk=50, key=mx.random.key(s)) for s in (1, 2, 3)]
    for _ in range(2):
        keys, noise = row_noise(keys, 64)
        for row, solo in enumerate(solos):
            assert mx.array_equal(noise[row], solo.frame_noise(1, 64, mx.float32)[:, 0]).item()


def test_busy_batch_equals_solo(speaker):
    requests = [
        Request("Hello from Sesame.", temperature=0, seed=1, max_audio_length_ms=MS),
        Request("How are you today?", temperature=0.9, topk=50, seed=2, max_audio_length_ms=MS),
        Request("This is a test.", speaker=1, temperature=0.7, topk=5, seed=3, max_audio_length_ms=MS - 160),
        Request("The past is just a story.", temperature=0.9, topk=50, seed=4, max_audio_length_ms=MS),
    ]
    with Engine(speaker, slots=3) as engine:
        results = [job.result(timeout=120) for job in [engine.submit(r) for r in requests]]
    greedy_stream = np.concatenate([c.pcm for c in speaker.generate_stream(
        requests[0].text, seed=1, temperature=0, max_audio_length_ms=MS)])
    assert_same_as_solo(results[0].audio, greedy_stream)  # greedy: the very solo audio
    for request, result in zip(requests, results):
        reference = solo(speaker, request)
        assert result.codes[0].shape[1] > 0 and result.seed == request.seed
        if request.temperature == 0:
            np.testing.assert_array_equal(result.codes[0], reference.codes[0])
        else:
            assert differing(result.codes[0], reference.codes[0]) <= 0.01
        assert result.audio.shape == reference.audio.shape


def test_every_row_streams_its_solo_audio(speaker):
    """All rows' audio comes from one batched Mimi state: each job's audio is bit for bit its solo
    stream's, also the job that takes over a slot (its Mimi row restarts) while the other row runs on."""
    requests = [
        Request("Hello from Sesame.", temperature=0, seed=1, max_audio_length_ms=MS - 240),
        Request("How are you today?", speaker=1, temperature=0, seed=2, max_audio_length_ms=MS + 240),
        Request("The past is just a story.", temperature=0, seed=3, max_audio_length_ms=MS),
    ]
    with Engine(speaker, slots=2) as engine:
        results = [job.result(timeout=120) for job in [engine.submit(r) for r in requests]]
    for request, result in zip(requests, results):
        alone = np.concatenate([c.pcm for c in speaker.generate_stream(
            request.text, request.speaker, seed=request.seed, temperature=0,
            max_audio_length_ms=request.max_audio_length_ms)])  # fmt: skip
        assert result.audio.size > 0
        assert_same_as_solo(result.audio, alone)


def test_join_mid_flight_longer_prompt_and_compaction(speaker):
    # B's voice context makes its prompt longer than the shared offset when it joins (shift right);
    # the 42-position cache forces compactions while A, B and C overlap.
    rng = np.random.default_rng(0)
    voice = [Segment(0, "How are you today?", codes=rng.integers(1, 60, (32, 12)).astype(np.int32))]
    a = Request("Hello from Sesame.", temperature=0, seed=5, max_audio_length_ms=MS)
    b = Request("This is a test.", context=voice, temperature=0.9, seed=6, max_audio_length_ms=MS)
    c = Request("The past.", temperature=0.9, seed=7, max_audio_length_ms=800)  # runs past the end
    with Engine(speaker, slots=2, cache_len=42) as engine:
        job_a = engine.submit(a)
        chunks = job_a.chunks(timeout=60)
        for _ in range(3):
            next(chunks)
        job_b = engine.submit(b)
        job_c = engine.submit(c)  # waits for a free slot
        results = [job.result(timeout=120) for job in (job_a, job_b, job_c)]
        assert engine.compactions > 0
    audio_checked = 0
    for request, result in zip((a, b, c), results):
        reference = solo(speaker, request)
        assert differing(result.codes[0], reference.codes[0]) <= (0 if request.temperature == 0 else 0.01)
        if np.array_equal(result.codes[0], reference.codes[0]):
            # B and C join slots that Mimi did not decode while A ran alone: their audio is theirs
            assert_same_as_solo(result.audio, solo_stream(speaker, request))
            audio_checked += 1
    if mx.default_device().type == mx.DeviceType.cpu:  # exact there: every row's audio was checked
        assert audio_checked == 3


def test_mimi_decodes_zeros_in_rows_without_a_frame(speaker, monkeypatch):
    """Idle slots compute frames too (the batch has a fixed size); Mimi must get zeros there, not those
    codes (a fresh stream restarts its row anyway, but codes past the codebook would be read out of range)."""
    seen = []
    decode_step = speaker.mimi.decode_step

    def spy(codes, state, **kwargs):
        seen.append(np.array(codes))
        return decode_step(codes, state, **kwargs)

    monkeypatch.setattr(speaker.mimi, "decode_step", spy)
    with Engine(speaker, slots=3) as engine:
        engine.submit(Request("Hello from Sesame.", temperature=0.9, seed=4, max_audio_length_ms=MS)).result(timeout=120)
    assert seen and all(step.shape == (3, 32, 1) for step in seen)
    decoding = {row for step in seen for row in range(3) if step[row].any()}
    assert len(decoding) == 1  # only the request's slot


def test_cancel_running_and_queued(speaker):
    with Engine(speaker, slots=1) as engine:
        long = engine.submit(Request("Hello from Sesame.", seed=8, max_audio_length_ms=4000))
        queued = engine.submit(Request("How are you today?", seed=9, max_audio_length_ms=MS))
        queued.cancel()
        stream = long.chunks(timeout=60)
        next(stream)
        long.cancel()
        rest = list(stream)
        with pytest.raises(Cancelled):
            long.result(timeout=60)
        with pytest.raises(Cancelled):
            queued.result(timeout=60)
        assert len(rest) < 10  # stopped within a frame or two, not after 50 frames
        after = engine.generate(Request("The past.", seed=10, temperature=0, max_audio_length_ms=MS), timeout=60)
    np.testing.assert_array_equal(after.codes[0], solo(speaker, Request(
        "The past.", seed=10, temperature=0, max_audio_length_ms=MS)).codes[0])


def test_bad_requests_and_queue_full(speaker):
    with Engine(speaker, slots=1, max_queue=1) as engine:
        with pytest.raises(ValueError, match="empty"):
            engine.submit(Request("  "))
        with pytest.raises(ValueError, match="topk"):
            engine.submit(Request("Hi.", topk=0))
        with pytest.raises(ValueError, match="too long"):
            engine.submit(Request("word " * 3000))
        with pytest.raises(QueueFull):
            for _ in range(3):
                engine.submit(Request("Hello.", max_audio_length_ms=2000))
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(Request("Hello."))


def test_torch_seed_runs_unbatched_and_exact(speaker):
    request = Request("Hello from Sesame.", torch_seed=3, max_audio_length_ms=MS)
    with Engine(speaker, slots=2) as engine:
        batched = engine.submit(Request("How are you today?", seed=1, max_audio_length_ms=MS))
        result = engine.generate(request, timeout=120)
        batched.result(timeout=120)
    expected = np.concatenate([c.pcm for c in speaker.generate_stream(
        request.text, torch_seed=3, max_audio_length_ms=MS)])
    assert_same_as_solo(result.audio, expected)
    assert result.torch_seed == 3


def test_close_cancels_what_runs_and_waits(speaker):
    engine = Engine(speaker, slots=1)
    running = engine.submit(Request("Hello from Sesame.", seed=1, max_audio_length_ms=20_000))
    waiting = engine.submit(Request("How are you?", seed=2, max_audio_length_ms=20_000))
    next(running.chunks(timeout=60))
    started = time.perf_counter()
    engine.close()
    assert time.perf_counter() - started < 10  # within a frame or two, not 250 frames
    for job in (running, waiting):
        with pytest.raises(Cancelled):
            job.result(timeout=1)

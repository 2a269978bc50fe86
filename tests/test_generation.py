"""End-to-end generation on a tiny model directory in the real transformers layout.

The PyTorch reference is the official frame loop (tests/torch_reference.py) on the same tiny
transformers model whose ``save_pretrained`` directory csm-mlx loads.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import csm  # noqa: E402
from csm.config import SAMPLES_PER_FRAME  # noqa: E402
from csm.generation import Turn  # noqa: E402
from csm.prompt import Segment, build_prompt  # noqa: E402
from tiny_checkpoint import write_model_dir  # noqa: E402
from torch_reference import official_generate  # noqa: E402

FRAMES = 12  # per turn, via max_audio_length_ms
MAX_MS = FRAMES * 80


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model directory, torch reference model)."""
    path = tmp_path_factory.mktemp("tiny-csm")
    return path, write_model_dir(path, seed=3)


@pytest.fixture(scope="module")
def speaker(tiny):
    return csm.load(str(tiny[0]), dtype="float32")


def test_generate_length_and_determinism(speaker):
    first = speaker.synthesize([Turn(0, "Hello from Sesame.")], seed=11, max_audio_length_ms=MAX_MS)
    again = speaker.synthesize([Turn(0, "Hello from Sesame.")], seed=11, max_audio_length_ms=MAX_MS)
    other = speaker.synthesize([Turn(0, "Hello from Sesame.")], seed=12, max_audio_length_ms=MAX_MS)
    frames = first.codes[0].shape[1]
    assert 0 < frames <= FRAMES
    assert first.audio.shape == (frames * SAMPLES_PER_FRAME,)
    assert np.abs(first.audio).max() > 0
    np.testing.assert_array_equal(first.codes[0], again.codes[0])
    np.testing.assert_array_equal(first.audio, again.audio)
    assert not np.array_equal(first.codes[0], other.codes[0])


def test_stream_equals_one_shot(speaker):
    audio = speaker.generate("How are you today?", seed=5, max_audio_length_ms=MAX_MS)
    for chunk_frames in (1, 3):
        chunks = list(speaker.generate_stream("How are you today?", seed=5, max_audio_length_ms=MAX_MS,
                                              chunk_frames=chunk_frames))
        assert all(c.pcm.shape == (c.frames * SAMPLES_PER_FRAME,) for c in chunks)
        streamed = np.concatenate([c.pcm for c in chunks])
        assert streamed.shape == audio.shape
        np.testing.assert_allclose(streamed, audio, atol=1e-5 * max(1.0, np.abs(audio).max()))


@pytest.mark.parametrize("seed", [0, 1234])
def test_torch_seed_matches_pytorch_reference(speaker, tiny, seed):
    """float32: the codes equal the official PyTorch loop's after torch.manual_seed(seed)."""
    text = "The past is just a story we tell ourselves."
    result = speaker.synthesize([Turn(0, text)], torch_seed=seed, max_audio_length_ms=MAX_MS)
    tokens, mask = build_prompt(speaker.tokenizer, [], 0, text)
    reference = official_generate(tiny[1], tokens, mask, max_frames=FRAMES, topk=50, temperature=0.9, seed=seed)
    assert reference.shape[1] > 0
    np.testing.assert_array_equal(result.codes[0], reference)


def test_conversation_matches_reference_turn_by_turn(speaker, tiny):
    """Each turn is generated with the earlier turns (text + codes) as context, one noise stream."""
    turns = [Turn(0, "Hello there!"), Turn(1, "Hi, how are you?"), Turn(0, "Fine, thanks.")]
    result = speaker.synthesize(turns, torch_seed=3, max_audio_length_ms=MAX_MS)
    assert len(result.codes) == len(turns) == len(result.turn_audio)
    assert result.audio.shape[0] == sum(c.shape[1] for c in result.codes) * SAMPLES_PER_FRAME
    torch.manual_seed(3)
    history = []
    for turn, codes in zip(turns, result.codes):
        tokens, mask = build_prompt(speaker.tokenizer, history, turn.speaker, turn.text)
        reference = official_generate(tiny[1], tokens, mask, max_frames=FRAMES, topk=50, temperature=0.9, seed=None)
        np.testing.assert_array_equal(codes, reference)
        history.append(Segment(turn.speaker, turn.text, codes=reference))


def test_context_budget_drops_oldest_unpinned_first(speaker, caplog):
    codes = np.ones((32, 600), dtype=np.int32)
    voice = Segment(0, "voice", codes=codes)
    history = [voice, Segment(0, "old", codes=codes), Segment(0, "new", codes=codes)]
    with caplog.at_level(logging.WARNING):
        kept, pinned = speaker.fit_context(history, Turn(0, "next"), max_frames=500, pinned=1)
    assert [s.text for s in kept] == ["voice", "new"]
    assert pinned == 1
    assert "dropped the oldest segment" in caplog.text
    kept, pinned = speaker.fit_context(history, Turn(0, "next"), max_frames=1000, pinned=1)
    assert [s.text for s in kept] == ["voice"] and pinned == 1
    kept, pinned = speaker.fit_context(history, Turn(0, "next"), max_frames=1500, pinned=1)
    assert kept == [] and pinned == 0


def test_text_too_long_for_context(speaker):
    with pytest.raises(ValueError, match="too long"):
        speaker.generate("word " * 3000, seed=0, max_audio_length_ms=MAX_MS)


@pytest.mark.parametrize(
    "options, message",
    [({"topk": 0}, "topk"), ({"temperature": -1.0}, "temperature"), ({"temperature": float("nan")}, "temperature")],
)
def test_invalid_sampling(speaker, options, message):
    with pytest.raises(ValueError, match=message):
        speaker.generate("Hello.", seed=0, **options)


def test_empty_text(speaker):
    with pytest.raises(ValueError, match="empty"):
        speaker.generate("   ", seed=0)


def test_context_audio_is_encoded(speaker):
    t = np.arange(SAMPLES_PER_FRAME * 6) / 24_000
    sweep = (0.3 * np.sin(2 * np.pi * (200 + 800 * t) * t)).astype(np.float32)
    [segment] = speaker.prepare_context([Segment(0, "a sweep", audio=sweep)])
    assert segment.codes.shape == (32, 6)
    audio = speaker.generate("Again.", context=[segment], seed=1, max_audio_length_ms=MAX_MS)
    assert audio.shape[0] % SAMPLES_PER_FRAME == 0


def test_batch_greedy_equals_single_runs(speaker):
    """Left-padded batch of texts of different lengths: greedy rows equal the texts spoken alone."""
    texts = ["Hi.", "The past is just a story we tell ourselves.", "How are you today?"]
    batch = speaker.generate_batch(texts, temperature=0, max_audio_length_ms=MAX_MS)
    assert len(batch) == len(texts)
    for text, audio in zip(texts, batch):
        alone = speaker.generate(text, temperature=0, max_audio_length_ms=MAX_MS)
        assert audio.shape == alone.shape and audio.shape[0] > 0
        np.testing.assert_allclose(audio, alone, atol=1e-4 * max(1.0, np.abs(alone).max()))

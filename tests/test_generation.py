"""End-to-end generation on a tiny model directory in the real transformers layout.

The PyTorch reference (tests/torch_reference.py) is the official generator re-typed in plain
torch: its own prompt layout and tokenizer template, the torchtune model step and the official
frame loop, on the weights of the same tiny transformers model whose ``save_pretrained``
directory csm-mlx loads. Nothing of csm-mlx is used to build what csm-mlx is compared with.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import csm  # noqa: E402
from csm.config import SAMPLES_PER_FRAME  # noqa: E402
from csm.generation import Turn  # noqa: E402
from csm.prompt import Segment, TextTokenizer, build_prompt, segment_length  # noqa: E402
from tiny_checkpoint import write_model_dir  # noqa: E402
from torch_reference import OfficialCSM, official_generate, official_prompt, official_tokenizer  # noqa: E402

FRAMES = 12  # per turn, via max_audio_length_ms
MAX_MS = FRAMES * 80
SAMPLING = dict(topk=50, temperature=0.9)


class Reference:
    """The official generator on one tiny model: tokenizer, model, and a turn-by-turn loop."""

    def __init__(self, path, hf_model):
        self.tokenizer = official_tokenizer(path / "tokenizer.json")
        self.model = OfficialCSM(hf_model)
        self.hf = hf_model

    def turn(self, context, speaker: int, text: str, *, max_frames: int, seed: int | None) -> np.ndarray:
        """Codes ``(32, T)`` of one ``generate`` call; ``context`` holds ``(speaker, text, codes)``."""
        tokens, mask = official_prompt(self.tokenizer, context, text, speaker)
        return official_generate(self.model, tokens, mask, max_frames=max_frames, seed=seed, **SAMPLING)

    def conversation(self, turns, seed: int, *, max_frames: int) -> list[np.ndarray]:
        """Each turn with the earlier turns' codes as context, one torch noise stream for all."""
        torch.manual_seed(seed)
        history, codes = [], []
        for turn in turns:
            codes.append(self.turn(history, turn.speaker, turn.text, max_frames=max_frames, seed=None))
            history.append((turn.speaker, turn.text, codes[-1]))
        return codes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model directory, torch reference model)."""
    path = tmp_path_factory.mktemp("tiny-csm")
    return path, write_model_dir(path, seed=3)


@pytest.fixture(scope="module")
def speaker(tiny):
    return csm.load(str(tiny[0]), dtype="float32")


@pytest.fixture(scope="module")
def reference(tiny):
    return Reference(*tiny)


@pytest.fixture(scope="module")
def ending(tmp_path_factory):
    """(csm-mlx Generator, Reference) of a tiny model whose turns end after a few frames."""
    path = tmp_path_factory.mktemp("tiny-csm-ends")
    model = write_model_dir(path, seed=3, turns_end=True)
    return csm.load(str(path), dtype="float32"), Reference(path, model)


def test_prompt_rows_written_by_hand(tmp_path):
    """Both prompt builders give the official layout, checked row by row on a hand-made tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<|begin_of_text|>": 1, "<|end_of_text|>": 2, "[": 3, "]": 4, "0": 5, "1": 6,
             "hi": 7, "yes": 8}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # "[1]yes" -> "[", "1", "]", "yes"
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    first = np.array([list(range(1, 33)), list(range(33, 65))]).T  # (32, 2): frame 0 = 1..32
    second = np.array([list(range(101, 133))]).T  # (32, 1)

    def text(token: int) -> list[int]:
        return [0] * 32 + [token]

    def audio(codes) -> list[int]:  # noqa: ANN001
        return list(codes) + [0]

    end = audio([0] * 32)
    expected_tokens = np.array([
        text(1), text(3), text(6), text(4), text(8), text(2),  # <bos> [ 1 ] yes <eos>
        audio(range(1, 33)), audio(range(33, 65)), end,  # its two frames, then the end frame
        text(1), text(3), text(5), text(4), text(7), text(2),  # <bos> [ 0 ] hi <eos>
        audio(range(101, 133)), end,
        text(1), text(3), text(5), text(4), text(8), text(7), text(2),  # <bos> [ 0 ] yes hi <eos>
    ])
    text_mask, audio_mask = [False] * 32 + [True], [True] * 32 + [False]
    expected_mask = np.array([text_mask] * 6 + [audio_mask] * 3 + [text_mask] * 6 + [audio_mask] * 2 + [text_mask] * 7)

    ours = TextTokenizer.from_file(tmp_path / "tokenizer.json")
    context = [Segment(1, "yes", codes=first), Segment(0, "hi", codes=second)]
    got_tokens, got_mask = build_prompt(ours, context, 0, "yes hi")
    ref_tokens, ref_mask = official_prompt(
        official_tokenizer(tmp_path / "tokenizer.json"), [(1, "yes", first), (0, "hi", second)], "yes hi", 0
    )
    for tokens, mask in ((got_tokens, got_mask), (ref_tokens, ref_mask)):
        np.testing.assert_array_equal(tokens, expected_tokens)
        np.testing.assert_array_equal(mask, expected_mask)
        assert mask.dtype == bool
    assert [segment_length(ours, s) for s in context] == [9, 8]  # the context budget counts the same rows


def test_reference_model_equals_transformers(tiny, reference):
    """The plain-torch official model (interleaved RoPE on un-permuted q/k, own KV cache) agrees
    with transformers' own modules (rotate-half RoPE on the permuted weights)."""
    hf, ours = tiny[1], reference.model
    rng = np.random.default_rng(0)
    tokens = np.zeros((1, 12, 33), np.int64)
    mask = np.zeros((1, 12, 33), bool)
    tokens[0, :6, 32], mask[0, :6, 32] = rng.integers(0, 400, 6), True
    tokens[0, 6:, :32], mask[0, 6:, :32] = rng.integers(0, 64, (6, 32)), True
    with torch.no_grad():
        embeds = ours.embed_tokens(torch.from_numpy(tokens), torch.from_numpy(mask))
        cache = ours.backbone.new_cache()
        got = torch.cat([ours.backbone(embeds[:, :8], torch.arange(8), cache),  # prefill, then
                         ours.backbone(embeds[:, 8:], torch.arange(8, 12), cache)], dim=1)  # cached steps
        want = hf.backbone_model(inputs_embeds=embeds).last_hidden_state
        # measured max |diff| 2.4e-6 (values up to 4.5), the decoder's 4.8e-7
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=3e-5)
        inputs = torch.randn(1, 5, embeds.shape[-1], generator=torch.Generator().manual_seed(0))
        got = ours.decoder(inputs @ ours.projection.T, torch.arange(5), ours.decoder.new_cache())
        want = hf.depth_decoder.model(inputs_embeds=inputs).last_hidden_state
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=5e-6)


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
def test_torch_seed_matches_pytorch_reference(speaker, reference, seed):
    """float32: the codes equal the official PyTorch loop's after torch.manual_seed(seed)."""
    text = "The past is just a story we tell ourselves."
    result = speaker.synthesize([Turn(0, text)], torch_seed=seed, max_audio_length_ms=MAX_MS)
    want = reference.turn([], 0, text, max_frames=FRAMES, seed=seed)
    assert want.shape[1] == FRAMES
    np.testing.assert_array_equal(result.codes[0], want)


def test_conversation_matches_reference_turn_by_turn(speaker, reference):
    """Each turn is generated with the earlier turns (text + codes) as context, one noise stream."""
    turns = [Turn(0, "Hello there!"), Turn(1, "Hi, how are you?"), Turn(0, "Fine, thanks.")]
    result = speaker.synthesize(turns, torch_seed=3, max_audio_length_ms=MAX_MS)
    assert len(result.codes) == len(turns) == len(result.turn_audio)
    assert result.audio.shape[0] == sum(c.shape[1] for c in result.codes) * SAMPLES_PER_FRAME
    for got, want in zip(result.codes, reference.conversation(turns, 3, max_frames=FRAMES)):
        np.testing.assert_array_equal(got, want)


# Turns of 3+4 frames, each with a "near end" (codebooks 0..30 zero, 31 not); 3+5 frames, the
# first with a frame that starts with 0 and is not an end.
@pytest.mark.parametrize("seed", [62, 77])
def test_turns_end_at_the_end_frame_like_the_official_loop(ending, seed):
    """A model that ends turns: each turn stops at its first all-zero frame (all 32 codebooks),
    the next continues the torch noise stream where the official loop does."""
    speaker, reference = ending
    turns = [Turn(0, "Hello there!"), Turn(1, "Hi, how are you?")]
    cap = 20
    result = speaker.synthesize(turns, torch_seed=seed, max_audio_length_ms=cap * 80)
    wanted = reference.conversation(turns, seed, max_frames=cap)
    for got, want in zip(result.codes, wanted):
        assert 2 <= want.shape[1] < cap  # ended by the end frame: not at once, not by the cap
        np.testing.assert_array_equal(got, want)
    streamed = list(speaker.stream_turns(turns, torch_seed=seed, max_audio_length_ms=cap * 80, chunk_frames=2))
    assert [sum(c.frames for c in streamed if c.turn == t) for t in range(2)] == [w.shape[1] for w in wanted]


def test_context_audio_matches_reference(speaker, reference):
    """Context PCM: csm-mlx's Mimi codes and the turn after them equal the official loop's, whose
    context codes come from the transformers Mimi (the tiny model's codec_model)."""
    t = np.arange(SAMPLES_PER_FRAME * 6) / 24_000
    sweep = (0.3 * np.sin(2 * np.pi * (200 + 800 * t) * t)).astype(np.float32)
    with torch.no_grad():
        codes = reference.hf.codec_model.encode(torch.from_numpy(sweep)[None, None]).audio_codes[0].numpy()
    assert codes.shape == (32, 6)
    context = [Segment(0, "a sweep", audio=sweep)]
    [segment] = speaker.prepare_context(context)
    np.testing.assert_array_equal(segment.codes, codes)
    result = speaker.synthesize([Turn(1, "Again.")], context, torch_seed=7, max_audio_length_ms=MAX_MS)
    want = reference.turn([(0, "a sweep", codes)], 1, "Again.", max_frames=FRAMES, seed=7)
    np.testing.assert_array_equal(result.codes[0], want)
    # the context audio matters: other codes there give another turn
    other = reference.turn([(0, "a sweep", codes[:, ::-1])], 1, "Again.", max_frames=FRAMES, seed=7)
    assert not np.array_equal(other, want)


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


def test_batch_greedy_equals_single_runs(speaker):
    """Left-padded batch of texts of different lengths: greedy rows equal the texts spoken alone."""
    texts = ["Hi.", "The past is just a story we tell ourselves.", "How are you today?"]
    batch = speaker.generate_batch(texts, temperature=0, max_audio_length_ms=MAX_MS)
    assert len(batch) == len(texts)
    for text, audio in zip(texts, batch):
        alone = speaker.generate(text, temperature=0, max_audio_length_ms=MAX_MS)
        assert audio.shape == alone.shape and audio.shape[0] > 0
        np.testing.assert_allclose(audio, alone, atol=1e-4 * max(1.0, np.abs(alone).max()))

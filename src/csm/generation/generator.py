"""Text → speech: the Generator that holds CSM, Mimi and the tokenizer.

``generate`` returns a 24 kHz waveform; ``generate_stream`` yields audio chunks as frames are
produced (streaming Mimi decode); ``synthesize`` does several turns — one speaker's sentences
(long text) or a conversation — each turn carrying the previous ones as context.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..config import MAX_SEQ_LEN, NUM_CODEBOOKS, SAMPLE_RATE
from ..prompt import Segment, TextTokenizer, build_prompt, segment_length
from ..sampling import TorchCompatibleGenerator, check_sampling_args
from .frames import FrameSamplers, PromptCache, generate_frames
from .text import default_max_audio_ms, frames_for_ms

logger = logging.getLogger(__name__)


@dataclass
class AudioChunk:
    """A piece of streamed speech: ``pcm`` float32 at 24 kHz for ``frames`` new frames of turn ``turn``."""

    pcm: np.ndarray
    frames: int
    turn: int


@dataclass
class Turn:
    """What one speaker says next."""

    speaker: int
    text: str


@dataclass
class Speech:
    """The result of a generation.

    Attributes:
        audio: all turns concatenated, float32 at 24 kHz.
        codes: Mimi codes ``(32, T)`` of each turn.
        seed / torch_seed: the noise source used (to repeat the run), when it was a seed.
        elapsed_s: wall time of generation and decoding.
        turn_audio: each turn's audio on its own.
    """

    audio: np.ndarray
    codes: list[np.ndarray]
    seed: int | None
    torch_seed: int | None
    elapsed_s: float
    sample_rate: int = SAMPLE_RATE
    turn_audio: list[np.ndarray] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return len(self.audio) / self.sample_rate

    @property
    def real_time_factor(self) -> float:
        """Seconds of compute per second of audio (< 1 is faster than real time)."""
        return self.elapsed_s / self.duration_s if self.duration_s else float("inf")


def random_seed() -> int:
    """A fresh 32-bit seed from the OS, for runs that were given none (it is reported so they can be repeated)."""
    return int.from_bytes(os.urandom(4), "little")


@dataclass(frozen=True)
class NoiseSource:
    """Which random stream a generation draws from (see :class:`FrameSamplers`)."""

    seed: int | None = None
    torch_seed: int | None = None
    key: mx.array | None = None
    generator: TorchCompatibleGenerator | None = None

    def resolve(self) -> "NoiseSource":
        """Fill in a fresh seed when no source was given, so every run can be repeated."""
        if any(v is not None for v in (self.seed, self.torch_seed, self.key, self.generator)):
            return self
        return NoiseSource(seed=random_seed())

    def samplers(self, **draw) -> FrameSamplers:
        if self.generator is not None or self.torch_seed is not None:
            generator = self.generator or TorchCompatibleGenerator(self.torch_seed)
            return FrameSamplers(generator=generator, **draw)
        key = self.key if self.key is not None else mx.random.key(self.seed)
        return FrameSamplers(key=key, **draw)


class Generator:
    """CSM-1B speech generation: holds the model, the Mimi codec and the text tokenizer.

    Args:
        model: the CSM model (:func:`csm.models.load_csm`).
        mimi: the codec (:func:`csm.codec.load_mimi`).
        tokenizer: the Llama-3.2 tokenizer with CSM's template.
        weights_dir: the folder the weights came from, if any.
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, model, mimi, tokenizer: TextTokenizer, *, weights_dir: Path | None = None):
        self.model, self.mimi, self.tokenizer = model, mimi, tokenizer
        #: where the weights were found (named voices are looked up there first)
        self.weights_dir = weights_dir

    # -- context -------------------------------------------------------------------------
    def encode_audio(self, pcm: np.ndarray) -> np.ndarray:
        """Mimi-encode mono 24 kHz PCM to ``(32, T)`` codes."""
        pcm = np.asarray(pcm, dtype=np.float32).reshape(1, 1, -1)
        return np.array(self.mimi.encode(mx.array(pcm)))[0]

    def prepare_context(self, context: Sequence[Segment]) -> list[Segment]:
        """Segments with ``codes`` filled in (audio is encoded once, here)."""
        prepared = []
        for segment in context:
            if segment.codes is None and segment.audio is not None:
                segment = Segment(segment.speaker, segment.text, segment.audio, self.encode_audio(segment.audio))
            prepared.append(segment)
        return prepared

    def fit_context(
        self, context: list[Segment], turn: Turn, max_frames: int, pinned: int = 0
    ) -> tuple[list[Segment], int]:
        """Drop the oldest context until prompt + ``max_frames`` fit the 2048 positions.

        The first ``pinned`` segments (the caller's context, e.g. a voice) go last: generated
        turns are dropped before them. Returns the kept segments and how many are still pinned.
        """
        budget = MAX_SEQ_LEN - max_frames
        own = len(self.tokenizer.encode_turn(turn.speaker, turn.text))
        if own >= budget:
            raise ValueError(
                f"text is too long for the {MAX_SEQ_LEN}-position context: {own} tokens plus up to "
                f"{max_frames} audio frames; split it into sentences or lower max_audio_length_ms"
            )
        context = list(context)
        while context and own + sum(segment_length(self.tokenizer, s) for s in context) >= budget:
            drop = pinned if pinned < len(context) else 0
            pinned -= 1 if drop == 0 and pinned else 0
            dropped = context.pop(drop)
            logger.warning(
                "context too long: dropped the oldest segment (speaker %d, %r)", dropped.speaker, dropped.text[:40]
            )
        return context, pinned

    # -- generation ----------------------------------------------------------------------
    def generate(self, text: str, speaker: int = 0, context: Sequence[Segment] = (), **options) -> np.ndarray:
        """Speak ``text`` as ``speaker``; returns mono float32 PCM at 24 kHz.

        Keyword options are those of :meth:`synthesize` (temperature, topk, seed, torch_seed,
        key, generator, safety, precision, max_audio_length_ms).
        """
        return self.synthesize([Turn(speaker, text)], context, **options).audio

    def generate_batch(
        self, texts: Sequence[str], speaker: int = 0, context: Sequence[Segment] = (), **options
    ) -> list[np.ndarray]:
        """Speak several texts at once (one batched frame loop); returns one waveform per text.

        Prompts of different lengths are left-padded; every row stops at its own end frame
        (or the cap derived from the longest text). Sampling options as for :meth:`generate`;
        rows draw from one noise stream, so a row's tokens differ from a single-text run with
        the same seed (greedy, ``temperature=0``, gives the same tokens).
        """
        opts = _Options.parse(options)
        if not texts:
            raise ValueError("texts is empty: give at least one text")
        history = self.prepare_context(context)
        turns = [Turn(speaker, text) for text in texts]
        max_frames = frames_for_ms(opts.max_audio_length_ms or max(default_max_audio_ms(t) for t in texts))
        prompts = []
        for turn in turns:
            _check_text(turn.text)
            kept, _ = self.fit_context(history, turn, max_frames, len(history))
            prompts.append(build_prompt(self.tokenizer, kept, turn.speaker, turn.text))
        tokens, mask = left_pad(prompts)
        samplers = opts.noise.samplers(**opts.draw)
        rows: list[list[np.ndarray]] = [[] for _ in texts]
        for frame in generate_frames(self.model, tokens, mask, samplers, max_frames=max_frames):
            for row, codes in zip(rows, frame):
                if codes.any():  # rows that have ended come back as all-zero frames
                    row.append(codes)
        return [self._decode(stack_frames(r)) for r in rows]

    def generate_stream(
        self, text: str, speaker: int = 0, context: Sequence[Segment] = (), *, chunk_frames: int = 1, **options
    ) -> Iterator[AudioChunk]:
        """Like :meth:`generate`, yielding audio every ``chunk_frames`` frames (streaming Mimi decode)."""
        yield from self.stream_turns([Turn(speaker, text)], context, chunk_frames=chunk_frames, **options)

    def synthesize(
        self,
        turns: Sequence[Turn],
        context: Sequence[Segment] = (),
        *,
        on_frame: Callable[[int], None] | None = None,
        record_logits: list[mx.array] | None = None,
        **options,
    ) -> Speech:
        """Generate several turns in order; each turn's codes join the context of the next.

        Long text is several turns of one speaker; a conversation alternates speakers. Audio
        is decoded once per turn (one-shot Mimi decode, as the official generator does) and
        the turns are concatenated.

        Args:
            turns: what to say, in order.
            context: segments heard before the first turn (e.g. a voice); kept longest when
                the 2048-position budget forces dropping context.
            on_frame: called with the turn index after every generated frame (progress bars).
            record_logits: if given, every sampled logits array ``(B, V)`` is appended to it.
            **options: temperature (0.9), topk (50), seed / torch_seed / key / generator,
                safety, precision, max_audio_length_ms (default: derived from each turn's text).
        """
        started = time.perf_counter()
        opts = _Options.parse(options)
        frames: list[list[np.ndarray]] = [[] for _ in turns]
        for turn, frame in self._frames(turns, context, opts, record_logits):
            frames[turn].append(frame)
            if on_frame is not None:
                on_frame(turn)
        codes = [stack_frames(f) for f in frames]
        pieces = [self._decode(c) for c in codes]
        audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
        elapsed = time.perf_counter() - started
        return Speech(audio, codes, opts.noise.seed, opts.noise.torch_seed, elapsed, turn_audio=pieces)

    def stream_turns(
        self, turns: Sequence[Turn], context: Sequence[Segment] = (), *, chunk_frames: int = 1, **options
    ) -> Iterator[AudioChunk]:
        """Stream the audio of several turns as it is generated (one decoder state per turn)."""
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        pending: list[AudioChunk] = []

        def decode(turn: int, frames: list[np.ndarray], state) -> None:
            codes = mx.array(np.stack(frames, axis=-1)[None])  # (1, 32, t)
            pcm = np.array(self.mimi.decode_step(codes, state)).reshape(-1)
            pending.append(AudioChunk(pcm, len(frames), turn))

        state, buffer, current = None, [], -1
        for turn, frame in self._frames(turns, context, _Options.parse(options)):
            if turn != current:
                if buffer:
                    decode(current, buffer, state)
                state, buffer, current = self.mimi.make_state(1), [], turn
            buffer.append(frame)
            if len(buffer) == chunk_frames:
                decode(turn, buffer, state)
                buffer = []
            yield from pending
            pending.clear()
        if buffer:
            decode(current, buffer, state)
        yield from pending

    # -- internals -----------------------------------------------------------------------
    def _decode(self, codes: np.ndarray) -> np.ndarray:
        if codes.shape[1] == 0:
            return np.zeros(0, np.float32)
        return np.array(self.mimi.decode(mx.array(codes[None]))).reshape(-1)

    def _frames(
        self, turns: Sequence[Turn], context: Sequence[Segment], opts: "_Options", record: list | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(turn index, codes (32,))`` for every generated frame of every turn."""
        for turn in turns:
            _check_text(turn.text)
        history = self.prepare_context(context)
        pinned = len(history)
        samplers = opts.noise.samplers(record=record, **opts.draw)
        prompt_cache = PromptCache()  # each turn's prompt starts with the last one's: prefill only the rest
        for index, turn in enumerate(turns):
            max_frames = frames_for_ms(opts.max_audio_length_ms or default_max_audio_ms(turn.text))
            history, pinned = self.fit_context(history, turn, max_frames, pinned)
            tokens, mask = build_prompt(self.tokenizer, history, turn.speaker, turn.text)
            frames = []
            for frame in generate_frames(
                self.model, tokens, mask, samplers, max_frames=max_frames, prompt_cache=prompt_cache
            ):
                frames.append(frame[0])
                yield index, frame[0]
            if not frames:
                logger.warning("turn %d ended before its first frame (the model emitted the end frame at once)", index)
            history.append(Segment(turn.speaker, turn.text, codes=stack_frames(frames)))


@dataclass(frozen=True)
class _Options:
    noise: NoiseSource
    draw: dict
    max_audio_length_ms: float | None

    @classmethod
    def parse(cls, options: dict) -> "_Options":
        options = dict(options)
        noise = NoiseSource(
            seed=options.pop("seed", None),
            torch_seed=options.pop("torch_seed", None),
            key=options.pop("key", None),
            generator=options.pop("generator", None),
        ).resolve()
        draw = dict(
            temperature=options.pop("temperature", 0.9),
            topk=options.pop("topk", 50),
            safety=options.pop("safety", False),
            precision=options.pop("precision", "float32"),
        )
        max_ms = options.pop("max_audio_length_ms", None)
        if options:
            raise TypeError(f"unknown generation options: {sorted(options)}")
        if max_ms is not None and frames_for_ms(max_ms) < 1:
            raise ValueError(f"max_audio_length_ms must be at least 80 ms, got {max_ms}")
        check_sampling_args(draw["topk"], draw["temperature"], draw["precision"])
        return cls(noise, draw, max_ms)


def stack_frames(frames: Sequence[np.ndarray]) -> np.ndarray:
    """Per-frame codes ``(32,)`` → ``(32, T)`` (``(32, 0)`` when there are none)."""
    return np.stack(frames, axis=1) if len(frames) else np.zeros((NUM_CODEBOOKS, 0), np.int32)


def _check_text(text: str) -> None:
    if not text or not text.strip():
        raise ValueError("text is empty: give the words to speak")


def left_pad(prompts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Stack prompts ``(S_i, 33)`` into ``(B, max S, 33)``, padding on the left with all-False mask rows."""
    length = max(tokens.shape[0] for tokens, _ in prompts)
    batch_tokens = np.zeros((len(prompts), length, prompts[0][0].shape[1]), np.int32)
    batch_mask = np.zeros(batch_tokens.shape, bool)
    for row, (tokens, mask) in enumerate(prompts):
        batch_tokens[row, length - len(tokens):] = tokens
        batch_mask[row, length - len(mask):] = mask
    return batch_tokens, batch_mask

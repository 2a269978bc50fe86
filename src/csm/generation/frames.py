"""The frame loop: prompt prefill, one CSM frame per step, stop at the all-zero frame.

Host syncs (the only ones in generation): reading frame ``t`` to test it for end-of-audio
and hand it to the caller, done *after* frame ``t+1`` has been built and ``mx.async_eval``'d,
so the device computes the next frame while the host looks at this one. The speculative
frame after the end frame is discarded (one frame of wasted compute). With a torch-compatible
noise stream there is no speculation, so the stream is consumed exactly as the official loop
consumes it.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import mlx.core as mx
import numpy as np

from ..config import FRAME_WIDTH, NUM_CODEBOOKS
from ..models import Sampler
from ..models.frame_step import Draw
from ..prompt import audio_rows
from ..sampling import TorchCompatibleGenerator, sample_topk, split_noise
from ..threads import per_thread


class FrameSamplers:
    """The noise source of one generation, handing out one sampler per frame.

    Exactly one source is used:

    * ``generator``: a TorchCompatibleGenerator — the Exp(1) stream PyTorch's CPU generator
      produces after ``torch.manual_seed(seed)``, consumed in the official order (codebook 0,
      then 1..31, one ``(B, V)`` draw each);
    * ``key``: an MLX PRNG key, split once per frame, so a run repeats bit-exactly on the same
      machine and backend. The compiled frame takes the frame's noise in one draw
      (:meth:`frame_noise`); a Python sampler (:meth:`next_frame`) splits the frame's key again,
      into one key per codebook.

    Args:
        temperature: > 0 divides logits; 0 means greedy (argmax).
        topk: keep the top-k logits (ties at the k-th value are kept, as torch does).
        key / generator: the noise source (exactly one).
        safety: exclude codes 1..31 (the original MLX port's "MIMI safety"); changes the distribution.
        precision: the sampler's arithmetic, see :func:`csm.sampling.sample_topk`.
        record: if given, every logits array the sampler sees is appended to it, in sampling
            order (for ``csm-mlx token-test --logits``).
    """

    def __init__(
        self,
        *,
        temperature: float,
        topk: int,
        key: mx.array | None = None,
        generator: TorchCompatibleGenerator | None = None,
        safety: bool = False,
        precision: str = "float32",
        record: list[mx.array] | None = None,
    ):
        if (key is None) == (generator is None):
            raise ValueError("give exactly one noise source: an MLX key or a TorchCompatibleGenerator")
        self._key, self._generator, self._record = key, generator, record
        #: Whether the next frame may be built before this one is read. Not with a torch-compatible
        #: stream: a frame after the end frame would consume noise the reference never draws,
        #: shifting the stream of a following turn.
        self.speculative = generator is None
        self.draw = Draw(topk=topk, temperature=temperature, safety=safety, precision=precision)
        #: The compiled frame needs the official sampler; recording logits needs a Python sampler.
        self.compiled = record is None

    def frame_noise(self, batch: int, vocab: int, dtype: mx.Dtype) -> mx.array | None:
        """The next frame's ``Exp(1)`` noise, ``(32, batch, vocab)``, or None for greedy draws.

        Drawn in the official order (codebook 0, 1, ..., 31, one ``(batch, vocab)`` draw each)
        from the torch-compatible stream; from an MLX key, one draw for the whole frame.
        """
        if self.draw.greedy:
            return None
        shape = (batch, vocab)
        if self._generator is not None:
            return mx.stack([self._generator.exponential(shape, dtype) for _ in range(NUM_CODEBOOKS)])
        self._key, noise = split_noise(self._key, (NUM_CODEBOOKS, *shape), dtype)
        return noise

    def next_frame(self) -> Sampler:
        """The sampler for the next frame (call once per frame, in order)."""
        draw, record = vars(self.draw), self._record
        if self._generator is not None:
            noise = lambda _codebook: {"generator": self._generator}  # noqa: E731
        else:
            self._key, frame_key = mx.random.split(self._key)
            keys = mx.random.split(frame_key, NUM_CODEBOOKS)
            noise = lambda codebook: {"key": keys[codebook]}  # noqa: E731

        def sampler(logits: mx.array, codebook: int) -> mx.array:
            if record is not None:
                record.append(logits)  # lazy: computed with the frame anyway
            return sample_topk(logits, **noise(codebook), **draw)

        return sampler


def _frame_rows(codes: mx.array) -> tuple[mx.array, mx.array]:
    batch = codes.shape[0]
    # host data: constants of the trace (mx.zeros / mx.ones would be fill kernels at every call)
    text_column = mx.array(np.zeros((batch, 1), np.int32))
    mask = mx.array(np.tile(np.r_[np.ones(NUM_CODEBOOKS, bool), False], (batch, 1)))
    tokens = mx.concatenate([codes.astype(mx.int32), text_column], axis=1)
    return tokens[:, None, :], mask[:, None, :]


_TRACES = SimpleNamespace()  # owns next_frame_rows' per-thread trace (csm.threads.per_thread)


def next_frame_rows(codes: mx.array) -> tuple[mx.array, mx.array]:
    """Feed back generated codes ``(B, 32)`` as one audio row: ``(B, 1, 33)`` tokens and mask.

    Compiled: the text column and the mask are constants of the trace, not arrays the host writes
    every frame (see :func:`csm.sampling.split_noise` for why that matters on CUDA).
    """
    return per_thread(_TRACES, "frame_rows", lambda: mx.compile(_frame_rows))(codes)


class PromptCache:
    """A backbone cache kept across the turns of one generation, with the rows it holds.

    A turn's prompt is the previous turn's prompt, its generated frames, the end frame and the new
    text, so the cache left by the previous turn is usually a prefix of the next prompt: only the
    rows after the longest common prefix are prefilled (after trimming any cached rows beyond it).
    Batch 1 only.
    """

    def __init__(self) -> None:
        self.frames = None  # FrameCache, made on first use
        self.tokens = np.zeros((0, FRAME_WIDTH), np.int32)
        self.mask = np.zeros((0, FRAME_WIDTH), bool)
        #: rows prefilled for each prompt so far (the rest came from the cache)
        self.prefilled: list[int] = []

    def reuse(self, model, tokens: np.ndarray, mask: np.ndarray) -> int:
        """Keep the cached rows that start ``tokens``/``mask`` (``(S, 33)``); return how many.

        At least the prompt's last row is always fed again: its hidden state starts the frame.
        """
        if self.frames is None:
            self.frames = model.make_cache(1)
        limit = min(len(self.tokens), len(tokens) - 1)
        same = (self.tokens[:limit] == tokens[:limit]).all(axis=1) & (self.mask[:limit] == mask[:limit]).all(axis=1)
        common = int(np.argmin(same)) if not same.all() else limit
        self.frames.trim(common)  # 0: empty, and the next prefill sets the row's start again
        self.tokens, self.mask = self.tokens[:common], self.mask[:common]
        self.prefilled.append(len(tokens) - common)
        return common

    def append(self, tokens: np.ndarray, mask: np.ndarray) -> None:
        """Record rows ``(S, 33)`` that were fed into the cache."""
        self.tokens = np.concatenate([self.tokens, tokens])
        self.mask = np.concatenate([self.mask, mask])


def generate_frames(
    model,
    tokens: np.ndarray,
    mask: np.ndarray,
    samplers: FrameSamplers,
    *,
    max_frames: int,
    prompt_cache: PromptCache | None = None,
) -> Iterator[np.ndarray]:
    """Yield the codes of each generated frame, ``(B, 32)`` int32, until every row has ended.

    Args:
        model: a CSM model (``make_cache``, ``generate_frame``, ``compiled_frame``).
        tokens: prompt ``(S, 33)`` or ``(B, S, 33)`` int32 rows.
        mask: the matching bool mask.
        samplers: the noise source state, consumed one frame at a time.
        max_frames: hard cap on generated frames.
        prompt_cache: batch 1: a cache kept from an earlier turn; only the prompt rows it does not
            already hold are prefilled, and it holds this turn's rows afterwards.

    A row ends at its first all-zero frame (not yielded for B=1; for B>1 ended rows are
    yielded as zeros until all rows have ended).
    """
    tokens = tokens if tokens.ndim == 3 else tokens[None]
    mask = mask if mask.ndim == 3 else mask[None]
    batch = tokens.shape[0]
    if prompt_cache is not None and batch == 1:
        kept = prompt_cache.reuse(model, tokens[0], mask[0])
        cache, fed = prompt_cache.frames, []
        prompt_cache.append(tokens[0, kept:], mask[0, kept:])
        tokens, mask = tokens[:, kept:], mask[:, kept:]
    else:
        prompt_cache, cache, fed = None, model.make_cache(batch), None
    ended = np.zeros(batch, dtype=bool)
    # Models without a compiled frame (test doubles, wrappers) run every frame op by op.
    compiled = model.compiled_frame(samplers.draw) if samplers.compiled and hasattr(model, "compiled_frame") else None

    def step(rows: tuple[mx.array, mx.array]) -> mx.array:
        if compiled is None:
            codes = model.generate_frame(*rows, cache, samplers.next_frame())
        else:
            noise = samplers.frame_noise(batch, model.args.audio_vocab_size, compiled.noise_dtype())
            codes = compiled(*rows, cache, noise)
        mx.async_eval(codes)
        return codes

    def feed(codes: mx.array) -> mx.array:
        if fed is not None:
            fed.append(codes)
        return step(next_frame_rows(codes))

    try:
        codes = step((mx.array(tokens), mx.array(mask)))
        for index in range(max_frames):
            more = index + 1 < max_frames
            upcoming = feed(codes) if more and samplers.speculative else None
            frame = np.array(codes)  # the one host read per frame
            ended |= ~frame.any(axis=1)
            if ended.all():
                return
            frame[ended] = 0
            yield frame
            codes = upcoming if upcoming is not None or not more else feed(codes)
    finally:
        if prompt_cache is not None and fed:  # every fed frame was read already: cheap host reads
            tokens, mask = audio_rows(np.stack([np.array(codes)[0] for codes in fed], axis=1))
            prompt_cache.append(tokens[:-1], mask[:-1])  # the frame rows, without audio_rows' end row

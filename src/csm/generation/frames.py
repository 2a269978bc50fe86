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

import mlx.core as mx
import numpy as np

from ..config import NUM_CODEBOOKS
from ..models import Sampler
from ..sampling import TorchCompatibleGenerator, sample_topk


class FrameSamplers:
    """The noise source of one generation, handing out one sampler per frame.

    Exactly one source is used:

    * ``generator``: a TorchCompatibleGenerator — the Exp(1) stream PyTorch's CPU generator
      produces after ``torch.manual_seed(seed)``, consumed in the official order (codebook 0,
      then 1..31, one ``(B, V)`` draw each);
    * ``key``: an MLX PRNG key, split once per frame and then into one key per codebook, so a
      run repeats bit-exactly on the same machine and backend.

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
        self._draw = dict(topk=topk, temperature=temperature, safety=safety, precision=precision)

    def next_frame(self) -> Sampler:
        """The sampler for the next frame (call once per frame, in order)."""
        draw, record = self._draw, self._record
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


def next_frame_rows(codes: mx.array) -> tuple[mx.array, mx.array]:
    """Feed back generated codes ``(B, 32)`` as one audio row: ``(B, 1, 33)`` tokens and mask."""
    batch = codes.shape[0]
    tokens = mx.concatenate([codes.astype(mx.int32), mx.zeros((batch, 1), mx.int32)], axis=1)
    mask = mx.concatenate([mx.ones((batch, NUM_CODEBOOKS), mx.bool_), mx.zeros((batch, 1), mx.bool_)], axis=1)
    return tokens[:, None, :], mask[:, None, :]


def generate_frames(
    model,
    tokens: np.ndarray,
    mask: np.ndarray,
    samplers: FrameSamplers,
    *,
    max_frames: int,
) -> Iterator[np.ndarray]:
    """Yield the codes of each generated frame, ``(B, 32)`` int32, until every row has ended.

    Args:
        model: a CSM model (``make_cache``, ``generate_frame``).
        tokens: prompt ``(S, 33)`` or ``(B, S, 33)`` int32 rows.
        mask: the matching bool mask.
        samplers: the noise source state, consumed one frame at a time.
        max_frames: hard cap on generated frames.

    A row ends at its first all-zero frame (not yielded for B=1; for B>1 ended rows are
    yielded as zeros until all rows have ended).
    """
    tokens = mx.array(tokens if tokens.ndim == 3 else tokens[None])
    mask = mx.array(mask if mask.ndim == 3 else mask[None])
    cache = model.make_cache(tokens.shape[0])
    ended = np.zeros(tokens.shape[0], dtype=bool)

    def step(rows: tuple[mx.array, mx.array]) -> mx.array:
        codes = model.generate_frame(*rows, cache, samplers.next_frame())
        mx.async_eval(codes)
        return codes

    codes = step((tokens, mask))
    for index in range(max_frames):
        more = index + 1 < max_frames
        upcoming = step(next_frame_rows(codes)) if more and samplers.speculative else None
        frame = np.array(codes)  # the one host read per frame
        ended |= ~frame.any(axis=1)
        if ended.all():
            return
        frame[ended] = 0
        yield frame
        codes = upcoming if upcoming is not None or not more else step(next_frame_rows(codes))

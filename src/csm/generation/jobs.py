"""What callers of the engine hold: a :class:`Request` to speak and the :class:`Job` it becomes.

A job is thread-safe: the engine's thread fills it (audio chunks, codes, the end), any other
thread streams it (:meth:`Job.chunks`), waits for it (:meth:`Job.result`) or cancels it.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..prompt import Segment
from ..sampling import check_sampling_args
from .generator import AudioChunk, Speech, stack_frames
from .text import default_max_audio_ms, frames_for_ms


class QueueFull(RuntimeError):
    """The engine's queue of waiting requests is full; retry later."""


class Cancelled(RuntimeError):
    """The job was cancelled before it finished."""


@dataclass(frozen=True)
class Request:
    """One utterance to speak.

    Attributes:
        text: the words.
        speaker: speaker id of the new turn.
        context: segments heard before (a voice); audio-only segments are Mimi-encoded by the engine.
        temperature / topk: sampling (0 = greedy).
        seed: MLX noise seed (a fresh one is drawn when None, and reported in the result).
        torch_seed: PyTorch-compatible noise instead; such a request runs unbatched (exact tokens).
        max_audio_length_ms: length cap (default: derived from the text, as :meth:`Generator.generate`).
        safety: never sample codes 1-31 (see :func:`csm.sampling.sample_topk`).
    """

    text: str
    speaker: int = 0
    context: Sequence[Segment] = ()
    temperature: float = 0.9
    topk: int = 50
    seed: int | None = None
    torch_seed: int | None = None
    max_audio_length_ms: float | None = None
    safety: bool = False

    @property
    def max_frames(self) -> int:
        return frames_for_ms(self.max_audio_length_ms or default_max_audio_ms(self.text))

    def check(self) -> None:
        """Raise one ValueError for a bad request (nothing is computed)."""
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError("text is empty: give the words to speak")
        if isinstance(self.speaker, bool) or not isinstance(self.speaker, int) or self.speaker < 0:
            raise ValueError(f"speaker must be an integer >= 0, got {self.speaker!r}")
        check_sampling_args(self.topk, self.temperature)
        if self.seed is not None and self.torch_seed is not None:
            raise ValueError("give at most one of seed and torch_seed")
        if self.max_audio_length_ms is not None and frames_for_ms(self.max_audio_length_ms) < 1:
            raise ValueError(f"max_audio_length_ms must be at least 80 ms, got {self.max_audio_length_ms}")


_END = object()


class Job:
    """A submitted request: stream its audio, wait for its result, or cancel it (thread-safe)."""

    _ids = itertools.count(1)

    def __init__(self, request: Request, seed: int | None, wake: threading.Condition):
        self.id = next(Job._ids)
        self.request, self.seed = request, seed
        self.status = "queued"  # -> running -> done | failed | cancelled
        self.error: BaseException | None = None
        self.submitted = time.perf_counter()
        self._wake = wake
        self._chunks: queue.Queue = queue.Queue()
        self._pcm: list[np.ndarray] = []
        self._codes: list[np.ndarray] = []
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._finished_at: float | None = None
        #: the prompt, when it could be built at submit time (no context audio left to encode)
        self._prompt: tuple[np.ndarray, np.ndarray] | None = None

    # -- consumer side --------------------------------------------------------------------
    def chunks(self, timeout: float | None = None) -> Iterator[AudioChunk]:
        """Audio chunks as they are produced (one per frame); ends when the job ends.

        Raises the job's error if it failed; a cancelled job's stream just stops. ``timeout``
        bounds the wait for each chunk (``queue.Empty`` past it).
        """
        while True:
            item = self._chunks.get(timeout=timeout)
            if item is _END:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def result(self, timeout: float | None = None) -> Speech:
        """Wait for the whole utterance; ``TimeoutError`` past ``timeout`` seconds.

        Raises:
            Cancelled: the job was cancelled.
            Exception: the job's own error (e.g. ValueError for a text too long for the context).
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"job {self.id} did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        if self.status == "cancelled":
            raise Cancelled(f"job {self.id} was cancelled")
        audio = np.concatenate(self._pcm) if self._pcm else np.zeros(0, np.float32)
        codes = [stack_frames(self._codes)] if self.request.torch_seed is None else []
        elapsed = (self._finished_at or time.perf_counter()) - self.submitted
        return Speech(audio, codes, self.seed, self.request.torch_seed, elapsed, turn_audio=[audio])

    def cancel(self) -> None:
        """Stop the job at the next frame boundary (no-op once it has finished)."""
        self._cancel.set()
        with self._wake:
            self._wake.notify_all()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # -- engine side ----------------------------------------------------------------------
    def _emit(self, pcm: np.ndarray, frames: int) -> None:
        self._pcm.append(pcm)
        self._chunks.put(AudioChunk(pcm, frames, 0))

    def _finish(self, status: str, error: BaseException | None = None) -> None:
        if self._done.is_set():
            return
        self.status, self.error = status, error
        self._finished_at = time.perf_counter()
        self._chunks.put(_END)
        self._done.set()

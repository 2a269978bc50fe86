"""Continuous batching: many requests share one frame loop in a fixed number of row slots.

A request joins at the next frame boundary: its prompt but the last row is prefilled alone
(batch 1, backbone only) and its keys/values copied into a free row of the shared cache, ending at
the shared offset (:mod:`.slots`); the last prompt row is the row's input to the next shared step,
which samples its first frame together with the other rows' next frames (so a join costs no
depth-decoder pass of its own). It leaves when its row ends (the all-zero frame), its length cap is
reached or it is cancelled, without stopping the other rows. Each row draws its noise from its
own key, split per frame as a solo run splits it, so a greedy request gives exactly its solo result
whatever shares the batch, and a seeded one matches its solo run up to batched-matmul rounding.

Audio streams out per request: one streaming Mimi decoder state of ``slots`` rows decodes every
row's frame in one batched step (a row restarts its stream when a new request takes the slot;
each row decodes what it decodes alone). Memory is bounded by
``slots`` rows of a ``cache_len``-position cache; when the shared offset reaches the end, every
row is shifted left (compaction). The loop runs in one background thread that owns every MLX
call; ``torch_seed`` requests (PyTorch's noise stream, consumed in the official order) run
unbatched beside the batch, one frame per loop turn, through :meth:`Generator.stream_turns`.

One host read per frame: frame ``t`` is read after frame ``t+1`` has been ``mx.async_eval``'d;
each frame's audio (one batched Mimi decode) is read on the next step, after the next frame is queued.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from ..codec.checks import check_codes
from ..config import MAX_SEQ_LEN, NUM_CODEBOOKS
from ..models import buckets
from ..models.frame_step import Draw
from ..models.fused import device_position
from ..prompt import Segment, build_prompt
from .frames import next_frame_rows
from .generator import AudioChunk, Generator, Speech, Turn, random_seed
from .jobs import Cancelled, Job, QueueFull, Request
from .slots import grouped_sampler, place_prompt, row_noise, shift_rows

logger = logging.getLogger(__name__)


@dataclass
class _Row:
    """An occupied slot."""

    job: Job
    draw: Draw
    limit: int
    frames: int = 0
    fresh: bool = True  # its first frame is being computed: nothing to read yet


@dataclass
class _Audio:
    """One batched Mimi decode in flight: ``pcm`` (slots, 1, frame_size) and who gets which row."""

    pcm: mx.array
    rows: list[tuple[Job, int, bool]]  # (job, slot, its last frame)


@dataclass
class _Solo:
    """The unbatched lane (torch_seed requests)."""

    job: Job
    chunks: Iterator[AudioChunk] = field(repr=False)


class _DeviceCopies:
    """Device copies of small host arrays, each written again only when its contents change.

    The engine's per-row state (starts, idle and decoding rows) changes when rows join, leave or
    move, not every frame; a host-written array costs the kernels that next touch it a page
    migration on CUDA (csm.sampling.split_noise), so a frame reuses the copy it already has.
    """

    def __init__(self) -> None:
        self._made: dict[str, tuple[bytes, mx.array]] = {}

    def __call__(self, name: str, host: np.ndarray) -> mx.array:
        made = self._made.get(name)
        if made is None or made[0] != host.tobytes():
            made = self._made[name] = (host.tobytes(), mx.array(host))
        return made[1]


class Engine:
    """Continuous-batching speech engine around a :class:`Generator`.

    Args:
        generator: the loaded model (``csm.load(...)``); the engine's thread owns it while running,
            so do not call ``generator.generate*`` concurrently.
        slots: rows generated together.
        max_queue: requests waiting for a slot before :meth:`submit` raises :class:`QueueFull`.
        cache_len: backbone positions of the shared cache (rows are compacted to the left when
            the shared offset reaches the end). The default, 4096, holds any request (prompt +
            frames <= 2048); a smaller cache rejects requests longer than it.
    """

    def __init__(self, generator: Generator, *, slots: int = 8, max_queue: int = 64, cache_len: int = 2 * MAX_SEQ_LEN):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if cache_len < 2:
            raise ValueError(f"cache_len must be >= 2, got {cache_len}")
        self.generator, self.slots, self.max_queue, self.cache_len = generator, slots, max_queue, cache_len
        self._model = generator.model
        self._vocab = self._model.args.audio_vocab_size
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._closing = False
        self._abort = False  # close(cancel=True): end every job at the next frame boundary
        self._rows: list[_Row | None] = [None] * slots
        self._solo: _Solo | None = None
        self.frames_generated = 0  # batched frame steps so far
        self.compactions = 0  # times every row was shifted left
        self._thread = threading.Thread(target=self._run, name="csm-engine", daemon=True)
        self._thread.start()

    # -- public ---------------------------------------------------------------------------
    def submit(self, request: Request) -> Job:
        """Queue a request; it joins the batch at the next frame boundary with a free slot.

        Raises:
            ValueError: a bad request (empty text, bad sampling options).
            QueueFull: ``max_queue`` requests are already waiting.
            RuntimeError: the engine is closed.
        """
        request.check()
        seed = request.seed if request.seed is not None or request.torch_seed is not None else random_seed()
        job = Job(request, seed, self._cond)
        if all(s.codes is not None or s.audio is None for s in request.context):
            job._prompt = self._prompt(request, list(request.context))  # bad length: ValueError here
        with self._cond:
            if self._closing:
                raise RuntimeError("the engine is closed")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting (the limit is {self.max_queue})")
            self._pending.append(job)
            self._cond.notify_all()
        return job

    def generate(self, request: Request, timeout: float | None = None) -> Speech:
        """Submit and wait."""
        return self.submit(request).result(timeout)

    def stats(self) -> dict[str, int]:
        """Rows in use, requests waiting, frame steps so far."""
        with self._cond:
            active = sum(row is not None for row in self._rows) + (self._solo is not None)
            return {"active": active, "queued": len(self._pending), "slots": self.slots,
                    "frames": self.frames_generated}

    def close(self, *, cancel: bool = True, timeout: float | None = 30.0) -> None:
        """Stop accepting requests; cancel (or, with ``cancel=False``, finish) the rest; join the thread."""
        with self._cond:
            self._closing, self._abort = True, cancel
            if cancel:
                for job in self._pending:
                    job._cancel.set()
            self._cond.notify_all()
        self._thread.join(timeout)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the loop -------------------------------------------------------------------------
    def _run(self) -> None:
        model = self._model
        self._cache = model.make_cache(self.slots, self.cache_len)
        self._starts = np.zeros(self.slots, np.int32)  # each active row's first position
        self._on_device = _DeviceCopies()
        self._codes = mx.zeros((self.slots, NUM_CODEBOOKS), mx.int32)
        self._keys = mx.zeros((self.slots, 2), mx.uint32)
        self._mimi = self.generator.mimi.make_state(self.slots)  # row r decodes slot r's audio
        self._audio: _Audio | None = None  # decoding, handed out next step
        self._joining: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # slot -> last prompt row
        try:
            while self._next_turn():
                if self._solo is not None:
                    self._solo_step()
                if any(row is not None for row in self._rows):
                    self._step()
        except BaseException as err:  # a bug in the loop: fail every job rather than hang them
            logger.exception("engine loop failed")
            decoding = [] if self._audio is None else [job for job, _, _ in self._audio.rows]
            running = [r.job for r in self._rows if r is not None] + decoding
            for job in list(self._pending) + running:
                job._finish("failed", err)
        finally:
            with self._cond:
                for job in self._pending:
                    job._finish("cancelled")
                self._pending.clear()
            mx.synchronize()
            mx.clear_streams()  # MLX aborts at exit if a thread's streams outlive it

    def _next_turn(self) -> bool:
        """Admit waiting requests into free slots; block while there is nothing to do."""
        with self._cond:
            while True:
                for job in [j for j in self._pending if j.cancelled]:
                    self._pending.remove(job)
                    job._finish("cancelled")
                busy = any(row is not None for row in self._rows) or self._solo is not None
                if busy or self._pending:
                    break
                if self._closing:
                    return False
                self._cond.wait()
            admitted: list[tuple[int | None, Job]] = []
            free = [i for i, row in enumerate(self._rows) if row is None]
            solo_free = self._solo is None
            for job in list(self._pending):
                if job.request.torch_seed is not None:
                    if solo_free:  # one unbatched job at a time
                        admitted.append((None, job))
                        self._pending.remove(job)
                        solo_free = False
                elif free:
                    admitted.append((free.pop(0), job))
                    self._pending.remove(job)
        for slot, job in admitted:
            try:
                job.status = "running"
                self._admit(slot, job)
            except Exception as err:  # noqa: BLE001 - a bad request fails alone
                logger.info("job %d failed at admission: %s", job.id, err)
                if slot is not None:
                    self._rows[slot] = None
                job._finish("failed", err)
        return True

    def _prompt(self, request: Request, context: list[Segment]) -> tuple[np.ndarray, np.ndarray]:
        """The request's prompt, with context dropped as :meth:`Generator.fit_context` drops it."""
        turn = Turn(request.speaker, request.text)
        kept, _ = self.generator.fit_context(context, turn, request.max_frames, len(context))
        return build_prompt(self.generator.tokenizer, kept, turn.speaker, turn.text)

    def _admit(self, slot: int | None, job: Job) -> None:
        request = job.request
        if slot is None:
            chunks = self.generator.stream_turns(
                [Turn(request.speaker, request.text)], request.context, torch_seed=request.torch_seed,
                temperature=request.temperature, topk=request.topk, safety=request.safety,
                max_audio_length_ms=request.max_audio_length_ms,
            )
            self._solo = _Solo(job, chunks)
            return
        prompt = job._prompt
        if prompt is None:
            prompt = self._prompt(request, self.generator.prepare_context(request.context))
        tokens, mask = (mx.array(a[None]) for a in prompt)
        length = tokens.shape[1]
        if length + request.max_frames + 2 > self.cache_len:
            raise ValueError(
                f"prompt ({length} rows) + {request.max_frames} frames do not fit the engine's "
                f"{self.cache_len}-position cache"
            )
        draw = Draw(topk=int(request.topk), temperature=float(request.temperature), safety=bool(request.safety))
        # All prompt rows but the last go in alone (batch 1, backbone only); the last one is this
        # row's input to the next shared step, which samples the first frame with the others.
        self._make_room(length - 1)
        if length > 1:
            # Room for the padded rows of a bucketed prefill (csm.models.buckets): a few cache shapes.
            solo = self._model.make_cache(1, buckets.padded_rows(length - 1, self.cache_len))
            self._model.forward_backbone(tokens[:, :-1], mask[:, :-1], solo)
            place_prompt(self._cache.backbone, solo.backbone, slot, length - 1)
        self._starts[slot] = self._cache.offset - (length - 1)
        self._keys[slot] = mx.random.key(job.seed)
        self._joining[slot] = (prompt[0][-1], prompt[1][-1])
        self._rows[slot] = _Row(job, draw, request.max_frames)
        logger.debug("job %d joined slot %d (%d prompt rows)", job.id, slot, length)

    def _active(self) -> list[int]:
        return [i for i, row in enumerate(self._rows) if row is not None]

    def _make_room(self, length: int) -> None:
        """Before a ``length``-row prompt joins: an empty batch restarts at 0; the offset must be >= length."""
        backbone, active = self._cache.backbone, self._active()
        if not active:
            shift_rows(backbone, self._cache.offset, -self._cache.offset)
        offset = self._cache.offset
        if offset < length:
            low = min((int(self._starts[i]) for i in active), default=offset)
            shift_rows(backbone, low, length - offset)
            self._starts[active] += length - offset

    def _compact(self) -> None:
        """Shift every row left so that the oldest row starts at 0 (the offset reached the end)."""
        active = self._active()
        low = min(int(self._starts[i]) for i in active)
        if self._cache.offset - low + 1 > self.cache_len:
            raise RuntimeError("the engine cache is full even after compaction")
        shift_rows(self._cache.backbone, low, -low)
        self._starts[active] -= low
        self.compactions += 1
        logger.debug("compacted the engine cache by %d positions", low)

    def _step(self) -> None:
        """One batched frame: build frame t+1, read frame t, hand each row its audio."""
        cache, active = self._cache, self._active()
        if cache.offset + 1 > self.cache_len:
            self._compact()
        cache.start = self._row_starts()
        common = Counter(self._rows[i].draw for i in active).most_common(1)[0][0]
        draws = [common if row is None else row.draw for row in self._rows]
        self._keys, noise = row_noise(self._keys, self._vocab)
        codes = self._codes
        upcoming = self._frame(self._inputs(codes), draws, noise)
        mx.async_eval(upcoming, self._keys)
        self._emit_audio()  # the previous frame's audio, decoded while this frame was being built
        frame = np.array(codes)  # the one host read per frame
        self._codes = upcoming
        self.frames_generated += 1
        self._deliver(frame, codes, active)
        if not self._active():
            self._emit_audio()  # nothing left to overlap with

    def _row_starts(self) -> mx.array:
        """Each row's first position for the next step, (slots,) int32: an idle row's is the
        offset, so it attends to itself only.

        The host writes these arrays only when rows join, leave or move; the offset, which moves
        every frame, is made on the device (host-written arrays cost the kernels that next touch
        them a page migration on CUDA: csm.sampling.split_noise).
        """
        idle = np.array([row is None for row in self._rows])
        starts = self._on_device("starts", self._starts)
        if not idle.any():
            return starts
        return mx.where(self._on_device("idle", idle), device_position(self._cache.offset), starts)

    def _frame(self, rows: tuple[mx.array, mx.array], draws: list[Draw], noise: mx.array) -> mx.array:
        """The next frame of every row: the compiled frame when all rows sample alike (the usual case),
        else the op-by-op frame with one sampler per group of settings."""
        if len(set(draws)) > 1 or not hasattr(self._model, "compiled_frame"):
            return self._model.generate_frame(*rows, self._cache, grouped_sampler(draws, noise))
        draw = draws[0]
        compiled = self._model.compiled_frame(draw)
        return compiled(*rows, self._cache, None if draw.temperature == 0 else noise.transpose(1, 0, 2))

    def _inputs(self, codes: mx.array) -> tuple[mx.array, mx.array]:
        """Each row's input to the step: its last frame, or a joining row's last prompt row."""
        tokens, mask = next_frame_rows(codes)
        if not self._joining:
            return tokens, mask
        joining = np.zeros(self.slots, bool)
        last_tokens, last_mask = np.zeros(tokens.shape, np.int32), np.zeros(mask.shape, bool)
        for slot, (row_tokens, row_mask) in self._joining.items():
            joining[slot], last_tokens[slot, 0], last_mask[slot, 0] = True, row_tokens, row_mask
        self._joining = {}
        where = mx.array(joining)[:, None, None]
        return mx.where(where, mx.array(last_tokens), tokens), mx.where(where, mx.array(last_mask), mask)

    def _deliver(self, frame: np.ndarray, codes: mx.array, active: list[int]) -> None:
        """End finished or cancelled rows; start decoding one frame of audio for all other rows at once.

        ``frame`` is ``codes`` (the device array) read on the host.

        The audio is handed out by :meth:`_emit_audio` on the next step, once the frame after
        it has been queued, so the host never waits on the decoder alone.
        """
        mimi, decoded = self.generator.mimi, []
        for slot in active:
            row = self._rows[slot]
            if row.fresh:  # its row of this frame belongs to whoever sat there before
                row.fresh = False
            elif row.job.cancelled or self._abort:
                self._end(slot, "cancelled")
            elif not frame[slot].any():
                self._end(slot, "done")
            else:
                try:  # on the host: the frame is already there
                    check_codes(frame[slot][None, :, None], mimi.num_codebooks, mimi.args.codebook_size)
                except ValueError as err:  # a code Mimi cannot decode
                    self._end(slot, "failed", err)
                    continue
                row.job._codes.append(frame[slot])
                row.frames += 1
                if row.frames == 1:  # a new utterance in this slot: a fresh stream in its Mimi row
                    self._mimi.reset_row(slot)
                last = row.frames >= row.limit
                decoded.append((row.job, slot, last))
                if last:  # the slot is free now; the job ends once its audio is out
                    self._free(slot)
        if decoded:
            # Every row steps (fixed shapes: one compiled trace); rows not decoding get zeros and
            # their streams are restarted before they are next used.
            rows = self._decoding_rows([slot for _, slot, _ in decoded])
            pcm = mimi.decode_step((codes * rows)[:, :, None], self._mimi, check_range=False)
            mx.async_eval(pcm)
            self._audio = _Audio(pcm, decoded)

    def _decoding_rows(self, slots: list[int]) -> mx.array:
        """(slots, 1) int32, 1 for the rows whose frame Mimi decodes this step, else 0, on the device:
        Mimi's input is built there from the frame's codes."""
        rows = np.zeros((self.slots, 1), np.int32)
        rows[slots] = 1
        return self._on_device("decoding", rows)

    def _emit_audio(self) -> None:
        audio, self._audio = self._audio, None
        if audio is None:
            return
        pcm = np.array(audio.pcm)  # one host read for every row
        for job, slot, last in audio.rows:
            job._emit(pcm[slot].reshape(-1), 1)
            if last:
                job._finish("done")

    def _end(self, slot: int, status: str, error: BaseException | None = None) -> None:
        job = self._free(slot)
        job._finish(status, error)
        logger.debug("job %d left slot %d: %s", job.id, slot, status)

    def _free(self, slot: int) -> Job:
        job = self._rows[slot].job
        with self._cond:
            self._rows[slot] = None
        return job

    def _solo_step(self) -> None:
        solo = self._solo
        try:
            if solo.job.cancelled or self._abort:
                solo.chunks.close()
                status, error = "cancelled", None
            else:
                chunk = next(solo.chunks)
                solo.job._emit(chunk.pcm, chunk.frames)
                return
        except StopIteration:
            status, error = "done", None
        except Exception as err:  # noqa: BLE001
            status, error = "failed", err
        with self._cond:
            self._solo = None
        solo.job._finish(status, error)


__all__ = ["Cancelled", "Engine", "Job", "QueueFull", "Request"]

"""csm.generation.frames.generate_frames: when rows end, what comes back (a scripted stand-in model).

The model contract of ``generate_frames`` is ``make_cache(batch)`` and
``generate_frame(tokens, mask, cache, sampler) -> (B, 32) int32``; the stand-in plays a fixed
script of frames so that the end frames fall where the test wants them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from csm.generation.frames import FrameSamplers, generate_frames, next_frame_rows
from csm.sampling import TorchCompatibleGenerator


class ScriptedModel:
    """Returns ``script[n]`` (B, 32) on the n-th frame; non-zero frames after the script."""

    def __init__(self, script: list[np.ndarray]):
        self.script, self.calls = script, 0

    def make_cache(self, batch_size: int) -> list:
        return []

    def generate_frame(self, tokens, mask, cache, sampler) -> mx.array:
        batch = tokens.shape[0]
        frame = self.script[self.calls] if self.calls < len(self.script) else np.full((batch, 32), 7)
        self.calls += 1
        return mx.array(frame.astype(np.int32))


def frame(*rows: int) -> np.ndarray:
    """One frame whose row r holds code rows[r] everywhere (0 = the end frame)."""
    return np.repeat(np.array(rows)[:, None], 32, axis=1)


def samplers(kind: str) -> FrameSamplers:
    noise = {"key": mx.random.key(0)} if kind == "key" else {"generator": TorchCompatibleGenerator(0)}
    return FrameSamplers(temperature=0.9, topk=50, **noise)


PROMPT = np.zeros((2, 3, 33), np.int32), np.ones((2, 3, 33), bool)


@pytest.mark.parametrize("kind", ["key", "generator"])  # speculative and exact-stream loops
def test_ended_batch_rows_come_back_as_zeros(kind):
    # row 0 ends on frame 2 and the model keeps producing codes for it; row 1 ends on frame 4
    script = [frame(1, 2), frame(3, 4), frame(0, 5), frame(6, 8), frame(9, 0)]
    got = list(generate_frames(ScriptedModel(script), *PROMPT, samplers(kind), max_frames=10))
    expected = [frame(1, 2), frame(3, 4), frame(0, 5), frame(0, 8)]  # frame 4: every row has ended
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == (2, 32)
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("kind", ["key", "generator"])
def test_single_row_stops_at_the_end_frame_and_the_cap(kind):
    tokens, mask = PROMPT[0][:1], PROMPT[1][:1]
    ends = [frame(1), frame(2), frame(0), frame(3)]
    got = list(generate_frames(ScriptedModel(ends), tokens, mask, samplers(kind), max_frames=10))
    np.testing.assert_array_equal(np.concatenate(got), np.concatenate([frame(1), frame(2)]))  # end frame not yielded
    capped = list(generate_frames(ScriptedModel([frame(4)] * 10), tokens[0], mask[0], samplers(kind), max_frames=3))
    assert len(capped) == 3 and all((c == 4).all() for c in capped)


def test_next_frame_rows_feeds_the_codes_back_as_an_audio_row():
    """(B, 32) codes -> (B, 1, 33) tokens (the codes, then the text column's 0) and mask (audio only)."""
    codes = mx.array(np.arange(64).reshape(2, 32) + 5, dtype=mx.uint32)
    for _ in range(2):  # the second call replays the compiled trace
        tokens, mask = next_frame_rows(codes)
        assert tokens.dtype == mx.int32 and tokens.shape == (2, 1, 33) and mask.shape == (2, 1, 33)
        np.testing.assert_array_equal(np.array(tokens)[:, 0], np.c_[np.array(codes), np.zeros(2)])
        np.testing.assert_array_equal(np.array(mask)[:, 0], np.tile(np.r_[np.ones(32, bool), False], (2, 1)))
        codes = codes + 1


SRC = Path(__file__).resolve().parents[1] / "src"
WORKER_DRAWS = """
import threading
import mlx.core as mx
from csm.generation.frames import next_frame_rows
from csm.sampling import split_noise


def frames():
    key = mx.random.key(0)
    for _ in range(3):
        key, noise = split_noise(key, (32, 1, 64))
        mx.eval(noise, next_frame_rows(mx.zeros((1, 32), mx.int32)))


worker = threading.Thread(target=frames)
worker.start()
worker.join()
"""


def test_a_worker_threads_compiled_draws_let_the_process_exit_cleanly():
    """The per-frame traces (noise, feedback rows) belong to the thread that ran them: shared
    across threads, a finished worker's traces made the process abort at exit (18 of 20 runs)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", WORKER_DRAWS], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]

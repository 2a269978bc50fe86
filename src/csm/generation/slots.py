"""Row slots in one shared backbone KV cache: place a prefilled prompt, shift rows, draw per-row noise.

The engine's cache has one offset shared by every row; row ``r`` occupies positions
``[start[r], offset)``. A joining request is prefilled alone (batch 1) and its keys/values copied
into its row so that they end at the shared offset. Keys are RoPE'd by position *relative to the
row's start*, so they are identical wherever they sit, and moving every row by the same amount
(:func:`shift_rows`) changes nothing a row computes. Each row draws its own noise
(:func:`row_noise`) and samples with its own temperature / top-k (:func:`grouped_sampler`).
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from ..config import NUM_CODEBOOKS
from ..models import Sampler
from ..models.cache import KVCache
from ..models.frame_step import Draw
from ..sampling import sample_topk, split_row_noise


def place_prompt(shared: Sequence[KVCache], solo: Sequence[KVCache], row: int, length: int) -> None:
    """Copy the first ``length`` positions of a batch-1 cache into ``row``, ending at the shared offset."""
    for target, source in zip(shared, solo, strict=True):
        target.place(row, source, length)


def shift_rows(caches: Sequence[KVCache], low: int, delta: int) -> None:
    """Move positions ``[low, offset)`` of every row by ``delta`` (negative: compact to the left)."""
    for cache in caches:
        cache.shift(low, delta)


def row_noise(keys: mx.array, vocab: int) -> tuple[mx.array, mx.array]:
    """Per-row frame noise from per-row keys ``(B, 2)``: next keys ``(B, 2)`` and noise ``(B, 32, vocab)``.

    Row ``r``'s noise depends on ``keys[r]`` only, and equals what a solo run seeded with the same
    key draws (:func:`csm.sampling.split_row_noise`; checked bit for bit in the tests).
    """
    # one frame of one row, as csm.generation.frames.FrameSamplers draws it for a batch of 1
    keys, noise = split_row_noise(keys, (NUM_CODEBOOKS, 1, vocab))
    return keys, noise[:, :, 0, :]


def grouped_sampler(draws: Sequence[Draw], noise: mx.array) -> Sampler:
    """A sampler for rows with their own temperature / top-k: one :func:`sample_topk` per distinct setting.

    Args:
        draws: one setting per row.
        noise: ``(B, 32, V)`` Exp(1) noise, row ``r`` codebook ``c`` at ``noise[r, c]``.
    """
    groups: dict[Draw, list[int]] = {}
    for row, draw in enumerate(draws):
        groups.setdefault(draw, []).append(row)

    def draw_rows(logits: mx.array, codebook: int, draw: Draw, rows: mx.array | None) -> mx.array:
        if rows is not None:
            logits = logits[rows]
        q = None
        if draw.temperature > 0:
            q = noise[:, codebook] if rows is None else noise[rows, codebook]
        return sample_topk(logits, draw.topk, draw.temperature, noise=q, safety=draw.safety)

    if len(groups) == 1:
        (only,) = groups
        return lambda logits, codebook: draw_rows(logits, codebook, only, None)
    order = [row for rows in groups.values() for row in rows]
    inverse = mx.array(np.argsort(order).astype(np.int32))
    indices = [(draw, mx.array(np.array(rows, np.int32))) for draw, rows in groups.items()]

    def sampler(logits: mx.array, codebook: int) -> mx.array:
        parts = [draw_rows(logits, codebook, draw, rows) for draw, rows in indices]
        return mx.concatenate(parts)[inverse]

    return sampler
